"""Predicted latency of a plan: the sum over the model's layers of their measured times.

Each conv/linear call is timed at a few widths along each of its prunable dims (multiples of
``step``, cached in a :class:`~pruners.latency.table.LatencyTable`, which for onnxruntime and
OpenVINO times what the layer adds inside a graph, not its run alone), and interpolated in
between. A layer's time at ``(c_in, c_out)`` is taken as separable above a floor ``f`` that
no width removes (the call's fixed cost, and the efficiency small kernels lose):
``f + (T(c_in, C_out) - f) * (T(C_in, c_out) - f) / (T(C_in, C_out) - f)``, with ``f`` where
the measured curves' trend lines meet zero width. Without the floor, a 3x3 conv of ResNet-50's
last stage at a quarter of both widths was predicted at 0.15 ms, and took 0.24 ms.

What the layers do not account for (norms, activations, adds, concat, Python overhead) is the
measured whole model minus the layers' sum, and scales with the activations the layers write.
In eager PyTorch on the CPU, the whole model and each layer inside it are timed in the same
runs (:func:`time_in_context`), and each layer's measured curve is scaled to its time there:
the table may have been filled on another day, when the machine ran faster or slower, and set
against a model timed now its layers could add up to more than the model (on a busy VM,
ResNet-50's cached layers summed to 1.3 times the model timed minutes later), which left the
norms and activations no time at all. A second resolution splits that remainder into a part
fixed per op and one per activation.
``evaluate(kept)`` takes the kept width of every channel dim in
:class:`depgraph.cost.CostModel` order, so allocation can use latency as its cost.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from depgraph.cost import CostModel
from depgraph.graph import ChannelGraph

from .table import LatencyTable, LayerShape, shape_of
from .timing import ModelCall, Runners, WallTimer, dtype_name, model_runner, time_call

__all__ = ["InContext", "LatencyModel", "LayerCall", "latency_model", "layer_calls",
           "time_in_context"]


@dataclass(frozen=True)
class LayerCall:
    """One call of a conv/linear module during the example forward."""

    module: str
    shape: LayerShape
    out_numel: int


def layer_calls(model: nn.Module, run: Callable[[], Any]) -> list[LayerCall]:
    """Every conv/linear call of ``run()`` (which runs ``model``), in call order."""
    calls: list[LayerCall] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            shape = shape_of(module, x)
            if shape is not None:
                calls.append(LayerCall(names[module], shape, out.numel()))

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass(frozen=True)
class InContext:
    """Eager timings of a whole model and of each conv/linear module inside it, taken in the
    same runs (:func:`time_in_context`). ``fixed_s``: the part of what the layers leave
    (norms, activations, adds, Python) that no width removes, found from runs at a smaller
    resolution (0 when there were none)."""

    dense_s: float
    layers: dict[str, float]
    fixed_s: float = 0.0


def time_in_context(model: nn.Module, run: Callable[[], Any], *,
                    smaller: Optional[Callable[[], Any]] = None, rounds: int = 9,
                    warmup: int = 2) -> InContext:
    """Time ``run()`` and each conv/linear module of ``model`` inside it (summed over its
    calls) by forward hooks on the wall clock, in the same runs, so both see the machine in
    the same state; medians of ``rounds``. Eager PyTorch on the CPU only.

    ``smaller`` runs the model on smaller inputs (half the resolution), in turn with ``run``:
    what the layers leave is ``fixed + per-activation cost``, and the two resolutions, whose
    layers write different numbers of activations, give both parts. On MobileNetV2 in eager
    mode about 40% of it is per-op cost that no width removes.
    """
    names = {m: n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    started: dict[nn.Module, float] = {}
    spent: dict[str, float] = {}
    written = [0]

    def before(module: nn.Module, args: tuple) -> None:
        started[module] = time.perf_counter()

    def after(module: nn.Module, args: tuple, out: Any) -> None:
        name = names[module]
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[module]
        written[0] += out.numel() if isinstance(out, torch.Tensor) else 0

    def once(fn: Callable[[], Any]) -> tuple[float, dict[str, float], int]:
        spent.clear()
        written[0] = 0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, dict(spent), written[0]

    handles = [h for m in names for h in (m.register_forward_pre_hook(before),
                                          m.register_forward_hook(after))]
    runs = [run] if smaller is None else [run, smaller]
    samples: list[list[tuple[float, dict[str, float], int]]] = [[] for _ in runs]
    try:
        with torch.no_grad():
            for r in range(warmup + rounds):
                for k, fn in enumerate(runs):
                    sample = once(fn)
                    if r >= warmup:
                        samples[k].append(sample)
    finally:
        for h in handles:
            h.remove()
    total = statistics.median(t for t, _, _ in samples[0])
    layers = {n: statistics.median(s.get(n, 0.0) for _, s, _ in samples[0])
              for n in samples[0][0][1]}
    fixed = 0.0
    if smaller is not None:
        rest = total - sum(layers.values())
        small_rest = statistics.median(t - sum(s.values()) for t, s, _ in samples[1])
        shrink = samples[1][0][2] / max(samples[0][0][2], 1)  # activations written, small/full
        if shrink < 0.9:  # rest = fixed + a * activations, at both sizes
            fixed = min(max((small_rest - shrink * rest) / (1 - shrink), 0.0), max(rest, 0.0))
    return InContext(total, layers, fixed)


def _grid(width: int, step: int, points: int) -> list[int]:
    """Up to ``points`` widths, multiples of ``step`` spread over (0, width], and ``width``."""
    multiples = list(range(step, width + 1, step)) or [width]
    if len(multiples) > points:
        picks = np.linspace(0, len(multiples) - 1, points).round().astype(int)
        multiples = [multiples[i] for i in sorted(set(picks.tolist()))]
    return sorted(set(multiples) | {width})


@dataclass
class LatencyModel:
    """Seconds as a function of kept widths (see the module docstring)."""

    calls: list[LayerCall]
    dense_s: float  # the whole model, measured
    layers_s: float  # the layers' sum at full width
    residual_s: float  # dense_s - layers_s, at least 0
    backend: str
    device: str
    threads: int
    step: int
    timer: Any = field(repr=False, default=None)  # what timed it (the table's timer)
    context: Optional[InContext] = None  # eager: the layers timed inside the model
    dtype: Optional[str] = None  # what the model was timed cast to (None: as it is)
    # vectorised evaluation: per call, the key index (into kept + [1]) of each dim
    _in_idx: np.ndarray = field(repr=False, default=None)
    _out_idx: np.ndarray = field(repr=False, default=None)
    _in_width: np.ndarray = field(repr=False, default=None)
    _out_width: np.ndarray = field(repr=False, default=None)
    _in_curve: np.ndarray = field(repr=False, default=None)  # flat, offsets below
    _out_curve: np.ndarray = field(repr=False, default=None)
    _in_off: np.ndarray = field(repr=False, default=None)
    _out_off: np.ndarray = field(repr=False, default=None)
    _full: np.ndarray = field(repr=False, default=None)  # T(C_in, C_out) per call
    _floor: np.ndarray = field(repr=False, default=None)  # per call, what no width removes
    _numel: np.ndarray = field(repr=False, default=None)
    _sizes: np.ndarray = field(repr=False, default=None)

    def full(self) -> float:
        """Predicted seconds of the unpruned model (equal to the measured ``dense_s``)."""
        return self.layers_s + self.residual_s

    def _calls_s(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted seconds of every call, kept fraction of every dim with 1 appended)."""
        frac = np.append(np.asarray(kept, dtype=np.float64) / np.maximum(self._sizes, 1), 1.0)
        a = np.rint(frac[self._in_idx] * self._in_width).astype(np.int64)
        b = np.rint(frac[self._out_idx] * self._out_width).astype(np.int64)
        f = self._floor
        times = f + (np.maximum(self._in_curve[self._in_off + a] - f, 0.0)
                     * np.maximum(self._out_curve[self._out_off + b] - f, 0.0) / (self._full - f))
        return times, frac

    def evaluate(self, kept: np.ndarray) -> float:
        """Predicted seconds when channel dim ``i`` keeps ``kept[i]`` (CostModel order)."""
        layers, frac = self._calls_s(kept)
        numel = float(self._numel.sum()) or 1.0
        share = float((self._numel * frac[self._out_idx]).sum()) / numel
        fixed = min(self.context.fixed_s, self.residual_s) if self.context else 0.0
        return float(layers.sum()) + fixed + (self.residual_s - fixed) * share

    def per_layer(self, kept: np.ndarray) -> dict[str, float]:
        """Predicted seconds of each module (summed over its calls) at ``kept``."""
        times, _ = self._calls_s(kept)
        out: dict[str, float] = {}
        for call, t in zip(self.calls, times):
            out[call.module] = out.get(call.module, 0.0) + float(t)
        return out

    def predict(self, graph: ChannelGraph, cost: CostModel, removed: list[int]) -> float:
        """Predicted seconds after removing ``removed`` (unit ids of ``graph``)."""
        return self.evaluate(cost.kept_after(graph, set(removed)))


