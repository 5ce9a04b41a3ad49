"""Training speed, evaluation throughput and peak memory of the models as they train, plus the data path.

What one model row measures, on random inputs of a data layout's shape, for a model built from the
project's configs by `src.run.build.build_model` (so what is measured is what trains):

- training step: the trainer's own `src.train.loop.train_step` (forward, loss, backward, gradient
  clipping as the config sets it, optimiser step) with the trainer's Adam and parameter groups;
- evaluation: samples per second of eval-mode, no-grad forward + loss;
- peak memory: the subprocess's peak resident memory (ru_maxrss) after training and after evaluation,
  and on a GPU also torch.cuda.max_memory_allocated for each phase.

Every row runs in its own subprocess (in --quick mode one subprocess per group), so the peak memory of
one row can't leak into another. Times are the median of the timed repeats after warm-up steps; a row
stops repeating once it has its minimum count and has used its time budget, and records how many it did.

Groups (`--only` picks some; the default runs all, in this order):

    reference  MulT on IEMOCAP, aligned b32 and unaligned b8, against the reference implementation,
               once per engine (src/models/engine.py: plain modules, and the fast engine)
    published  the method's published configuration (ALBERT-base text, ResNet-18 audio and vision)
               against the default CausalMER of configs/iemocap.yaml
    layouts    each data layout (IEMOCAP, MOSEI, MOSI; aligned and unaligned): the MulT backbone alone
               and CausalMER with pool, transformer and resnet18 branches
    pmr        PMR alone and CausalMER-wrapped, MOSEI aligned and unaligned
    data       a >= 2 GB synthetic pickle: conversion to the float32 cache (time, peak memory), and
               training memory from the memory-mapped cache against the same on a small file
    compile    MulT alone on IEMOCAP, aligned b32 and unaligned b8, eager and torch.compiled (the
               first calls, which compile, are timed apart from the steps)
    dmd        DMD alone and CausalMER-wrapped, MOSEI aligned and unaligned (a row whose model fails
               to build is recorded with its error; the rest of the run goes on)

    python benchmarks/speed.py --threads 2                  # full run (about 10 minutes on 2 cores)
    python benchmarks/speed.py --quick                      # tiny sizes, a smoke run in seconds
    python benchmarks/speed.py --only reference,published   # some groups
    python benchmarks/speed.py --device cuda                # on a GPU (the data group stays on the CPU)

Results go to benchmarks/results/speed.json (speed_quick.json with --quick), with machine info and the
load average at the start of every group and row: on a machine shared with other jobs the timings are
noisy, so compare medians and look at the load. `--markdown PATH` also writes the tables as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import GB, fmt, machine_info, peak_rss_gb, utc_now  # noqa: E402  (after the sys.path lines above)
from src.models import BRANCHES  # noqa: E402
from src.modalities import MODALITIES  # noqa: E402

GROUPS = ("reference", "published", "layouts", "pmr", "data", "compile", "dmd")
LAYOUTS = {  # name -> (dataset, aligned); lengths and dims come from src.data.layout (docs/design.md § Data)
    "iemocap_aligned": ("iemocap", True),
    "iemocap_unaligned": ("iemocap", False),
    "mosei_aligned": ("mosei_senti", True),
    "mosei_unaligned": ("mosei_senti", False),
    "mosi_aligned": ("mosi", True),
    "mosi_unaligned": ("mosi", False),
}
# Branch kinds that train from scratch; the published configuration's albert has its own group.
BRANCH_KINDS = tuple(kind for kind in BRANCHES if kind != "albert")

# The reference implementation on this 2-core CPU class, the baselines to beat.
REFERENCE = {
    "mult_iemocap_aligned": {"step_s": 0.24, "batch": 32},
    "mult_iemocap_unaligned": {"step_s": 7.1, "peak_rss_gb": 4.2, "batch": 8},
    # The published CausalMER configuration (pretrained ALBERT-base text branch, ResNet-18 audio and
    # vision branches, MulT backbone) on aligned IEMOCAP: about 2.6 s per batch of 32.
    "published_iemocap_aligned": {"step_s": 2.6, "batch": 32},
}

ALBERT_TINY = dict(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64)

# Full-run measurement policy: warm-up steps, then timed repeats until at least `min` are done and
# either `max` are done or `budget_s` seconds have been spent.
FULL_POLICY = dict(warmup=1, min_repeats=3, max_repeats=7, budget_s=8.0,
                   eval_warmup=1, eval_min_repeats=2, eval_max_repeats=5, eval_budget_s=4.0)
QUICK_POLICY = dict(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0,
                    eval_warmup=1, eval_min_repeats=2, eval_max_repeats=2, eval_budget_s=0.0)
# Rows that cost many seconds per sample (PMR on unaligned MOSEI: its hub has 1050 steps and its
# final encoder 2100) take fewer repeats.
EXPENSIVE = dict(min_repeats=2, max_repeats=2, eval_min_repeats=2, eval_max_repeats=3)

# Unaligned sequences cost about a second per training sample on 2 cores, so unaligned rows use a
# smaller batch than the configs' (the batch used is recorded in each row; per-sample numbers compare).
UNALIGNED_BATCH, UNALIGNED_EVAL_BATCH = 4, 8
# PMR and DMD on MOSEI: (train batch, eval batch) for aligned and unaligned data. Aligned training
# uses the configs' batch; evaluation a smaller batch than the configs' 128 (per-sample throughput
# hardly depends on it on a CPU, and PMR forwards cost about a second per sample).
HUB_BATCHES = {"pmr": {True: (None, 32), False: (1, 2)}, "dmd": {True: (None, 32), False: (UNALIGNED_BATCH, 8)}}

# Data path: synthetic unaligned MOSEI. One sample is (50·300 + 500·74 + 500·35) float64 ≈ 0.56 MB, so
# scale 0.18 (about 4100 samples over the three splits) writes a pickle of about 2.3 GB.
DATA_DATASET = "mosei_senti"
DATA_SCALES = {"large": 0.18, "small": 0.01}
DATA_SCALES_QUICK = {"large": 0.002, "small": 0.0005}
DATA_TRAIN_STEPS = 3
DATA_TRAIN_BATCH = 4
DATA_READ_BATCH = 16  # the config's batch, for a full pass over the training split without a model
LARGE_FILE_MIN_BYTES = 2_000_000_000

REFERENCE_PROCESSES = 3
CHILD_TIMEOUT_S = 900


# ==================================================================================================
# What to measure


def model_row(name, layout, backbone="mult", model="causalmer", branches=None, batch=None, eval_batch=None,
              expensive=False, processes=1, warmup=None, engine=None):
    """A model row: `branches` is one kind for all three modalities, a per-modality dict, or None
    (the dataset config's branches); `batch`/`eval_batch` None means the config's sizes. A full run
    measures the row in `processes` separate processes and keeps the one with the median training
    step; `warmup` overrides the policy's untimed steps; `engine` None means the backbone's default."""
    if isinstance(branches, str):
        branches = {m: {"kind": branches} for m in MODALITIES}
    dataset, aligned = LAYOUTS[layout]
    return dict(name=name, layout=layout, dataset=dataset, aligned=aligned, backbone=backbone, model=model,
                branches=branches, batch=batch, eval_batch=eval_batch, expensive=expensive, processes=processes,
                warmup=warmup, engine=engine)


def layout_batches(layout):
    """(train batch, eval batch) for a layout: the configs' for aligned data, smaller for unaligned."""
    return (None, None) if LAYOUTS[layout][1] else (UNALIGNED_BATCH, UNALIGNED_EVAL_BATCH)


def group_rows(group: str) -> list[dict]:
    if group == "compile":
        return compile_rows()
    if group == "reference":
        # The rows compared with fixed reference figures, once per engine: on the 2-core machine the
        # same step runs at one of two speeds from one process to the next, so each is measured in
        # several processes and the median one is reported.
        from src.models.engine import ENGINES

        aligned = [model_row(f"mult_iemocap_aligned/{engine}", "iemocap_aligned", model="backbone", batch=32,
                             processes=REFERENCE_PROCESSES, warmup=3, engine=engine) for engine in ENGINES]
        unaligned = [model_row(f"mult_iemocap_unaligned/{engine}", "iemocap_unaligned", model="backbone", batch=8,
                               eval_batch=8, processes=REFERENCE_PROCESSES, warmup=2, engine=engine)
                     for engine in ENGINES]
        return aligned + unaligned
    if group == "layouts":
        rows = []
        for layout in LAYOUTS:
            batch, eval_batch = layout_batches(layout)
            rows.append(model_row(f"{layout}/mult", layout, model="backbone", batch=batch, eval_batch=eval_batch))
            for kind in BRANCH_KINDS:
                rows.append(model_row(f"{layout}/causalmer+{kind}", layout, branches=kind, batch=batch,
                                      eval_batch=eval_batch))
        return rows
    if group == "published":
        published = {"text": {"kind": "albert"},  # the branch's default: ALBERT-base, random weights
                     "audio": {"kind": "resnet18"}, "vision": {"kind": "resnet18"}}
        return [model_row("published_iemocap_aligned", "iemocap_aligned", branches=published, batch=32),
                model_row("default_iemocap_aligned", "iemocap_aligned", branches=None, batch=32)]
    if group in ("pmr", "dmd"):
        rows = []
        for layout in ("mosei_aligned", "mosei_unaligned"):
            aligned = LAYOUTS[layout][1]
            batch, eval_batch = HUB_BATCHES[group][aligned]
            for model in ("backbone", "causalmer"):
                label = group if model == "backbone" else f"causalmer+{group}"
                rows.append(model_row(f"{layout}/{label}", layout, backbone=group, model=model, batch=batch,
                                      eval_batch=eval_batch, expensive=group == "pmr" and not aligned))
        return rows
    raise ValueError(f"group {group} has no model rows")


def shrink_for_quick(row: dict) -> dict:
    """Tiny lengths, batches and depths: every code path of the full run, in a fraction of a second."""
    aligned = row["aligned"]
    branches = row["branches"]
    if branches is not None:
        branches = {m: dict(options) for m, options in branches.items()}
        for options in branches.values():
            if options["kind"] == "resnet18":
                options["width"] = 8
            if options["kind"] == "albert":
                options["config"] = ALBERT_TINY
    return dict(row, branches=branches, lengths=(8, 8, 8) if aligned else (8, 16, 20), batch=2, eval_batch=4,
                shrink=True)


# ==================================================================================================
# The child: measurements inside one subprocess


def proc_status_gb() -> dict:
    """Current anonymous and file-backed resident memory (Linux): memory-mapped data pages count as
    file-backed, which the kernel can drop at any time, unlike the anonymous memory a process owns."""
    fields = {"RssAnon": "rss_anon_gb", "RssFile": "rss_file_gb"}
    out = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(":")[0]
                if key in fields:
                    out[fields[key]] = int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return out


class Device:
    """Timing and memory accounting for the chosen device (CUDA work is asynchronous: synchronise)."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        return self.torch.cuda.max_memory_allocated(self.device) / GB if self.cuda else None


def timed(step, device: Device, warmup: int, min_repeats: int, max_repeats: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        step()
    device.sync()
    times, started = [], time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        step()
        device.sync()
        times.append(time.perf_counter() - begin)
    return times


def build_cfg(row: dict) -> dict:
    """The run config the trainer would use for this row (dataset yaml + backbone yaml), adapted."""
    from src.run.config import load_config

    cfg = load_config(row["dataset"], backbone=row["backbone"], model_name=row["model"])
    cfg["data"]["aligned"] = row["aligned"]
    if row["branches"] is not None:
        cfg["model"]["branches"] = row["branches"]
    if row.get("engine") is not None:
        cfg["model"]["backbone_params"]["engine"] = row["engine"]
    if row.get("shrink"):
        cfg["model"]["backbone_params"]["layers"] = 1  # every backbone calls its depth `layers`
        for options in cfg["model"]["branches"].values():
            if options["kind"] == "resnet18":
                options.setdefault("width", 8)
    return cfg


def make_optimizer(torch, model, cfg: dict, kind: str):
    """The trainer's own optimiser ("trainer"), or Adam with another implementation for comparison."""
    from src.run import build

    if kind == "trainer":
        return build.make_optimizer(model, cfg["train"])
    options = {"weight_decay": cfg["train"]["weight_decay"]}
    if kind == "fused":
        options["fused"] = True
    elif kind == "foreach":
        options["foreach"] = True
    elif kind == "loop":
        options["foreach"] = False
    return torch.optim.Adam(build.param_groups(model, cfg["train"]["lr"]), **options)


def random_batch(torch, batch: int, lengths, dims, task: str, device):
    inputs = [torch.randn(batch, length, dim, device=device) for length, dim in zip(lengths, dims)]
    if task == "binary":
        target = torch.randint(0, 2, (batch, 4), device=device)
    elif task == "cls":
        target = torch.randint(0, 7, (batch,), device=device)
    else:
        target = torch.randn(batch, device=device)
    return inputs, target


def measure_row(row: dict, settings: dict) -> dict:
    """One model row in this process: its training steps, its evaluation batches and their peaks.

    Every training step is the trainer's own `src.train.loop.train_step` on `run`, the module as
    training runs it: the model itself, or for a variant row (`variant_row`) the model wrapped in
    torch.compile and/or under the bf16 autocast. A variant row also reports compile_s and
    eval_compile_s, the first training step and the first evaluation forward, which compile when the
    model is compiled (eager rows report their first calls too, for comparison); its timed steps
    start after them.
    """
    import torch

    from src.data.layout import get_spec, output_dim
    from src.eval.evaluate import autocast
    from src.models.engine import resolve_engine
    from src.run.build import build_model, compile_model
    from src.train import loop

    device = Device(settings["device"])
    policy = dict(settings["policy"], **(EXPENSIVE if row.get("expensive") and not row.get("shrink") else {}))
    variant = "variant" in row
    amp, compiled = row.get("amp", False), row.get("compile", False)
    backend = QUICK_COMPILE_BACKEND if row.get("shrink") else "inductor"
    cfg = build_cfg(row)
    spec = get_spec(row["dataset"])
    lengths = tuple(row.get("lengths") or spec.seq_lens(row["aligned"]))
    task = cfg["data"]["task"]
    batch = row["batch"] or cfg["train"]["batch_size"]
    eval_batch = row["eval_batch"] or cfg["train"]["eval_batch_size"]
    result = {"loadavg": list(os.getloadavg()), "dataset": row["dataset"], "aligned": row["aligned"],
              "backbone": row["backbone"], "model": row["model"], "lengths": list(lengths), "dims": list(spec.dims),
              "task": task, "batch": batch, "eval_batch": eval_batch, "config_batch": cfg["train"]["batch_size"],
              "config_eval_batch": cfg["train"]["eval_batch_size"],
              # With accumulation the trainer steps Adam every N batches; every timed step here does.
              "config_accumulate": cfg["train"]["accumulate"]}
    if variant:
        result.update(variant=row["variant"], compile=compiled, compile_backend=backend if compiled else None, amp=amp)
    if row["model"] == "causalmer":
        result["branches"] = {m: cfg["model"]["branches"][m]["kind"] for m in MODALITIES}

    torch.manual_seed(0)
    model = build_model(cfg, spec.dims, lengths, output_dim(task)).to(device.device)
    run = compile_model(model, backend=backend) if compiled else model
    optimizer = make_optimizer(torch, model, cfg, settings["optimizer"])
    inputs, target = random_batch(torch, batch, lengths, spec.dims, task, device.device)
    training_batch = {**dict(zip(MODALITIES, inputs)), "target": target}
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["rss_after_build_gb"] = peak_rss_gb()
    result["module"] = type(run).__name__  # what the steps call: OptimizedModule when compiled
    if row["backbone"] in ("mult", "dmd", "pmr") or row.get("engine") is not None:
        result["engine"] = resolve_engine(cfg["model"]["backbone_params"].get("engine", "auto"), device.device)

    def train_step():
        loop.train_step(run, optimizer, training_batch, cfg["train"], device.device, amp=amp)

    run.train()
    device.reset_peak()
    if variant:
        result["compile_s"] = first_call(train_step, device)
    warmup = policy["warmup"] if row.get("warmup") is None or row.get("shrink") else row["warmup"]
    times = timed(train_step, device, warmup, policy["min_repeats"], policy["max_repeats"], policy["budget_s"])
    result.update(training_figures(times, batch, device))

    # The training batch's inputs, gradients and optimizer state stay alive, as they would between a
    # training epoch and its validation pass.
    eval_inputs, eval_target = random_batch(torch, eval_batch, lengths, spec.dims, task, device.device)

    def eval_step():
        with torch.no_grad(), autocast(device.device, amp):
            model.loss(run(*eval_inputs), eval_target)

    run.eval()
    device.reset_peak()
    if variant:
        result["eval_compile_s"] = first_call(eval_step, device)
    times = timed(eval_step, device, policy["eval_warmup"], policy["eval_min_repeats"],
                  policy["eval_max_repeats"], policy["eval_budget_s"])
    result.update(evaluation_figures(times, eval_batch, device))
    return result


def first_call(step, device: Device) -> float:
    """Seconds of one call of `step`, finished on the device (a compiled model's first call compiles)."""
    begin = time.perf_counter()
    step()
    device.sync()
    return time.perf_counter() - begin


def child_rows(payload: dict) -> dict:
    import torch

    torch.set_num_threads(payload["settings"]["threads"])
    results = {}
    for row in payload["rows"]:
        try:
            results[row["name"]] = measure_row(row, payload["settings"])
        except Exception as error:  # a row that can't build or run is recorded, the others still run
            results[row["name"]] = {"error": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc(limit=6)}
    return results


def child_data_write(payload: dict) -> dict:
    from src.data.synthetic import write_synthetic

    started = time.perf_counter()
    path = write_synthetic(payload["dir"], DATA_DATASET, aligned=False, scale=payload["scale"])
    return {"seconds": time.perf_counter() - started, "file": path.name, "file_gb": path.stat().st_size / GB,
            "peak_rss_gb": peak_rss_gb()}


def child_data_convert(payload: dict) -> dict:
    from src.data import data_file, load_splits
    from src.data.cache import MANIFEST_NAME, cache_locations

    started = time.perf_counter()
    splits = load_splits(payload["dir"], DATA_DATASET, aligned=False)  # no cache yet: converts the pickle
    seconds = time.perf_counter() - started
    written = [d for d in cache_locations(data_file(payload["dir"], DATA_DATASET, aligned=False))
               if (d / MANIFEST_NAME).is_file()]
    cache_gb = sum(p.stat().st_size for p in written[0].iterdir()) / GB if written else None
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "cache_gb": cache_gb,
            "cache_beside_pickle": bool(written) and written[0].parent == Path(payload["dir"]),
            "samples": sum(len(split) for split in splits.values())}


