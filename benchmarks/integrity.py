"""What the integrity checks cost: checkpoint CRCs on load, and the cache's per-array checksums on open.

- checkpoint: a MulT CausalMER checkpoint as `last.pt` holds it (weights, Adam state, scheduler, RNG) for
  IEMOCAP's default config; the time of `verify_checksums` (every zip member read through zipfile, CRC
  checked) against the `torch.load(weights_only=True)` it precedes.
- cache: a float32 cache built from a synthetic pickle; the time of the full CRC-32 of every array (what
  opening the cache now checks) against the checks it already did (sizes, shapes, dtypes through memory
  maps) and against a sampled digest (64 blocks of 64 KiB per array plus its size), with the page cache warm.

The alternatives are timed interleaved in one process and the median is kept, so load from other jobs
disturbs them alike; figures on a shared machine are provisional.

    python benchmarks/integrity.py --data-dir /tmp/big     # builds mosei_senti unaligned at --scale there
    python benchmarks/integrity.py --quick                 # tiny sizes, a smoke run

Results go to benchmarks/results/integrity.json (integrity_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine_info  # noqa: E402
from src.data.cache import MANIFEST_NAME, data_crc32, prepare_cache  # noqa: E402
from src.data.layout import get_spec  # noqa: E402
from src.data.synthetic import write_synthetic  # noqa: E402
from src.run import checkpoint as ckpt_io  # noqa: E402
from src.run.build import build_model, make_optimizer  # noqa: E402
from src.run.config import dump_config, load_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 64 << 10


def median_times(functions: dict, repeats: int) -> dict:
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def checkpoint_row(directory: Path, repeats: int, quick: bool) -> dict:
    cfg = load_config("iemocap", overrides=["model.backbone_params.layers=1"] if quick else [])
    spec = get_spec("iemocap")
    model = build_model(cfg, spec.dims, spec.aligned_seq_lens, 8)
    optimizer = make_optimizer(model, cfg["train"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's moments exist, as in any last.pt
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    state = {"epoch": 1, "best_loss": 1.0, "best_score": 0.5, "since_best": 0, "history": []}
    path = directory / "last.pt"
    ckpt_io.atomic_save({"model": model.state_dict(), "config": dump_config(cfg), "epoch": 1,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": ckpt_io.rng_state(), "state": state}, path)
    timing = median_times({"verify_checksums": lambda: ckpt_io.verify_checksums(path),
                           "torch_load": lambda: torch.load(path, map_location="cpu", weights_only=True)}, repeats)
    return {"bytes": path.stat().st_size, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": timing, "checksum_over_load": timing["verify_checksums"] / timing["torch_load"]}


def sampled_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = zlib.crc32(str(size).encode())
    with open(path, "rb") as handle:
        for offset in np.linspace(0, max(0, size - SAMPLE_BYTES), SAMPLE_BLOCKS).astype(np.int64):
            handle.seek(int(offset))
            digest = zlib.crc32(handle.read(SAMPLE_BYTES), digest)
    return digest


def cache_row(data_dir: Path, scale: float, repeats: int) -> dict:
    spec = get_spec("mosei_senti")
    pickle_path = data_dir / spec.file_name(False)
    if not pickle_path.exists():
        write_synthetic(data_dir, "mosei_senti", aligned=False, scale=scale)
    started = time.perf_counter()
    cache = prepare_cache(pickle_path, spec)
    first_open = time.perf_counter() - started
    files = [cache.directory / entry["file"] for entry in cache.manifest["arrays"].values()]

    def shapes_only():
        for path in files:
            array = np.load(path, mmap_mode="r")
            _ = path.stat().st_size, array.shape, array.dtype
            del array

    def full_crc():
        for path in files:
            data_crc32(path)

    def sampled():
        for path in files:
            sampled_digest(path)

    full_crc()  # warm the page cache: a run that trains reads these files anyway
    timing = median_times({"sizes_shapes_dtypes": shapes_only, "full_crc32": full_crc, "sampled_64x64KiB": sampled},
                          repeats)
    started = time.perf_counter()
    prepare_cache(pickle_path, spec)
    timing["prepare_cache_reopen"] = time.perf_counter() - started
    total = sum(p.stat().st_size for p in files)
    return {"pickle_bytes": pickle_path.stat().st_size, "cache_bytes": total, "arrays": len(files),
            "first_prepare_cache_seconds": first_open, "seconds": timing,
            "full_crc32_gb_per_s": total / timing["full_crc32"] / 1e9,
            "manifest": str(cache.directory / MANIFEST_NAME)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="where the synthetic pickle is (or is written)")
    parser.add_argument("--scale", type=float, default=0.05, help="size of the synthetic unaligned MOSEI file")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        scale = 0.001 if args.quick else args.scale
        repeats = 2 if args.quick else args.repeats
        report = {"machine": machine_info(threads=1),
                  "repeats": repeats, "scale": scale,
                  "checkpoint": checkpoint_row(Path(tmp), repeats, args.quick),
                  "cache": cache_row(data_dir, scale, repeats)}
    out = Path(args.output) if args.output else RESULTS / ("integrity_quick.json" if args.quick else "integrity.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("checkpoint", "cache")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
