"""The GPU check: one command for a CUDA machine, in at most eight minutes on one GPU.

    bash benchmarks/gpu_check.sh          # from the checkout; uses the torch (>= 2.4) installed there

It runs, each part within its budget of seconds (time a part leaves unused goes to the next):

    tests  120  the tests marked `cuda` (pytest -m cuda): the training step of every backbone on CUDA in
                fp32 and bf16 with fused Adam, CUDA against the CPU, engines against plain, the NCCL start
    speed  270  the speed benchmark's CUDA rows (benchmarks/speed.py's variant rows): MulT on IEMOCAP
                aligned b32 and unaligned b8, PMR on unaligned MOSEI b8; each engine and torch.compile;
                fp32 and the --amp bf16 autocast; step time, first (compiling) step apart, peak memory
    demo    90  `main.py demo --device cuda --epochs 2` into a temporary directory

and writes benchmarks/results/gpu.json and gpu.md. Nothing is installed: the project's requirements
(numpy, scikit-learn, pyyaml, tqdm) must be there, pytest for the tests part (recorded as skipped
without it), no optional extra. Without a CUDA device it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import speed  # noqa: E402  (benchmarks/speed.py: rows and their measurement)
from common import fmt, machine_info, utc_now  # noqa: E402

BUDGETS_S = {"tests": 120, "speed": 270, "demo": 90}
PARTS = tuple(BUDGETS_S)
MIN_TORCH = (2, 4)
# Each speed row runs with every engine (the compile rows keep the default engine).
from src.models.engine import ENGINES  # noqa: E402
PRECISIONS = {"fp32": False, "bf16": True}  # bf16 is the --amp autocast
SPEED_ROWS = (  # (layout, backbone, batch); each is trained alone (model "backbone")
    ("iemocap_aligned", "mult", 32),
    ("iemocap_unaligned", "mult", 8),
    ("mosei_unaligned", "pmr", 8),
)
# A GPU step takes milliseconds: a few warm-up steps, then repeats for about two seconds.
GPU_POLICY = dict(warmup=3, min_repeats=5, max_repeats=30, budget_s=2.0,
                  eval_warmup=2, eval_min_repeats=3, eval_max_repeats=20, eval_budget_s=1.0)
OUTPUT_TAIL = 4000


# ----------------------------------------------------------------------------------------------- rows
def speed_rows() -> list[list[dict]]:
    """The CUDA rows in the order they run, one list per subprocess: every eager row first (cheap),
    then the compiled rows of each layout (each compile takes tens of seconds)."""
    eager, compiled = [], []
    for layout, backbone, batch in SPEED_ROWS:
        variants = [(engine or "default", {"engine": engine}) for engine in ENGINES] + [("compile", {"compile": True})]
        for variant, options in variants:
            rows = [speed.variant_row(f"{layout}/{backbone}/{variant}/{precision}", layout, variant, amp=amp,
                                      backbone=backbone, model="backbone", batch=batch, eval_batch=batch, **options)
                    for precision, amp in PRECISIONS.items()]
            for row in rows:
                row["precision"] = "bf16" if row["amp"] else "fp32"
            if options.get("compile"):
                compiled.append(rows)
            else:
                eager.extend(rows)
    return [eager, *compiled]


def child(payload: dict) -> None:
    """Measure rows in this process, one JSON line per row as soon as it is done (a part that runs
    out of time keeps the rows finished before)."""
    settings = payload["settings"]
    for row in payload["rows"]:
        try:
            result = speed.measure_row(row, settings)
            result["precision"] = row["precision"]
        except Exception as error:  # a row that fails is recorded; the others still run
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
        print(json.dumps({"name": row["name"], "result": result}), flush=True)


# ----------------------------------------------------------------------------------------------- parts
def run_command(command: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run a command with a timeout; returns rc (None when it timed out), seconds, stdout and its tail."""
    begin = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        done = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=max(1.0, timeout))
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        rc, out, err = None, _text(expired.stdout), _text(expired.stderr)
    return {"rc": rc, "timed_out": rc is None, "seconds": time.perf_counter() - begin, "stdout": out,
            "tail": (out + err)[-OUTPUT_TAIL:]}


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def part_tests(budget: float, work: Path) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"not_run": "pytest is not installed"}
    junit = work / "cuda-tests.xml"
    done = run_command([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", "tests"], budget)
    out = {key: done[key] for key in ("rc", "timed_out", "seconds", "tail")}
    out.update(junit_counts(junit))
    return out


def junit_counts(path: Path) -> dict:
    """Test counts of a pytest junit XML file (passed = tests - failures - errors - skipped)."""
    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def part_speed(budget: float, device: str) -> dict:
    begin = time.perf_counter()
    deadline = begin + budget
    settings = {"device": device, "optimizer": "trainer", "policy": GPU_POLICY}
    rows, processes = {}, []
    for chunk in speed_rows():
        left = deadline - time.perf_counter()
        if left < 5:
            for row in chunk:
                rows[row["name"]] = {"error": "not measured: the speed part's time budget was spent"}
            continue
        payload = {"rows": chunk, "settings": settings}
        done = run_command([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)], left)
        processes.append({"rows": [row["name"] for row in chunk], "rc": done["rc"], "seconds": done["seconds"]})
        finished = {}
        for line in done["stdout"].splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                finished[entry["name"]] = entry["result"]
        for row in chunk:
            if row["name"] in finished:
                rows[row["name"]] = finished[row["name"]]
            elif done["timed_out"]:
                rows[row["name"]] = {"error": f"timed out after {done['seconds']:.0f} s (the speed part's budget)"}
            else:
                rows[row["name"]] = {"error": f"exit status {done['rc']}: {done['tail'][-600:]}"}
    return {"rows": rows, "processes": processes, "policy": GPU_POLICY, "seconds": time.perf_counter() - begin}


def part_demo(budget: float, work: Path) -> dict:
    data, runs = work / "data", work / "runs"
    done = run_command([sys.executable, "main.py", "demo", "--device", "cuda", "--epochs", "2",
                        "--data-dir", str(data), "--runs-dir", str(runs)], budget)
    out = {key: done[key] for key in ("rc", "timed_out", "seconds", "tail")}
    for name in ("demo_mult", "demo_causalmer"):
        path = runs / "iemocap" / name / "seed1" / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            out[name] = {"test_avg_acc": {k: v["avg_acc"] for k, v in metrics["best_acc"]["test"]["predictions"].items()},
                         "epoch_seconds": [entry["seconds"] for entry in metrics["history"]]}
    return out


# ----------------------------------------------------------------------------------------------- report
def render_markdown(results: dict) -> str:
    machine = results["machine"]
    parts = results["parts"]
    lines = [f"GPU: {machine.get('cuda_device', '-')} (CUDA {machine.get('cuda', '-')}, {machine.get('gpus', '-')} GPU(s)), "
             f"torch {machine['torch']}, {machine['platform']}.  ",
             f"Command: `{results['command']}` ({results['started_utc']} to {results['finished_utc']}, "
             f"{fmt(results['wall_s'], 0)} s).", ""]
    tests = parts.get("tests", {})
    lines.append("## cuda tests")
    lines.append("")
    if "not_run" in tests:
        lines.append(f"Not run: {tests['not_run']}.")
    elif tests:
        state = "timed out" if tests.get("timed_out") else f"exit status {tests.get('rc')}"
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failures", "errors", "skipped") if k in tests)
        lines.append(f"{counts or 'no test report'} ({state}, {fmt(tests.get('seconds'), 0)} s).")
        for name in tests.get("failed_names", []):
            lines.append(f"- failed: `{name}`")
    lines.append("")
    rows = parts.get("speed", {}).get("rows", {})
    if rows:
        lines += ["## speed (CUDA)", "",
                  "Training step: the trainer's `train_step` (forward, loss, backward, clipping, fused Adam); the first step (which compiles "
                  "under torch.compile) is timed apart. Peak: torch.cuda.max_memory_allocated.", "",
                  "| layout | backbone | variant | precision | batch | first step s | step s | ms/sample | "
                  "first eval s | eval samples/s | peak GB train | peak GB eval |", "|---" * 12 + "|"]
        for name, row in rows.items():
            layout, backbone, variant, precision = name.split("/")
            if not speed.ok(row):
                lines.append(f"| {layout} | {backbone} | {variant} | {precision} | failed: {row['error'][:160]} |"
                             + " |" * 7)
                continue
            lines.append(f"| {layout} | {backbone} | {variant} | {precision} | {row['batch']} | {fmt(row['compile_s'])} | "
                         f"{fmt(row['train_step_s'], 4)} | {fmt(row['train_ms_per_sample'], 2)} | "
                         f"{fmt(row['eval_compile_s'])} | {fmt(row['eval_samples_per_s'], 0)} | "
                         f"{fmt(row.get('train_cuda_peak_gb'), 3)} | {fmt(row.get('eval_cuda_peak_gb'), 3)} |")
        lines.append("")
    demo = parts.get("demo", {})
    if demo:
        state = "timed out" if demo.get("timed_out") else f"exit status {demo.get('rc')}"
        lines += ["## demo (`main.py demo --device cuda --epochs 2`)", "", f"{state}, {fmt(demo.get('seconds'), 0)} s.", ""]
        for name in ("demo_mult", "demo_causalmer"):
            if name in demo:
                accs = ", ".join(f"{k} {100 * v:.1f}" for k, v in demo[name]["test_avg_acc"].items())
                epochs = ", ".join(fmt(s, 1) for s in demo[name]["epoch_seconds"])
                lines.append(f"- {name}: test avg_acc (%) {accs}; epoch seconds {epochs}")
        lines.append("")
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu.json", out_dir / "gpu.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def torch_version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help=f"comma-separated parts not to run, of: {', '.join(PARTS)}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where gpu.json and gpu.md go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"gpu check: no CUDA device is available (torch {torch.__version__}); nothing was run")
        return 0
    if torch_version(torch.__version__) < MIN_TORCH:
        print(f"gpu check: torch {torch.__version__} is installed; the check needs torch >= 2.4")
        return 2
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if skip - set(PARTS):
        raise SystemExit(f"--skip: unknown part(s) {', '.join(sorted(skip - set(PARTS)))}; valid: {', '.join(PARTS)}")

    started = time.perf_counter()
    command = " ".join(["bash benchmarks/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": machine_info("cuda"), "command": command, "started_utc": utc_now(), "budgets_s": BUDGETS_S,
               "parts": {}}
    spare = 0.0
    with tempfile.TemporaryDirectory(prefix="causalmer-gpu-") as tmp:
        work = Path(tmp)
        for part in PARTS:
            if part in skip:
                continue
            budget = BUDGETS_S[part] + spare
            begin = time.perf_counter()
            print(f"gpu check: {part} (budget {budget:.0f} s)", flush=True)
            if part == "tests":
                results["parts"][part] = part_tests(budget, work)
            elif part == "speed":
                results["parts"][part] = part_speed(budget, "cuda")
            else:
                results["parts"][part] = part_demo(budget, work)
            spare = max(0.0, budget - (time.perf_counter() - begin))
    results["finished_utc"] = utc_now()
    results["wall_s"] = time.perf_counter() - started
    json_path, md_path = write_results(results, args.out_dir)
    print(render_markdown(results))
    print(f"written {json_path} and {md_path} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
