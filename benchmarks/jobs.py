"""What runs inside one benchmark child process: a pruning run, or a latency comparison.

    python -m benchmarks.jobs '<job json>' <result.json>

The parent (:mod:`benchmarks.limits`) enforces the limits; this side measures and writes one
JSON object. A tool that raises still gets a row: ``status="error"`` with the exception.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .models import Bench, build


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _contract(out: Any) -> tuple[str, list[list[int]]]:
    leaves, spec = pytree.tree_flatten(out)
    return str(spec), [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def _compare(bench: Bench, before: tuple, after: tuple) -> str:
    """Output contracts (from :func:`_contract`): "unchanged", "same structure" (a detector's
    box count follows the weights, so only the leading sizes may differ), or "changed"."""
    (spec0, shapes0), (spec1, shapes1) = before, after
    if spec0 != spec1:
        return "changed"
    if shapes0 == shapes1:
        return "unchanged"
    if isinstance(bench.inputs, list) and [len(s) for s in shapes0] == [len(s) for s in shapes1]:
        return "same structure"
    return "changed"


def _run(bench: Bench, model: torch.nn.Module, inputs: Any = None) -> Any:
    inputs = bench.inputs if inputs is None else inputs
    with torch.no_grad():  # a tuple is the forward's arguments, as prune() reads it
        out = model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    return bench.outputs(out) if bench.outputs is not None else out


def prune_job(job: dict) -> dict:
    """Prune ``job["model"]`` with ``job["tool"]`` to ``job["target"]`` of the FLOPs.

    FLOPs and parameters before and after are counted here, by FlopCounterMode, for every tool
    alike. The pruned model is saved to ``job["save"]`` (if given) for the latency job.
    """
    from pruners.report import measure

    from .tools import resolve

    torch.set_num_threads(job.get("threads") or os.cpu_count() or 1)
    tool = resolve(job["tool"])
    bench = build(job["model"])
    flops0, params0 = measure(bench.model, (bench.inputs,))
    spec0, shapes0 = _contract(_run(bench, bench.model))
    row: dict = {"flops_before": flops0, "params_before": params0,
                 "rss_before_mb": round(_peak_rss_mb(), 1)}
    start = time.perf_counter()
    try:
        pruned, info = tool(bench, job["target"], job["round_to"])
    except Exception as exc:  # noqa: BLE001 - a failing tool is a result
        row.update(status="error", engine_s=round(time.perf_counter() - start, 3),
                   peak_rss_mb=round(_peak_rss_mb(), 1), error=_describe(exc))
        return row
    row["engine_s"] = round(time.perf_counter() - start, 3)
    row["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    row.update(info)
    pruned.eval()
    try:
        flops1, params1 = measure(pruned, (bench.inputs,))
        spec1, shapes1 = _contract(_run(bench, pruned))
    except Exception as exc:  # noqa: BLE001 - the pruned model does not run
        row.update(status="error", error="pruned model fails: " + _describe(exc))
        return row
    row.update(flops_after=flops1, params_after=params1, flops_ratio=flops1 / flops0,
               params_ratio=params1 / params0, gap=flops1 / flops0 - job["target"])
    row["outputs"] = _compare(bench, (spec0, shapes0), (spec1, shapes1))
    if row["outputs"] == "changed":
        row.update(status="error",
                   error=f"output contract changed: {shapes0[:3]} -> {shapes1[:3]}")
        return row
    if job.get("save"):
        torch.save(pruned, job["save"])
    row["status"] = "ok"
    return row


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {first[:240]}{at}"


def interleaved(fns: dict[str, Callable[[], Any]], budget_s: float, warmup: int = 2,
                min_rounds: int = 5, max_rounds: int = 40, max_spread: float = 0.1,
                retries: int = 2) -> tuple[dict[str, Any], bool]:
    """Per function its :class:`pruners.latency.Timing` (median ms, spread), timed round-robin
    in an order rotated every round (``pruners.latency.interleave``), and whether the figures
    are noise: measured again up to ``retries`` times while a spread exceeds ``max_spread``,
    keeping the narrowest attempt. The round count fills ``budget_s``."""
    from pruners.latency import WallTimer, steady

    labels = list(fns)
    start = time.perf_counter()
    for label in labels:
        fns[label]()
    per_round = time.perf_counter() - start
    # a sample is the mean of a few calls (about 0.1 s of the slowest model): the spread
    # then judges the machine, not one call's jitter
    repeat = max(1, min(20, int(0.1 * len(labels) / max(per_round, 1e-6))))
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round * repeat, 1e-6))))
    calls = {label: (fn, label) for label, fn in fns.items()}
    best, _ = steady(calls, WallTimer(), rounds, repeat=repeat, max_spread=max_spread,
                     retries=retries, warmup=warmup - 1)
    return best, max(t.spread for t in best.values()) > max_spread


def latency_job(job: dict) -> dict:
    """Dense and every pruned variant of one model, timed interleaved in this one process:
    PyTorch eager and onnxruntime, at each batch size in ``job["batches"]``, each figure with
    its spread, a noisy flag and the machine (``pruners.latency.environment``).

    Batch sizes after the first time only the labels in ``job["wide"]`` (default: all).
    """
    from pruners.latency import environment

    threads = job.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(threads)
    bench = build(job["model"])
    models = {"dense": bench.model}
    for label, path in job["variants"].items():
        models[label] = torch.load(path, weights_only=False).eval()
    budget = job.get("budget_s", 20.0)
    out: dict = {"eager": {}, "ort": {}, "ort_errors": {}, "spread": {"eager": {}, "ort": {}},
                 "noisy": {"eager": {}, "ort": {}}, "env": environment("eager", "cpu", threads)}
    sessions: dict = {}
    if job.get("ort", True):
        sessions, out["ort_errors"] = _ort_sessions(bench, models, threads)
    for i, b in enumerate(job["batches"]):
        if i and isinstance(bench.inputs, list):
            break  # detectors take a list of full-size images: batch 1 only, to bound time
        timed = [k for k in models if i == 0 or k == "dense" or k in job.get("wide", models)]
        x = bench.batch(b)
        feeds = [t.numpy() for t in pytree.tree_leaves(x)]
        settings = {"eager": {k: (lambda m=models[k]: _run(bench, m, x)) for k in timed},
                    "ort": {k: (lambda s=sessions[k][0], n=sessions[k][1]:
                                s.run(None, dict(zip(n, feeds))))
                            for k in timed if k in sessions}}
        for setting, fns in settings.items():
            if not fns:
                continue
            times, noisy = interleaved(fns, budget, max_spread=job.get("max_spread", 0.1))
            out[setting][str(b)] = {k: t.median_ms for k, t in times.items()}
            out["spread"][setting][str(b)] = {k: round(t.spread, 4) for k, t in times.items()}
            out["noisy"][setting][str(b)] = noisy
    out["status"] = "ok"
    return out


def _ort_sessions(bench: Bench, models: dict, threads: int) -> tuple[dict, dict]:
    import onnxruntime as ort

    from pruners import export_onnx
    from pruners.latency import ort_options

    options = ort_options(threads)
    sessions, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            path = os.path.join(tmp, f"{label}.onnx")
            try:
                export_onnx(model, (bench.inputs,), path, simplify=False, outputs=bench.outputs,
                            dynamic_batch=not isinstance(bench.inputs, list), rtol=1e-3)
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - recorded, the eager numbers still stand
                errors[label] = _describe(exc)
                continue
            sessions[label] = (session, [i.name for i in session.get_inputs()])
    return sessions, errors


def coverage_job(job: dict) -> dict:
    """``prune()`` one zoo model with defaults and say how well it went, and if not, why.

    status: "ok" (within 1 point of the target, outputs unchanged, exact check passed where it
    applies), "limited" (the target is infeasible: pruned to the reachable target instead),
    "off-target", "broken" (outputs changed or the check failed) or "error" (prune raised).
    A model with nothing prunable is "limited" at FLOPs 1.0, with the reasons.
    """
    from depgraph.errors import PruningError
    from pruners import prune
    from pruners.allocate import InfeasibleTargetError

    from .zoo import build as build_zoo

    torch.set_num_threads(job.get("threads") or os.cpu_count() or 1)
    bench, extra = build_zoo(job["model"])
    target = job["target"]
    row: dict = {"params_m": round(bench.params / 1e6, 2)}
    spec0, shapes0 = _contract(_run(bench, bench.model))
    start = time.perf_counter()
    status, why = "ok", []
    try:
        try:
            result = prune(bench.model, bench.inputs, target_flops=target,
                           outputs=bench.outputs, **extra)
        except InfeasibleTargetError as exc:
            if exc.reachable is None:
                raise
            status, why = "limited", [str(exc).split("Frozen:")[-1].strip()]
            if exc.reachable >= 0.995:  # nothing can go: the reasons are the whole answer
                row.update(status=status, flops_ratio=1.0, params_ratio=1.0,
                           engine_s=round(time.perf_counter() - start, 2),
                           why=f"nothing prunable: {why[0]}"[:600])
                return row
            target = min(1.0, float(np.ceil(exc.reachable * 100) / 100 + 0.01))
            result = prune(bench.model, bench.inputs, target_flops=target,
                           outputs=bench.outputs, **extra)
    except PruningError as exc:
        row.update(status="error", why=_describe(exc),
                   engine_s=round(time.perf_counter() - start, 2))
        return row
    row["engine_s"] = round(time.perf_counter() - start, 2)
    report, graph = result.report, result.graph
    row.update({f"time_{k.replace(' ', '_')}_s": round(v, 2) for k, v in report.seconds.items()})
    row.update(target=target, flops_before=report.flops_before, flops_after=report.flops_after,
               params_before=report.params_before, params_after=report.params_after,
               flops_ratio=round(report.flops_ratio, 4), params_ratio=round(report.params_ratio, 4))
    for kind in ("conv", "linear"):
        prunable, total = graph.prunable_share(kind)
        row[f"{kind}_prunable"], row[f"{kind}_total"] = prunable, total
    spec1, shapes1 = _contract(_run(bench, result.model))
    if _compare(bench, (spec0, shapes0), (spec1, shapes1)) == "changed":
        status, why = "broken", [f"output contract changed: {shapes0[:2]} -> {shapes1[:2]}"]
    elif report.verify is not None and not report.verify.ok:
        status, why = "broken", [f"zero-equivalence check failed: {report.verify}"]
    elif status == "ok" and abs(report.flops_ratio - target) > 0.01:
        status = "off-target"  # e.g. a detector whose proposal count follows the weights
    check = report.verify
    row["verified"] = ("inexact units (not checked)" if check is None else "exact" if not
                       check.inexact else "exact (inexact units removed from both)")
    why += _frozen_reasons(graph) + [n for n in report.notes if n.startswith(("froze", "achieved"))]
    row.update(status=status, why=" | ".join(why)[:600])
    return row


def _frozen_reasons(graph, top: int = 3) -> list[str]:
    """The biggest reasons conv/linear output channels are frozen, output contracts aside."""
    outs = {(layer.weight, layer.out_dim) for layer in graph.layers
            if layer.kind in ("conv", "linear") and layer.weight and layer.out_dim is not None}
    counts = []
    for frozen in graph.frozen:
        n = sum(c for p, d, c in frozen.dims if (p, d) in outs)
        if n and "reaches the model output" not in frozen.reason:
            counts.append((n, frozen.reason))
    return [f"{n} ch: {reason}" for n, reason in sorted(counts, reverse=True)[:top]]


JOBS = {"prune": prune_job, "latency": latency_job, "coverage": coverage_job}


def main(argv: list[str]) -> None:
    job, result_path = json.loads(argv[0]), argv[1]
    result = JOBS[job["kind"]](job)
    result.setdefault("peak_rss_mb", round(_peak_rss_mb(), 1))
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
