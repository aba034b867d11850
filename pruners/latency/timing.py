"""Timing you can trust: interleaved rounds, spread checked, the machine recorded.

Every measurement goes through a :data:`Timer`, ``timer(fn, what) -> seconds of one call``:
:class:`WallTimer` runs ``fn`` against the clock; tests pass a fake that computes a time from
``what`` (a :class:`~pruners.latency.table.LayerShape` or a :class:`ModelCall`), so the logic
above the clock is deterministic.

A figure is only as good as the machine was quiet. :func:`measure_models` times every model
in rounds, taking turns in an order rotated each round (a load change hits all alike), and
checks the spread (interquartile range over median) of each; when any is wider than
``max_spread`` it measures again, and a figure still that wide comes back marked ``noisy``:
report it as noise, not a result. It also counts each model's page faults per call: a model
whose freed activations the allocator hands back to the OS between calls (glibc's malloc does,
for large ones) pays for mapping them again on every call, which is the allocator's doing,
not the model's; the measurement says so.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BACKENDS", "Timer", "WallTimer", "ModelCall", "Timing", "Measurement", "Runners",
           "environment", "machine_id", "time_call", "interleave", "steady", "measure_models",
           "model_runner", "graph_runner", "onnx_runner", "openvino_config", "openvino_request",
           "ort_options", "ORT_TIMING", "ORT_SPINNING", "installed", "require", "dtype_name",
           "backend_dtype", "DTYPES",
           "GRAPH_COPIES", "page_faults", "FAULTS_NOTED"]

Timer = Callable[[Callable[[], Any], Any], float]

#: Where latency is measured: PyTorch eager, or a CPU runtime running the model's ONNX export
#: (onnxruntime; OpenVINO, which many CPU deployments use, when installed), or on a GPU the
#: model captured once as a CUDA graph and replayed ("cudagraph": how a GPU deployment runs
#: without paying a kernel launch per op, which at small batches outweighs the kernels).
BACKENDS = ("eager", "onnxruntime", "openvino", "cudagraph")

#: Forwards captured into one CUDA graph when a single layer is timed: replaying one small
#: layer costs about as much as the layer, so a call replays this many and counts as one.
GRAPH_COPIES = 10

#: Page faults per call above which a measurement notes that the allocator's timing is in it.
FAULTS_NOTED = 100

#: The precisions latency can be timed in (``dtype_name``).
DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype: Any) -> Optional[str]:
    """"float32", "float16" or "bfloat16" for a ``torch.dtype`` or its name; None for None
    (time the model in the precision it has); ValueError naming the choices otherwise."""
    if dtype is None:
        return None
    name = str(dtype).split(".")[-1]
    if name not in DTYPES:
        raise ValueError(f"latency is timed in {', '.join(DTYPES)}; got dtype {dtype!r}")
    return name


def backend_dtype(backend: str, dtype: Any) -> Optional[str]:
    """:func:`dtype_name` of ``dtype``, and ValueError where ``backend`` cannot time in it:
    the ONNX runtimes time float32 only."""
    name = dtype_name(dtype)
    if name not in (None, "float32") and backend in ("onnxruntime", "openvino"):
        raise ValueError(f"{backend} latency is timed in float32 only, not {name}; use "
                         "backend='eager' or 'cudagraph'")
    return name


def installed(backend: str) -> bool:
    """Whether ``backend``'s runtime imports here (OpenVINO is an optional extra)."""
    return backend != "openvino" or importlib.util.find_spec("openvino") is not None


def require(backend: str) -> None:
    """ImportError, saying what to install, unless ``backend``'s runtime is installed."""
    if not installed(backend):
        raise ImportError(f"backend={backend!r} needs OpenVINO: pip install openvino")


