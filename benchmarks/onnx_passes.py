"""What ``export_onnx``'s graph rewrites are worth: ``python -m benchmarks.onnx_passes``.

Each model dense and pruned (50% FLOPs, ``round_to=16``), exported as the tracer writes it
and with :mod:`pruners.onnx_passes` applied, all four timed interleaved in each ONNX runtime:
milliseconds, the rewrites' effect on each model, and the pruned model's speedup and
efficiency (speedup x FLOPs kept) on either graph. A rewrite that removes a cost no pruning
removes (YOLOv8's softmax over a non-last axis in onnxruntime) shortens both models by the
same milliseconds, so the pruned model's share of the saving is larger and its efficiency
rises. Results go to ``benchmarks/results/onnx_passes.{csv,md,json}``.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from .hardware import RESULTS, bench_for, pruned_half
from .summary import machine_line, print_table, timing_args, write_tables

MODELS = ["yolov8s", "yolov8n", "resnet50"]
RUNTIMES = ["onnxruntime", "openvino"]
GRAPHS = {"as traced": False, "rewritten": True}


def run(models: list[str], runtimes: list[str], threads: int, rounds: int, out: str,
        prefix: str) -> list[dict]:
    import onnx

    from pruners.latency import installed
    from pruners.latency.timing import (WallTimer, _arrays, _onnx_bytes, environment,
                                        onnx_runner, steady)
    from pruners.onnx_passes import optimize

    torch.set_num_threads(threads)
    rows, envs = [], {}
    for name in models:
        bench = bench_for(name)
        pruned, kept = pruned_half(bench, threads)
        args = (bench.inputs,)
        graphs = {(label, graph): _onnx_bytes(model, args, passes=passes)
                  for label, model in (("dense", bench.model), ("pruned", pruned))
                  for graph, passes in GRAPHS.items()}
        rewrites = optimize(onnx.load_from_string(graphs[("dense", "as traced")]))
        for runtime in runtimes:
            if not installed(runtime):
                continue
            print(f"[onnx_passes] {name} in {runtime} ...", flush=True)
            calls = {f"{label} {graph}": (onnx_runner(data, _arrays(args), runtime, threads), None)
                     for (label, graph), data in graphs.items()}
            times, _ = steady(calls, WallTimer(), rounds, repeat=3)
            ms = {k: t.median_ms for k, t in times.items()}
            row = {"model": name, "runtime": runtime, "flops_kept": round(kept, 4),
                   "rewrites": " ".join(f"{k}={v}" for k, v in rewrites.items()) or "none",
                   "spread": round(max(t.spread for t in times.values()), 3)}
            for graph in GRAPHS:
                d, p = ms[f"dense {graph}"], ms[f"pruned {graph}"]
                key = graph.replace(" ", "_")
                row.update({f"{key}_dense_ms": round(d, 4), f"{key}_pruned_ms": round(p, 4),
                            f"{key}_eff": round(kept * d / p, 3)})
            rows.append(row)
            envs[f"{name}/{runtime}"] = environment(runtime, "cpu", threads)
            write_tables(rows, envs, out, prefix, markdown(rows, envs))
    return rows


def markdown(rows: list[dict], envs: dict) -> str:
    env = next(iter(envs.values()), {})
    lines = ["# export_onnx's graph rewrites, dense and pruned", "",
             f"{machine_line(env, onnxruntime=True)}, onnxruntime "
             f"{env.get('onnxruntime', '?')}, OpenVINO {env.get('openvino', '?')}; "
             f"{env.get('date', '')}. Batch 1, CPU; each model dense "
             "and pruned (50% FLOPs, round_to 16), exported as traced and with "
             "`pruners.onnx_passes` applied, the four timed interleaved per runtime (median ms;"
             " spread: the widest interquartile spread of the four). Efficiency: speedup × "
             "FLOPs kept.", "",
             "| model | runtime | rewrites | dense ms: as traced → rewritten | pruned ms: as "
             "traced → rewritten | efficiency: as traced → rewritten | spread |",
             "|---" * 7 + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['rewrites']} | "
            f"{r['as_traced_dense_ms']:.1f} → {r['rewritten_dense_ms']:.1f} | "
            f"{r['as_traced_pruned_ms']:.1f} → {r['rewritten_pruned_ms']:.1f} | "
            f"{r['as_traced_eff']:.3f} → {r['rewritten_eff']:.3f} | "
            f"{100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_passes",
                                description=__doc__.splitlines()[0])
    timing_args(p, MODELS, RESULTS, "onnx_passes")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=RUNTIMES)
    a = p.parse_args(argv)
    run(a.models, a.runtimes, a.threads, a.rounds, a.out, a.prefix)
    print_table(a.out, a.prefix)


if __name__ == "__main__":
    main()
