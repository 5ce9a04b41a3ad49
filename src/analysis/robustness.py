"""robustness.md: the robustness command's result as one table, the chosen α, the intervals and the charts."""
from __future__ import annotations

from pathlib import Path

LABELS = {"m": "m (backbone)", "te": "te (fused)", "tie": "tie (debiased)", "tie_alpha": "tie_alpha (TE − α·NDE)",
          "baseline": "baseline (backbone alone)"}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def columns(result: dict) -> list[tuple[str, str]]:
    """(header, key) of the table: all, then per kind conflicting, aligned and their gap, then the rest."""
    names = [n for n in result["accuracy"] if n != "all"]
    cols = [("all", "all")]
    for name in names:
        if name.startswith("conflicting_"):
            kind = name[len("conflicting_"):]
            cols.append((name, name))
            if f"aligned_{kind}" in names:
                cols += [(f"aligned_{kind}", f"aligned_{kind}"), (f"gap {kind}", f"gap:{kind}")]
    cols += [(n, n) for n in names if not n.startswith(("conflicting_", "aligned_"))]
    return cols


def _cell(result: dict, key: str, prediction: str) -> str:
    accuracy = result["accuracy"]
    if key.startswith("gap:"):
        kind = key[4:]
        aligned, conflicting = accuracy[f"aligned_{kind}"][prediction], accuracy[f"conflicting_{kind}"][prediction]
        return "-" if None in (aligned, conflicting) else f"{100 * (aligned - conflicting):.1f}"
    return _pct(accuracy[key][prediction])


def robustness_markdown(result: dict, pngs: dict) -> str:
    """The page; `pngs` ({"alpha": path, "missing": path}) are linked by name (they sit beside it)."""
    metric, split = result["metric"], result["split"]
    sizes = result["subset_sizes"]
    cols = columns(result)
    lines = [f"# Robustness of {result['run']} ({result['model']} on {result['backbone']})", "",
             f"{metric} in % on the {split} split; subset sizes in the header. Gap: aligned − conflicting (points). "
             f"AUILC: area under {metric} against the missing rate.", "",
             "| prediction | " + " | ".join(f"{h} ({sizes[k]})" if k in sizes else h for h, k in cols) + " | AUILC |",
             "|---" * (len(cols) + 2) + "|"]
    for prediction in result["predictions"]:
        auilc = result["missing"]["auilc"].get(prediction)
        lines.append(f"| {LABELS.get(prediction, prediction)} | " + " | ".join(_cell(result, k, prediction) for _, k in cols)
                     + f" | {'-' if auilc is None else f'{100 * auilc:.2f}'} |")
    alpha = result["alpha"]
    if alpha:
        chosen = ", ".join(f"{name} {a}" for name, a in alpha["selected_conflicting"].items())
        lines += ["", f"α chosen on the validation split: **{alpha['selected']}** (grid {alpha['grid'][0]}–"
                  f"{alpha['grid'][-1]}); on its conflicting subsets: {chosen or '-'}; per modality: "
                  + ", ".join(f"{m} {a}" for m, a in alpha["selected_per_modality"].items())
                  + ". tie_alpha uses the first. Never chosen on the split reported."]
    boot = result["bootstrap"]
    if boot["intervals"]:
        lines += ["", f"Paired bootstrap ({boot['rounds']} rounds, seed {boot['seed']}), {100 * boot['level']:.0f}% "
                  "intervals of the difference, points:", "", "| difference | subset | n | difference | interval |",
                  "|---|---|---|---|---|"]
        for name, per_subset in boot["intervals"].items():
            for subset, iv in per_subset.items():
                if iv["difference"] is None:
                    lines.append(f"| {name} | {subset} | 0 | - | - |")
                else:
                    lines.append(f"| {name} | {subset} | {iv['n']} | {100 * iv['difference']:+.2f} | "
                                 f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] |")
    captions = {"alpha": f"{metric} against α", "missing": f"{metric} against the missing rate"}
    for name, path in pngs.items():
        lines += ["", f"![{captions[name]}]({Path(path).name})"]
    return "\n".join(lines) + "\n"
