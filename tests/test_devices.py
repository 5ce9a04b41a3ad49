"""Device placement: one training step of every backbone, alone and inside CausalMER, on the meta device
(any CPU) and on CUDA (tests marked `cuda`, skipped without a GPU).

The meta device holds shapes and dtypes but no data, and refuses to mix its tensors with CPU tensors.
A forward, loss, backward and optimiser step that runs on meta therefore creates no tensor on the CPU
by default, calls no `.cpu()` or `.item()`, and reuses no cached tensor of another device: the
mistakes that would otherwise only show on a GPU. Meta tensors also take the non-CPU branches of the
code, the ones a CUDA run executes.
"""
import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.data.layout import get_spec, output_dim
from src.models import BACKBONES
from src.run.build import build_model, make_optimizer
from src.run.config import load_config
from src.eval.evaluate import autocast, to_device, unwrap

from src.models.engine import ENGINES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
META, CUDA = torch.device("meta"), torch.device("cuda")
# Every check runs with each engine (src/models/engine.py); the CUDA equality test compares each
# engine but the reference-shaped "plain" one with it.
FAST_ENGINES = tuple(engine for engine in ENGINES if engine != "plain")
MODELS = ("backbone", "causalmer")
# layout -> (dataset, aligned, (L_t, L_a, L_v)): short sequences; unaligned ones of unequal lengths
LAYOUTS = {"aligned": ("iemocap", True, (6, 6, 6)), "unaligned": ("mosei_senti", False, (5, 9, 7))}
BATCH = 3


def tiny_config(backbone: str, model: str, layout: str, engine=None, no_dropout: bool = False) -> dict:
    """The trainer's config for this backbone and dataset (configs/), one layer deep."""
    dataset, aligned, _ = LAYOUTS[layout]
    cfg = load_config(dataset, backbone=backbone, model_name=model)
    cfg["data"]["aligned"] = aligned
    params = cfg["model"]["backbone_params"]
    for depth in ("layers", "nlevels"):
        if depth in params:
            params[depth] = 1
    if engine is not None:
        params["engine"] = engine
    if no_dropout:
        for key in params:
            if "dropout" in key:
                params[key] = 0.0
        for options in cfg["model"]["branches"].values():
            options["dropout"] = 0.0
    return cfg


def build(cfg: dict, layout: str) -> torch.nn.Module:
    """The model as src.run.build.make_model builds it (on the CPU; the caller moves it)."""
    spec = get_spec(cfg["dataset"])
    return build_model(cfg, spec.dims, LAYOUTS[layout][2], output_dim(cfg["data"]["task"]))


def make_batch(cfg: dict, layout: str, seed: int = 0) -> dict:
    """A random CPU batch in the data pipeline's layout (what Dataset.get_batch returns)."""
    generator = torch.Generator().manual_seed(seed)
    spec = get_spec(cfg["dataset"])
    batch = {m: torch.randn(BATCH, length, dim, generator=generator)
             for m, length, dim in zip(("text", "audio", "vision"), LAYOUTS[layout][2], spec.dims)}
    task = cfg["data"]["task"]
    if task == "binary":
        batch["target"] = torch.randint(0, 2, (BATCH, 4), generator=generator)
    elif task == "cls":
        batch["target"] = torch.randint(0, 7, (BATCH,), generator=generator)
    else:
        batch["target"] = torch.randn(BATCH, generator=generator)
    return batch


def training_step(model, optimizer, batch: dict, tcfg: dict, device: torch.device, amp: bool = False):
    """One optimiser step as src/train/loop.py's train_epoch takes it (accumulate 1): the batch moved
    to the device, forward and loss under the --amp autocast, backward, the config's clipping, Adam.
    Returns (detached loss, outputs)."""
    batch = to_device(batch, device)
    with autocast(device, amp):
        out = model(batch["text"], batch["audio"], batch["vision"])
        loss = unwrap(model).loss(out, batch["target"])
    loss.backward()
    if tcfg.get("grad_clip_value"):
        torch.nn.utils.clip_grad_value_(model.parameters(), tcfg["grad_clip_value"])
    if tcfg.get("grad_clip_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip_norm"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), out


def output_tensors(out: dict) -> dict:
    return {key: value for key, value in out.items() if torch.is_tensor(value)}


# ----------------------------------------------------------------------------------------- meta device
def test_meta_refuses_a_tensor_made_on_the_cpu():
    """What the meta tests rely on: a CPU tensor (beyond a 0-dim scalar) met by a meta one is an error."""
    x = torch.randn(2, 5, device=META)
    with pytest.raises(RuntimeError):
        x + torch.ones(5)
    with pytest.raises(RuntimeError):
        torch.cat([x, torch.zeros(2, 5)])
    assert (x * torch.tensor(2.0)).device == META  # 0-dim CPU tensors mix with any device, here too


def test_fused_adam_does_not_run_on_meta():
    """Why the meta step uses Adam with fused=False: the fused kernel refuses meta parameters. The CUDA
    tests below run the trainer's fused Adam."""
    model = torch.nn.Linear(3, 2).to(META)
    model(torch.randn(4, 3, device=META)).sum().backward()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    with pytest.raises(RuntimeError, match="fused"):
        optimizer.step()


