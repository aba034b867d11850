"""Coverage: does ``prune()`` work on the models users bring? ``python -m benchmarks.coverage``.

``--zoo`` picks the models: the chosen zoo (default), or the ecosystem-wide ``timm-all``,
``tv-all`` and ``ultra-all`` (:mod:`benchmarks.zoo`). Each model is pruned to 50% of its FLOPs with defaults and
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
from .summary import machine, package_version
from .zoo import SCOPES, WIDE_SCOPES, names, timm_family

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
ENGINE_GOAL_S = 30.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage",
                                description=__doc__.splitlines()[0])
    p.add_argument("--zoo", "--scope", dest="zoo", default="all",
                   choices=SCOPES + ("all",) + WIDE_SCOPES)
    p.add_argument("--models", nargs="+", help="zoo names, e.g. tv:resnet50 yolo:yolov8n")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--mem-gb", type=float, default=16.0)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", help="file name prefix (coverage, or coverage_timm_all etc.)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs file and skip models already in it (models named by "
                        "--models run again: their new rows replace the old)")
    p.add_argument("--list-failures", action="store_true",
                   help="print, per cause, the models of the runs file that are not ok")
    p.add_argument("--readme", action="store_true",
                   help="regenerate the README's coverage section from the wide zoos' runs")
    a = p.parse_args(argv)
    a.prefix = a.prefix or prefix_of(a.zoo)
    if a.readme:
        print("wrote", write_readme(a.out))
        return
    if a.list_failures:
        print(failures(load(os.path.join(a.out, f"{a.prefix}_runs.jsonl"))))
        return
    models = a.models or names(a.zoo)
    os.makedirs(a.out, exist_ok=True)
    runs_path = os.path.join(a.out, f"{a.prefix}_runs.jsonl")
    done = set()
    if a.resume and os.path.exists(runs_path):
        with open(runs_path) as f:
            done = {json.loads(line)["job"]["model"] for line in f if line.strip()}
        done -= set(a.models or ())
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


def prefix_of(zoo: str) -> str:
    """Result file prefix of a zoo: ``coverage`` for the chosen one, ``coverage_timm_all``…"""
    return f"coverage_{zoo.replace('-', '_')}" if zoo in WIDE_SCOPES else "coverage"


def verdict(row: dict) -> str:
    """ok; refused (the engine said why: a frozen construct, an infeasible target, a
    PruningError) or failed (off target, outputs changed, a raw exception, timeout, oom)."""
    if row["status"] == "ok":
        return "ok"
    return "refused" if row["status"] == "limited" or (row["status"] == "error"
                                                        and not raw(row)) else "failed"


def raw(row: dict) -> bool:
    """The child died of an exception other than a PruningError (which the job catches and
    reports with its engine time): a raw exception reached the user."""
    return row["status"] in ("error", "crash") and "engine_s" not in row


def group_of(model: str) -> str:
    """What a wide table groups by: the timm family, the torchvision kind, the YAML folder."""
    source, _, name = model.partition(":")
    if source == "timm":
        return timm_family(name)
    if source == "yaml":
        return os.path.dirname(name) or "."
    return source


def stats(rows: list[dict], target: float = 0.5) -> dict:
    """The acceptance figures of a run: counts per verdict, raw exceptions, models more than
    a point under their target, models over the engine-time goal."""
    n = len(rows)
    counts = {v: sum(verdict(r) == v for r in rows) for v in ("ok", "refused", "failed")}
    under = [r["model"] for r in rows if "flops_ratio" in r
             and r["flops_ratio"] < r.get("target", target) - 0.01]
    slow = [r["model"] for r in rows
            if (r.get("engine_s") or 0) > ENGINE_GOAL_S or r["status"] == "timeout"]
    return {"models": n, **counts, "ok_share": counts["ok"] / n if n else 0.0,
            "raw_exceptions": [r["model"] for r in rows if raw(r)], "under_target": under,
            "over_30s": slow}


def wide_brief(rows: list[dict], header: str) -> list[str]:
    """A wide zoo's table: one row per model, grouped, with verdict, FLOPs reached, engine
    seconds, peak memory, and the reason where it is not ok."""
    st = stats(rows)
    lines = [header, "",
             f"{st['models']} models: {st['ok']} ok ({100 * st['ok_share']:.1f}%), "
             f"{st['refused']} refused with a reason, {st['failed']} failed; "
             f"{len(st['raw_exceptions'])} raw exceptions; {len(st['under_target'])} more than "
             f"1 point under target; {len(st['over_30s'])} over {ENGINE_GOAL_S:g} s in the engine.",
             "", "| group | model | verdict | FLOPs kept | engine (s) | peak (GB) | why |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (group_of(r["model"]), r["model"])):
        why = "" if r["status"] == "ok" else f"{r['status']}: {_why(r, 140)}"
        peak = f"{r['peak_rss_mb'] / 1024:.1f}" if r.get("peak_rss_mb") else "-"
        lines.append(f"| {group_of(r['model'])} | {r['model'].split(':', 1)[1]} | "
                     f"{verdict(r)} | {r.get('flops_ratio', '-')} | {r.get('engine_s', '-')} | "
                     f"{peak} | {why} |")
    return lines


def write_readme(out: str = RESULTS, readme: str = README) -> str:
    """Replace the README's text between the coverage markers with the wide zoos' summaries
    (one line of figures per zoo and the models that are not ok), from their runs files."""
    lines = ["| zoo | models | ok | refused (reason given) | failed | raw exceptions | "
             ">1 pt under target | over 30 s |", "|---|---|---|---|---|---|---|---|"]
    not_ok = []
    for zoo in WIDE_SCOPES:
        path = os.path.join(out, f"{prefix_of(zoo)}_runs.jsonl")
        if not os.path.exists(path):
            lines.append(f"| {zoo} | not run | | | | | | |")
            continue
        rows = load(path)
        st = stats(rows)
        lines.append(f"| {zoo} | {st['models']} | {st['ok']} ({100 * st['ok_share']:.0f}%) | "
                     f"{st['refused']} | {st['failed']} | {len(st['raw_exceptions'])} | "
                     f"{len(st['under_target'])} | {len(st['over_30s'])} |")
        not_ok += [f"| {zoo} | {r['model']} | {verdict(r)} | {r.get('flops_ratio', '-')} | "
                   f"{r.get('engine_s', '-')} | {r['status']}: {_why(r, 160)} |"
                   for r in rows if r["status"] != "ok"]
    if not_ok:
        lines += ["", "Models not ok (full tables: `benchmarks/results/coverage_*_all.md`):", "",
                  "| zoo | model | verdict | FLOPs kept | engine (s) | why |",
                  "|---|---|---|---|---|---|"] + not_ok
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} … {END} section to regenerate")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(readme, "w") as f:
        f.write(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)
    return readme


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
             f"Machine: {machine()}; {_versions()}.", "", f"Status: {_counts(rows)}.", "",
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
    wide = prefix.endswith("_all")
    with open(brief_path, "w") as f:
        f.write("\n".join((wide_brief if wide else brief)(rows, lines[0])) + "\n")
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


def _versions() -> str:
    return ", ".join(f"{p} {package_version(p)}" for p in ("torchvision", "timm", "ultralytics"))


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
