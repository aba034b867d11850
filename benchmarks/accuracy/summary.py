"""Tables and a plot from the accuracy benchmark's raw rows (mean +- std over seeds)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["aggregate", "write_summary"]


def _stats(values: list) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (model, method, target): n, means and stds."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            cells[(r["model"], r["method"], r["target"])].append(r)
    out = []
    for (model, method, target), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        before, before_sd = _stats([r["acc_before"] for r in rs])
        after, after_sd = _stats([r["acc_after"] for r in rs])
        cell = {"model": model, "method": method, "target": target, "n": len(rs),
                "flops_kept": float(np.mean([r["flops_kept"] for r in rs])),
                "params_kept": float(np.mean([r["params_kept"] for r in rs])),
                "acc_before": before, "acc_before_std": before_sd,
                "acc_after": after, "acc_after_std": after_sd}
        for key in sorted({k for r in rs for k in r if k.startswith("acc_ep")}):
            cell[key], cell[f"{key}_std"] = _stats([r.get(key) for r in rs])
        out.append(cell)
    return out


CHANCE = 0.1  # ten balanced classes


def recovery_lines(cells: list[dict]) -> list[str]:
    """The recovery table: accuracy before fine-tuning and along it, per recovery method,
    with the share of the chance-to-dense gap closed before any training."""
    rec = [c for c in cells if c["method"].startswith("recover/")]
    if not rec:
        return []
    epochs = sorted({int(k[6:]) for c in rec for k in c if k.startswith("acc_ep")
                     and not k.endswith("_std")})
    md = ["## Recovery without training (ours, l2; `prune(recover=...)` on 8 unlabeled "
          "calibration batches)", "",
          "Gap closed = (accuracy before fine-tuning - chance) / (dense - chance), chance 10%. "
          "The epoch columns are points along the same fine-tuning run.", "",
          "| model | target | recovery | before FT | gap closed | "
          + " | ".join(f"after {e} ep." for e in epochs) + " | after full FT | n |",
          "|---|---:|---|---:|---:|" + "---:|" * len(epochs) + "---:|---:|"]
    for c in rec:
        dense = next((d for d in cells if d["model"] == c["model"] and d["method"] == "dense"),
                     None)
        gap = ((c["acc_before"] - CHANCE) / (dense["acc_after"] - CHANCE)
               if dense and not np.isnan(c["acc_before"]) else float("nan"))
        md.append(f"| {c['model']} | {100 * c['target']:.0f}% | {c['method'][8:]} | "
                  f"{_pct(c['acc_before'], c['acc_before_std'])} | "
                  + ("–" if np.isnan(gap) else f"{100 * gap:.0f}%") + " | "
                  + " | ".join(_pct(c.get(f"acc_ep{e}", float("nan")),
                                    c.get(f"acc_ep{e}_std", float("nan"))) for e in epochs)
                  + f" | {_pct(c['acc_after'], c['acc_after_std'])} | {c['n']} |")
    return md + [""]


def _pct(mean: float, sd: float) -> str:
    return "–" if np.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _best(cells: list[dict], prefix: str) -> dict | None:
    """The one-shot criterion (no distillation) with the highest mean accuracy after FT."""
    pool = [c for c in cells if c["method"].startswith(prefix) and "+kd" not in c["method"]
            and "-" not in c["method"].split("/", 1)[1]]  # one-shot global ranking only
    return max(pool, key=lambda c: c["acc_after"]) if pool else None


def headline(cells: list[dict]) -> list[str]:
    """Per model and target: best ours vs best Torch-Pruning, and vs narrowed-from-scratch."""
    lines = []
    for model in sorted({c["model"] for c in cells}):
        for target in sorted({c["target"] for c in cells if c["model"] == model}, reverse=True):
            if target == 1.0:
                continue
            here = [c for c in cells if c["model"] == model and c["target"] == target]
            ours, tp = _best(here, "ours/"), _best(here, "tp/")
            scratch = next((c for c in here if c["method"] == "scratch"), None)
            best_any = max((c for c in here if c["method"] != "scratch"),
                           key=lambda c: c["acc_after"], default=None)
            parts = [f"- **{model}, {100 * target:.0f}% FLOPs**:"]
            if ours and tp:
                diff = ours["acc_after"] - tp["acc_after"]
                sd = np.hypot(ours["acc_after_std"], tp["acc_after_std"])
                parts.append(f"best of ours `{ours['method']}` {_pct(ours['acc_after'], ours['acc_after_std'])}"
                             f" vs best of Torch-Pruning `{tp['method']}` "
                             f"{_pct(tp['acc_after'], tp['acc_after_std'])}: "
                             f"difference {100 * diff:+.1f} points (std of the difference "
                             f"{100 * sd:.1f});")
            sens = next((c for c in here if c["method"] == "ours/sensitivity-l2"), None)
            glob = next((c for c in here if c["method"] == "ours/l2"), None)
            if sens and glob:
                diff = sens["acc_after"] - glob["acc_after"]
                parts.append(f"sensitivity allocation `ours/sensitivity-l2` "
                             f"{_pct(sens['acc_after'], sens['acc_after_std'])} vs global ranking "
                             f"`ours/l2` {_pct(glob['acc_after'], glob['acc_after_std'])} "
                             f"({100 * diff:+.1f} points; before fine-tuning "
                             f"{_pct(sens['acc_before'], sens['acc_before_std'])} vs "
                             f"{_pct(glob['acc_before'], glob['acc_before_std'])});")
            if scratch and best_any:
                diff = best_any["acc_after"] - scratch["acc_after"]
                parts.append(f"best pruned + fine-tuned `{best_any['method']}` "
                             f"{_pct(best_any['acc_after'], best_any['acc_after_std'])} vs narrowed "
                             f"from scratch {_pct(scratch['acc_after'], scratch['acc_after_std'])}"
                             f" ({100 * diff:+.1f} points).")
            lines.append(" ".join(parts))
    return lines


def _plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c["model"] for c in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        here = [c for c in cells if c["model"] == model]
        dense = next((c for c in here if c["method"] == "dense"), None)
        for method in sorted({c["method"] for c in here if c["method"] != "dense"
                              and not c["method"].startswith("recover/")}):
            pts = sorted((c["flops_kept"], c["acc_after"], c["acc_after_std"])
                         for c in here if c["method"] == method)
            xs, ys, sds = zip(*pts)
            style = "--" if method.startswith("tp/") else ":" if method == "scratch" else "-"
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * s for s in sds], fmt=style,
                        marker="o", ms=3, capsize=2, label=method, lw=1)
        if dense:
            ax.axhline(100 * dense["acc_after"], color="k", lw=0.8, label="dense")
        ax.set_title(f"{model}: test accuracy after fine-tuning")
        ax.set_xlabel("FLOPs kept (fraction of dense)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(runs: Path, stem: Path, recipe) -> str:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png``; return the markdown."""
    rows = [json.loads(line) for line in runs.read_text().splitlines()] if runs.exists() else []
    cells = aggregate(rows)
    if cells:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            fields = list(dict.fromkeys(k for c in cells for k in c))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(cells)
        _plot(cells, stem.with_suffix(".png"))
    errors = [r for r in rows if "error" in r]
    md = [f"# Accuracy after pruning and fine-tuning ({recipe.name} recipe)", "",
          f"shapes10, {recipe.n_train} training / {recipe.n_test} test images at 32x32; dense "
          f"epochs {dict(recipe.dense_epochs)}; fine-tuning {recipe.ft_epochs} epochs "
          f"(lr {recipe.ft_lr}, cosine) for every method; scratch = narrowed uniformly, trained "
          f"for dense + fine-tuning epochs; seeds {list(recipe.seeds)}. "
          "Accuracy in %, mean ± std over seeds.", ""]
    md += headline(cells) + [""]
    for model in sorted({c["model"] for c in cells}):
        md += [f"## {model}", "",
               "| target | method | FLOPs kept | params kept | acc. before FT | acc. after FT | n |",
               "|---:|---|---:|---:|---:|---:|---:|"]
        for c in (c for c in cells if c["model"] == model
                  and not c["method"].startswith("recover/")):
            md.append(f"| {100 * c['target']:.0f}% | {c['method']} | {100 * c['flops_kept']:.1f}% | "
                      f"{100 * c['params_kept']:.1f}% | {_pct(c['acc_before'], c['acc_before_std'])} | "
                      f"{_pct(c['acc_after'], c['acc_after_std'])} | {c['n']} |")
        md.append("")
    md += recovery_lines(cells)
    if errors:
        md += ["## Failed runs", ""] + [f"- {r['model']} {r['method']} {r['target']:g} seed "
                                        f"{r['seed']}: {r['error']}" for r in errors] + [""]
    text = "\n".join(md)
    stem.with_suffix(".md").write_text(text)
    return text