def child_data_train(payload: dict) -> dict:
    """A few training steps reading batches from the memory-mapped cache, then one pass over the
    whole training split without a model (what an epoch reads)."""
    import torch

    from src.data import load_splits
    from src.run.build import build_model
    from src.run.config import load_config
    from src.train.loop import train_step

    torch.set_num_threads(payload["threads"])
    started = time.perf_counter()
    splits = load_splits(payload["dir"], DATA_DATASET, aligned=False)  # the cache exists: memory-maps it
    open_s = time.perf_counter() - started
    train = splits["train"]
    cfg = load_config(DATA_DATASET)
    cfg["data"]["aligned"] = False
    if payload["quick"]:
        cfg["model"]["backbone_params"]["layers"] = 1
    torch.manual_seed(0)
    model = build_model(cfg, train.dims, train.seq_lens, train.output_dim).train()
    optimizer = make_optimizer(torch, model, cfg, "trainer")
    rss_before = peak_rss_gb()

    times = []
    batches = train.iter_batches(payload["batch"], shuffle=True, generator=torch.Generator().manual_seed(0))
    for _, batch in zip(range(payload["steps"]), batches):
        begin = time.perf_counter()
        train_step(model, optimizer, batch, cfg["train"], torch.device("cpu"))
        times.append(time.perf_counter() - begin)
    result = {"open_cache_s": open_s, "train_samples": len(train), "batch": payload["batch"], "steps": len(times),
              "step_s": statistics.median(times), "rss_after_build_gb": rss_before,
              "train_peak_rss_gb": peak_rss_gb(), **proc_status_gb()}

    # One full pass: every page of the training arrays is read. Mapped pages show up as file-backed
    # resident memory (page cache the kernel can reclaim); what the process itself holds stays small.
    max_anon, count = 0.0, 0
    begin = time.perf_counter()
    for batch in train.iter_batches(DATA_READ_BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)):
        count += len(batch["target"])
        max_anon = max(max_anon, proc_status_gb().get("rss_anon_gb", 0.0))
    read_s = time.perf_counter() - begin
    after = proc_status_gb()
    result.update(epoch_read_s=read_s, epoch_read_samples_per_s=count / read_s, epoch_read_max_rss_anon_gb=max_anon,
                  epoch_read_rss_file_gb=after.get("rss_file_gb"), peak_rss_gb_after_epoch_read=peak_rss_gb())
    return result