def latency_model(model: nn.Module, example_inputs: Any, cost: CostModel, table: LatencyTable,
                  *, run: Optional[Callable[[], Any]] = None, step: int = 1, points: int = 8,
                  dense_s: Optional[float] = None,
                  calls: Optional[list[LayerCall]] = None,
                  context: Optional[InContext] = None,
                  smaller: Optional[Callable[[], Any]] = None,
                  dtype: Any = None, runners: Optional[Runners] = None) -> LatencyModel:
    """Measure (or read from ``table``) what the :class:`LatencyModel` of ``model`` needs.

    ``run`` runs ``model`` on the example (default: ``model(*example_inputs)``) once, to see
    every conv/linear call (``calls`` skips that when already known); ``dense_s`` skips
    timing the whole model when already known, and ``context`` (:func:`time_in_context`)
    scales each layer's curve to its time inside the model and splits what the layers leave
    into a fixed part and one that scales with the activations. For eager PyTorch on the CPU
    with the wall clock, ``context`` is measured here when not given, with ``smaller`` (the
    model run at half resolution) for the fixed part. ``dtype`` (float16, bfloat16: the
    precision the model is deployed in) times the whole model as a copy cast to it; the
    layers are timed in their ``calls``' dtype, which the caller sets to match. In-model
    timing then does not apply (``run`` runs the model as it is). ``runners``: where the
    whole model's runner for an ONNX runtime is kept, for later timings of it to reuse.
    """
    name = dtype_name(dtype)
    if run is None:
        from depgraph.capture import as_args

        args = as_args(example_inputs)
        run = lambda: model(*args)  # noqa: E731
    if calls is None:
        calls = layer_calls(model, run)
    index = {k: i for i, k in enumerate(cost.keys)}
    pad = len(cost.keys)
    in_idx, out_idx, in_w, out_w, full, numel = [], [], [], [], [], []
    in_curves, out_curves, varied = [], [], []
    for call in calls:
        s = call.shape
        weight = f"{call.module}.weight"
        o = index.get((weight, 0), pad)
        i = o if s.depthwise else index.get((weight, 1), pad)
        groups = 1 if s.depthwise else s.groups
        lstep = step * groups // math.gcd(step, groups)
        vin, vout = i != pad and not s.depthwise, o != pad
        # the layer and both curves' widths timed together: one state of the machine
        in_grid = _grid(s.in_channels, lstep, points) if vin else []
        out_grid = _grid(s.out_channels, lstep, points) if vout else []
        times = table.seconds_many(
            [s] + [s.at(w, s.out_channels) for w in in_grid]
            + [s.at(w, w) if s.depthwise else s.at(s.in_channels, w) for w in out_grid])
        t0 = times[0]
        in_curve = _curve(s.in_channels, in_grid, times[1:1 + len(in_grid)], t0)
        out_curve = _curve(s.out_channels, out_grid, times[1 + len(in_grid):], t0)
        in_idx.append(i)
        out_idx.append(o)
        in_w.append(s.in_channels)
        out_w.append(s.out_channels)
        in_curves.append(in_curve)
        out_curves.append(out_curve)
        varied.append((vin, vout, lstep))
        full.append(t0)
        numel.append(call.out_numel)
    table.save()
    as_run = table.backend == "eager" and table.device == "cpu" and name in (None, "float32")
    if dense_s is None and context is None and as_run and isinstance(table.timer, WallTimer):
        context = time_in_context(model, run, smaller=smaller, rounds=max(table.repeats, 9))
    if context is not None:
        dense_s = context.dense_s
        _scale_to(context.layers, calls, full, in_curves, out_curves)
    floor = [_floor(in_curves[j] if vin else None, out_curves[j] if vout else None, lstep)
             for j, (vin, vout, lstep) in enumerate(varied)]
    if dense_s is None:
        def make() -> Callable[[], Any]:
            return model_runner(model, example_inputs, table.backend, table.device,
                                table.threads, name)

        fn = _no_grad(run) if as_run else make() if runners is None else \
            runners.get(model, make)
        dense_s = time_call(fn, ModelCall("dense", model, example_inputs, table.backend, name),
                            table.timer, repeats=max(table.repeats, 9))
    layers_s = float(sum(full))
    lm = LatencyModel(calls, dense_s, layers_s, max(0.0, dense_s - layers_s), table.backend,
                      table.device, table.threads, step, table.timer, context, name)
    lm._in_idx, lm._out_idx = np.array(in_idx, dtype=np.int64), np.array(out_idx, dtype=np.int64)
    lm._in_width = np.array(in_w, dtype=np.float64)
    lm._out_width = np.array(out_w, dtype=np.float64)
    lm._in_curve, lm._in_off = _flatten(in_curves)
    lm._out_curve, lm._out_off = _flatten(out_curves)
    lm._full = np.maximum(np.array(full, dtype=np.float64), 1e-12)
    lm._floor = np.minimum(np.array(floor, dtype=np.float64), 0.9 * lm._full)
    lm._numel = np.array(numel, dtype=np.float64)
    lm._sizes = np.asarray(cost.sizes, dtype=np.float64)
    return lm