class WallTimer:
    """Seconds of one call by ``time.perf_counter``; on CUDA, synchronised before and after."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], Any], what: Any = None) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


@dataclass(frozen=True)
class ModelCall:
    """What a whole-model timing runs (for a fake timer): the module, its inputs, the backend."""

    label: str
    model: Optional[nn.Module]
    inputs: Any
    backend: str = "eager"
    dtype: Optional[str] = None  # what the timed copy is cast to (None: as it is)


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per call and the spread (interquartile range / median)."""

    median_ms: float
    spread: float
    samples: int

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (spread {100 * self.spread:.0f}%, n={self.samples})"


@dataclass
class Measurement:
    """Timings of several models taken together, the machine they ran on, and whether the
    figures are trustworthy (``noisy``: some spread stayed over ``max_spread``)."""

    times: dict[str, Timing]
    env: dict[str, Any]
    max_spread: float
    attempts: int
    noisy: bool = False
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # models that would not run there
    faults: dict[str, float] = field(default_factory=dict)  # minor page faults per call

    def ratio(self, label: str, reference: str = "dense") -> float:
        """``label``'s median over ``reference``'s (latency kept)."""
        return self.times[label].median_ms / self.times[reference].median_ms


def _cpu() -> tuple[str, list[str]]:
    """CPU model name and the SIMD flags that decide kernel widths."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(f for f in have if f.startswith(("avx", "amx", "fma", "sse4_2"))
                                   or f in ("f16c", "neon", "asimd"))
                    break
    except OSError:
        pass
    return name, flags


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(backend: str = "eager", device: str = "cpu",
                threads: Optional[int] = None) -> dict[str, Any]:
    """Everything a latency figure depends on, to print beside it."""
    cpu, flags = _cpu()
    env = {"backend": backend, "device": device, "threads": threads or torch.get_num_threads(),
           "cpu": cpu, "cores": os.cpu_count(), "flags": " ".join(flags),
           "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
           "openvino": _version("openvino"),
           "python": platform.python_version(),
           "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if backend == "onnxruntime":
        env["onnxruntime_threads"] = ORT_TIMING
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def machine_id(backend: str = "eager", device: str = "cpu") -> str:
    """A short fingerprint of what a layer's time depends on besides its shape: the CPU model
    and SIMD flags, torch's version, the runtime's for ``backend``, and the GPU and cuDNN on
    ``device`` "cuda". Latency tables key their entries by it."""
    cpu, flags = _cpu()
    parts = [cpu, " ".join(flags), torch.__version__]
    if backend == "onnxruntime":
        parts.append(f"{backend} {_version(backend)} {ORT_TIMING}")
    elif backend == "openvino":
        parts.append(f"{backend} {_version(backend)}")
    if str(device).startswith("cuda") and torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(torch.device(device)),
                  str(torch.backends.cudnn.version())]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def time_call(fn: Callable[[], Any], what: Any, timer: Timer, repeats: int = 7,
              warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn, what) for _ in range(repeats))


def page_faults(fn: Callable[[], Any], calls: int = 3, warmup: int = 1) -> Optional[float]:
    """Minor page faults of this process per call of ``fn`` (after ``warmup`` calls, which
    grow the heap to what ``fn`` needs); None where the OS does not count them."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    for _ in range(warmup):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _spread(samples: list[float]) -> float:
    if len(samples) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / max(statistics.median(samples), 1e-12)


def interleave(calls: dict[str, tuple[Callable[[], Any], Any]], timer: Timer, rounds: int,
               warmup: int = 2, repeat: int = 1) -> dict[str, Timing]:
    """Time every ``label: (fn, what)`` once per round, in an order rotated every round; a
    sample is the mean of ``repeat`` consecutive calls (the spread is then of those means)."""
    labels = list(calls)
    for _ in range(warmup):
        for label in labels:
            calls[label][0]()
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            fn, what = calls[label]
            samples[label].append(sum(timer(fn, what) for _ in range(repeat)) / repeat)
    return {label: Timing(1000 * statistics.median(s), _spread(s), len(s))
            for label, s in samples.items()}


