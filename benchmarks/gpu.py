"""GPU latency of pruned models: ``python -m benchmarks.gpu [--quick]`` where a CUDA GPU is.

For each model, in one process: the dense model; ours at 50% FLOPs with round_to 1, 8 and 16;
ours with ``round_to="auto"`` and with ``target_latency=0.5``, both measured on the GPU
(``device="cuda", backend="cudagraph"``, ``latency_dtype`` the timing dtype: layers and
models replayed as CUDA graphs, at the model's latency batch); Torch-Pruning at 50% FLOPs
with round_to 8 and 16 (when installed). Pruning itself runs on the CPU, as it does for users.
Then every model is timed on the GPU, interleaved (``pruners.latency.measure_models``: rounds
in rotated order, spread checked, marked noisy if it stays wide), in float16 and channels-last
at batch 1 and 32 (``--batches``) in eager PyTorch, and replayed as a CUDA graph at the
batches ``--graph-batches`` names (default 1; launch overhead removed; models whose forward
syncs with the host, such as NMS, do not capture).

Efficiency is speedup x FLOPs kept: 1 means every FLOP removed turned into time. Results go
to ``benchmarks/results/gpu{_quick}.{csv,md,json}`` (``--out`` elsewhere). TensorRT is not
used; the results record whether its Python package imports there.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from typing import Any, Optional

import torch

from .hardware import bench_for, what_it_said
from .summary import write_tables

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODELS = ["resnet50", "mobilenet_v2", "yolov8s", "retinanet_resnet50_fpn"]
QUICK_MODELS = ["resnet18"]
#: the batch at which ours measures latency for round_to="auto" and target_latency on the GPU
LATENCY_BATCH = {"yolov8s": 8, "retinanet_resnet50_fpn": 8}
LATENCY_BATCH_DEFAULT = 32
#: label -> (tool, options); ours rows are prune() with these keywords
VARIANTS: dict[str, tuple[str, dict]] = {
    "ours r1": ("ours", dict(target_flops=0.5, round_to=1)),
    "ours r8": ("ours", dict(target_flops=0.5, round_to=8)),
    "ours r16": ("ours", dict(target_flops=0.5, round_to=16)),
    "ours auto": ("ours", dict(target_flops=0.5, round_to="auto", device="cuda",
                               backend="cudagraph")),
    "ours latency": ("ours", dict(target_latency=0.5, round_to="auto", device="cuda",
                                  backend="cudagraph")),
    "tp r8": ("torch_pruning", dict(target_flops=0.5, round_to=8)),
    "tp r16": ("torch_pruning", dict(target_flops=0.5, round_to=16)),
}


def prune_variant(name: str, label: str, device: str, latency_batch: int,
                  dtype: torch.dtype = torch.float16) -> tuple[torch.nn.Module, dict]:
    """One pruned model (on the CPU) and what its pruning said; variants measured on the
    GPU time layers and models in ``dtype``, as the table times them."""
    from pruners import prune

    from .tools import torch_pruning

    tool, options = VARIANTS[label]
    bench = bench_for(name)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if tool == "torch_pruning":
        model, _ = torch_pruning(bench, options["target_flops"], options["round_to"])
    else:
        options = dict(options)
        inputs = bench.inputs
        if options.get("device") == "cuda":
            options.update(device=device, latency_dtype=dtype)
            if not device.startswith("cuda"):  # --device cpu tries the harness: eager there
                options.pop("backend", None)
            inputs = bench.batch(latency_batch)
            info["latency_batch"] = latency_batch
        result = prune(bench.model, inputs, outputs=bench.outputs, **options)
        model = result.model
        info.update(what_it_said(result))
    info["engine_s"] = round(time.perf_counter() - start, 1)
    return model.eval(), info


def _cast(value: Any, device: str, dtype: torch.dtype) -> Any:
    """Inputs on ``device`` in ``dtype``, 4-d images channels-last."""
    if isinstance(value, torch.Tensor):
        value = value.to(device, dtype)
        return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device, dtype) for v in value)
    return value


def deployed(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` as it would be deployed on the GPU: ``dtype``, channels-last."""
    return copy.deepcopy(model).eval().to(device, dtype).to(memory_format=torch.channels_last)