# Meta kernels are Python reference implementations (about a millisecond an op), so a step takes
# seconds; the unaligned layout, which adds the padded-mask paths, is marked slow.
META_LAYOUTS = ("aligned", pytest.param("unaligned", marks=pytest.mark.slow))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", META_LAYOUTS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_training_step_on_meta(backbone, model_name, layout, engine):
    cfg = tiny_config(backbone, model_name, layout, engine)
    torch.manual_seed(0)
    model = build(cfg, layout)
    # A CPU forward first fills every per-shape cache with CPU tensors: a cache that ignored the
    # device would hand them to the meta step below.
    model.eval()
    with torch.no_grad():
        model(*(make_batch(cfg, layout)[m] for m in ("text", "audio", "vision")))
    model.train().to(META)
    optimizer = make_optimizer(model, cfg["train"], fused=False)
    loss, out = training_step(model, optimizer, make_batch(cfg, layout), cfg["train"], META)
    assert loss.device == META and loss.dim() == 0
    assert all(value.device == META for value in output_tensors(out).values())
    assert all(p.device == META for p in model.parameters())
    states = [s for s in optimizer.state.values() if s]
    assert states, "the optimiser stepped no parameter"
    assert all(s["exp_avg"].device == META and s["exp_avg_sq"].device == META for s in states)
    with_grad = [p for p in model.parameters() if p.requires_grad]
    assert len(states) >= len(with_grad) // 2, "fewer than half of the parameters got a gradient"


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("amp", (False, True), ids=("fp32", "bf16"))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_training_step_on_cuda(backbone, model_name, layout, engine, amp):
    """The trainer's step on CUDA with its fused Adam, in fp32 and under the --amp bf16 autocast."""
    cfg = tiny_config(backbone, model_name, layout, engine)
    torch.manual_seed(0)
    model = build(cfg, layout).to(CUDA).train()
    optimizer = make_optimizer(model, cfg["train"])
    assert all(group["fused"] for group in optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        loss, out = training_step(model, optimizer, make_batch(cfg, layout, seed=step), cfg["train"], CUDA, amp)
        assert loss.device.type == "cuda" and torch.isfinite(loss)
        logits = out["logits_m"]
        assert logits.device.type == "cuda"
        assert logits.dtype == (torch.bfloat16 if amp else torch.float32)
    torch.cuda.synchronize()
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert changed >= len(before) // 2, f"only {changed} of {len(before)} parameters changed"


def forward_backward(model, batch: dict, device: torch.device):
    """Outputs and every parameter's gradient of one forward + loss + backward (no optimiser step)."""
    model.zero_grad(set_to_none=True)
    batch = to_device(batch, device)
    out = model(batch["text"], batch["audio"], batch["vision"])
    unwrap(model).loss(out, batch["target"]).backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float().cpu() for k, v in output_tensors(out).items()}, grads


def assert_same(reference: tuple, other: tuple) -> None:
    (out_a, grads_a), (out_b, grads_b) = reference, other
    assert set(out_a) == set(out_b) and set(grads_a) == set(grads_b)
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"gradient of {name}: {m}")


@pytest.fixture
def exact_fp32(monkeypatch):
    """fp32 matrix products and convolutions without TF32 rounding, so CUDA can be compared exactly."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cuda_equals_cpu(backbone, model_name, layout, engine, exact_fp32):
    """Eval outputs, and train-mode outputs and gradients with dropout 0, are the CPU's on CUDA."""
    cfg = tiny_config(backbone, model_name, layout, engine, no_dropout=True)
    torch.manual_seed(0)
    on_cpu = build(cfg, layout)
    on_cuda = copy.deepcopy(on_cpu).to(CUDA)
    batch = make_batch(cfg, layout)
    for train in (False, True):
        on_cpu.train(train)
        on_cuda.train(train)
        assert_same(forward_backward(on_cpu, batch, torch.device("cpu")), forward_backward(on_cuda, batch, CUDA))


@pytest.mark.cuda
@pytest.mark.parametrize("engine", FAST_ENGINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_engine_equals_plain_on_cuda(backbone, model_name, layout, engine, exact_fp32):
    """Each speed engine against the plain one on CUDA: eval outputs, train-mode outputs and gradients
    (dropout 0), with the plain model's weights loaded into the engine's (one checkpoint layout)."""
    plain = build(tiny_config(backbone, model_name, layout, "plain", no_dropout=True), layout).to(CUDA)
    cfg = tiny_config(backbone, model_name, layout, engine, no_dropout=True)
    fast = build(cfg, layout).to(CUDA)
    fast.load_state_dict(plain.state_dict())
    batch = make_batch(cfg, layout)
    for train in (False, True):
        plain.train(train)
        fast.train(train)
        assert_same(forward_backward(plain, batch, CUDA), forward_backward(fast, batch, CUDA))


# The DDP start a CUDA run under torchrun makes: src.run.distributed.setup joins an NCCL group.
NCCL_CHECK = textwrap.dedent("""
    import os
    import torch
    import torch.distributed as dist
    from src.run import distributed

    ctx = distributed.setup("cuda")
    world = int(os.environ["WORLD_SIZE"])
    assert ctx.device.type == "cuda" and ctx.device.index in (None, int(os.environ["LOCAL_RANK"])), ctx.device
    if world == 1:
        # One GPU: setup leaves a single process out of any group; join one of size 1 with the
        # backend setup would choose, to prove NCCL starts.
        assert not ctx.distributed
        dist.init_process_group(distributed.backend_for(ctx.device), rank=0, world_size=1)
        ctx = distributed.Context(ctx.device, 0, 1)
    assert dist.get_backend() == "nccl", dist.get_backend()
    value = torch.full((1,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(value)
    assert value.item() == world * (world + 1) / 2, value
    gathered = [None] * world
    dist.all_gather_object(gathered, ctx.rank)
    assert gathered == list(range(world)), gathered
    dist.barrier()
    dist.destroy_process_group()
    print("nccl ok", ctx.rank)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.cuda
def test_ddp_nccl_start(tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_CHECK)
    gpus = min(torch.cuda.device_count(), 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if gpus >= 2:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                   f"--master_port={free_port()}", str(script)]
    else:
        command = [sys.executable, str(script)]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("nccl ok") == gpus
