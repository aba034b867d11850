"""Measured latency of single layers, cached on disk.

A :class:`LayerShape` is one conv or linear call at given widths (and everything else its time
depends on: kernel, stride, groups, the input's spatial size, dtype, and in PyTorch the memory
layout: a channels-last model's convs skip the layout conversions a contiguous one pays); a
:class:`LatencyTable` maps ``(shape, backend, device, threads)`` to measured seconds and keeps
them in a JSON file, so a model's layers are timed once per machine and every later plan is
predicted from the file.

What a layer costs inside a model is not what it costs run alone in a runtime. Alone, an
onnxruntime or OpenVINO graph of one conv also pays the run's fixed cost and converts its
input and output between the plain layout and the blocked one its kernels use (``nChw16c``),
which a model does only at its edges: on MobileNetV2 in OpenVINO the layers timed alone add up
to 2.8 times the whole model. So for those runtimes a layer's time is the time that
:data:`COPIES` copies of it, on the same input with their outputs summed, take over one copy,
per extra copy: the cost of one more such layer inside a graph. Eager PyTorch runs a model
module by module, as a layer alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..surgery import CHANNELS_LAST, memory_format
from .timing import (BACKENDS, GRAPH_COPIES, Timer, WallTimer, backend_dtype, machine_id,
                     model_runner, onnx_runner, require, time_call)

__all__ = ["LayerShape", "LatencyTable", "check_backend", "default_cache_path", "shape_of"]


@dataclass(frozen=True)
class LayerShape:
    """One conv (``kind="conv"``, any spatial rank) or linear call.

    ``input_shape`` is the full input (batch first); ``in_channels``/``out_channels`` are the
    widths timed. A depthwise conv (``groups == in == out``) keeps that when widths change.
    """

    kind: str
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    dtype: str = "float32"
    follow: int = 0  # > 0: timed followed by a 1x1 conv/linear back to this many channels
    copies: int = 1  # > 1: that many copies on the same input, their outputs summed
    layout: str = "contiguous"  # or "channels_last": weights and input, as the model has them

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and \
            self.groups == self.in_channels == self.out_channels

    def at(self, in_channels: int, out_channels: int) -> "LayerShape":
        """The same layer at other widths (grouped convs keep their group count)."""
        if self.depthwise:
            width = out_channels
            return dataclasses.replace(self, in_channels=width, out_channels=width, groups=width,
                                       input_shape=_with_channels(self, width))
        return dataclasses.replace(self, in_channels=in_channels, out_channels=out_channels,
                                   input_shape=_with_channels(self, in_channels))

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """A fresh module of this shape and a random input for it."""
        dtype = getattr(torch, self.dtype)
        if self.kind == "linear":
            module = nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
            after = nn.Linear(self.out_channels, self.follow) if self.follow else None
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
            module = conv(self.in_channels, self.out_channels, self.kernel, self.stride,
                          self.padding, self.dilation, self.groups, self.bias)
            after = conv(self.out_channels, self.follow, 1) if self.follow else None
        if after is not None:
            module = nn.Sequential(module, after)
        if self.copies > 1:
            module = _Summed([module] + [dataclasses.replace(self, copies=1).build()[0]
                                         for _ in range(self.copies - 1)])
        x = torch.randn(self.input_shape, dtype=dtype)
        module = module.to(dtype).eval()
        if self.layout == "channels_last" and x.dim() in CHANNELS_LAST:
            last = CHANNELS_LAST[x.dim()]
            module, x = module.to(memory_format=last), x.contiguous(memory_format=last)
        return module, x

    def onnx(self) -> tuple[bytes, torch.Tensor, nn.Module]:
        """The ONNX graph of :meth:`build`'s module, written directly (``torch.onnx.export``
        took 4 ms on a small layer and 66 ms on four copies of a 256-wide 3x3 conv, about
        twice what building and writing them takes), with its input and the module; float32
        only."""
        from onnx import TensorProto, helper, numpy_helper

        module, x = self.build()
        nodes, weights = [], []

        def tensor(value: torch.Tensor) -> str:
            name = f"w{len(weights)}"
            weights.append(numpy_helper.from_array(value.detach().numpy(), name))
            return name

        def emit(layer: nn.Module, source: str) -> str:
            if isinstance(layer, nn.Sequential):
                return emit(layer[1], emit(layer[0], source))
            out = f"y{len(nodes)}"
            if isinstance(layer, nn.Linear):
                product = out + "_mm"
                nodes.append(helper.make_node("MatMul", [source, tensor(layer.weight.t())],
                                              [product if layer.bias is not None else out]))
                if layer.bias is not None:
                    nodes.append(helper.make_node("Add", [product, tensor(layer.bias)], [out]))
                return out
            inputs = [source, tensor(layer.weight)] + \
                ([tensor(layer.bias)] if layer.bias is not None else [])
            nodes.append(helper.make_node(
                "Conv", inputs, [out], kernel_shape=list(layer.kernel_size),
                strides=list(layer.stride), pads=list(layer.padding) * 2,
                dilations=list(layer.dilation), group=layer.groups))
            return out

        layers = list(module.layers) if isinstance(module, _Summed) else [module]
        outs = [emit(layer, "x") for layer in layers]
        total = outs[0]
        for k, other in enumerate(outs[1:]):
            nodes.append(helper.make_node("Add", [total, other], [f"sum{k}"]))
            total = f"sum{k}"
        graph = helper.make_graph(
            nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info(total, TensorProto.FLOAT, None)], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return model.SerializeToString(), x, module

    def key(self, backend: str, device: str, threads: int, machine: str = "") -> str:
        """The table's key for this shape timed with ``backend`` on ``device`` with
        ``threads``, on the machine ``machine`` names (:func:`~.timing.machine_id`). The
        layout is part of it in PyTorch only (the ONNX runtimes choose their own)."""
        dims = "x".join(map(str, self.input_shape))
        if self.layout != "contiguous" and backend in ("eager", "cudagraph"):
            dims += f" {self.layout}"
        conv = (f" k{self.kernel} s{self.stride} p{self.padding} d{self.dilation} "
                f"g{self.groups}" if self.kind == "conv" else "")
        where = f"{backend}/{device}/{machine}" if machine else f"{backend}/{device}"
        return (f"{where}/t{threads}/{self.dtype}/{TIMING}/{self.kind} "
                f"{self.in_channels}->"
                f"{self.out_channels} in {dims}{conv}{' bias' if self.bias else ''}"
                f"{f' then 1x1 to {self.follow}' if self.follow else ''}"
                f"{f' x{self.copies} summed' if self.copies > 1 else ''}")


class _Summed(nn.Module):
    """Copies of a layer (each with its own weights, so no runtime merges them) run on the
    same input, their outputs summed: one graph holding several such layers."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers[0](x)
        for layer in self.layers[1:]:
            out = out + layer(x)
        return out