def _time_graphs(models: dict[str, torch.nn.Module], inputs: Any, rounds: int, device: str):
    """Interleaved timings of CUDA-graph replays (models that do not capture go to errors)."""
    from depgraph.capture import as_args
    from pruners.latency import WallTimer, graph_runner, steady

    calls, errors = {}, {}
    for label, m in models.items():
        try:
            calls[label] = (graph_runner(m, as_args(inputs)), label)
        except Exception as exc:  # noqa: BLE001 - a model that does not capture is a cell
            errors[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            torch.cuda.synchronize()
    if not calls:
        return {}, errors
    times, _ = steady(calls, WallTimer(device), rounds, repeat=20)
    return times, errors


def run(models: list[str], batches: list[int], rounds: int, out: str, prefix: str,
        variants: list[str], device: str, dtype: torch.dtype, budget_s: float,
        graph_batches: tuple[int, ...] = (1,), command: str = "") -> list[dict]:
    """Prune, time and write every model's rows (see the module's docstring)."""
    benchmark_mode = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # kernels picked per shape, as deployments do
    try:
        return _run(models, batches, rounds, out, prefix, variants, device, dtype, budget_s,
                    graph_batches, command)
    finally:
        torch.backends.cudnn.benchmark = benchmark_mode


def _run(models: list[str], batches: list[int], rounds: int, out: str, prefix: str,
         variants: list[str], device: str, dtype: torch.dtype, budget_s: float,
         graph_batches: tuple[int, ...], command: str) -> list[dict]:
    from pruners.latency import environment, measure_models
    from pruners.report import measure

    start = time.perf_counter()
    rows: list[dict] = []
    env: dict[str, Any] = {**environment("eager", device), "dtype": str(dtype).split(".")[-1],
                           "memory_format": "channels_last",
                           "cudnn": torch.backends.cudnn.version(),
                           "cuda": torch.version.cuda, "tensorrt": _tensorrt(),
                           "command": f"python -m benchmarks.gpu {command}".strip()}
    for name in models:
        if time.perf_counter() - start > budget_s:
            print(f"[gpu] {name}: skipped, over the {budget_s:.0f} s budget", flush=True)
            continue
        bench = bench_for(name)
        counted = (bench.inputs,)
        flops0, _ = measure(bench.model, counted)
        pruned: dict[str, torch.nn.Module] = {"dense": bench.model}
        info: dict[str, dict] = {}
        for label in variants:
            print(f"[gpu] {name}: pruning {label} ...", flush=True)
            try:
                pruned[label], info[label] = prune_variant(
                    name, label, device, LATENCY_BATCH.get(name, LATENCY_BATCH_DEFAULT), dtype)
            except Exception as exc:  # noqa: BLE001 - a failing variant is a row
                info[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"[gpu] {name}: {label}: {info[label]}", flush=True)
        flops = {label: measure(m, counted)[0] / flops0 for label, m in pruned.items()}
        on_gpu = {label: deployed(m, device, dtype) for label, m in pruned.items()}
        cells: dict[str, dict[str, Any]] = {label: {} for label in ["dense", *variants]}
        for batch in batches:
            print(f"[gpu] {name}: timing {len(on_gpu)} models at batch {batch} ...", flush=True)
            inputs = _cast(bench.batch(batch), device, dtype)
            m = measure_models(dict(on_gpu), inputs, device=device, rounds=rounds,
                               sample_s=0.05, retries=1)
            _record(cells, f"b{batch}", m.times, m.errors, m.noisy)
            if batch in graph_batches and device.startswith("cuda"):
                print(f"[gpu] {name}: timing CUDA graphs at batch {batch} ...", flush=True)
                _record(cells, f"g{batch}", *_time_graphs(on_gpu, inputs, rounds, device))
        for label in ["dense", *variants]:
            row: dict[str, Any] = {"model": name, "variant": label, **info.get(label, {})}
            if label in flops:
                row["flops_kept"] = round(flops[label], 4)
            row.update(cells[label])
            rows.append(row)
        del on_gpu
        torch.cuda.empty_cache()
        _write(rows, env, out, prefix)
    return rows


def _record(cells: dict[str, dict[str, Any]], key: str, times: dict, errors: dict,
            noisy: Optional[bool] = None) -> None:
    """Each model's timing (``Timing`` by label) as ``key``_ms/_spread/_speedup cells, or the
    error that kept it from being timed; ``noisy`` marks a measurement that stayed wide."""
    for label, cell in cells.items():
        if label in times:
            t = times[label]
            cell[f"{key}_ms"] = round(t.median_ms, 3)
            cell[f"{key}_spread"] = round(t.spread, 3)
            if noisy is not None:
                cell[f"{key}_noisy"] = noisy
            if label != "dense" and "dense" in times:
                cell[f"{key}_speedup"] = round(times["dense"].median_ms / t.median_ms, 3)
        elif label in errors:
            cell[f"{key}_error"] = errors[label]


def _tensorrt() -> str:
    """The TensorRT version when its Python package imports, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "not installed"
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"does not import: {type(exc).__name__}"


def _write(rows: list[dict], env: dict, out: str, prefix: str) -> None:
    write_tables(rows, env, out, prefix, markdown(rows, env))


def _cell(row: dict, key: str) -> str:
    if f"{key}_error" in row:
        return "no capture" if key.startswith("g") else "fails"
    if f"{key}_ms" not in row:
        return "-"
    text = f"{row[f'{key}_ms']:.2f} ±{100 * row[f'{key}_spread']:.0f}%"
    if f"{key}_speedup" in row:
        eff = row[f"{key}_speedup"] * row.get("flops_kept", 1.0)
        text += f" · {row[f'{key}_speedup']:.2f}x · eff {eff:.2f}"
    return text + (" (noisy)" if row.get(f"{key}_noisy") else "")


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(key, heading) of every timing column present: eager batches, then CUDA graphs."""
    keys = {k.rsplit("_", 1)[0] for r in rows for k in r if k.endswith(("_ms", "_error"))
            and k[0] in "bg" and k[1:].split("_")[0].isdigit()}
    eager = sorted((k for k in keys if k[0] == "b"), key=lambda k: int(k[1:]))
    graph = sorted((k for k in keys if k[0] == "g"), key=lambda k: int(k[1:]))
    return [(k, f"eager b{k[1:]}") for k in eager] + [(k, f"CUDA graph b{k[1:]}") for k in graph]


def markdown(rows: list[dict], env: dict) -> str:
    cols = _columns(rows)
    lines = ["# Pruned models on a GPU: measured latency", "",
             f"{env.get('gpu', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"cuDNN {env.get('cudnn', '?')} (benchmark mode); {env.get('dtype', '?')}, "
             f"{env.get('memory_format', '')}; TensorRT: {env.get('tensorrt', '?')}; host CPU "
             f"{env.get('cpu', '?')}; {env.get('date', '')}. Every model of a row group timed "
             "interleaved in one process (median ms ± interquartile spread · speedup over dense"
             " · efficiency = speedup × FLOPs kept). Pruning ran on the CPU; `ours auto` and "
             "`ours latency` measured latency on this GPU at the latency batch, as CUDA-graph "
             f"replays in {env.get('dtype', '?')} (`backend=\"cudagraph\"`, `latency_dtype`)."
             + (f" Produced by `{env['command']}`." if env.get("command") else ""),
             "", f"| model | variant | FLOPs kept | round_to | "
             f"{' | '.join(h for _, h in cols)} | latency target: predicted / measured in "
             "prune (batch) | engine s |", "|---" * (6 + len(cols)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error'][:90]} |"
                         + " |" * (3 + len(cols)))
            continue
        options = VARIANTS.get(r["variant"], ("", {}))[1]
        rt = r.get("round_to", options.get("round_to", ""))
        rt = f"auto → {rt}" if options.get("round_to") == "auto" else rt
        lat = (f"{r['predicted']:.3f} / {r['measured_in_prune']:.3f} (b{r['latency_batch']})"
               if "predicted" in r else "")
        lines.append(f"| {r['model']} | {r['variant']} | {r.get('flops_kept', 1.0):.3f} | {rt} | "
                     + "".join(f"{_cell(r, k)} | " for k, _ in cols)
                     + f"{lat} | {r.get('engine_s', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18, batches 1 and 4")
    p.add_argument("--models", nargs="+")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--batches", nargs="+", type=int)
    p.add_argument("--graph-batches", nargs="*", type=int, default=[1],
                   help="batches also timed as CUDA-graph replays")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no new model after this many seconds (a lease's time)")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    variants = a.variants or [v for v, (tool, _) in VARIANTS.items()
                              if tool == "ours" or importlib.util.find_spec("torch_pruning")]
    models = a.models or (QUICK_MODELS if a.quick else MODELS)
    batches = a.batches or ([1, 4] if a.quick else [1, 32])
    rows = run(models, batches, a.rounds, a.out, "gpu_quick" if a.quick else "gpu", variants,
               a.device, getattr(torch, a.dtype), a.budget_s, tuple(a.graph_batches),
               " ".join(repr(v) if " " in v else v for v in (argv or sys.argv[1:])))
    print(markdown(rows, {}))


if __name__ == "__main__":
    main()