def run_child(args) -> None:
    from src.run.runtime import keep_freed_memory

    keep_freed_memory()  # as main.py does before training: measure what trains
    handlers = {"rows": child_rows, "data-write": child_data_write, "data-convert": child_data_convert,
                "data-train": child_data_train}
    payload = json.loads(args.child)
    if payload["task"] == "sequence":
        print(json.dumps([handlers[stage["task"]](stage) for stage in payload["stages"]]))
    else:
        print(json.dumps(handlers[payload["task"]](payload)))


# ==================================================================================================
# Execution variants: torch.compile and bf16 autocast (the compile group here, benchmarks/gpu.py's rows)

# The compiler backend of a --quick run: the benchmark's own code paths at the cost of tracing, not of
# generating and building kernels (a full run uses the trainer's default, inductor).
QUICK_COMPILE_BACKEND = "eager"


def variant_row(name, layout, variant: str, compile=False, amp=False, engine=None, **options) -> dict:
    """A model row run the way `main.py train [--amp] [--compile]` runs it: `compile` wraps the model
    in torch.compile, `amp` trains and evaluates under the bf16 autocast (CUDA only), `engine` is
    passed to the backbone when given."""
    return dict(model_row(name, layout, **options), variant=variant, compile=compile, amp=amp, engine=engine)


