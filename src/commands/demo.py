"""The demo: synthetic IEMOCAP-layout data, MulT alone and CausalMER on it trained briefly, then the
missing-modality test, the modality analysis, and the comparison it is for."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import data_file
from ..data.synthetic import DEFAULT_DEMO, write_synthetic
from .analyze import analyze_runs
from .evaluate import evaluate_run
from .train import RunSpec, train_all

# (model, run name) of the two runs the demo trains
DEMO_RUNS = (("mult", "demo_mult"), ("causalmer", "demo_causalmer"))


def demo(data_dir: str = "data/synthetic", runs_dir: str = "checkpoints", epochs: int = 8, device: str = "cpu",
         fresh: bool = False) -> None:
    path = data_file(data_dir, "iemocap", True)
    if not path.exists():
        write_synthetic(data_dir, **DEFAULT_DEMO)
        print(f"wrote synthetic IEMOCAP-layout data to {path}")
    specs = {name: RunSpec("iemocap", name, seed=1, model=model, data_dir=data_dir, runs_dir=runs_dir, epochs=epochs)
             for model, name in DEMO_RUNS}
    train_all(list(specs.values()), fresh, "--fresh", device)
    print("\n=== missing-modality test of demo_causalmer ===")
    evaluate_run(specs["demo_causalmer"].run_dir, remove="sweep", device=device, data_dir=data_dir)

    runs = [specs[name].run_dir for name in ("demo_causalmer", "demo_mult")]
    print("\n=== modality contributions, CausalMER and the backbone alone ===")
    analyze_runs(runs, device=device, data_dir=data_dir)

    # The comparison the demo is for: the same backbone, data and seed, without and with the causal head.
    causal, alone = (json.loads((Path(run) / "metrics.json").read_text())["best_acc"]["test"]["predictions"]
                     for run in runs)
    print("\n=== test avg_acc (%), checkpoints of the best validation avg_acc ===")
    print(f"MulT alone {100 * alone['m']['avg_acc']:.1f} | CausalMER: debiased (tie) {100 * causal['tie']['avg_acc']:.1f}, "
          f"fused (te) {100 * causal['te']['avg_acc']:.1f}, its backbone (m) {100 * causal['m']['avg_acc']:.1f}")
