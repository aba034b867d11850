"""What eager PyTorch can gain from pruning: ``python -m benchmarks.eager_floor``.

Eager PyTorch pays a fixed cost per op (Python, dispatch, allocation) that no channel
removal shrinks. This times each model at its benchmark size and at a small size (an eighth
of the side, rounded to a multiple of 32: under 2% of the FLOPs), dense and pruned at 50%
FLOPs, interleaved. At the small size what is left is that fixed part ``F`` plus reading the
weights and a little compute, which shrink with the FLOPs kept ``f`` (the two models' small
times ``S`` and ``s``): ``S = F + R``, ``s = F + f R``, so ``F = (s - f S) / (1 - f)``. A
model of time ``T`` with every removed FLOP turned into time and nothing of ``F`` removed
takes ``F + (T - F) f``: its efficiency (speedup x FLOPs kept) is at most
``f T / (F + (T - F) f)``, the ceiling printed beside the measured one. Results go to
``benchmarks/results/eager_floor.{csv,md,json}``.

``--layouts onnxruntime`` applies the same method to the models' ONNX exports in
onnxruntime, whose fixed part is the session's per-node cost (a "layout" there names how the
model runs: contiguous or channels-last eager, or onnxruntime).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .hardware import MODELS, RESULTS, bench_for, in_layout, pruned_half
from .summary import machine_line, print_table, timing_args, write_tables


def small_inputs(bench: Any) -> tuple[torch.nn.Module, Any]:
    """The benchmark at an eighth of its side (a multiple of 32, at least 32): the model (for
    a detector, a shallow copy whose transform resizes to that side) and its inputs."""
    if isinstance(bench.inputs, list):  # a torchvision detector: its transform sets the size
        side = max(32, bench.inputs[0].shape[-1] // 8 // 32 * 32)
        model = copy.copy(bench.model)
        model._modules = dict(model._modules)  # else the copy's transform is the original's
        model.transform = copy.copy(bench.model.transform)
        model.transform.min_size, model.transform.max_size = (side,), side
        return model, [F.interpolate(bench.inputs[0][None], size=(side, side))[0]]
    side = max(32, bench.inputs.shape[-1] // 8 // 32 * 32)
    return bench.model, F.interpolate(bench.inputs, size=(side, side))


#: how a model runs here: eager in either layout, or its ONNX export in onnxruntime
LAYOUTS = ("contiguous", "channels_last", "onnxruntime")
EAGER_LAYOUTS = LAYOUTS[:2]  # the default


def run(models: list[str], threads: int, rounds: int, out: str, prefix: str,
        round_to: int = 16, layouts: tuple[str, ...] = EAGER_LAYOUTS) -> list[dict]:
    from pruners.latency.timing import WallTimer, environment, model_runner, steady

    torch.set_num_threads(threads)
    rows, envs = [], {}
    for name in models:
        bench = bench_for(name)
        pruned_model, f = pruned_half(bench, threads, round_to)
        for layout in layouts:
            print(f"[eager_floor] {name} ({layout}) ...", flush=True)
            backend = "onnxruntime" if layout == "onnxruntime" else "eager"
            calls = {}
            for label, model in (("dense", bench.model), ("pruned", pruned_model)):
                full = bench.inputs
                if layout == "channels_last":
                    model, full = in_layout(model, full)
                small_model, small = small_inputs(type(bench)(name, model, full))
                calls[label] = (model_runner(model, full, backend, threads=threads), None)
                calls[f"{label} small"] = (
                    model_runner(small_model, small, backend, threads=threads), None)
            times, _ = steady(calls, WallTimer(), rounds, repeat=3)
            t, pruned = times["dense"].median_ms, times["pruned"].median_ms
            small, small_pruned = times["dense small"].median_ms, times["pruned small"].median_ms
            fixed = min(max((small_pruned - f * small) / (1 - f), 0.0), small)
            rows.append({
                "model": name, "layout": layout, "flops_kept": round(f, 4),
                "dense_ms": round(t, 3), "pruned_ms": round(pruned, 3),
                "dense_small_ms": round(small, 3), "pruned_small_ms": round(small_pruned, 3),
                "fixed_ms": round(fixed, 3), "fixed_share": round(fixed / t, 3),
                "speedup": round(t / pruned, 3), "eff": round(f * t / pruned, 3),
                "eff_ceiling": round(f * t / (fixed + (t - fixed) * f), 3),
                "spread": round(max(x.spread for x in times.values()), 3)})
            envs[f"{name}/{layout}"] = environment(backend, "cpu", threads)
            write_tables(rows, envs, out, prefix, markdown(rows, envs))
    return rows


def markdown(rows: list[dict], envs: dict) -> str:
    env = next(iter(envs.values()), {})
    eager = all(r["layout"] != "onnxruntime" for r in rows)
    lines = [f"# What {'eager PyTorch' if eager else 'a runtime'} can gain: the fixed part of "
             "a forward", "",
             f"{machine_line(env, onnxruntime=not eager)}; "
             f"{env.get('date', '')}. Batch 1 (eager under no_grad, or onnxruntime); dense and "
             "pruned (50% FLOPs, round_to 16), each at its size and at an eighth of its side, "
             "interleaved (median ms; spread = the widest interquartile spread of the four). Fixed: the "
             "part of a forward no channel removal shrinks, estimated from the small-size "
             "times; ceiling: the efficiency a pruned model could reach if every removed FLOP "
             "became time (module docstring).", "",
             "| model | layout | FLOPs kept | dense ms | pruned ms | at 1/8 side: dense / "
             "pruned ms | fixed ms (share) | speedup | efficiency | ceiling | spread |",
             "|---" * 11 + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['flops_kept']:.3f} | {r['dense_ms']:.1f} | "
            f"{r['pruned_ms']:.1f} | {r['dense_small_ms']:.1f} / {r['pruned_small_ms']:.1f} | "
            f"{r['fixed_ms']:.1f} ({r['fixed_share']:.2f}) | {r['speedup']:.2f}x | "
            f"{r['eff']:.2f} | {r['eff_ceiling']:.2f} | {100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eager_floor",
                                description=__doc__.splitlines()[0])
    timing_args(p, MODELS, RESULTS, "eager_floor")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(EAGER_LAYOUTS))
    a = p.parse_args(argv)
    run(a.models, a.threads, a.rounds, a.out, a.prefix, layouts=tuple(a.layouts))
    print_table(a.out, a.prefix)


if __name__ == "__main__":
    main()
