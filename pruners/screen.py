"""Probes on fake tensors: does a pruned model still run, with outputs of the same shapes?

Most widths baked into a model's Python break the pruned model by raising (a view to the old
head count, a split by the old sizes) or by changing an output's shape, and both show just
as well on fake tensors (``torch._subclasses.FakeTensorMode``), which carry shapes through
every op and compute nothing. Where a forward takes seconds (DeepSeek's 412M-parameter ViT
at 1024 px: 15 s on two cores, 1.2 s on fake tensors), repair screens its probes this way
and runs for real only those whose numbers it compares (exact units, see ``verify``), and
the final check runs the train-mode forward (which only has to run) on fake tensors too. On
small models a fake run costs more than a real one (ResNet-50: 0.12 s real, 0.44 s fake), so
:meth:`ShapeScreen.of` offers the screen only where it is several times cheaper.

A fake run cannot follow values: ``.item()``, ``nonzero`` or a branch on a tensor stop it
(:class:`FakeUnsupported`). The screen needs the unpruned model to run fake first, and a
probe stopped that way sends the caller back to real runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch._subclasses import fake_tensor as _fake
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

from depgraph.graph import ChannelGraph

from .copying import copy_model
from .surgery import remove_units
from .verify import (DenseRun, _run_at, _run_counted, check_shapes, fails_to_run, narrowed_shapes,
                     run_model, shared_params)

__all__ = ["FakeUnsupported", "ShapeScreen", "dense_run", "estimated_flops", "serves"]

#: what a fake run raises where it cannot go on without values (not a fault of the model)
_VALUE_NEEDED = (_fake.DataDependentOutputException, _fake.DynamicOutputShapeException,
                 _fake.UnsupportedOperatorException, _fake.UnsupportedFakeTensorException,
                 GuardOnDataDependentSymNode)

#: a fake run is used only where it costs at most this share of a real one ...
_CHEAPER = 1 / 3
#: ... and real runs take at least this long (below, a fake run saves too little to try)
_MIN_REAL_S = 1.0
#: the unpruned model's first run is made on fake tensors from this many estimated FLOPs (a
#: real one takes seconds on a CPU: DeepSeek's ViT at 546 px, 1.6e12, 16 s on two cores; a
#: fake one about 1 s at any size)
_FAKE_DENSE_FLOPS = 5e11


def serves(screen: Optional["ShapeScreen"], inputs: Any) -> bool:
    """``screen`` exists and probes these very inputs (probes on other inputs run for real)."""
    return screen is not None and screen.inputs is inputs


class FakeUnsupported(Exception):
    """Fake tensors cannot run this model (it needs values): check with real ones."""


def _fake_mode() -> _fake.FakeTensorMode:
    return _fake.FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _quiet_fake(mode: Optional[_fake.FakeTensorMode] = None) -> Iterator[None]:
    """Fake mode (``mode``, or a new one) with torch's fake-tensor logger silenced: a probe
    that fails is expected, and torch logs every failing meta kernel with its traceback."""
    logger = logging.getLogger(_fake.__name__)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with mode if mode is not None else _fake_mode():
            yield
    finally:
        logger.setLevel(level)


def fake_shapes(run: Callable[[nn.Module], list[torch.Tensor]], model: nn.Module,
                mode: Optional[_fake.FakeTensorMode] = None) -> list[tuple[int, ...]]:
    """The shapes of ``run(model)``'s tensors, computed on fake tensors (of ``mode``, the one
    that made ``model``'s fake weights, if any). ``model`` should be a throwaway copy: its
    forward may store fake tensors in Python attributes (a cache).

    Raises:
        FakeUnsupported: the forward needs values.
        Exception: whatever the model's code raises.
    """
    try:
        with _quiet_fake(mode):
            got = run(model)
    except _VALUE_NEEDED as exc:
        raise FakeUnsupported(f"{type(exc).__name__}: {exc}") from exc
    return [tuple(t.shape) for t in got]


def _throwaway(model: nn.Module) -> nn.Module:
    return copy_model(model, shared_params(model))


def _fake_copy(model: nn.Module, mode: _fake.FakeTensorMode) -> nn.Module:
    """A throwaway copy of ``model`` whose parameters and buffers are ``mode``'s fake tensors:
    surgery on it slices nothing real. (A probe that removes one residual-stream channel of a
    632M-parameter ViT otherwise sliced 2.5 GB of real weights only to run them fake, 6 s of
    first-touched memory on two cores.)"""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo.setdefault(id(b), mode.from_tensor(b))
    return copy_model(model, memo)


@dataclass(frozen=True)
class ShapeScreen:
    """The unpruned model's outputs on fake tensors, for probes of pruned copies.

    ``inputs`` (kept by identity) are those the probes run on; with ``at``, a probe runs the
    model until those submodules have run and compares their outputs, as repair's real probes
    do. ``seconds``: the fake run's time, beside ``real_s``, the real one it was judged by.
    """

    inputs: Any
    shapes: list[tuple[int, ...]]
    outputs: Optional[Callable] = None
    example_kwargs: Optional[dict] = None
    at: Optional[Sequence[str]] = None
    seconds: float = 0.0
    real_s: Optional[float] = field(default=None, compare=False)

    def _run(self, model: nn.Module) -> list[torch.Tensor]:
        if self.at:
            return _run_at(model, list(self.at), self.inputs, self.example_kwargs,
                           stop_early=True)
        return run_model(model, self.inputs, self.outputs, self.example_kwargs)

    @classmethod
    def of(cls, model: nn.Module, inputs: Any, *, outputs: Optional[Callable] = None,
           example_kwargs: Optional[dict] = None, at: Optional[Sequence[str]] = None,
           real_s: Optional[float] = None) -> Optional["ShapeScreen"]:
        """A screen for ``model`` on ``inputs``, or None where fake tensors cannot run it.

        ``real_s`` (a real forward's time on ``inputs``) asks for one only where it pays: None
        below ``_MIN_REAL_S`` or when the fake run is not at most ``_CHEAPER`` of it. Without
        ``real_s`` the screen is made whenever the model runs fake (tests; a caller's choice).
        """
        if real_s is not None and real_s < _MIN_REAL_S:
            return None
        screen = cls(inputs, [], outputs, example_kwargs, tuple(at) if at else None)
        start = time.perf_counter()
        try:
            shapes = fake_shapes(screen._run, _throwaway(model))
        except Exception:  # noqa: BLE001 - fake tensors cannot follow it: real runs will
            return None
        seconds = time.perf_counter() - start
        if real_s is not None and seconds > _CHEAPER * real_s:
            return None
        return cls(inputs, shapes, outputs, example_kwargs, screen.at, seconds, real_s)

    def check(self, model: nn.Module, graph: ChannelGraph, units: Iterable[int]) -> None:
        """Remove ``units`` from a copy of ``model`` and run it fake.

        Raises:
            VerificationError: it fails to run, or its outputs change number or shape.
            FakeUnsupported: the pruned copy needs values where the original did not.
        """
        units = list(units)
        mode = _fake_mode()
        pruned = remove_units(_fake_copy(model, mode), graph, units)
        try:
            got = fake_shapes(self._run, pruned, mode)
        except FakeUnsupported:
            raise
        except Exception as exc:  # noqa: BLE001
            raise fails_to_run(exc) from exc
        check_shapes(narrowed_shapes(self.shapes, graph.kept_at(self.at, units))
                     if self.at else self.shapes, got)

    def runs_in_train_mode(self, pruned: nn.Module) -> Optional[BaseException]:
        """What a train-mode forward of ``pruned`` on fake tensors raises (None: it runs).

        Raises:
            FakeUnsupported: the forward needs values.
        """
        copy = _throwaway(pruned).train()
        try:
            fake_shapes(lambda m: run_model(m, self.inputs, None, self.example_kwargs), copy)
        except FakeUnsupported:
            raise
        except Exception as exc:  # noqa: BLE001
            return exc
        return None


def estimated_flops(model: nn.Module, inputs: Any) -> float:
    """About what one forward of ``model`` on ``inputs`` costs, before running it: twice the
    parameters times the positions of a stride-16 grid over the largest image input (a ViT's
    tokens at patch 16; a CNN's weights, averaged over its stages, see about as many). Within
    a factor of two on ResNets, ViTs and YOLOs; 0 where no input is an image."""
    sides = [t.shape[-2] * t.shape[-1] for t in pytree.tree_leaves(inputs)
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4]
    if not sides:
        return 0.0
    return 2.0 * sum(p.numel() for p in model.parameters()) * max(sides) / 256


def _state(model: nn.Module) -> dict[tuple[str, str], int]:
    """What a forward could store in ``model``: every module attribute, parameter and buffer,
    by identity."""
    seen: dict[tuple[str, str], int] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                seen[name, key] = id(value)
        for kind in ("_parameters", "_buffers"):
            for key, value in getattr(module, kind).items():
                seen[name, f"{kind}.{key}"] = id(value)
    return seen


def dense_run(model: nn.Module, inputs: Any, outputs: Optional[Callable] = None,
              example_kwargs: Optional[dict] = None) -> DenseRun:
    """The unpruned model's first run (``DenseRun``): on fake tensors where a real one would
    take seconds (:func:`estimated_flops`), else real (``DenseRun.of``).

    Nothing later needs its values (checks compare with the masked original), only its
    outputs' shapes and FLOPs, which fake tensors give alike. It runs real where the fake run
    would not pay (small models, a GPU), where fake tensors cannot follow the model, where it
    raises (the real run's error is the one to report), and where the forward stores
    something in the model (a cache by input shape, as Ultralytics' anchors; a lazy layer):
    the real run also warms that, which the capture after it needs.
    """
    if (any(type(m).__name__ in ("DistributedDataParallel", "DataParallel")
            or isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
            or any(p.device.type != "cpu" for p in model.parameters())
            or estimated_flops(model, inputs) < _FAKE_DENSE_FLOPS):
        return DenseRun.of(model, inputs, outputs, example_kwargs)
    copy = _throwaway(model)
    before = _state(copy)
    counted: dict = {}
    start = time.perf_counter()
    try:
        got = fake_shapes(lambda m: _run_counted(
            lambda c: run_model(c, inputs, outputs, example_kwargs), m, counted, "dense"), copy)
    except Exception:  # noqa: BLE001 - fake tensors cannot follow it, or it raises: real
        return DenseRun.of(model, inputs, outputs, example_kwargs)
    seconds = time.perf_counter() - start
    if _state(copy) != before or counted["dense"].total < _FAKE_DENSE_FLOPS:
        return DenseRun.of(model, inputs, outputs, example_kwargs)
    return DenseRun(inputs, got, counted["dense"], seconds, fake=True)


def input_share(small: Any, full: Any) -> float:
    """How much of ``full``'s floating-point input ``small`` holds (1.0 when they are one):
    a real forward's time scales with it, a fake one's hardly."""
    if small is full:
        return 1.0

    def count(x: Any) -> int:
        return sum(t.numel() for t in pytree.tree_leaves(x)
                   if isinstance(t, torch.Tensor) and t.is_floating_point())

    whole = count(full)
    return count(small) / whole if whole else 1.0