def compile_rows() -> list[dict]:
    """Eager and compiled MulT on the reference layouts. A --quick run keeps the aligned pair: tracing
    the unaligned model takes tens of seconds even at its tiny sizes."""
    rows = []
    for layout, batch in (("iemocap_aligned", 32), ("iemocap_unaligned", 8)):
        for compiled in (False, True):
            variant = "compile" if compiled else "eager"
            row = variant_row(f"{layout}/mult/{variant}", layout, variant, compile=compiled, model="backbone",
                              batch=batch, eval_batch=batch)
            row["full_only"] = not LAYOUTS[layout][1]
            rows.append(row)
    return rows


def variant_table(rows: dict) -> list[str]:
    """Variant rows side by side: first-call (compile) times apart from the timed steps."""
    lines = ["| row | batch | first training step s | training step s | ms/sample | first eval s | eval samples/s | "
             "peak RSS GB | CUDA peak GB (train) |", "|---" * 9 + "|"]
    for name, row in rows.items():
        if not ok(row):
            lines.append(f"| {name} | failed: {row['error'][:120]} |" + " |" * 7)
            continue
        lines.append(f"| {name} | {row['batch']} | {fmt(row['compile_s'])} | {fmt(row['train_step_s'], 3)} | "
                     f"{fmt(row['train_ms_per_sample'], 1)} | {fmt(row['eval_compile_s'])} | "
                     f"{fmt(row['eval_samples_per_s'], 1)} | {fmt(row['peak_rss_gb'])} | "
                     f"{fmt(row.get('train_cuda_peak_gb'))} |")
    return lines


