"""The engines against each other in one process: MulT's training step with each engine, interleaved.

On a shared machine, timings from separate processes drift with the load; steps of both engines
alternating in one process see the same conditions, so their ratio is what this script reports
(the speed benchmark, benchmarks/speed.py, measures each engine in its own processes, with its peak
memory). Both models are built from the same config and seed, so they hold the same weights, and
each step is the trainer's own `train_step`. CPU time (the process's, with one thread) is reported
beside wall time: it is the less disturbed by other jobs.

    python benchmarks/engines.py                       # IEMOCAP aligned, batch 32, 10 rounds
    python benchmarks/engines.py --unaligned --batch 8 --rounds 3
    python benchmarks/engines.py --unaligned --batch 8 --engines plain   # one engine: its own peak memory
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import machine_info, peak_rss_gb  # noqa: E402  (after the sys.path lines above)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="iemocap")
    parser.add_argument("--unaligned", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each engine per round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engines", default="plain,fast", help="comma-separated engines to run (default both)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "engines.json")
    args = parser.parse_args(argv)

    import torch

    from src.data.layout import get_spec, output_dim
    from src.models.engine import ENGINES
    from src.run.build import build_model, make_optimizer
    from src.run.config import load_config
    from src.train.loop import train_step

    torch.set_num_threads(args.threads)
    machine = machine_info(threads=args.threads)  # before the steps: its load average is the start's
    aligned = not args.unaligned
    cfg = load_config(args.dataset, backbone="mult", model_name="backbone")
    cfg["data"]["aligned"] = aligned
    spec = get_spec(args.dataset)
    lengths = spec.seq_lens(aligned)
    task = cfg["data"]["task"]
    generator = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(args.batch, length, dim, generator=generator)
             for m, length, dim in zip(("text", "audio", "vision"), lengths, spec.dims)}
    batch["target"] = (torch.randint(0, 2, (args.batch, 4), generator=generator) if task == "binary"
                       else torch.randint(0, 7, (args.batch,), generator=generator))
    chosen = [e for e in ENGINES if e in args.engines.split(",")]
    runs = {}
    for engine in chosen:
        cfg["model"]["backbone_params"]["engine"] = engine
        torch.manual_seed(0)
        model = build_model(cfg, spec.dims, lengths, output_dim(task)).train()
        runs[engine] = (model, make_optimizer(model, cfg["train"]))
    wall, cpu = {e: [] for e in chosen}, {e: [] for e in chosen}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for engine, (model, optimizer) in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, batch, cfg["train"], torch.device("cpu"))
            if round_:
                wall[engine].append(time.perf_counter() - started)
                cpu[engine].append(time.process_time() - started_cpu)
    result = {"dataset": args.dataset, "aligned": aligned, "batch": args.batch, "lengths": list(lengths),
              "threads": args.threads, "rounds": args.rounds, "loadavg": list(os.getloadavg()),
              "machine": machine,
              # with both engines in the process it is the larger one's
              "peak_rss_gb": peak_rss_gb(),
              "engines": {e: {"wall_s_median": statistics.median(wall[e]), "cpu_s_median": statistics.median(cpu[e]),
                              "wall_s": wall[e], "cpu_s": cpu[e]} for e in chosen}}
    for engine, entry in result["engines"].items():
        print(f"{engine:6s} wall {entry['wall_s_median']:.3f} s  cpu {entry['cpu_s_median']:.3f} s per step")
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB; load average {result['loadavg'][0]:.2f}")
    if len(chosen) == 2:
        result["fast_over_plain_cpu"] = result["engines"]["plain"]["cpu_s_median"] / result["engines"]["fast"]["cpu_s_median"]
        print(f"fast vs plain (CPU time): {result['fast_over_plain_cpu']:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.output}")
    return result


if __name__ == "__main__":
    main()
