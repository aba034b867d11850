"""Turn a runs file (one JSON object per finished job) into CSV, Markdown and plots."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import time
from importlib import metadata
from typing import Optional

SETTINGS = ("eager", "ort")


def machine_line(env: dict, onnxruntime: bool = False) -> str:
    """A timed table's machine, for its header: CPU, cores, SIMD flags, threads and torch
    (from ``pruners.latency.environment``), whether malloc was pinned (``benchmarks``), and,
    for a table with onnxruntime figures, how its threads ran (``pruners.latency.ort_options``)."""
    from pruners.latency.timing import ORT_TIMING

    from . import MALLOC_PINNED

    line = (f"{env.get('cpu', '?')} ({env.get('cores', '?')} cores; {env.get('flags', '')}); "
            f"{env.get('threads', '?')} threads; torch {env.get('torch', '?')}; malloc "
            f"{'pinned' if MALLOC_PINNED else 'default'}")
    return f"{line}; onnxruntime threads: {ORT_TIMING}" if onnxruntime else line


def timing_args(p: argparse.ArgumentParser, models: list[str], out: str, prefix: str) -> None:
    """The options every timed benchmark takes: ``--models``, ``--threads``, ``--rounds``
    (interleaved rounds per timing), ``--out`` and ``--prefix`` (where its tables go)."""
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=out)
    p.add_argument("--prefix", default=prefix)


def print_table(out: str, prefix: str) -> None:
    """Print the Markdown table a benchmark wrote (``prefix``.md under ``out``), if any."""
    path = os.path.join(out, f"{prefix}.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            print(f.read(), end="")


def write_tables(rows: list[dict], env: dict, out: str, prefix: str, table: str) -> None:
    """``prefix``.csv (every key any row has), ``prefix``.json (rows and environment) and
    ``prefix``.md (``table``) under ``out``."""
    os.makedirs(out, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(out, f"{prefix}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, f"{prefix}.json"), "w") as f:
        json.dump({"rows": rows, "environment": env}, f, indent=1)
    with open(os.path.join(out, f"{prefix}.md"), "w") as f:
        f.write(table)


def load_rows(runs_path: str) -> tuple[list[dict], dict[str, dict]]:
    """(one row per pruning run with its latency merged in, latency results by model)."""
    prunes: dict[tuple, dict] = {}
    latency: dict[str, dict] = {}
    with open(runs_path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            job, result = rec["job"], rec["result"] or {}
            if job["kind"] == "latency":
                latency[job["model"]] = dict(result, status=rec["status"], error=rec["error"])
                continue
            row = {"model": job["model"], "tool": job["tool"], "target": job["target"],
                   "round_to": job["round_to"], "status": rec["status"], "error": rec["error"],
                   "wall_s": round(rec["seconds"], 2), "peak_rss_mb": round(rec["peak_rss_mb"])}
            row.update({k: v for k, v in result.items() if k not in row or v is not None})
            row["_label"] = job["label"]
            prunes[job["label"], job["model"]] = row  # a resumed run's repeat replaces it
    for row in prunes.values():
        lat = latency.get(row["model"], {})
        # only figures taken by the checked harness count: it records the machine ("env")
        # and flags a spread that stayed over 10% as noise; older latency runs are dropped
        trusted = "env" in lat
        for setting in SETTINGS:
            for batch, times in (lat.get(setting) or {}).items():
                key = f"{setting}_b{batch}"
                if trusted and (lat.get("noisy", {}).get(setting) or {}).get(batch):
                    row[f"noisy_{key}"] = True
                    continue
                if trusted and row["_label"] in times and "dense" in times:
                    ms, dense = times[row["_label"]], times["dense"]
                    row[f"spread_{key}"] = lat["spread"][setting][batch].get(row["_label"])
                    row[f"{key}_ms"] = round(ms, 3)
                    row[f"dense_{key}_ms"] = round(dense, 3)
                    row[f"speedup_{key}"] = round(dense / ms, 3)
                    if row.get("flops_ratio"):
                        row[f"efficiency_{key}"] = round(dense / ms * row["flops_ratio"], 3)
        if row["_label"] in (lat.get("ort_errors") or {}):
            row["ort_error"] = lat["ort_errors"][row["_label"]]
    return list(prunes.values()), latency


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {package_version(p)}"
                         for p in ("torch", "torch-pruning", "onnxruntime"))
    return f"{cpu}, {os.cpu_count()} cores; {versions}; {time.strftime('%Y-%m-%d')}"


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_summary(runs_path: str, out: str, prefix: str) -> list[str]:
    rows, latency = load_rows(runs_path)
    paths = [os.path.join(out, f"{prefix}.csv"), os.path.join(out, f"{prefix}.md"),
             os.path.join(out, f"{prefix}_brief.md")]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not k.startswith("_")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, latency)
    with open(paths[1], "w") as f:
        f.write(text)
    print(text)
    with open(paths[2], "w") as f:
        f.write(brief(rows))
    paths += plots(rows, out, prefix)
    return paths


def _status(row: Optional[dict]) -> str:
    if row is None:
        return "not run"
    if row["status"] == "ok":
        return "ok"
    return f"{row['status']}: {row['error'][:70]}".replace("|", "\\|")


def _num(row: Optional[dict], key: str, fmt: str) -> str:
    return format(row[key], fmt) if row and row.get(key) is not None else "-"


def markdown(rows: list[dict], latency: dict[str, dict]) -> str:
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    by = {(r["model"], r["target"], r["round_to"], r["tool"]): r for r in rows}
    cases = list(dict.fromkeys((r["model"], r["target"], r["round_to"]) for r in rows))
    timed = [c for c in cases if any(k.startswith(("speedup_", "noisy_"))
                                     for t in tools for k in (by.get(c + (t,)) or {}))]
    lines = [f"Machine: {machine()}.", "",
             "FLOPs: achieved fraction of the dense model's FLOPs (FlopCounterMode, same counter "
             "for both tools). Engine: seconds of the tool's own call. Speedup: dense / pruned "
             "median latency, PyTorch eager, batch 1, CPU, from latency jobs that checked their "
             "spread (\"noisy\": it stayed over 10%, no figure; \"-\": not re-measured with "
             "the checked harness).", ""]
    head = "| model | target | round_to |"
    rule = "|---|---|---|"
    for tool in tools:
        head += f" {tool} | FLOPs | engine (s) | speedup |"
        rule += "---|---|---|---|"
    lines += [head, rule]
    for case in cases:
        line = f"| {case[0]} | {case[1]:g} | {case[2]} |"
        for tool in tools:
            r = by.get(case + (tool,))
            line += (f" {_status(r)} | {_num(r, 'flops_ratio', '.3f')} | "
                     f"{_num(r, 'engine_s', '.1f')} | {_timed(r, 'eager_b1')} |")
        lines.append(line)
    lines += ["", _totals(rows, tools), ""]
    if timed:
        lines += ["Latency in ms (speedup over dense); efficiency = speedup x FLOPs fraction "
                  "(1.0: the removed FLOPs all show up as time).", "",
                  "| model | tool | target | round_to | eager b1 | eager b8 | ort b1 | ort b8 "
                  "| efficiency eager b1 | efficiency ort b1 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case in timed:
            for tool in tools:
                r = by.get(case + (tool,))
                if not r or r["status"] != "ok":
                    continue
                cells = []
                for key in ("eager_b1", "eager_b8", "ort_b1", "ort_b8"):
                    cells.append(f"{r[key + '_ms']:.1f} ({r['speedup_' + key]:.2f}x)"
                                 if key + "_ms" in r else _timed(r, key))
                lines.append(f"| {case[0]} | {tool} | {case[1]:g} | {case[2]} | "
                             + " | ".join(cells) + f" | {_num(r, 'efficiency_eager_b1', '.2f')}"
                             f" | {_num(r, 'efficiency_ort_b1', '.2f')} |")
        lines.append("")
    errors = [(m, lat["error"]) for m, lat in latency.items() if lat.get("status") != "ok"]
    errors += [(r["model"], f"{r['tool']} onnx: {r['ort_error']}") for r in rows
               if r.get("ort_error")]
    if errors:
        lines += ["Latency problems:", ""] + [f"- {m}: {e}" for m, e in errors] + [""]
    return "\n".join(lines)


def _short_status(row: Optional[dict]) -> str:
    """The failure in a few words: the status and the exception type where there is one."""
    if row is None:
        return "not run"
    match = re.match(r"(\w+(?:Error|Exception))\b", row["error"] or "")
    return f"{row['status']} ({match.group(1)})" if match else row["status"]


def _timed(row: Optional[dict], key: str) -> str:
    """The speedup at ``key`` (``eager_b1``...), "noisy" when its spread stayed over 10%,
    or "-" (not timed by the checked harness)."""
    if row is not None and row.get(f"speedup_{key}") is not None:
        return f"{row[f'speedup_{key}']:.2f}"
    return "noisy" if row is not None and row.get(f"noisy_{key}") else "-"


def _cell(row: Optional[dict]) -> str:
    if row is None or row["status"] != "ok":
        return _short_status(row)
    timing = _timed(row, "eager_b1")
    timing = {"-": "not timed", "noisy": "noisy"}.get(timing, f"{timing}x")
    return f"{_num(row, 'flops_ratio', '.3f')} · {_num(row, 'engine_s', '.1f')} s · {timing}"


def brief(rows: list[dict]) -> str:
    """One row per model and target, each tool at each round_to in one cell (for the README).

    A cell reads "FLOPs kept · engine seconds · eager batch-1 speedup", or the failure.
    """
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    rounds = sorted({r["round_to"] for r in rows})
    by = {(r["model"], r["target"], r["round_to"], r["tool"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    cases = sorted(dict.fromkeys((r["model"], r["target"]) for r in rows),
                   key=lambda c: (models.index(c[0]), -c[1]))
    columns = [(t, k) for t in tools for k in rounds]
    lines = [f"Machine: {machine()}.", "",
             "Each cell: FLOPs kept · engine time · speedup (dense / pruned median latency, "
             "PyTorch eager, batch 1, CPU). `rN`: round_to N.", "",
             "| model | target | " + " | ".join(f"{t} r{k}" for t, k in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for model, target in cases:
        cells = [_cell(by.get((model, target, k, t))) for t, k in columns]
        lines.append(f"| {model} | {target:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _totals(rows, tools), ""])


def _totals(rows: list[dict], tools: list[str]) -> str:
    parts = []
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool]
        ok = [r for r in mine if r["status"] == "ok"]
        gaps = [abs(r["gap"]) for r in ok if r.get("gap") is not None]
        eff = [r["efficiency_eager_b1"] for r in ok if r.get("efficiency_eager_b1")]
        text = f"**{tool}**: {len(ok)}/{len(mine)} runs succeeded"
        if gaps:
            text += f", median distance from target {100 * statistics.median(gaps):.2f} points"
        if eff:
            text += f", median efficiency (eager b1) {statistics.median(eff):.2f}"
        parts.append(text)
    return "; ".join(parts) + "."


def plots(rows: list[dict], out: str, prefix: str) -> list[str]:
    """Latency against FLOPs (both tools), and engine time against model size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    ok = [r for r in rows if r["status"] == "ok"]
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    keys = [k for k in ("eager_b1", "eager_b8", "ort_b1", "ort_b8")
            if any(f"speedup_{k}" in r for r in ok)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for tool, marker in zip(tools, "os^v"):
                pts = [(r["flops_ratio"], 1 / r[f"speedup_{key}"]) for r in ok
                       if r["tool"] == tool and f"speedup_{key}" in r]
                if pts:
                    ax.scatter(*zip(*pts), label=tool, marker=marker, alpha=0.7)
            ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="latency = FLOPs")
            ax.set(xlabel="FLOPs kept", ylabel="latency kept", title=key.replace("_", " "),
                   xlim=(0, 1.05), ylim=(0, 1.3))
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{prefix}_latency_vs_flops.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    scaling = [r for r in rows if r["target"] == 0.5 and r["round_to"] == 8
               and r.get("engine_s") is not None and r.get("params_before")]
    if scaling:
        fig, ax = plt.subplots(figsize=(6, 4))
        for tool, marker in zip(tools, "os^v"):
            for family, pattern in (("ResNet", r"resnet\d+"), ("YOLOv8", r"yolov8[nsmlx]")):
                pts = sorted((r["params_before"] / 1e6, r["engine_s"], r["status"])
                             for r in scaling
                             if r["tool"] == tool and re.fullmatch(pattern, r["model"]))
                if not pts:
                    continue
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                                label=f"{tool}, {family}")
                for x, y, status in pts:
                    if status != "ok":
                        ax.annotate(status, (x, y), fontsize=6, color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="parameters (M)",
               ylabel="engine time (s)", title="engine time at 50% FLOPs, round_to 8")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{prefix}_engine_scaling.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