def steady(calls: dict[str, tuple[Callable[[], Any], Any]], timer: Timer, rounds: int, *,
           repeat: int = 1, max_spread: float = 0.1, retries: int = 2, warmup: int = 2
           ) -> tuple[dict[str, Timing], int]:
    """:func:`interleave`, again (up to ``retries`` times) while any spread exceeds
    ``max_spread``: the attempt with the narrowest worst spread, and how many were made."""
    best: Optional[dict[str, Timing]] = None
    attempts = 0
    for attempts in range(1, retries + 2):
        times = interleave(calls, timer, rounds, warmup=warmup, repeat=repeat)
        if best is None or _worst(times) < _worst(best):
            best = times
        if _worst(best) <= max_spread:
            break
    return best, attempts


def _worst(times: dict[str, Timing]) -> float:
    return max(t.spread for t in times.values())


#: How onnxruntime's threads run when it is timed (:func:`ort_options`), named beside its
#: figures and in :func:`machine_id`, so latency tables timed another way are not reused.
ORT_TIMING = "threads spin within a run, stop after it"

#: Ways onnxruntime's pool threads may spin: name -> (``session.intra_op.allow_spinning``,
#: ``session.force_spinning_stop``). :func:`ort_options` times with "within a run".
ORT_SPINNING = {"within a run": ("1", "1"), "off": ("0", "0"), "always": ("1", "0")}


