"""Readable tables of a run's results (the same numbers are in metrics.json)."""
from __future__ import annotations

from . import metrics

TITLES = {"best_loss": "best validation loss", "best_acc": "best validation score"}
LABELS = {"tie": "tie (debiased)", "te": "te (fused)", "m": "m (backbone)"}


def prediction_table(predictions: dict) -> str:
    """The metrics of each prediction side by side, columns labelled by what the prediction is, and the units."""
    return (metrics.format_table({LABELS.get(name, name): values for name, values in predictions.items()})
            + "\n(accuracies and F1 in %; MAE and corr in their own units)")


def print_run_results(results: dict, cfg: dict) -> None:
    """Every split scored beyond valid (test, and any other the file holds: test_ood, ...), per checkpoint."""
    for which in ("best_loss", "best_acc"):
        entry = results[which]
        for split, scored in entry.items():
            if split in ("epoch", "checkpoint", "valid"):
                continue
            print(f"\n{cfg['dataset']} {split} split, checkpoint of the {TITLES[which]} (epoch {entry['epoch']}):")
            print(prediction_table(scored["predictions"]))


def print_removal_report(report: dict) -> None:
    """One row per removal; per prediction its headline score and the drop from the full input (in %)."""
    key = report["metric"]
    names = list(report["summary"])
    print(f"{'removed':<10}" + "".join(f"{n + ' ' + key:>18}{'drop':>9}" for n in names))
    print(f"{'none':<10}" + "".join(f"{100 * report['summary'][n]['full_score']:>18.2f}{'':>9}" for n in names))
    for removal in report["removals"]:
        line = f"{removal:<10}"
        for name in names:
            entry = report["summary"][name]["removals"][removal]
            line += f"{100 * entry['score']:>18.2f}{100 * entry['drop']:>9.2f}"
        print(line)
    print(f"{'drop std':<10}" + "".join(f"{'':>18}{100 * report['summary'][n]['drop_std']:>9.2f}" for n in names))
