"""The detection benchmark's table and plot from its raw rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["write_summary"]


def _f(v, scale=100.0, digits=1) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def write_summary(runs: Path, stem: Path, recipe) -> str:
    rows = [json.loads(l) for l in runs.read_text().splitlines()] if runs.exists() else []
    ok = [r for r in rows if "error" not in r]
    md = [f"# Detection: YOLO pruned and fine-tuned with Ultralytics' trainer ({recipe.name})", "",
          f"digits-det, {recipe.n_train} training / {recipe.n_val} validation images at "
          f"{recipe.imgsz} px; dense {recipe.dense_epochs} epochs, fine-tuning "
          f"{recipe.ft_epochs} epochs (lr0 {recipe.ft_lr0}), scratch {recipe.dense_epochs + recipe.ft_epochs}"
          " epochs; one seed. mAP in %; CPU latency eager, batch 1, median of interleaved rounds.",
          "", "| target | method | FLOPs kept | params kept | mAP50-95 before FT | mAP50-95 | mAP50 "
          "| latency ms (dense ms) | speedup |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(ok, key=lambda r: (-r["target"], r["method"])):
        speed = r["dense_latency_ms"] / r["latency_ms"] if r.get("latency_ms") else None
        md.append(f"| {100 * r['target']:.0f}% | {r['method']} | {_f(r['flops_kept'])}% | "
                  f"{_f(r['params_kept'])}% | {_f(r['map50_95_before'])} | {_f(r['map50_95'])} | "
                  f"{_f(r['map50'])} | {r['latency_ms']:.2f} ({r['dense_latency_ms']:.2f}) | "
                  f"{_f(speed, 1, 2)}x |")
    errors = [r for r in rows if "error" in r]
    if errors:
        md += ["", "Failed runs (a result, not a crash of the benchmark):", ""]
        md += [f"- {r['method']} at {100 * r['target']:.0f}%: {r['error']}" for r in errors]
    if ok:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            fields = sorted({k for r in ok for k in r})
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(ok)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for method in sorted({r["method"] for r in ok}):
            pts = sorted((r["flops_kept"], r["map50_95"]) for r in ok if r["method"] == method)
            ax.plot(*zip(*[(x, 100 * y) for x, y in pts]), marker="o", label=method)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("mAP50-95 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
    text = "\n".join(md) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text
