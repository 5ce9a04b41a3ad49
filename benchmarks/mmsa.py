"""What reading an MMSA feature pickle costs: the one-time conversion to the float32 cache, and training after it.

The file is MOSEI-shaped in MMSA's unaligned layout (16326 / 1871 / 4659 samples, lengths 50 / 500 / 375,
BERT text 768, audio 74, vision 35), written by `make-data --format mmsa` at a fraction `--scales` of
the real size (the full file is about 8 GB and writing it needs several times that in memory). For each
fraction, in a fresh process each:
- conversion: wall time of the first `load_splits` (unpickle through the restricted unpickler, validate,
  write the cache) and the process's peak resident memory;
- training: peak resident memory of a process that opens the cache and runs a fixed number of training
  steps of MulT (batch 16), so that only the file's size differs between rows; and, after the steps, how
  much of what is resident is the process's own memory (RssAnon) and how much is pages of the memory-mapped
  cache (RssFile: page-cache pages the kernel maps around each row read, reclaimable, not allocations).
Conversion memory grows with the file (unpickling holds it whole, as any pickle reader does); training
memory should not, since the features are memory-mapped.

    python benchmarks/mmsa.py                       # scales 0.025 0.05 0.1, in a temporary folder
    python benchmarks/mmsa.py --scales 0.002 --quick

Results: benchmarks/results/mmsa_conversion.json and .md (mmsa_conversion_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
TRAIN_STEPS = 8

# Each measurement runs in a child of its own and reads its peak memory from VmHWM, the high-water mark of
# its own address space (getrusage's ru_maxrss would also count the parent's memory at the fork, which
# Linux carries across exec).
PEAK = """
def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024
def peak_mb():
    return status_mb("VmHWM")
"""
CONVERT = PEAK + """
import json, sys, time
sys.path.insert(0, {repo!r})
from src.data import load_splits
started = time.perf_counter()
splits = load_splits(None, "mosei_senti", aligned=False, data_file={path!r})
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak_mb(),
                  "samples": {{name: len(split) for name, split in splits.items()}},
                  "dims": list(splits["train"].dims), "seq_lens": list(splits["train"].seq_lens)}}))
"""
TRAIN = PEAK + """
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from src.data import load_splits
from src.run.config import load_config
from src.run.build import build_model, make_optimizer
from src.train.loop import train_step
splits = load_splits(None, "mosei_senti", aligned=False, data_file={path!r})
train = splits["train"]
cfg = load_config("mosei_senti", backbone="mult", model_name="backbone",
                  overrides=["model.backbone_params.layers=1", "data.aligned=false"])
model = build_model(cfg, train.dims, train.seq_lens, train.output_dim)
optimizer = make_optimizer(model, cfg["train"])
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
before = peak_mb()
started = time.perf_counter()
for step in range({steps}):
    batch = train.get_batch(order[(torch.arange(16) + step * 16) % len(train)])
    train_step(model, optimizer, batch, cfg["train"], torch.device("cpu"))
print(json.dumps({{"seconds": time.perf_counter() - started, "steps": {steps},
                  "peak_rss_mb": peak_mb(), "rss_before_steps_mb": before,
                  "rss_anon_after_mb": status_mb("RssAnon"), "rss_file_after_mb": status_mb("RssFile")}}))
"""


def child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"a measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(folder: Path, scale: float, train: bool) -> dict:
    from src.data import write_synthetic

    path = write_synthetic(folder, "mosei_senti", aligned=False, scale=scale, data_format="mmsa",
                           path=folder / f"mosei_{scale:g}" / "unaligned_50.pkl")
    result = {"scale": scale, "file_mb": path.stat().st_size / 2**20,
              "conversion": child(CONVERT.format(repo=str(REPO), path=str(path)))}
    cache = path.with_name(path.name + ".cache")
    result["cache_mb"] = sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**20
    if train:
        result["training"] = child(TRAIN.format(repo=str(REPO), path=str(path), steps=TRAIN_STEPS))
    path.unlink()
    for item in cache.iterdir():
        item.unlink()
    return result


def markdown(results: dict) -> str:
    lines = [f"# MMSA conversion and training memory ({results['machine']})", "",
             f"MOSEI-shaped unaligned MMSA file (lengths 50/500/375, dims 768/74/35) at fractions of the real "
             f"16326/1871/4659 samples; the full file would be about "
             f"{results['full_size_estimate_gb']:.1f} GB. Each measurement in a fresh process.", "",
             "| scale | file MB | conversion s | conversion peak RSS MB | training peak RSS MB "
             f"({TRAIN_STEPS} steps) | after: own (anon) MB | after: mapped cache (file) MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        training = r.get("training", {})
        cells = [training.get(k) for k in ("peak_rss_mb", "rss_anon_after_mb", "rss_file_after_mb")]
        lines.append(f"| {r['scale']:g} | {r['file_mb']:.0f} | {r['conversion']['seconds']:.1f} | "
                     f"{r['conversion']['peak_rss_mb']:.0f} | " + " | ".join("-" if c is None else f"{c:.0f}" for c in cells)
                     + " |")
    lines += ["", results["reading"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.025, 0.05, 0.1])
    parser.add_argument("--folder", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--no-train", action="store_true", help="only the conversion")
    parser.add_argument("--quick", action="store_true", help="write *_quick results (a smoke run)")
    args = parser.parse_args(argv)
    from src.data.synthetic import file_bytes

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        rows = [row(Path(tmp), scale, not args.no_train) for scale in args.scales]
    first, last = rows[0], rows[-1]
    growth = ((last["conversion"]["peak_rss_mb"] - first["conversion"]["peak_rss_mb"])
              / max(last["file_mb"] - first["file_mb"], 1e-9))
    reading = (f"Conversion peak memory grows by {growth:.2f} MB per MB of file (unpickling holds the file "
               "whole); conversion time per GB of file: "
               f"{last['conversion']['seconds'] / max(last['file_mb'] / 1024, 1e-9):.0f} s.")
    if "training" in first:
        reading += (f" Training: the process's own memory after the steps is {first['training']['rss_anon_after_mb']:.0f} "
                    f"MB at the smallest file and {last['training']['rss_anon_after_mb']:.0f} MB at the largest; what "
                    "differs in the peak is mapped pages of the cache file (RssFile), which the kernel reclaims.")
    results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared 2-core host",
               "full_size_estimate_gb": file_bytes("mosei_senti", False, 1.0, "mmsa") / 2**30,
               "train_steps": TRAIN_STEPS, "rows": rows, "reading": reading}
    name = "mmsa_conversion_quick" if args.quick else "mmsa_conversion"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
