"""Side-by-side comparison with Torch-Pruning: ``python -m benchmarks [--quick]``.

For each model: every (tool, FLOPs target, round_to) pruning run in its own child process under
a time and a memory limit, then one latency child that times the dense model and every pruned
variant interleaved. Every finished job is appended to ``<prefix>_runs.jsonl`` at once, so an
interrupted run loses nothing and ``--resume`` picks up where it stopped. The CSV, Markdown
summary and plots are written from that file (:mod:`benchmarks.summary`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from .limits import Outcome, run_job

RESULTS = os.path.join(os.path.dirname(__file__), "results")

FULL_MODELS = ["resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v2",
               "mobilenet_v3_large", "efficientnet_b0", "densenet121", "regnet_y_800mf",
               "convnext_tiny", "yolov5s", "yolov8n", "yolov8s", "yolov8m", "yolo11n", "yolo11s",
               "retinanet_resnet50_fpn"]
QUICK_MODELS = ["resnet18", "mobilenet_v2", "yolov8n"]
#: Extra models for the engine-time scaling plot (pruning runs only, no latency).
SCALING_MODELS = ["resnet34", "yolov8l", "yolov8x"]
TOOLS = ["ours", "torch_pruning"]


@dataclass(frozen=True)
class Config:
    models: list[str]
    targets: list[float]
    round_to: list[int]
    tools: list[str]
    batches: list[int]
    scaling: list[str]
    timeout_s: float
    latency_timeout_s: float
    mem_mb: float
    latency_budget_s: float
    max_spread: float
    ort: bool
    prefix: str
    out: str
    resume: bool = False
    summary_only: bool = False


def parse(argv: Optional[list[str]] = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{', '.join(QUICK_MODELS)} at 50%% FLOPs, round_to 1 and 8 (<10 min)")
    p.add_argument("--models", nargs="+", help="override the model list")
    p.add_argument("--targets", nargs="+", type=float, help="FLOPs fractions to keep")
    p.add_argument("--round-to", nargs="+", type=int, dest="round_to")
    p.add_argument("--tools", nargs="+", default=TOOLS,
                   help="tool names or 'module:function' (see benchmarks/tools.py)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--no-scaling", action="store_true", help="skip the extra scaling models")
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime latency")
    p.add_argument("--timeout", type=float, help="seconds per pruning run")
    p.add_argument("--mem-gb", type=float, default=16.0, help="memory limit per child")
    p.add_argument("--latency-budget", type=float, default=None,
                   help="seconds of timed rounds per latency measurement")
    p.add_argument("--max-spread", type=float, default=0.1, dest="max_spread",
                   help="a latency figure whose interquartile spread stays over this after "
                        "3 attempts is reported as noise")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", help="file name prefix (compare, or compare_quick)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs file and skip the jobs it already holds")
    p.add_argument("--summary-only", action="store_true", dest="summary_only",
                   help="rewrite CSV, Markdown and plots from the runs file; run nothing")
    a = p.parse_args(argv)
    quick = a.quick
    return Config(
        models=a.models or (QUICK_MODELS if quick else FULL_MODELS),
        targets=a.targets or ([0.5] if quick else [0.7, 0.5, 0.3]),
        round_to=a.round_to or [1, 8], tools=a.tools, batches=a.batches,
        scaling=[] if (quick or a.no_scaling or a.models) else SCALING_MODELS,
        timeout_s=a.timeout or (300.0 if quick else 900.0), latency_timeout_s=3600.0,
        mem_mb=a.mem_gb * 1024, latency_budget_s=a.latency_budget or (4.0 if quick else 6.0),
        max_spread=a.max_spread,
        ort=not a.no_ort, prefix=a.prefix or ("compare_quick" if quick else "compare"),
        out=a.out, resume=a.resume, summary_only=a.summary_only)


def plan_jobs(cfg: Config, workdir: str) -> list[dict]:
    """Pruning runs grouped by model, each model followed by its latency job."""
    jobs = []
    for model in cfg.models + cfg.scaling:
        latency = model not in cfg.scaling
        variants = {}
        for tool, target, r in itertools.product(cfg.tools, cfg.targets, cfg.round_to):
            if not latency and (target != 0.5 or r != 8):
                continue  # scaling models: one run per tool
            label = f"{tool}|{target:g}|{r}"
            path = os.path.join(workdir, f"{model}-{tool.replace(':', '_')}-{target:g}-r{r}.pt")
            jobs.append({"kind": "prune", "model": model, "tool": tool, "target": target,
                         "round_to": r, "save": path if latency else None, "label": label})
            variants[label] = path
        if latency:
            wide = [k for k in variants if k.split("|")[1] == "0.5"] or list(variants)
            jobs.append({"kind": "latency", "model": model, "variants": variants,
                         "batches": cfg.batches, "wide": wide, "ort": cfg.ort,
                         "budget_s": cfg.latency_budget_s, "max_spread": cfg.max_spread})
    return jobs


def job_key(job: dict) -> str:
    """Identifies a job across runs; a latency job by its model and the variants it times."""
    key = {k: job[k] for k in ("kind", "model", "tool", "target", "round_to") if k in job}
    if job["kind"] == "latency":
        key["variants"] = sorted(job.get("variants", ()))
    return json.dumps(key, sort_keys=True)


class Progress:
    """One status line, redrawn in place on a terminal, one line per job otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.tty = sys.stdout.isatty()

    def show(self, text: str) -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed / 60:5.1f} min  {text}")
        if self.tty:
            print("\r" + line[:shutil.get_terminal_size().columns - 1].ljust(79), end="",
                  flush=True)
        else:
            print(line, flush=True)

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text)
        if self.tty and self.done == self.total:
            print()


