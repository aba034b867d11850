"""Does the channel multiple matter on this machine? ``python -m benchmarks.alignment``.

``round_to`` changes two things at once: the widths' alignment to the kernels' blocks, and
where the allocation removes channels. This separates them: each model is planned at 50%
FLOPs with ``round_to=16`` ("aligned"), and the same plan is nudged by one channel in every
group left at a multiple of 16, the allocation otherwise the same: one more removed ("one
under": widths 16k - 1, the same number of 16-channel blocks) and one removed channel kept
("one over": widths 16k + 1, one more block, nearly empty). Where kernels pad to blocks (a
staircase), "one over" pays a block per layer for one channel and "one under" pays nothing;
where they handle a width's remainder on a slower path, both pay. All are timed interleaved
with the dense model in eager PyTorch (contiguous, and channels-last), onnxruntime and
OpenVINO when installed; ratios over the aligned model's time say what alignment is worth
there; beside them, the multiple ``round_to="auto"``'s layer staircases pick there
(``pruners.latency.auto_round_to``). Results go to
``benchmarks/results/alignment.{csv,md,json}``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Optional

import torch

from .hardware import MODELS, RESULTS, all_in_layout, bench_for, in_layout
from .summary import machine_line, print_table, timing_args, write_tables

#: runtime column -> (backend, memory format of the model and inputs timed)
RUNTIMES = {"eager": ("eager", torch.contiguous_format),
            "eager cl": ("eager", torch.channels_last),
            "onnxruntime": ("onnxruntime", None), "openvino": ("openvino", None)}


def nudged(planned: Any, multiple: int, by: int) -> tuple[Any, int]:
    """The plan of ``planned`` (a ``PlannedPruning``) with every group whose kept width is a
    positive multiple of ``multiple`` one channel narrower (``by=-1``: one more unit removed)
    or wider (``by=+1``: one removed unit kept), and how many groups that is."""
    from pruners import Plan

    graph, removed = planned.graph, set(planned.removed)
    changed = set()
    for group in graph.groups:
        kept = [u for u in group.units if u not in removed]
        gone = [u for u in group.units if u in removed]
        total = len(kept) + group.frozen
        if total < multiple or total % multiple:
            continue
        if by < 0 and len(kept) > 1:
            changed.add(kept[-1])
        elif by > 0 and gone:
            changed.add(gone[0])
    units = removed | changed if by < 0 else removed - changed
    return Plan.from_units(graph, units, planned.plan.meta), len(changed)


#: variant label -> how its widths differ from the aligned plan's
NUDGES = {"one under": -1, "one over": +1}


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
        variants = {"dense": bench.model,
                    "aligned": apply_plan(copy.deepcopy(bench.model), planned.plan).eval()}
        groups = {}
        for label, by in NUDGES.items():
            plan, groups[label] = nudged(planned, multiple, by)
            variants[label] = apply_plan(copy.deepcopy(bench.model), plan).eval()
        counted = (bench.inputs,)
        flops0 = measure(bench.model, counted)[0]
        kept = {label: round(measure(model, counted)[0] / flops0, 4)
                for label, model in variants.items() if label != "dense"}
        for runtime in runtimes:
            backend, layout = RUNTIMES[runtime]
            print(f"[alignment] {name}: {runtime} ...", flush=True)
            timed, inputs = variants, bench.inputs
            if layout is not None:
                timed, inputs = all_in_layout(variants, inputs, layout)
            m = measure_models(timed, inputs, backend=backend, threads=threads, rounds=rounds)
            envs[f"{name}/{runtime}"] = m.env
            row: dict[str, Any] = {"model": name, "runtime": runtime}
            for label in variants:
                key = label.replace(" ", "_")
                if label in groups:
                    row[f"groups_{key}"] = groups[label]
                if label in kept:
                    row[f"flops_kept_{key}"] = kept[label]
                if label in m.times:
                    row[f"{key}_ms"] = round(m.times[label].median_ms, 3)
                    if label in NUDGES and "aligned" in m.times:
                        row[f"{key}_over_aligned"] = round(m.ratio(label, "aligned"), 3)
                else:
                    row[f"{key}_error"] = m.errors.get(label, "?")
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
    lines = ["# Does alignment matter? One plan, aligned to 16 and one channel either side",
             "", f"{machine_line(env, onnxruntime='onnxruntime' in timed)}{versions}; "
             f"{env.get('date', '')}. Batch 1; 50% FLOPs at round_to 16 (aligned), and that "
             "plan with every group at a multiple of 16 one channel narrower (one under: "
             "16k - 1) or wider (one over: 16k + 1); dense, aligned, one under and one over "
             "timed interleaved (median ms; spread = the widest interquartile spread of the "
             "four). A ratio over 1: what alignment saves; auto: the multiple round_to='auto''s "
             "layer staircases pick there.", "",
             "| model | runtime | groups | dense ms | aligned ms | one under ms (/ aligned) | "
             "one over ms (/ aligned) | auto picks | spread |", "|---" * 9 + "|"]
    for r in rows:
        def ms(key: str) -> str:
            if f"{key}_ms" not in r:
                return "error"
            ratio = r.get(f"{key}_over_aligned")
            return f"{r[f'{key}_ms']:.2f}" + (f" ({ratio:.3f})" if ratio is not None else "")

        noisy = " (noisy)" if r.get("noisy") else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r.get('groups_one_over', '-')} | "
                     f"{ms('dense')} | {ms('aligned')} | {ms('one_under')} | "
                     f"{ms('one_over')}{noisy} | {r.get('auto_round_to', '-')} | "
                     f"{100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment",
                                description=__doc__.splitlines()[0])
    timing_args(p, MODELS, RESULTS, "alignment")
    p.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=None)
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--no-auto", action="store_false", dest="auto",
                   help="do not time layer staircases for round_to='auto'")
    a = p.parse_args(argv)
    run(a.models, a.threads, a.rounds, a.out, a.prefix, a.multiple, a.runtimes, a.auto)
    print_table(a.out, a.prefix)


if __name__ == "__main__":
    main()
