"""Where the time goes, dense against pruned: ``python -m benchmarks.profile_latency yolov8n``.

Prunes the model with our engine (50% FLOPs, round_to 8 unless told), then profiles both with
``torch.profiler`` on CPU, taking turns, and prints per aten op the median milliseconds dense
and pruned and the ratio.
Efficiency below 1 means some removed FLOPs did not turn into time; this table says which ops
keep their cost (memory-bound elementwise ops, depthwise convs, layers left whole).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from .models import build


def op_times(model: torch.nn.Module, inputs, runs: int = 5) -> dict[str, float]:
    """Mean self CPU milliseconds per aten op over ``runs`` forwards (after one warm-up)."""
    with torch.no_grad():
        model(inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(inputs)
    return {e.key: e.self_cpu_time_total / 1000 / runs for e in prof.key_averages()
            if e.key.startswith("aten::")}


def interleaved_op_times(models: list[torch.nn.Module], inputs, rounds: int = 5,
                         runs: int = 3) -> list[dict[str, float]]:
    """Per model, the median over ``rounds`` of :func:`op_times`, the models taking turns.

    Taking turns (and rotating who goes first) keeps a change in machine load from landing on
    one model only, as it would if each were profiled in one block.
    """
    samples: list[list[dict[str, float]]] = [[] for _ in models]
    for r in range(rounds):
        order = list(range(len(models)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            samples[i].append(op_times(models[i], inputs, runs))
    return [{op: statistics.median(s.get(op, 0.0) for s in per)
             for op in set().union(*per)} for per in samples]


def main(argv: list[str] | None = None) -> None:
    from pruners import prune

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=8, dest="round_to")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5, help="dense and pruned take turns")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--channels-last", action="store_true", dest="channels_last",
                   help="prune and profile both models channels-last")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bench = build(a.model)
    if a.channels_last:
        bench.model.to(memory_format=torch.channels_last)
    result = prune(bench.model, bench.inputs, target_flops=a.target, round_to=a.round_to,
                   outputs=bench.outputs)
    x = bench.batch(a.batch)
    dense, pruned = interleaved_op_times([bench.model, result.model], x, a.rounds)
    total_d, total_p = sum(dense.values()), sum(pruned.values())
    print(f"{a.model}{' (channels-last)' if a.channels_last else ''}: FLOPs kept {result.report.flops_ratio:.3f}; op time kept "
          f"{total_p / total_d:.3f} ({total_d:.1f} -> {total_p:.1f} ms, batch {a.batch}); "
          f"efficiency {result.report.flops_ratio * total_d / total_p:.2f}")
    print(f"{'op':<40}{'dense ms':>10}{'pruned ms':>11}{'kept':>7}{'share of pruned':>17}")
    # the union: an op can run in the pruned model only (a 1x1 conv that narrow takes
    # aten::_slow_conv2d_forward, PyTorch's pick over oneDNN for small inputs)
    for op in sorted(set(dense) | set(pruned),
                     key=lambda k: -max(dense.get(k, 0.0), pruned.get(k, 0.0)))[:a.top]:
        d, q = dense.get(op, 0.0), pruned.get(op, 0.0)
        print(f"{op:<40}{d:>10.2f}{q:>11.2f}{q / d if d else 0:>7.2f}{q / total_p:>17.1%}")


if __name__ == "__main__":
    main()
