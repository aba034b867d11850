"""Predicted latency of a plan: the sum over the model's layers of their measured times.

Each conv/linear call is timed at a few widths along each of its prunable dims (multiples of
``step``, cached in a :class:`~pruners.latency.table.LatencyTable`, which for onnxruntime and
OpenVINO times what the layer adds inside a graph, not its run alone), and interpolated in
between; a layer's time at ``(c_in, c_out)``
is taken as separable, ``T(c_in, C_out) * T(C_in, c_out) / T(C_in, C_out)``. What the layers
do not account for (norms, activations, adds, concat, Python overhead) is the measured whole
model minus the layers' sum, and scales with the activations the layers write.
``evaluate(kept)`` takes the kept width of every channel dim in
:class:`depgraph.cost.CostModel` order, so allocation can use latency as its cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from depgraph.cost import CostModel
from depgraph.graph import ChannelGraph

from .table import LatencyTable, LayerShape, shape_of
from .timing import ModelCall, model_runner, time_call

__all__ = ["LatencyModel", "LayerCall", "latency_model", "layer_calls"]


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
        times = self._in_curve[self._in_off + a] * self._out_curve[self._out_off + b] / self._full
        return times, frac

    def evaluate(self, kept: np.ndarray) -> float:
        """Predicted seconds when channel dim ``i`` keeps ``kept[i]`` (CostModel order)."""
        layers, frac = self._calls_s(kept)
        numel = float(self._numel.sum()) or 1.0
        share = float((self._numel * frac[self._out_idx]).sum()) / numel
        return float(layers.sum()) + self.residual_s * share

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
                  calls: Optional[list[LayerCall]] = None) -> LatencyModel:
    """Measure (or read from ``table``) what the :class:`LatencyModel` of ``model`` needs.

    ``run`` runs ``model`` on the example (default: ``model(*example_inputs)``) once, to see
    every conv/linear call (``calls`` skips that when already known); ``dense_s`` skips
    timing the whole model when already known.
    """
    if run is None:
        from depgraph.capture import as_args

        args = as_args(example_inputs)
        run = lambda: model(*args)  # noqa: E731
    if calls is None:
        calls = layer_calls(model, run)
    index = {k: i for i, k in enumerate(cost.keys)}
    pad = len(cost.keys)
    in_idx, out_idx, in_w, out_w, full, numel = [], [], [], [], [], []
    in_curves, out_curves = [], []
    for call in calls:
        s = call.shape
        weight = f"{call.module}.weight"
        t0 = table.seconds(s)
        o = index.get((weight, 0), pad)
        i = o if s.depthwise else index.get((weight, 1), pad)
        groups = 1 if s.depthwise else s.groups
        lstep = step * groups // math.gcd(step, groups)
        in_curve = np.full(s.in_channels + 1, t0)
        out_curve = np.full(s.out_channels + 1, t0)
        if s.depthwise:
            if o != pad:
                out_curve = _curve(s.out_channels, lstep, points,
                                   lambda w: table.seconds(s.at(w, w)))
        else:
            if i != pad:
                in_curve = _curve(s.in_channels, lstep, points,
                                  lambda w: table.seconds(s.at(w, s.out_channels)))
            if o != pad:
                out_curve = _curve(s.out_channels, lstep, points,
                                   lambda w: table.seconds(s.at(s.in_channels, w)))
        in_idx.append(i)
        out_idx.append(o)
        in_w.append(s.in_channels)
        out_w.append(s.out_channels)
        in_curves.append(in_curve)
        out_curves.append(out_curve)
        full.append(t0)
        numel.append(call.out_numel)
    table.save()
    if dense_s is None:
        fn = model_runner(model, example_inputs, table.backend, table.device, table.threads) \
            if table.backend != "eager" else _no_grad(run)
        dense_s = time_call(fn, ModelCall("dense", model, example_inputs, table.backend),
                            table.timer, repeats=max(table.repeats, 9))
    layers_s = float(sum(full))
    lm = LatencyModel(calls, dense_s, layers_s, max(0.0, dense_s - layers_s), table.backend,
                      table.device, table.threads, step, table.timer)
    lm._in_idx, lm._out_idx = np.array(in_idx, dtype=np.int64), np.array(out_idx, dtype=np.int64)
    lm._in_width = np.array(in_w, dtype=np.float64)
    lm._out_width = np.array(out_w, dtype=np.float64)
    lm._in_curve, lm._in_off = _flatten(in_curves)
    lm._out_curve, lm._out_off = _flatten(out_curves)
    lm._full = np.maximum(np.array(full, dtype=np.float64), 1e-12)
    lm._numel = np.array(numel, dtype=np.float64)
    lm._sizes = np.asarray(cost.sizes, dtype=np.float64)
    return lm


def _no_grad(run: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        with torch.no_grad():
            return run()
    return wrapped


def _curve(width: int, step: int, points: int, seconds: Callable[[int], float]) -> np.ndarray:
    """Seconds at every width 0..``width``: measured on the grid, linear in between, flat
    below the smallest grid width."""
    grid = _grid(width, step, points)
    times = [seconds(w) for w in grid]
    return np.interp(np.arange(width + 1), grid, times)


def _flatten(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(c) for c in curves[:-1]]).astype(np.int64)
    return (np.concatenate(curves) if curves else np.zeros(0)), offsets