def _scale_to(in_context: dict[str, float], calls: list[LayerCall], full: list[float],
              in_curves: list[np.ndarray], out_curves: list[np.ndarray]) -> None:
    """Scale each module's curves (in place) so that its calls at full width add up to its
    time inside the model; a module not timed there keeps the table's."""
    table_s: dict[str, float] = {}
    for call, t in zip(calls, full):
        table_s[call.module] = table_s.get(call.module, 0.0) + t
    for j, call in enumerate(calls):
        if call.module in in_context and table_s[call.module] > 0:
            k = in_context[call.module] / table_s[call.module]
            full[j] *= k
            in_curves[j] = in_curves[j] * k
            out_curves[j] = out_curves[j] * k


def _floor(in_curve: Optional[np.ndarray], out_curve: Optional[np.ndarray], step: int) -> float:
    """Seconds a call takes whatever its widths: the lowest zero-width intercept of the trend
    lines through its measured curves (at multiples of ``step``), at least 0, and 0 when no
    width varies."""
    cuts = []
    for curve in (in_curve, out_curve):
        if curve is None:
            continue
        widths = np.arange(step, len(curve), step)
        if len(widths) >= 2:
            cuts.append(float(np.polyfit(widths, curve[widths], 1)[1]))
    return max(0.0, min(cuts)) if cuts else 0.0


def _no_grad(run: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        with torch.no_grad():
            return run()
    return wrapped


def _curve(width: int, grid: list[int], times: list[float], full: float) -> np.ndarray:
    """Seconds at every width 0..``width``: measured on the grid, linear in between, flat
    below the smallest grid width; ``full`` everywhere when no width was measured."""
    if not grid:
        return np.full(width + 1, full)
    return np.interp(np.arange(width + 1), grid, times)


def _flatten(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(c) for c in curves[:-1]]).astype(np.int64)
    return (np.concatenate(curves) if curves else np.zeros(0)), offsets
