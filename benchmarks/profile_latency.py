"""Where the time goes, dense against pruned: ``python -m benchmarks.profile_latency yolov8n``.

Prunes the model with our engine (50% FLOPs, round_to 8 unless told), then profiles both with
``torch.profiler`` on CPU and prints, per aten op, milliseconds dense and pruned and the ratio.
Efficiency below 1 means some removed FLOPs did not turn into time; this table says which ops
keep their cost (memory-bound elementwise ops, depthwise convs, layers left whole).
"""

from __future__ import annotations

import argparse
import os

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


def main(argv: list[str] | None = None) -> None:
    from pruners import prune

    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=8, dest="round_to")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bench = build(a.model)
    result = prune(bench.model, bench.inputs, target_flops=a.target, round_to=a.round_to,
                   outputs=bench.outputs)
    x = bench.batch(a.batch)
    dense, pruned = op_times(bench.model, x), op_times(result.model, x)
    total_d, total_p = sum(dense.values()), sum(pruned.values())
    print(f"{a.model}: FLOPs kept {result.report.flops_ratio:.3f}; op time kept "
          f"{total_p / total_d:.3f} ({total_d:.1f} -> {total_p:.1f} ms, batch {a.batch}); "
          f"efficiency {result.report.flops_ratio * total_d / total_p:.2f}")
    print(f"{'op':<40}{'dense ms':>10}{'pruned ms':>11}{'kept':>7}{'share of pruned':>17}")
    for op in sorted(dense, key=lambda k: -dense[k])[:a.top]:
        d, q = dense[op], pruned.get(op, 0.0)
        print(f"{op:<40}{d:>10.2f}{q:>11.2f}{q / d if d else 0:>7.2f}{q / total_p:>17.1%}")


if __name__ == "__main__":
    main()