def describe(job: dict, outcome: Outcome) -> str:
    name = f"{job['model']} {job.get('tool', 'latency')}"
    if "target" in job:
        name += f" {job['target']:g} r{job['round_to']}"
    if outcome.status != "ok":
        return f"{name}: {outcome.status.upper()} {outcome.error[:80]}"
    r = outcome.result or {}
    if job["kind"] == "prune":
        return f"{name}: FLOPs {r['flops_ratio']:.3f} in {r['engine_s']:.1f} s"
    return f"{name}: timed in {outcome.seconds:.0f} s"


def run(cfg: Config) -> str:
    """Run every job not yet in the runs file; return the runs file's path.

    Pruned models wait in ``<out>/.models`` for their model's latency job, which deletes them.
    """
    os.makedirs(cfg.out, exist_ok=True)
    runs_path = os.path.join(cfg.out, f"{cfg.prefix}_runs.jsonl")
    done: dict[str, str] = {}
    if cfg.resume and os.path.exists(runs_path):
        with open(runs_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
            done = {job_key(r["job"]): r["status"] for r in records}
    elif os.path.exists(runs_path):
        os.remove(runs_path)
    workdir = os.path.join(cfg.out, ".models")
    os.makedirs(workdir, exist_ok=True)
    jobs = plan_jobs(cfg, workdir)
    progress = Progress(len(jobs))
    exhausted: dict[tuple, str] = {}  # (model, tool) -> why its other runs are skipped
    latency = {j["model"]: j for j in jobs if j["kind"] == "latency"}
    # Timing deletes the pruned models, and a timing covers every variant of its model: a
    # model that lacks a prune row after its timing is redone whole, or the new variant would
    # go untimed (or inherit the timing of the run it replaces).
    redo = {j["model"] for j in jobs if j["kind"] == "prune" and job_key(j) not in done
            and j["model"] in latency and job_key(latency[j["model"]]) in done}
    done = {k: v for k, v in done.items() if json.loads(k)["model"] not in redo}
    for job in jobs:
        timed = job["model"] in latency and job_key(latency[job["model"]]) in done
        lost = (job["kind"] == "prune" and done.get(job_key(job)) == "ok" and not timed
                and job["save"] and not os.path.exists(job["save"]))
        if job_key(job) in done and not lost:
            progress.step(f"{job['model']}: already done")
            continue  # (a pruned model lost before its timing is pruned again)
        planned = job
        if job["kind"] == "latency":
            job = dict(job, variants={k: v for k, v in job["variants"].items()
                                      if os.path.exists(v)})
            if not job["variants"]:
                progress.step(f"{job['model']} latency: no pruned model to time")
                continue
        progress.show(f"{job['model']} {job.get('tool', 'latency')} ...")
        timeout = cfg.timeout_s if job["kind"] == "prune" else cfg.latency_timeout_s
        hopeless = exhausted.get((job["model"], job.get("tool")))
        if hopeless:  # it ran out of time or memory before any target mattered
            outcome = Outcome("skipped", None, hopeless, 0.0, 0.0)
        else:
            outcome = run_job({k: v for k, v in job.items() if k != "label"},
                              timeout_s=timeout, mem_mb=cfg.mem_mb)
        if outcome.status in ("timeout", "oom") and job["kind"] == "prune":
            exhausted[job["model"], job["tool"]] = (
                f"not run: {outcome.status} at target {job['target']:g}, round_to "
                f"{job['round_to']} ({outcome.error})")
        with open(runs_path, "a") as f:
            f.write(json.dumps({"job": planned, **asdict(outcome)}) + "\n")
        if job["kind"] == "latency":
            for path in job["variants"].values():
                os.remove(path)
        progress.step(describe(job, outcome))
    return runs_path


def main(argv: Optional[list[str]] = None) -> None:
    from .summary import write_summary

    cfg = parse(argv)
    runs = (os.path.join(cfg.out, f"{cfg.prefix}_runs.jsonl") if cfg.summary_only
            else run(cfg))
    paths = write_summary(runs, cfg.out, cfg.prefix)
    print("\n".join(["", "wrote:"] + [f"  {p}" for p in paths]))
