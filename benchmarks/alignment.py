"""Does the channel multiple matter on this machine? ``python -m benchmarks.alignment``.

``round_to`` changes two things at once: the widths' alignment to the kernels' blocks, and
where the allocation removes channels (rounding moves removals between groups). Comparing
``round_to=1`` against ``16`` mixes both. This separates them: each model is planned at 50%
FLOPs with ``round_to=16`` ("aligned"), and the same plan with one more channel removed from
every group left at a multiple of 16 ("one off": every such width is 16k - 1, the allocation
otherwise the same). Both are timed interleaved with the dense model in eager PyTorch
(contiguous, and channels-last), onnxruntime and OpenVINO when installed. ``one off /
aligned`` above 1 is what alignment alone is worth there; beside it, the multiple
``round_to="auto"`` picks for that runtime and layout from its layer staircases
(``pruners.latency.auto_round_to``), so the two can be checked against each other. Results go
to ``benchmarks/results/alignment.{csv,md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Optional

import torch

from .hardware import MODELS, RESULTS, all_in_layout, bench_for, in_layout
from .summary import machine_line, write_tables

#: runtime column -> (backend, memory format of the model and inputs timed)
RUNTIMES = {"eager": ("eager", torch.contiguous_format),
            "eager cl": ("eager", torch.channels_last),
            "onnxruntime": ("onnxruntime", None), "openvino": ("openvino", None)}


def one_off(planned: Any, multiple: int) -> tuple[Any, int]:
    """The plan of ``planned`` (a ``PlannedPruning``) with one more unit removed from every
    group whose kept width is a positive multiple of ``multiple``, and how many groups that
    is."""
    from pruners import Plan

    graph, removed = planned.graph, set(planned.removed)
    extra = []
    for group in graph.groups:
        kept = [u for u in group.units if u not in removed]
        total = len(kept) + group.frozen
        if len(kept) > 1 and total >= multiple and total % multiple == 0:
            extra.append(kept[-1])
    return Plan.from_units(graph, removed | set(extra), planned.plan.meta), len(extra)


def auto_pick(bench: Any, backend: str, layout: Optional[torch.memory_format],
              threads: int) -> int:
    """The multiple ``round_to="auto"`` picks for ``bench``'s model with ``backend`` in
    ``layout`` (the on-disk latency cache: timed once per machine)."""
    from pruners.latency import LatencyTable, auto_round_to, default_cache_path, layer_calls
    from pruners.verify import run_model

    model, inputs = bench.model, bench.inputs
    if layout is not None and layout != torch.contiguous_format:
        model, inputs = in_layout(model, inputs, layout)
    calls = layer_calls(model, lambda: run_model(model, inputs, bench.outputs))
    table = LatencyTable(default_cache_path(), backend=backend, threads=threads)
    return auto_round_to(calls, table).multiple


def run(models: list[str], threads: int, rounds: int, out: str, prefix: str,
        multiple: int = 16, runtimes: Optional[list[str]] = None, auto: bool = True
        ) -> list[dict]:
    from pruners import apply_plan, plan_pruning
    from pruners.latency import installed, measure_models
    from pruners.report import measure

    torch.set_num_threads(threads)
    runtimes = [r for r in (runtimes or RUNTIMES) if installed(RUNTIMES[r][0])]
    rows, envs = [], {}
    for name in models:
        bench = bench_for(name)
        planned = plan_pruning(bench.model, bench.inputs, target_flops=0.5, round_to=multiple,
                               outputs=bench.outputs, threads=threads)
        aligned = apply_plan(copy.deepcopy(bench.model), planned.plan).eval()
        plan, groups = one_off(planned, multiple)
        off = apply_plan(copy.deepcopy(bench.model), plan).eval()
        counted = (bench.inputs,)
        flops0 = measure(bench.model, counted)[0]
        kept = {k: measure(m, counted)[0] / flops0 for k, m in (("aligned", aligned),
                                                                  ("one off", off))}
        for runtime in runtimes:
            backend, layout = RUNTIMES[runtime]
            print(f"[alignment] {name}: {runtime} ...", flush=True)
            timed = {"dense": bench.model, "aligned": aligned, "one off": off}
            inputs = bench.inputs
            if layout is not None:
                timed, inputs = all_in_layout(timed, inputs, layout)
            m = measure_models(timed, inputs, backend=backend, threads=threads, rounds=rounds)
            envs[f"{name}/{runtime}"] = m.env
            row: dict[str, Any] = {"model": name, "runtime": runtime, "groups_one_off": groups,
                                   "flops_kept_aligned": round(kept["aligned"], 4),
                                   "flops_kept_one_off": round(kept["one off"], 4)}
            for label in timed:
                if label in m.times:
                    row[f"{label.replace(' ', '_')}_ms"] = round(m.times[label].median_ms, 3)
                else:
                    row[f"{label.replace(' ', '_')}_error"] = m.errors.get(label, "?")
            if "aligned" in m.times and "one off" in m.times:
                row["one_off_over_aligned"] = round(m.ratio("one off", "aligned"), 3)
            row["spread"] = round(max(t.spread for t in m.times.values()), 3)
            row["noisy"] = m.noisy
            if auto:
                row["auto_round_to"] = auto_pick(bench, backend, layout, threads)
            rows.append(row)
            write_tables(rows, envs, out, prefix, markdown(rows, envs))
    return rows


def markdown(rows: list[dict], envs: dict) -> str:
    env = next(iter(envs.values()), {})
    timed = {r["runtime"] for r in rows}
    versions = "".join(f", {name} {env.get(key, '?')}" for runtime, name, key in (
        ("onnxruntime", "onnxruntime", "onnxruntime"), ("openvino", "OpenVINO", "openvino"))
        if runtime in timed)
    lines = ["# Does alignment matter? The same plan, aligned to 16 and one channel off", "",
             f"{machine_line(env)}{versions}; "
             f"{env.get('date', '')}. Batch 1; 50% FLOPs at round_to 16 (aligned), and that "
             "plan with one more channel removed from every group at a multiple of 16 (one "
             "off); dense, aligned and one off timed interleaved (median ms; spread = the "
             "widest interquartile spread of the three). One off / aligned above 1: what "
             "alignment alone saves; auto: the multiple round_to='auto' picks there.", "",
             "| model | runtime | groups one off | dense ms | aligned ms | one off ms | "
             "one off / aligned | auto picks | spread |", "|---" * 9 + "|"]
    for r in rows:
        def ms(key: str) -> str:
            return f"{r[key]:.2f}" if key in r else "error"

        ratio = f"{r['one_off_over_aligned']:.3f}" if "one_off_over_aligned" in r else "-"
        noisy = " (noisy)" if r.get("noisy") else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['groups_one_off']} | "
                     f"{ms('dense_ms')} | {ms('aligned_ms')} | {ms('one_off_ms')} | "
                     f"{ratio}{noisy} | {r.get('auto_round_to', '-')} | "
                     f"{100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment",
                                description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--no-auto", action="store_false", dest="auto",
                   help="do not time layer staircases for round_to='auto'")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", default="alignment")
    a = p.parse_args(argv)
    run(a.models, a.threads, a.rounds, a.out, a.prefix, a.multiple, a.runtimes, a.auto)
    with open(os.path.join(a.out, f"{a.prefix}.md"), encoding="utf-8") as f:
        sys.stdout.write(f.read())


if __name__ == "__main__":
    main()
