"""torch.compile (--compile, train.compile): the compiled model computes what the module does, trains,
and leaves checkpoints with the module's own keys; the command line compiles for training and eval."""
import json

import pytest
import torch

import main
from src.data.layout import get_spec, output_dim
from src.errors import CheckpointError
from src.run import build
from src.run.build import build_model, compile_model, make_optimizer
from src.run.checkpoint import check_same_config
from src.run.config import load_config

TINY = {"d_model": 10, "layers": 1}  # MulT always has 10 heads
LENGTHS = (6, 6, 6)


def tiny_causalmer() -> tuple[torch.nn.Module, dict]:
    cfg = load_config("iemocap")
    cfg["model"]["backbone_params"].update(TINY)
    cfg["model"]["branches"] = {m: {"kind": "pool"} for m in ("text", "audio", "vision")}
    torch.manual_seed(0)
    return build_model(cfg, get_spec("iemocap").dims, LENGTHS, output_dim("binary")), cfg


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = [torch.randn(3, length, dim, generator=generator) for length, dim in zip(LENGTHS, get_spec("iemocap").dims)]
    return x, torch.randint(0, 2, (3, 4), generator=generator)


@pytest.mark.slow
def test_compiled_model_equals_the_module_and_trains():
    """Inductor on the CPU (what --compile runs): eval outputs equal the module's, a training step runs
    and updates the shared parameters, and the module's state_dict keys are the uncompiled ones."""
    model, cfg = tiny_causalmer()
    keys = list(model.state_dict())
    compiled = compile_model(model)
    x, target = inputs()
    model.eval()
    with torch.no_grad():
        expected = model(*x)
        got = compiled(*x)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")

    compiled.train()
    optimizer = make_optimizer(model, cfg["train"])
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.loss(compiled(*x), target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert changed >= len(before) // 2
    assert list(model.state_dict()) == keys
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())  # why checkpoints use `model`


def test_resume_may_switch_compile_but_nothing_else(tmp_path):
    saved = load_config("iemocap")
    requested = load_config("iemocap", overrides=["train.compile=true"])
    assert saved["train"]["compile"] is False and requested["train"]["compile"] is True
    check_same_config(saved, requested, tmp_path / "config.yaml")
    del saved["train"]["compile"]  # a run written before the key existed
    check_same_config(saved, requested, tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match="train.epochs"):
        check_same_config(saved, load_config("iemocap", overrides=["train.compile=true", "train.epochs=3"]),
                          tmp_path / "config.yaml")


def test_compile_key_is_a_bool():
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile"):
        load_config("iemocap", overrides=["train.compile=yes please"])


@pytest.mark.slow
def test_compile_flag_compiles_for_training_and_evaluation(synthetic_data, tmp_path, monkeypatch):
    """--compile through main.py train and eval, with a tracing-only backend (the inductor numerics are
    the slow test's): what it wraps, what the run records, and that checkpoints keep the module's keys."""
    wrapped = []

    def tracing_compile(model):
        wrapped.append(type(model).__name__)
        return build.compile_model(model, backend="eager")

    monkeypatch.setattr("src.train.loop.compile_model", tracing_compile)
    monkeypatch.setattr("src.commands.evaluate.compile_model", tracing_compile)
    data = synthetic_data()
    common = ["--dataset", "iemocap", "--name", "c", "--seed", "1", "--data-dir", str(data),
              "--runs-dir", str(tmp_path), "--device", "cpu"]
    tiny = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
            "--set", "train.batch_size=4", "--epochs", "1"]
    assert main.main(["train", *common, *tiny, "--compile"]) == 0
    assert wrapped == ["CausalMER"]
    run_dir = tmp_path / "iemocap" / "c" / "seed1"
    assert "compile: true" in (run_dir / "config.yaml").read_text()
    state = torch.load(run_dir / "best_acc.pt", weights_only=True)["model"]
    model, _ = tiny_causalmer()
    assert list(state) == list(model.state_dict())

    assert main.main(["eval", *common, "--checkpoint", "best_acc"]) == 0  # the run's train.compile
    assert wrapped == ["CausalMER", "CausalMER"]
    compiled_eval = json.loads((run_dir / "eval_best_acc_test.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())["best_acc"]["test"]
    assert set(compiled_eval["predictions"]) == set(trained["predictions"]) == {"tie", "te", "m"}
    for name, scores in trained["predictions"].items():
        assert compiled_eval["predictions"][name] == pytest.approx(scores, abs=1e-6)