def ort_options(threads: Optional[int] = None, spin: str = "within a run"):
    """onnxruntime session options for timing: ``threads`` intra-op threads, one inter-op,
    quiet logs; the pool's threads spin between the ops of a run, as a deployed session's do
    by default, and stop spinning when the run ends (``spin``: a way of
    :data:`ORT_SPINNING`, others for comparing them).

    Why: with spinning off (as before), every op pays a thread wake-up, a fixed cost that hid
    most of a small pruned model's gain (MobileNetV2, 2 threads, 50% FLOPs: 4.6 against 2.7
    ms, efficiency 0.86; spinning within a run: 4.2 against 2.2 ms, 0.97). With spinning left
    on after a run, the idle threads of the session timed last steal the cores of the one
    timed next (dense MobileNetV2 7.1 ms). A process-wide shared pool would avoid both but,
    once made, makes onnxruntime refuse every session that has a pool of its own: users'
    sessions included."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    allow, stop = ORT_SPINNING[spin]
    options.add_session_config_entry("session.intra_op.allow_spinning", allow)
    options.add_session_config_entry("session.force_spinning_stop", stop)
    return options


def openvino_config(threads: Optional[int] = None) -> dict[str, Any]:
    """OpenVINO CPU compile options for timing: latency mode, one stream, ``threads`` threads,
    float32 like the other backends (OpenVINO would run bfloat16 on a CPU that has it; a
    quantized model's int8 layers stay int8)."""
    return {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}


def model_runner(model: nn.Module, inputs: Any, backend: str = "eager", device: str = "cpu",
                 threads: Optional[int] = None, dtype: Any = None,
                 copies: int = 1) -> Callable[[], Any]:
    """A no-argument function that runs ``model`` on ``inputs`` with the backend: PyTorch
    eager under ``no_grad``, a CUDA graph of it replayed ("cudagraph", ``copies`` forwards
    per replay), or an onnxruntime session or OpenVINO CPU request of its ONNX export.
    ``dtype`` (float32, float16, bfloat16) runs a copy of the model and its floating inputs
    cast to it, as a deployment in that precision does (None: as they are); the ONNX
    runtimes time float32 only."""
    from depgraph.capture import as_args

    args = as_args(inputs)
    name = backend_dtype(backend, dtype)
    if backend in ("eager", "cudagraph"):
        cast = None if name is None else getattr(torch, name)
        model = _on(model.eval(), device, cast)
        args = pytree.tree_map(lambda a: _moved(a, device, cast), args)
        if backend == "cudagraph":
            return graph_runner(model, args, copies)

        def run() -> Any:
            with torch.no_grad():
                return model(*args)

        return run
    if backend in ("onnxruntime", "openvino"):
        return onnx_runner(_onnx_bytes(model, args), _arrays(args), backend, threads)
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _moved(value: Any, device: str, dtype: Optional[torch.dtype]) -> Any:
    """A tensor on ``device``, cast to ``dtype`` (when given) if it is floating point."""
    if not isinstance(value, torch.Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        return value.to(device, dtype)
    return value.to(device)


def graph_runner(model: nn.Module, args: tuple, copies: int = 1) -> Callable[[], Any]:
    """``model(*args)`` (on a GPU) captured once as a CUDA graph, ``copies`` times in a row;
    the returned function replays it. Warmed up first on a side stream, as capture needs
    (cuDNN picks its kernels there). A forward that syncs with the host (``.item()``, NMS)
    cannot be captured: RuntimeError naming the model."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            model(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            for _ in range(copies):
                model(*args)
    except Exception as exc:  # noqa: BLE001 - said in terms of the model
        torch.cuda.synchronize()
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise RuntimeError(
            f"{type(model).__name__} cannot be captured as a CUDA graph ({type(exc).__name__}: "
            f"{first}): its forward syncs with the host (.item(), NMS, data-dependent shapes). "
            "Time it with backend='eager'"
        ) from exc
    return graph.replay


def _on(model: nn.Module, device: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``model`` on ``device`` (and in ``dtype`` when given): itself when it is so already,
    else a copy moved and cast (the caller's model stays as it is: timing a CPU model on a
    GPU, or in float16, leaves it on the CPU in its precision)."""
    want = torch.device(device)
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", torch.cuda.current_device())
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == want for t in tensors) and (dtype is None or all(
            t.dtype == dtype for t in tensors if t.is_floating_point())):
        return model
    return copy.deepcopy(model).to(device) if dtype is None else \
        copy.deepcopy(model).to(device, dtype)


def onnx_runner(onnx: bytes, arrays: list, backend: str,
                threads: Optional[int] = None) -> Callable[[], Any]:
    """A no-argument function running an ONNX model (its bytes) on ``arrays`` (numpy, in
    the graph's input order) in an onnxruntime session or an OpenVINO CPU request."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(onnx, ort_options(threads),
                                       providers=["CPUExecutionProvider"])
        feeds = dict(zip([i.name for i in session.get_inputs()], arrays))
        return lambda: session.run(None, feeds)
    if backend == "openvino":
        request = openvino_request(onnx, threads)
        # inputs and outputs shared, not copied: a layer timed alone would otherwise be
        # mostly the copies, which the layer inside a whole model does not make
        return lambda: request.infer(arrays, share_inputs=True, share_outputs=True)
    raise ValueError(f"no ONNX runtime called {backend!r}: 'onnxruntime' or 'openvino'")


def _onnx_bytes(model: nn.Module, args: tuple, passes: bool = True) -> bytes:
    """``model``'s ONNX export as ``export_onnx`` writes it, less onnxsim: with
    :mod:`pruners.onnx_passes`' rewrites (unless ``passes`` is false), so the runtimes time
    the graph users deploy."""
    import io

    import onnx

    from ..onnx_passes import optimize

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model.eval(), args, buffer, opset_version=17, dynamo=False,
                          do_constant_folding=True)
    if not passes:
        return buffer.getvalue()
    proto = onnx.load_from_string(buffer.getvalue())
    return proto.SerializeToString() if optimize(proto) else buffer.getvalue()


def _arrays(args: tuple) -> list:
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(args)
            if isinstance(t, torch.Tensor)]


def openvino_request(onnx: Any, threads: Optional[int] = None, shape: Optional[tuple] = None):
    """An OpenVINO CPU infer request for an ONNX model (a file path, or the file's bytes),
    compiled by :func:`openvino_config`; ``shape`` fixes the input's shape (one batch size of
    a file exported with a dynamic batch)."""
    require("openvino")
    import openvino as ov

    core = ov.Core()
    network = core.read_model(onnx)
    if shape is not None:
        network.reshape(list(shape))
    return core.compile_model(network, "CPU", openvino_config(threads)).create_infer_request()


class Runners:
    """Each model's runner (:func:`model_runner`), made once and reused while the model
    object lives here: a latency target times its dense model and each plan again in later
    rounds, and for the ONNX runtimes each runner is an export and a session (RetinaNet:
    2.2 s to export, every time). For one set of inputs, backend, device, threads and
    dtype."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[nn.Module, Callable[[], Any]]] = {}

    def get(self, model: nn.Module, make: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
        hit = self._made.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
        runner = make()
        self._made[id(model)] = (model, runner)  # the model kept: its id stays its own
        return runner

    def clear(self) -> None:
        """Drop every runner (and the sessions and models they hold)."""
        self._made.clear()


def measure_models(models: dict[str, nn.Module], inputs: Any, *, backend: str = "eager",
                   device: str = "cpu", threads: Optional[int] = None,
                   timer: Optional[Timer] = None, rounds: int = 30, max_spread: float = 0.1,
                   retries: int = 2, sample_s: float = 0.1, dtype: Any = None,
                   runners: Optional[Runners] = None) -> Measurement:
    """Median latency of each model, taken interleaved, with the machine recorded.

    Measures again (up to ``retries`` times) while any spread exceeds ``max_spread``, keeping
    the attempt with the narrowest worst spread; ``noisy`` says it never got under. A sample
    is the mean of as many consecutive calls as fill ``sample_s`` (at most 20), so the spread
    judges the machine, not one call's jitter. The
    first label is the reference of :meth:`Measurement.ratio` ("dense" by convention). A
    model that does not run with the backend (an ONNX export that fails) is left out and
    named in ``errors``. ``dtype``: each model is timed as a copy cast to it (see
    :func:`model_runner`). ``runners``: reuse the runners made for these model objects by
    earlier calls with the same inputs and settings (:class:`Runners`).
    """
    name = dtype_name(dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    previous = torch.get_num_threads()
    timer = timer or WallTimer(device)
    calls, errors = {}, {}
    try:
        for label, m in models.items():
            try:
                def make(m: nn.Module = m) -> Callable[[], Any]:
                    return model_runner(m, inputs, backend, device, threads, name)

                calls[label] = (make() if runners is None else runners.get(m, make),
                                ModelCall(label, m, inputs, backend, name))
                calls[label][0]()
            except Exception as exc:  # noqa: BLE001 - reported; the others are still timed
                calls.pop(label, None)
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                errors[label] = f"{type(exc).__name__}: {first}"
        if not calls:
            raise RuntimeError(f"no model runs with backend {backend!r}: {errors}")
        repeat = 1
        if sample_s > 0:
            slowest = max(timer(fn, what) for fn, what in calls.values())
            repeat = max(1, min(20, int(sample_s / max(slowest, 1e-9))))
        best, attempts = steady(calls, timer, rounds, repeat=repeat, max_spread=max_spread,
                                retries=retries)
        faults = {label: page_faults(fn) for label, (fn, _) in calls.items()} \
            if isinstance(timer, WallTimer) else {}
    finally:
        torch.set_num_threads(previous)
    worst = _worst(best)
    env = environment(backend, device, threads)
    if name is not None:
        env["dtype"] = name
    result = Measurement(best, env, max_spread, attempts, noisy=worst > max_spread,
                         errors=errors, faults={k: v for k, v in faults.items() if v is not None})
    faulting = {k: v for k, v in result.faults.items() if v > FAULTS_NOTED}
    if faulting:
        result.notes.append(
            "page faults per call: " + ", ".join(f"{k} {v:.0f}" for k, v in faulting.items())
            + ": the allocator returns their freed activations to the OS between calls, and "
            "their times include mapping them again (pin it, as the benchmarks do, or use "
            "jemalloc or tcmalloc, for times that do not depend on it)")
    if result.noisy:
        result.notes.append(f"spread {100 * worst:.0f}% stayed over {100 * max_spread:.0f}% in "
                            f"{attempts} attempts: the machine is not quiet, these figures are "
                            "noise")
    return result