# ==================================================================================================
# The parent: subprocesses, tables, JSON


def spawn(payload: dict, args, timeout: float = CHILD_TIMEOUT_S) -> dict:
    """Run one child; a crash, a kill (e.g. out of memory) or a timeout comes back as {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-8:]
        return {"error": f"exit status {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def settings_for(args) -> dict:
    return {"device": args.device, "threads": args.threads, "optimizer": args.optimizer,
            "policy": dict(QUICK_POLICY if args.quick else FULL_POLICY, **policy_overrides(args))}


def policy_overrides(args) -> dict:
    out = {}
    if args.warmup is not None:
        out.update(warmup=args.warmup, eval_warmup=args.warmup)
    if args.repeats is not None:
        out.update(min_repeats=min(args.repeats, 3), max_repeats=args.repeats,
                   eval_min_repeats=min(args.repeats, 3), eval_max_repeats=args.repeats)
    return out


def run_model_group(group: str, args) -> dict:
    rows = group_rows(group)
    if args.quick:
        rows = [shrink_for_quick(row) for row in rows if not row.get("full_only")]
    settings = settings_for(args)
    results = {}
    # A full run gives every row its own process (its own peak memory); --quick shares one per group.
    chunks = [rows] if args.quick else [[row] for row in rows]
    for chunk in chunks:
        processes = 1 if args.quick else chunk[0].get("processes", 1)
        runs = [spawn({"task": "rows", "rows": chunk, "settings": settings}, args) for _ in range(processes)]
        for row in chunk:
            result = median_process([run.get(row["name"], {"error": run.get("error", "no result")}) for run in runs])
            if args.quick:
                result["shared_process"] = True
            results[row["name"]] = result
            print_model_row(group, row["name"], result)
    return results


def median_process(results: list[dict]) -> dict:
    """Of one row measured in several processes, the process with the median training step (the
    lower middle one for an even count), with every process's step time recorded."""
    measured = [r for r in results if ok(r)]
    if not measured:
        return results[0]
    measured.sort(key=lambda r: r["train_step_s"])
    chosen = dict(measured[(len(measured) - 1) // 2])
    if len(results) > 1:
        chosen["train_step_s_per_process"] = [r.get("train_step_s") for r in results]
    return chosen


def run_data_group(args) -> dict:
    scales = DATA_SCALES_QUICK if args.quick else DATA_SCALES
    root = Path(tempfile.mkdtemp(prefix="causalmer-speed-data-", dir=args.tmp_dir))
    out = {"dataset": DATA_DATASET, "aligned": False, "tmp_dir": str(root)}
    try:
        for label, scale in scales.items():
            folder = str(root / label)
            stages = {"write": {"task": "data-write", "dir": folder, "scale": scale},
                      "convert": {"task": "data-convert", "dir": folder},
                      "train": {"task": "data-train", "dir": folder, "threads": args.threads, "quick": args.quick,
                                "steps": 2 if args.quick else DATA_TRAIN_STEPS,
                                "batch": 1 if args.quick else DATA_TRAIN_BATCH}}
            if args.quick:
                # One process for the three stages: a smoke run needs the code paths, not the peaks.
                done = spawn({"task": "sequence", "stages": list(stages.values())}, args)
                measured = dict(zip(stages, done)) if isinstance(done, list) else dict.fromkeys(stages, done)
                for stage in measured.values():
                    stage["shared_process"] = True
            else:
                measured = {name: spawn(stage, args) for name, stage in stages.items()}
            out[label] = {"scale": scale, **measured}
            print_data_entry(label, out[label])
    finally:
        # The files are large; never leave them behind, even on an interrupted run.
        shutil.rmtree(root, ignore_errors=True)
    out["deleted"] = not root.exists()
    return out


def summarize(groups: dict, quick: bool, default_engine: str = "fast") -> dict:
    """Comparisons against the reference figures and between rows. The reference rows' entry holds
    every engine's figures; its top level is the default engine's (`default_engine`)."""
    summary = {}
    reference = groups.get("reference", {}).get("rows", {})
    for name in ("mult_iemocap_aligned", "mult_iemocap_unaligned"):
        if quick:
            break
        ref = REFERENCE[name]
        engines = {}
        for row_name, row in reference.items():
            if row_name.startswith(name + "/") and ok(row):
                entry = {"batch": row["batch"], "step_s": row["train_step_s"], "reference_step_s": ref["step_s"],
                         "speedup": ref["step_s"] / row["train_step_s"]}
                if "peak_rss_gb" in ref:
                    entry.update(peak_rss_gb=row["train_peak_rss_gb"], reference_peak_rss_gb=ref["peak_rss_gb"],
                                 memory_ratio=row["train_peak_rss_gb"] / ref["peak_rss_gb"])
                engines[row_name.split("/", 1)[1]] = entry
        if default_engine not in engines:
            continue
        summary[name] = {**engines[default_engine], "engine": default_engine, "engines": engines}
        if "plain" in engines and "fast" in engines:
            summary[name]["fast_over_plain"] = engines["plain"]["step_s"] / engines["fast"]["step_s"]

    published = groups.get("published", {}).get("rows", {})
    pub, default = published.get("published_iemocap_aligned"), published.get("default_iemocap_aligned")
    if ok(pub) and ok(default):
        per_sample = default["train_step_s"] / default["batch"]
        entry = {"published_s_per_sample": pub["train_step_s"] / pub["batch"], "default_s_per_sample": per_sample,
                 "speedup_vs_published_measured": pub["train_step_s"] / pub["batch"] / per_sample,
                 "eval_speedup_vs_published_measured": default["eval_samples_per_s"] / pub["eval_samples_per_s"],
                 "target_speedup": 5.0}
        if not quick:
            ref = REFERENCE["published_iemocap_aligned"]
            entry["reference_s_per_sample"] = ref["step_s"] / ref["batch"]
            entry["speedup_vs_published_reference"] = entry["reference_s_per_sample"] / per_sample
            entry["published_measured_vs_reference"] = pub["train_step_s"] / ref["step_s"]
        summary["published_vs_default"] = entry

    data = groups.get("data", {}).get("rows", {})
    large, small = data.get("large", {}), data.get("small", {})
    if all(ok(part.get(key)) for part in (large, small) for key in ("write", "convert", "train")):
        summary["data_path"] = {
            "large_file_gb": large["write"]["file_gb"], "small_file_gb": small["write"]["file_gb"],
            "large_file_at_least_2gb": large["write"]["file_gb"] * GB >= LARGE_FILE_MIN_BYTES,
            "convert_s": large["convert"]["seconds"], "convert_peak_rss_gb": large["convert"]["peak_rss_gb"],
            "train_peak_rss_gb_large": large["train"]["train_peak_rss_gb"],
            "train_peak_rss_gb_small": small["train"]["train_peak_rss_gb"],
            "train_peak_ratio_large_over_small": large["train"]["train_peak_rss_gb"] / small["train"]["train_peak_rss_gb"],
        }
    return summary


def training_figures(times: list, batch: int, device) -> dict:
    """A row's training numbers from its timed steps, and the peaks of the training phase."""
    return {"train_step_s": statistics.median(times), "train_step_s_min": min(times), "train_repeats": len(times),
            "train_ms_per_sample": 1e3 * statistics.median(times) / batch,
            "train_peak_rss_gb": peak_rss_gb(), "train_cuda_peak_gb": device.peak_gb()}


def evaluation_figures(times: list, eval_batch: int, device) -> dict:
    """A row's evaluation numbers from its timed batches, and the peaks of the whole row."""
    return {"eval_batch_s": statistics.median(times), "eval_repeats": len(times),
            "eval_samples_per_s": eval_batch / statistics.median(times),
            "peak_rss_gb": peak_rss_gb(), "eval_cuda_peak_gb": device.peak_gb()}


def ok(entry) -> bool:
    return isinstance(entry, dict) and "error" not in entry


# --- printing -------------------------------------------------------------------------------------

HEADER = (f"{'row':44s} {'batch':>5s} {'lengths':>11s} {'step s':>8s} {'ms/smp':>8s} {'eval/s':>8s} "
          f"{'peak GB':>8s} {'params':>10s}")


def print_model_row(group: str, name: str, row: dict) -> None:
    label = f"{group}/{name}" if group != "layouts" else name
    if not ok(row):
        print(f"{label:44s} failed: {row['error'][:200]}", flush=True)
        return
    lengths = "/".join(map(str, row["lengths"]))
    print(f"{label:44s} {row['batch']:5d} {lengths:>11s} {row['train_step_s']:8.3f} {row['train_ms_per_sample']:8.1f} "
          f"{row['eval_samples_per_s']:8.1f} {row['peak_rss_gb']:8.2f} {row['parameters']:10d}", flush=True)


def print_data_entry(label: str, entry: dict) -> None:
    parts = [entry.get(key, {}) for key in ("write", "convert", "train")]
    if not all(ok(part) for part in parts):
        errors = "; ".join(part["error"][:200] for part in parts if not ok(part))
        print(f"data/{label}: failed: {errors}", flush=True)
        return
    write, convert, train = parts
    print(f"data/{label}: {write['file_gb']:.2f} GB pickle written in {write['seconds']:.1f} s | converted in "
          f"{convert['seconds']:.1f} s, peak {convert['peak_rss_gb']:.2f} GB | training from the cache: peak "
          f"{train['train_peak_rss_gb']:.2f} GB (anon {train.get('rss_anon_gb', float('nan')):.2f} GB) | one epoch read "
          f"{train['epoch_read_s']:.1f} s, max anon {train['epoch_read_max_rss_anon_gb']:.2f} GB", flush=True)


def print_summary(summary: dict) -> None:
    if not summary:
        return
    print("\nsummary")
    for name in ("mult_iemocap_aligned", "mult_iemocap_unaligned"):
        if name in summary:
            for engine, entry in summary[name]["engines"].items():
                default = " (default)" if engine == summary[name]["engine"] else ""
                line = (f"  {name} {engine}{default} b{entry['batch']}: {entry['step_s']:.3f} s/step vs reference "
                        f"{entry['reference_step_s']} s -> {entry['speedup']:.2f}x")
                if "memory_ratio" in entry:
                    line += (f"; peak {entry['peak_rss_gb']:.2f} GB vs {entry['reference_peak_rss_gb']} GB "
                             f"-> {entry['memory_ratio']:.2f}x the memory")
                print(line)
            if "fast_over_plain" in summary[name]:
                print(f"  {name}: the fast engine's step is {summary[name]['fast_over_plain']:.2f}x the plain modules' speed")
    if "published_vs_default" in summary:
        entry = summary["published_vs_default"]
        line = (f"  default CausalMER vs published configuration, per training sample: "
                f"{entry['speedup_vs_published_measured']:.1f}x (measured here)")
        if "speedup_vs_published_reference" in entry:
            line += f", {entry['speedup_vs_published_reference']:.1f}x (vs the reference's 2.6 s per 32)"
        print(line)
    if "data_path" in summary:
        entry = summary["data_path"]
        print(f"  data: {entry['large_file_gb']:.2f} GB pickle -> cache in {entry['convert_s']:.1f} s "
              f"(peak {entry['convert_peak_rss_gb']:.2f} GB); training peak {entry['train_peak_rss_gb_large']:.2f} GB "
              f"vs {entry['train_peak_rss_gb_small']:.2f} GB on a {entry['small_file_gb']:.2f} GB file")


# --- markdown -------------------------------------------------------------------------------------


def cell(row) -> str:
    """One model row in a markdown cell: training ms per sample · eval samples/s · peak RSS."""
    if row is None:
        return "-"
    if not ok(row):
        return "failed"
    rate = row["eval_samples_per_s"]
    return (f"{fmt(row['train_ms_per_sample'], 1)} ms · {fmt(rate, 1 if rate < 10 else 0)}/s · "
            f"{fmt(row['peak_rss_gb'])} GB")


def batch_note(row) -> str:
    if not ok(row):
        return "-"
    note = f"b{row['batch']}"
    if row["batch"] != row["config_batch"]:
        note += f" (config {row['config_batch']})"
    return note + f", eval b{row['eval_batch']}"


def pivot_table(rows: dict, layouts, columns) -> list[str]:
    """Layouts down, models across; `columns` maps a heading to the row-name suffix after 'layout/'."""
    lines = ["| layout | lengths | batch | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
    for layout in layouts:
        found = [rows.get(f"{layout}/{suffix}") for suffix in columns.values()]
        first = next((row for row in found if ok(row)), None)
        if first is None and all(row is None for row in found):
            continue
        lengths = "/".join(map(str, first["lengths"])) if first else "-"
        lines.append(f"| {layout} | {lengths} | {batch_note(first) if first else '-'} | "
                     + " | ".join(cell(row) for row in found) + " |")
    return lines


def render_markdown(results: dict) -> str:
    machine = results["machine"]
    groups = results["groups"]
    summary = results.get("summary", {})
    lines = [f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), {machine['threads']} torch threads, "
             f"torch {machine['torch']}, {machine['platform']}, device {machine['device']}.  ",
             f"Command: `{results['command']}` ({results['started_utc']} to {results['finished_utc']}).  ",
             "Load average (1 min) at the start of each group: "
             + ", ".join(f"{g} {fmt(v['loadavg_start'][0])}" for g, v in groups.items()) + ".", ""]
    if any(k in summary for k in ("mult_iemocap_aligned", "mult_iemocap_unaligned")):
        lines += ["| MulT alone, IEMOCAP | engine | batch | s/step | reference s/step | speed-up | peak GB | reference GB "
                  "| memory ratio | fast vs plain |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in ("mult_iemocap_aligned", "mult_iemocap_unaligned"):
            if name in summary:
                for engine, e in summary[name]["engines"].items():
                    label = f"{engine} (default)" if engine == summary[name]["engine"] else engine
                    ratio = f"{fmt(e['memory_ratio'])}x" if "memory_ratio" in e else "-"
                    versus = (f"{fmt(summary[name]['fast_over_plain'])}x"
                              if engine == "fast" and "fast_over_plain" in summary[name] else "-")
                    lines.append(f"| {name.split('_')[-1]} | {label} | {e['batch']} | {fmt(e['step_s'], 3)} | "
                                 f"{e['reference_step_s']} | {fmt(e['speedup'])}x | {fmt(e.get('peak_rss_gb'))} | "
                                 f"{e.get('reference_peak_rss_gb', '-')} | {ratio} | {versus} |")
        lines.append("")
    if "published_vs_default" in summary:
        e = summary["published_vs_default"]
        lines += ["| CausalMER, IEMOCAP aligned, batch 32 | train s/sample | default's per-sample speed-up |",
                  "|---|---|---|",
                  f"| published configuration, measured here (ALBERT-base text, ResNet-18 audio and vision) | "
                  f"{fmt(e['published_s_per_sample'], 4)} | {fmt(e['speedup_vs_published_measured'], 1)}x |"]
        if "reference_s_per_sample" in e:
            lines.append(f"| published configuration, reference figure (2.6 s per batch of 32) | "
                         f"{fmt(e['reference_s_per_sample'], 4)} | {fmt(e['speedup_vs_published_reference'], 1)}x |")
        kinds = sorted(set(groups["published"]["rows"]["default_iemocap_aligned"]["branches"].values()))
        lines += [f"| default (configs/iemocap.yaml: {'/'.join(kinds)} branches) | {fmt(e['default_s_per_sample'], 4)} | - |",
                  ""]
    lines += ["Cells: training ms per sample (forward, backward, clipping, Adam) · evaluation samples/s (eval mode, "
              "no grad) · peak RSS of the row's process.", ""]
    if "layouts" in groups:
        columns = {"MulT alone": "mult", **{f"CausalMER, {kind} branches": f"causalmer+{kind}" for kind in BRANCH_KINDS}}
        lines += pivot_table(groups["layouts"]["rows"], LAYOUTS, columns) + [""]
    if "compile" in groups:
        lines += variant_table(groups["compile"]["rows"]) + [""]
    for backbone in ("pmr", "dmd"):
        if backbone in groups:
            columns = {f"{backbone.upper()} alone": backbone, f"CausalMER + {backbone.upper()}": f"causalmer+{backbone}"}
            lines += pivot_table(groups[backbone]["rows"], ("mosei_aligned", "mosei_unaligned"), columns) + [""]
    if "data_path" in summary:
        e = summary["data_path"]
        data = groups["data"]["rows"]
        large, small = data["large"], data["small"]
        lines += ["| data path (synthetic unaligned MOSEI) | large file | small file |", "|---|---|---|",
                  f"| pickle size | {fmt(e['large_file_gb'])} GB | {fmt(e['small_file_gb'])} GB |",
                  f"| conversion to the float32 cache: time, peak RSS | {fmt(large['convert']['seconds'], 1)} s, "
                  f"{fmt(large['convert']['peak_rss_gb'])} GB | {fmt(small['convert']['seconds'], 1)} s, "
                  f"{fmt(small['convert']['peak_rss_gb'])} GB |",
                  f"| training from the memory-mapped cache ({large['train']['steps']} steps, batch "
                  f"{large['train']['batch']}): peak RSS | {fmt(e['train_peak_rss_gb_large'])} GB | "
                  f"{fmt(e['train_peak_rss_gb_small'])} GB |",
                  f"| reading the whole training split: max anonymous RSS, samples/s | "
                  f"{fmt(large['train']['epoch_read_max_rss_anon_gb'])} GB, {fmt(large['train']['epoch_read_samples_per_s'], 0)} | "
                  f"{fmt(small['train']['epoch_read_max_rss_anon_gb'])} GB, {fmt(small['train']['epoch_read_samples_per_s'], 0)} |",
                  ""]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------


def parse_groups(text):
    if text is None:
        return list(GROUPS)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in GROUPS]
    if unknown or not chosen:
        raise SystemExit(f"--only: unknown group(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(GROUPS)}")
    return [name for name in GROUPS if name in chosen]  # always in the documented order (dmd last)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (seconds)")
    parser.add_argument("--only", help=f"comma-separated groups to run, of: {', '.join(GROUPS)}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default 2; 1 with --quick, where tiny steps on a busy "
                             "machine lose more to waiting for a descheduled second thread than they gain)")
    parser.add_argument("--repeats", type=int, default=None, help="at most this many timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--optimizer", choices=("trainer", "fused", "foreach", "loop"), default="trainer",
                        help="Adam implementation (default: the trainer's, torch's default choice)")
    parser.add_argument("--tmp-dir", default=None, help="where the data group writes its temporary files")
    parser.add_argument("--output", type=Path, default=None, help="results JSON path")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    groups_to_run = parse_groups(args.only)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")

    started = time.time()
    command = " ".join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": machine_info(args.device, threads=args.threads), "command": command, "quick": args.quick, "device": args.device,
               "optimizer": args.optimizer, "started_utc": utc_now(), "reference": REFERENCE,
               "policy": settings_for(args)["policy"], "groups": {}}
    print(f"{'quick run' if args.quick else 'full run'} on {args.device}, {args.threads} threads; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n{HEADER}", flush=True)
    for group in groups_to_run:
        entry = {"loadavg_start": list(os.getloadavg()), "started_utc": utc_now()}
        begin = time.time()
        entry["rows"] = run_data_group(args) if group == "data" else run_model_group(group, args)
        entry["seconds"] = time.time() - begin
        entry["loadavg_end"] = list(os.getloadavg())
        results["groups"][group] = entry

    from src.models.engine import resolve_engine

    results["summary"] = summarize(results["groups"], args.quick, resolve_engine("auto", args.device))
    results["finished_utc"] = utc_now()
    results["wall_s"] = time.time() - started
    print_summary(results["summary"])
    output = args.output or RESULTS / ("speed_quick.json" if args.quick else "speed.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {output} ({results['wall_s']:.0f} s)")
    if args.markdown:
        args.markdown.write_text(render_markdown(results))
        print(f"written {args.markdown}")
    return results


if __name__ == "__main__":
    main()
