"""Coverage: does ``prune()`` work on the models users bring? ``python -m benchmarks.coverage``.

Each model of the zoo (:mod:`benchmarks.zoo`) is pruned to 50% of its FLOPs with defaults and
no user-listed layers, in its own child process under a time and a memory limit. The table
says, per model: FLOPs and params before and after, the share of prunable conv and linear
output channels, engine time, status, and for anything not fully pruned, why: the reasons
come from the analysis and the report, not from a hand-written list.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re

from .compare import RESULTS, Progress
from .limits import run_job
from .summary import machine
from .zoo import SCOPES, names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage",
                                description=__doc__.splitlines()[0])
    p.add_argument("--scope", default="all", choices=SCOPES + ("all",))
    p.add_argument("--models", nargs="+", help="zoo names, e.g. tv:resnet50 yolo:yolov8n")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--mem-gb", type=float, default=16.0)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", default="coverage")
    p.add_argument("--resume", action="store_true", help="skip models already in the runs file")
    p.add_argument("--list-failures", action="store_true",
                   help="print, per cause, the models of the runs file that are not ok")
    a = p.parse_args(argv)
    if a.list_failures:
        print(failures(load(os.path.join(a.out, f"{a.prefix}_runs.jsonl"))))
        return
    models = a.models or names(a.scope)
    os.makedirs(a.out, exist_ok=True)
    runs_path = os.path.join(a.out, f"{a.prefix}_runs.jsonl")
    done = set()
    if a.resume and os.path.exists(runs_path):
        with open(runs_path) as f:
            done = {json.loads(line)["job"]["model"] for line in f if line.strip()}
    elif os.path.exists(runs_path):
        os.remove(runs_path)
    progress = Progress(len(models))
    for model in models:
        if model in done:
            progress.step(f"{model}: already done")
            continue
        progress.show(f"{model} ...")
        job = {"kind": "coverage", "model": model, "target": a.target}
        outcome = run_job(job, timeout_s=a.timeout, mem_mb=a.mem_gb * 1024)
        with open(runs_path, "a") as f:
            f.write(json.dumps({"job": job, "status": outcome.status, "error": outcome.error,
                                "seconds": outcome.seconds, "peak_rss_mb": outcome.peak_rss_mb,
                                "result": outcome.result}) + "\n")
        row = outcome.result or {}
        status = row.get("status", outcome.status) if outcome.status == "ok" else outcome.status
        flops = f"FLOPs {row['flops_ratio']:.3f}" if "flops_ratio" in row else outcome.error[:60]
        progress.step(f"{model}: {status} {flops}")
    for path in write(runs_path, a.out, a.prefix, a.target):
        print("wrote", path)


def load(runs_path: str) -> list[dict]:
    """One row per model, in first-run order; a later run of a model replaces the earlier."""
    rows: dict[str, dict] = {}
    with open(runs_path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            row = {"model": rec["job"]["model"], **(rec["result"] or {}),
                   "status": rec["status"]}  # the job's verdict, or crash / timeout / oom
            if rec["error"] and not row.get("why"):
                row["why"] = rec["error"]
            row["peak_rss_mb"] = round(rec["peak_rss_mb"])
            rows[row["model"]] = row
    return list(rows.values())


def write(runs_path: str, out: str, prefix: str, target: float) -> list[str]:
    rows = load(runs_path)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    csv_path, md_path = os.path.join(out, f"{prefix}.csv"), os.path.join(out, f"{prefix}.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Coverage at target_flops={target:g}, defaults, no ignored layers. "
             f"Machine: {machine()}.", "", f"Status: {_counts(rows)}.", "",
             "| model | params (M) | GFLOPs | FLOPs kept | params kept | prunable conv | "
             "prunable linear | engine (s) | status | why not fully pruned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('params_m', '-')} | {_gflops(r, 2)} | "
            f"{r.get('flops_ratio', '-')} | {r.get('params_ratio', '-')} | "
            f"{_share(r, 'conv', 1)} | {_share(r, 'linear', 1)} | {r.get('engine_s', '-')} | "
            f"{r['status']} | "
            f"{_why(r, 300)} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    brief_path = os.path.join(out, f"{prefix}_brief.md")
    with open(brief_path, "w") as f:
        f.write("\n".join(brief(rows, lines[0])) + "\n")
    return [csv_path, md_path, brief_path]


def brief(rows: list[dict], header: str) -> list[str]:
    """The README's version: status per scope, then one short row per model (reasons only
    where the status is not ok; the full reasons are in the long table)."""
    scopes: dict[str, list[dict]] = {}
    for r in rows:
        scopes.setdefault(r["model"].split(":")[0], []).append(r)
    lines = [header, "", "| scope | models | status |", "|---|---|---|"]
    lines += [f"| {scope} | {len(members)} | {_counts(members)} |"
              for scope, members in scopes.items()]
    lines += ["", "| model | GFLOPs | FLOPs kept | params kept | prunable conv | engine (s) | "
              "status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {_why(r, 120)}"
        lines.append(f"| {r['model']} | {_gflops(r, 1)} | {r.get('flops_ratio', '-')} | "
                     f"{r.get('params_ratio', '-')} | {_share(r, 'conv', 0)} | "
                     f"{r.get('engine_s', '-')} | {status} |")
    return lines


def cause(row: dict) -> str:
    """A failure's cause, for grouping: its status and the first reason, with the module
    names, node names and numbers taken out (so one construct in many models is one cause)."""
    why = str(row.get("why", "")).split(" | ")[0]
    why = re.sub(r"'[\w.\[\]-]+'", "'…'", why)
    why = re.sub(r"\d+", "N", why)
    return f"{row['status']}: {why[:160]}"


def failures(rows: list[dict]) -> str:
    """Per cause, most frequent first, the models that are not ok."""
    by_cause: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            by_cause.setdefault(cause(r), []).append(r["model"])
    if not by_cause:
        return f"all {len(rows)} models ok"
    lines = []
    for c, models in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{len(models)} x {c}")
        lines += [f"    {m}" for m in models]
    return "\n".join(lines)


def _counts(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _share(r: dict, kind: str, digits: int) -> str:
    total = r.get(f"{kind}_total")
    return f"{100 * r[f'{kind}_prunable'] / total:.{digits}f}%" if total else "-"


def _gflops(r: dict, digits: int) -> str:
    return f"{r['flops_before'] / 1e9:.{digits}f}" if r.get("flops_before") else "-"


def _why(r: dict, limit: int) -> str:
    return str(r.get("why", "")).replace("|", "/")[:limit]


if __name__ == "__main__":
    main()