def _with_channels(shape: LayerShape, channels: int) -> tuple[int, ...]:
    dims = list(shape.input_shape)
    dims[-1 if shape.kind == "linear" else 1] = channels
    return tuple(dims)


def shape_of(module: nn.Module, x: torch.Tensor) -> Optional[LayerShape]:
    """The :class:`LayerShape` of ``module`` called on ``x``; None for what is not timed here
    (transposed convs, non-zero padding modes, string padding)."""
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features, tuple(x.shape),
                          bias=module.bias is not None, dtype=str(x.dtype).split(".")[-1])
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed \
            and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        last = memory_format(x) != torch.contiguous_format or \
            memory_format(module.weight) != torch.contiguous_format
        return LayerShape("conv", module.in_channels, module.out_channels, tuple(x.shape),
                          tuple(module.kernel_size), tuple(module.stride),
                          tuple(module.padding), tuple(module.dilation), module.groups,
                          module.bias is not None, str(x.dtype).split(".")[-1],
                          layout="channels_last" if last else "contiguous")
    return None


def check_backend(backend: str, device: str, dtype: Any = None) -> None:
    """ValueError unless latency can be measured with ``backend`` on ``device`` in ``dtype``
    (None: as the model is; :func:`~.timing.backend_dtype`), ImportError when the backend's
    runtime is not installed."""
    backend_dtype(backend, dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {backend!r}")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if str(device).startswith("cuda") and backend in ("onnxruntime", "openvino"):
        raise ValueError(f"{backend} latency is measured on the CPU only")
    if backend == "cudagraph" and not str(device).startswith("cuda"):
        raise ValueError("backend='cudagraph' replays CUDA graphs: it needs device='cuda', "
                         f"got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this PyTorch sees no CUDA GPU "
                         "(torch.cuda.is_available() is False); time on device='cpu'")
    require(backend)


def default_cache_path() -> str:
    """``$PRUNERS_LATENCY_CACHE``, else ``~/.cache/pruners/latency.json``."""
    return os.environ.get("PRUNERS_LATENCY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pruners", "latency.json")


#: Copies of a layer timed together to find its cost inside a runtime's graph (see above).
COPIES = 4

#: How an entry was timed, in its key: an entry timed another way is timed again rather
#: than mixed into one curve with the new ones (and dropped from the file on save). Now:
#: interleaved rounds, the fastest kept (``alone_many``); before, one shape after another.
TIMING = "interleaved"


def _timed_now(entries: dict[str, Any]) -> dict[str, Any]:
    """The entries of a cache file that were timed as :data:`TIMING` says."""
    return {k: v for k, v in entries.items() if f"/{TIMING}/" in k}


class LatencyTable:
    """Seconds per layer shape on one backend, device and thread count; JSON on disk.

    ``path=None`` keeps the table in memory. Entries are keyed by the machine too
    (``machine``, default :func:`~.timing.machine_id`: the CPU model and SIMD flags, the GPU,
    the runtime versions), so one file shared between machines keeps each one's times
    apart. ``timer`` (default: the wall clock) is what
    measures a missing entry, as the median of ``repeats`` calls per round (see
    :meth:`alone_many`); ``measured`` counts the entries this table timed itself. The file
    keeps what was timed (a graph of one layer, or of :data:`COPIES`), not what is derived
    from it.
    """

    def __init__(self, path: Optional[str] = None, *, backend: str = "eager",
                 device: str = "cpu", threads: Optional[int] = None,
                 timer: Optional[Timer] = None, repeats: int = 3,
                 machine: Optional[str] = None) -> None:
        check_backend(backend, device)
        self.path, self.backend, self.device = path, backend, device
        self.machine = machine_id(backend, device) if machine is None else machine
        self.threads = threads or torch.get_num_threads()
        self.timer = timer or WallTimer(device)
        self.repeats = repeats
        self.measured = 0
        self._entries: dict[str, float] = {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self._entries = _timed_now(json.load(f))

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, shape: LayerShape) -> str:
        return shape.key(self.backend, self.device, self.threads, self.machine)

    def has(self, shape: LayerShape) -> bool:
        return self._key(shape) in self._entries

    def runner(self, shape: LayerShape):
        """A no-argument function running a fresh layer of ``shape`` on this backend (in
        onnxruntime and OpenVINO, its ONNX graph written directly, when float32; as a CUDA
        graph, :data:`~.timing.GRAPH_COPIES` forwards per call: see :meth:`alone_many`)."""
        if self.backend in ("onnxruntime", "openvino") and shape.dtype == "float32":
            onnx, x, _ = shape.onnx()
            return onnx_runner(onnx, [x.numpy()], self.backend, self.threads)
        module, x = shape.build()
        return model_runner(module, x, self.backend, self.device, self.threads, shape.dtype,
                            copies=self.per_call)

    @property
    def per_call(self) -> int:
        """Forwards of a layer in one timed call of :meth:`runner`."""
        return GRAPH_COPIES if self.backend == "cudagraph" else 1

    def put(self, shape: LayerShape, seconds: float) -> None:
        self._entries[self._key(shape)] = float(seconds)
        self.measured += 1

    def alone(self, shape: LayerShape) -> float:
        """Seconds of one run of ``shape`` on its own (a graph of just it, for a runtime),
        measuring (and remembering) it if missing."""
        return self.alone_many([shape])[0]

    def alone_many(self, shapes: list[LayerShape], rounds: int = 3) -> list[float]:
        """:meth:`alone` of each of ``shapes``, the missing ones timed together: ``rounds``
        rounds, each timing every shape once (median of ``repeats`` calls) in an order
        rotated each round, keeping each shape's fastest round. Timed one after the other,
        the points of one layer's curve caught the machine in different states (on a busy
        VM, a 512-wide conv timed 2.4 ms at full width and 1.0 ms at 384 outputs, where
        interleaved they take 1.3 and 1.0)."""
        missing = list(dict.fromkeys(s for s in shapes if not self.has(s)))
        if missing:
            runners = [self.runner(s) for s in missing]
            best: dict[LayerShape, float] = {}
            for r in range(rounds):
                k = r % len(missing)
                for j in list(range(k, len(missing))) + list(range(k)):
                    t = time_call(runners[j], missing[j], self.timer, repeats=self.repeats,
                                  warmup=1)
                    best[missing[j]] = min(best.get(missing[j], t), t)
            for shape, t in best.items():
                self.put(shape, t / self.per_call)
        return [self._entries[self._key(s)] for s in shapes]

    def seconds(self, shape: LayerShape) -> float:
        """Seconds ``shape`` adds to a model run with this backend: its time alone in eager
        PyTorch or a CUDA graph; in onnxruntime and OpenVINO, what each copy beyond the first
        adds to a graph of :data:`COPIES` (the run's fixed cost and the layout conversions at
        the graph's edges are paid once, as in a model). At least a nanosecond."""
        return self.seconds_many([shape])[0]

    def seconds_many(self, shapes: list[LayerShape]) -> list[float]:
        """:meth:`seconds` of each of ``shapes``, timed together (:meth:`alone_many`)."""
        if self.backend in ("eager", "cudagraph"):  # a model's layers run as they do alone
            return self.alone_many(shapes)
        many = [dataclasses.replace(s, copies=COPIES) for s in shapes]
        times = self.alone_many(list(shapes) + many)
        return [max((times[len(shapes) + j] - t) / (COPIES - 1), 1e-9)
                for j, t in enumerate(times[:len(shapes)])]

    def save(self) -> None:
        """Write the table to ``path`` (merged with what another process wrote meanwhile)."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        merged: dict[str, Any] = {}
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    merged = json.load(f)
            except (OSError, ValueError):
                merged = {}
        merged = _timed_now(merged)
        merged.update(self._entries)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, self.path)
