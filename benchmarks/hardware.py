"""Hardware-aware pruning measured: ``python -m benchmarks.hardware [--quick]``.

For each model, in one process: the dense model; ours at 50% FLOPs with round_to 1, 8, 16 and
"auto" (measured in eager, and in onnxruntime and OpenVINO: "auto ort", "auto ov"); ours at
``target_latency=0.5`` measured with PyTorch eager, onnxruntime and OpenVINO; ours on the
model converted to channels-last ("cl": round_to "auto" and a latency target timed in that
layout); Torch-Pruning at 50% FLOPs with round_to 8 and 16. Then every model is
timed interleaved (``pruners.latency.measure_models``: rounds in rotated order, spread
checked, retried, marked noisy if it stays wide) with PyTorch eager (every model contiguous,
and again every model channels-last: "eager cl"), onnxruntime and (when installed) OpenVINO
on the CPU, batch 1.

Efficiency is speedup / FLOPs reduction (speedup x FLOPs kept): 1 means every FLOP removed
turned into time. Results go to ``benchmarks/results/hardware{_quick}.{csv,md,json}``. Run it
on a quiet machine: nothing else running. Latency tables are cached in
``pruners.latency.default_cache_path()`` (first run measures them).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Optional

import torch

from .models import Bench, build
from .summary import machine_line, write_tables

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODELS = ["resnet50", "yolov8s", "mobilenet_v2", "retinanet_resnet50_fpn"]
QUICK_MODELS = ["resnet18"]
#: label -> (tool, options); every ours row is prune() with these keywords.
VARIANTS: dict[str, tuple[str, dict]] = {
    "ours r1": ("ours", dict(target_flops=0.5, round_to=1)),
    "ours r8": ("ours", dict(target_flops=0.5, round_to=8)),
    "ours r16": ("ours", dict(target_flops=0.5, round_to=16)),
    "ours auto": ("ours", dict(target_flops=0.5, round_to="auto")),
    # round_to="auto" measured with the runtime deployed to (its staircases and its times of
    # the whole model planned at each multiple)
    "ours auto ort": ("ours", dict(target_flops=0.5, round_to="auto", backend="onnxruntime")),
    "ours auto ov": ("ours", dict(target_flops=0.5, round_to="auto", backend="openvino")),
    "ours latency eager": ("ours", dict(target_latency=0.5, round_to="auto", backend="eager")),
    "ours latency ort": ("ours", dict(target_latency=0.5, round_to="auto",
                                      backend="onnxruntime")),
    "ours latency ov": ("ours", dict(target_latency=0.5, round_to="auto", backend="openvino")),
    # the model converted to channels-last before pruning: round_to="auto" and the latency
    # table time its layers as it runs (eager CPU convs then skip layout conversions)
    "ours auto cl": ("ours", dict(target_flops=0.5, round_to="auto", channels_last=True)),
    "ours latency eager cl": ("ours", dict(target_latency=0.5, round_to="auto",
                                           backend="eager", channels_last=True)),
    "tp r8": ("torch_pruning", dict(target_flops=0.5, round_to=8)),
    "tp r16": ("torch_pruning", dict(target_flops=0.5, round_to=16)),
}
#: runtime -> column key; "eager": PyTorch eager on contiguous copies of every model and its
#: inputs, "eager cl": on channels-last copies; OpenVINO only when it is installed
BACKENDS = {"eager": "eager", "eager cl": "eager_cl", "onnxruntime": "ort", "openvino": "ov"}
#: RetinaNet resizes every image to 800 px by default; at 320 px a forward fits 2 cores.
DETECTOR_SIZE = 320


def bench_for(name: str) -> Bench:
    bench = build(name)
    if name.startswith("retinanet"):
        bench.model.transform.min_size = (DETECTOR_SIZE,)
        bench.model.transform.max_size = DETECTOR_SIZE
        bench.inputs = [torch.rand(3, DETECTOR_SIZE, DETECTOR_SIZE)]
    elif name.startswith("yolo"):
        bench.inputs = torch.randn(1, 3, 640, 640)
    return bench


def in_layout(model: torch.nn.Module, inputs: Any,
              layout: torch.memory_format = torch.channels_last
              ) -> tuple[torch.nn.Module, Any]:
    """A copy of ``model`` with its 4-D weights in ``layout`` (channels-last by default), and
    its inputs with their 4-D tensors so."""
    models, inputs = all_in_layout({"": model}, inputs, layout)
    return models[""], inputs


def all_in_layout(models: dict[str, torch.nn.Module], inputs: Any,
                  layout: torch.memory_format) -> tuple[dict[str, torch.nn.Module], Any]:
    """:func:`in_layout` of every model of ``models``, and of their inputs once: a set of
    models timed all in one layout."""
    from torch.utils import _pytree as pytree

    def to(t: Any) -> Any:
        return t.contiguous(memory_format=layout) \
            if isinstance(t, torch.Tensor) and t.dim() == 4 else t

    return ({k: copy.deepcopy(m).to(memory_format=layout) for k, m in models.items()},
            pytree.tree_map(to, inputs))


def pruned_half(bench: Bench, threads: int, round_to: int = 16
                ) -> tuple[torch.nn.Module, float]:
    """``bench``'s model pruned by ours to 50% FLOPs at ``round_to`` (eval mode), and the
    share of the FLOPs it kept, counted on the two models."""
    from pruners import prune
    from pruners.report import measure

    result = prune(bench.model, bench.inputs, target_flops=0.5, round_to=round_to,
                   outputs=bench.outputs, threads=threads)
    args = (bench.inputs,)
    return result.model.eval(), measure(result.model, args)[0] / measure(bench.model, args)[0]


def prune_variant(name: str, label: str, threads: int, latency_table: Any = None
                  ) -> tuple[torch.nn.Module, dict]:
    """One pruned model and what its pruning said (``latency_table``: a
    ``pruners.latency.LatencyTable`` for ours, default the on-disk cache)."""
    from pruners import prune

    from .tools import torch_pruning

    tool, options = VARIANTS[label]
    bench = bench_for(name)
    options = dict(options)
    if options.pop("channels_last", False):
        bench.model, bench.inputs = in_layout(bench.model, bench.inputs)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if tool == "torch_pruning":
        model, _ = torch_pruning(bench, options["target_flops"], options["round_to"])
    else:
        extra = {} if latency_table is None else {"latency_table": latency_table}
        result = prune(bench.model, bench.inputs, outputs=bench.outputs, threads=threads,
                       **options, **extra)
        model = result.model
        info.update(what_it_said(result))
    info["engine_s"] = round(time.perf_counter() - start, 1)
    return model.eval(), info


def what_it_said(result: Any) -> dict[str, Any]:
    """The multiple ``round_to="auto"`` chose, and a latency target's predicted and measured
    shares, from a ``PruneResult``."""
    info: dict[str, Any] = {}
    auto = next((n for n in result.report.notes if n.startswith("round_to='auto'")), None)
    if auto:
        info["round_to"] = int(auto.split(" chose ")[1].split()[0])
    if result.report.latency is not None:
        lat = result.report.latency
        info.update(predicted=round(lat.predicted, 4), measured_in_prune=round(lat.ratio, 4),
                    attempts=lat.attempts)
    return info


def run(models: list[str], threads: int, rounds: int, out: str, prefix: str,
        variants: Optional[list[str]] = None, latency_table: Any = None,
        backends: Optional[list[str]] = None) -> list[dict]:
    from pruners.latency import measure_models
    from pruners.report import measure

    torch.set_num_threads(threads)
    rows, envs = [], {}
    for name in models:
        bench = bench_for(name)
        counted = (bench.inputs,)
        flops0, params0 = measure(bench.model, counted)
        pruned: dict[str, torch.nn.Module] = {}
        info: dict[str, dict] = {}
        for label in variants or _variants():
            print(f"[hardware] {name}: pruning {label} ...", flush=True)
            try:
                pruned[label], info[label] = prune_variant(name, label, threads, latency_table)
            except Exception as exc:  # noqa: BLE001 - a failing variant is a row
                info[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        models_ = {"dense": bench.model, **pruned}
        timings = {}
        for backend in _backends(backends):
            print(f"[hardware] {name}: timing {len(models_)} models with {backend} ...",
                  flush=True)
            timed, inputs = copy.copy(models_), bench.inputs
            if backend.startswith("eager"):  # every model in one layout (a variant pruned
                # channels-last comes back so, and would run so in the plain column)
                layout = torch.channels_last if backend == "eager cl" else \
                    torch.contiguous_format
                timed, inputs = all_in_layout(timed, inputs, layout)
            timings[backend] = measure_models(timed, inputs, backend=backend.split()[0],
                                              threads=threads, rounds=rounds)
            envs[f"{name}/{backend}"] = timings[backend].env
        for label in ["dense", *(variants or _variants())]:
            row: dict[str, Any] = {"model": name, "variant": label}
            if label != "dense":
                row.update(info.get(label, {}))
            if label in models_:
                flops, params = measure(models_[label], counted)
                row.update(flops_kept=round(flops / flops0, 4), params_kept=round(params / params0, 4))
            for backend, m in timings.items():
                key = BACKENDS[backend]
                if label in m.times:
                    t = m.times[label]
                    row[f"{key}_ms"] = round(t.median_ms, 3)
                    row[f"{key}_spread"] = round(t.spread, 3)
                    row[f"{key}_noisy"] = m.noisy
                    if label in m.faults:
                        row[f"{key}_faults"] = round(m.faults[label])
                    if label != "dense" and "flops_kept" in row:
                        speedup = m.ratio("dense", label)
                        row[f"{key}_speedup"] = round(speedup, 3)
                        row[f"{key}_eff"] = round(speedup * row["flops_kept"], 3)
                elif label in m.errors:
                    row[f"{key}_error"] = m.errors[label]
            rows.append(row)
        _write(rows, envs, out, prefix)
    return rows


def _backends(only: Optional[list[str]] = None) -> list[str]:
    """The runtimes to time in: ``only`` (default every one) that are installed."""
    from pruners.latency import installed

    return [b for b in BACKENDS if installed(b.split()[0]) and (only is None or b in only)]


def _variants() -> list[str]:
    return [label for label, (_, options) in VARIANTS.items()
            if options.get("backend", "eager") in _backends()]


def _write(rows: list[dict], envs: dict, out: str, prefix: str) -> None:
    write_tables(rows, envs, out, prefix, markdown(rows, envs))


def _cell(row: dict, key: str) -> str:
    if f"{key}_error" in row:
        return "export fails"
    if f"{key}_ms" not in row:
        return "-"
    noisy = " (noisy)" if row.get(f"{key}_noisy") else ""
    text = f"{row[f'{key}_ms']:.1f} ±{100 * row[f'{key}_spread']:.0f}%"
    if f"{key}_speedup" in row:
        mark = "" if row[f"{key}_eff"] >= 0.9 else " ✗"
        text += f" · {row[f'{key}_speedup']:.2f}x · eff {row[f'{key}_eff']:.2f}{mark}"
    return text + noisy


def markdown(rows: list[dict], envs: dict) -> str:
    from pruners.latency.timing import FAULTS_NOTED

    env = next(iter(envs.values()), {})
    shown = [b for b in BACKENDS if any(f"{BACKENDS[b]}_ms" in r for r in rows)] \
        or ["eager", "onnxruntime"]
    versions = f"onnxruntime {env.get('onnxruntime', '?')}" + (
        f", OpenVINO {env.get('openvino', '?')} (f32)" if "openvino" in shown else "")
    lines = ["# Hardware-aware pruning: measured latency", "",
             f"{machine_line(env, onnxruntime=True)}, {versions}; "
             f"{env.get('date', '')}. Batch 1, CPU; every model "
             "of a row group timed interleaved in one process (median ms ± interquartile spread"
             " · speedup over dense · efficiency = speedup × FLOPs kept; ✗ under 0.9).", "",
             f"| model | variant | FLOPs kept | round_to | {' | '.join(shown)} | latency target: "
             "predicted / measured in prune | engine s |",
             "|---" * (6 + len(shown)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error'][:80]} |"
                         + " |" * (4 + len(shown)))
            continue
        tool, options = VARIANTS.get(r["variant"], ("", {}))
        rt = r.get("round_to", options.get("round_to", ""))
        rt = f"auto → {rt}" if options.get("round_to") == "auto" else rt
        lat = (f"{r['predicted']:.3f} / {r['measured_in_prune']:.3f} ({r['attempts']} plans)"
               if "predicted" in r else "")
        lines.append(f"| {r['model']} | {r['variant']} | {r.get('flops_kept', 1.0):.3f} | {rt} | "
                     + "".join(f"{_cell(r, BACKENDS[b])} | " for b in shown) + f"{lat} | "
                     f"{r.get('engine_s', '')} |")
    noisy = sorted({k for k in envs if any(
        r.get(f"{BACKENDS[k.split('/', 1)[1]]}_noisy") for r in rows
        if r["model"] == k.split("/")[0])})
    if noisy:
        lines += ["", f"Noisy (a spread stayed over 10% after 3 attempts): {', '.join(noisy)}."]
    faulting = [f"{r['model']} {r['variant']} {b} {r[f'{BACKENDS[b]}_faults']}" for r in rows
                for b in shown if r.get(f"{BACKENDS[b]}_faults", 0) > FAULTS_NOTED]
    if any(k.endswith("_faults") for r in rows for k in r):  # tables from before they counted
        lines += ["", f"Page faults per call over {FAULTS_NOTED}: "
                  + (", ".join(faulting) if faulting else "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hardware",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, fewer rounds")
    p.add_argument("--models", nargs="+")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                   help="the runtimes to time in (default: every installed one)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", help="file name prefix (default hardware, hardware_quick)")
    a = p.parse_args(argv)
    models = a.models or (QUICK_MODELS if a.quick else MODELS)
    prefix = a.prefix or ("hardware_quick" if a.quick else "hardware")
    rows = run(models, a.threads, a.rounds or (10 if a.quick else 30), a.out, prefix,
               a.variants, backends=a.backends)
    print(markdown(rows, {}), file=sys.stdout)


if __name__ == "__main__":
    main()
