"""How onnxruntime runs its threads, and what that does to a pruned model's gain:
``python -m benchmarks.ort_threads``.

Each model dense and pruned (50% FLOPs, ``round_to=16``), exported as ``export_onnx`` writes
it, timed interleaved in onnxruntime with its intra-op threads run each way of :data:`MODES`:

- "spin within a run": :func:`pruners.latency.ort_options`, how the library times
  onnxruntime: the pool's threads spin between the ops of a run and stop when it ends;
- "no spinning": how it timed before; every op wakes the pool's threads;
- "spin always": onnxruntime's default for a session alone; timed in turn with the other
  model's session, the idle pool of one spins on the cores the other one runs on;
- "1 thread": no pool at all, the reference that shows what the pool costs.

A thread wake-up per op is a fixed cost: the same milliseconds for dense and pruned, so a
larger share of the pruned model, whose efficiency (speedup x FLOPs kept) it lowers. Results
go to ``benchmarks/results/ort_threads.{csv,md,json}``.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

from .hardware import RESULTS, bench_for, pruned_half
from .summary import machine_line, print_table, timing_args, write_tables

MODELS = ["mobilenet_v2", "resnet50", "yolov8s"]
#: name: (threads, or None for the run's; how the pool's threads may spin, a way of
#: ``pruners.latency.timing.ORT_SPINNING``)
MODES: dict[str, tuple[Optional[int], str]] = {
    "spin within a run": (None, "within a run"),
    "no spinning": (None, "off"),
    "spin always": (None, "always"),
    "1 thread": (1, "off"),
}


def options(mode: str, threads: int) -> Any:
    """onnxruntime session options for ``mode`` (one of :data:`MODES`): the library's own
    (:func:`pruners.latency.ort_options`), its threads run that way."""
    from pruners.latency import ort_options

    n, spin = MODES[mode]
    return ort_options(n or threads, spin=spin)


def run(models: list[str], modes: list[str], threads: int, rounds: int, out: str,
        prefix: str) -> list[dict]:
    import onnxruntime as ort

    from pruners.latency.timing import WallTimer, _arrays, _onnx_bytes, environment, steady

    torch.set_num_threads(threads)
    rows, envs = [], {}
    for name in models:
        bench = bench_for(name)
        pruned, kept = pruned_half(bench, threads)
        args = (bench.inputs,)
        graphs = {"dense": _onnx_bytes(bench.model, args),
                  "pruned": _onnx_bytes(pruned, args)}
        arrays = _arrays(args)
        for mode in modes:
            print(f"[ort_threads] {name}, {mode} ...", flush=True)
            calls = {}
            for label, data in graphs.items():
                session = ort.InferenceSession(data, options(mode, threads),
                                               providers=["CPUExecutionProvider"])
                feeds = dict(zip([i.name for i in session.get_inputs()], arrays))
                calls[label] = ((lambda s=session, f=feeds: s.run(None, f)), None)
            times, attempts = steady(calls, WallTimer(), rounds, repeat=3)
            d, p = times["dense"].median_ms, times["pruned"].median_ms
            rows.append({"model": name, "mode": mode, "flops_kept": round(kept, 4),
                         "dense_ms": round(d, 4), "pruned_ms": round(p, 4),
                         "speedup": round(d / p, 3), "eff": round(kept * d / p, 3),
                         "spread": round(max(t.spread for t in times.values()), 3),
                         "attempts": attempts})
            del calls  # the sessions' pools go before the next mode's are made
        envs[name] = environment("onnxruntime", "cpu", threads)
        write_tables(rows, envs, out, prefix, markdown(rows, envs))
    return rows


def markdown(rows: list[dict], envs: dict) -> str:
    env = next(iter(envs.values()), {})
    lines = ["# onnxruntime's threads, dense and pruned", "",
             f"{machine_line(env)}, onnxruntime {env.get('onnxruntime', '?')}; "
             f"{env.get('date', '')}. Batch 1, CPU; each model dense and pruned (50% FLOPs, "
             "round_to 16, `export_onnx`'s graph), the two timed interleaved for each way of "
             "running onnxruntime's intra-op threads (median ms; spread: the wider "
             "interquartile spread of the two). Efficiency: speedup × FLOPs kept.", "",
             "| model | threads run | dense ms | pruned ms | speedup | efficiency | spread |",
             "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['dense_ms']:.2f} | {r['pruned_ms']:.2f}"
                     f" | {r['speedup']:.2f}x | {r['eff']:.3f} | {100 * r['spread']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_threads",
                                description=__doc__.splitlines()[0])
    timing_args(p, MODELS, RESULTS, "ort_threads")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    a = p.parse_args(argv)
    run(a.models, a.modes, a.threads, a.rounds, a.out, a.prefix)
    print_table(a.out, a.prefix)


if __name__ == "__main__":
    main()
