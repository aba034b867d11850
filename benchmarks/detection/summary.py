"""The detection benchmark's table and plot from its raw rows and its latency phase."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

__all__ = ["write_summary"]


def _f(v, scale=100.0, digits=1) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def _ms(values: list) -> str:
    """mean ± std (in %) of the seeds' values, or the single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return _f(values[0])
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _stem(path) -> str:
    return Path(path).stem if path else ""


def write_summary(runs: Path, latency: Path, stem: Path, recipe) -> str:
    rows = [json.loads(l) for l in runs.read_text().splitlines()] if runs.exists() else []
    lat = json.loads(latency.read_text()) if latency.exists() else {}
    by_threads = lat.get("threads") or ({"?": lat["models"]} if "models" in lat else {})
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        for t, timed in by_threads.items():
            mine = timed.get(_stem(r.get("model_file")))
            dense = timed.get(_stem(r.get("dense_file")))
            r[f"latency_ms_t{t}"] = mine and mine["ms"]
            r[f"latency_spread_t{t}"] = mine and mine["spread"]
            r[f"dense_latency_ms_t{t}"] = dense and dense["ms"]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    env = lat.get("environment", {})
    seeds = sorted({r.get("seed", 0) for r in ok})
    md = [f"# Detection: YOLO pruned and fine-tuned with Ultralytics' trainer ({recipe.name})", "",
          f"digits-det, {recipe.n_train} training / {recipe.n_val} validation images at "
          f"{recipe.imgsz} px; dense {recipe.dense_epochs} epochs, fine-tuning "
          f"{recipe.ft_epochs} epochs (lr0 {recipe.ft_lr0}), scratch "
          f"{recipe.dense_epochs + recipe.ft_epochs} epochs; seeds {seeds} (mean ± std where "
          "more than one). mAP in %.",
          "", f"Latency: CPU, eager, batch 1, {lat.get('rounds', '?')} interleaved rounds of "
          f"{lat.get('calls', '?')} calls, median (spread = interquartile range / median of the rounds); "
          f"torch {env.get('torch', '?')}, {env.get('cpu', '?')}, {env.get('cores', '?')} cores, "
          f"at {' and '.join(by_threads) or '?'} threads; taken after all training, nothing else "
          "running. Speedup = the model's own dense model's latency / its latency.",
          "", "| target | method | seeds | FLOPs kept | params kept | mAP50-95 before FT | "
          "mAP50-95 | mAP50 | " + " | ".join(f"ms at {t} thr. (spread) | speedup"
                                                for t in by_threads) + " |",
          "|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(by_threads)]
    for (target, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        r = rs[0]
        cells = []
        for t in by_threads:
            ms, dense_ms = r[f"latency_ms_t{t}"], r[f"dense_latency_ms_t{t}"]
            cells.append(f"{ms:.2f} ({100 * r[f'latency_spread_t{t}']:.0f}%)" if ms else "–")
            cells.append(f"{dense_ms / ms:.2f}x" if ms and dense_ms else "–")
        md.append(f"| {100 * target:.0f}% | {method} | {len(rs)} | {_f(r['flops_kept'])}% | "
                  f"{_f(r['params_kept'])}% | {_ms([x['map50_95_before'] for x in rs])} | "
                  f"{_ms([x['map50_95'] for x in rs])} | {_ms([x['map50'] for x in rs])} | "
                  + " | ".join(cells) + " |")
    errors = list({(r["method"], r["target"]): r for r in rows if "error" in r}.values())
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
        for method in sorted({m for (_, m), rs in groups.items()
                              if all(x["map50_95"] is not None for x in rs)}):
            pts = sorted((statistics.mean(x["flops_kept"] for x in rs),
                          100 * statistics.mean(x["map50_95"] for x in rs))
                         for (_, m), rs in groups.items() if m == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("FLOPs kept (of its own dense model)")
        ax.set_ylabel("mAP50-95 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
    text = "\n".join(md) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text
