"""Verification: the pruned model runs, and equals the original with the pruned channels masked.

The zero-equivalence check (see ``shared/design.md``): in the original (in place, restored
after), zero the *consumer* slices of the removed units (the input columns of every
conv/linear/matmul weight that reads them). Physically prune the same units from a copy.
Both must give the same outputs. A missed coupling shows up as a shape error or an output
difference.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from depgraph.capture import ValueReads, as_args, fresh, plain_outputs
from depgraph.errors import VerificationError
from depgraph.graph import ChannelGraph

from .copying import copy_model
from .reparam import deepcopy_model
from .surgery import lookup_tensor, remove_units

if TYPE_CHECKING:
    from .screen import ShapeScreen

__all__ = ["DenseRun", "VerifyResult", "verify", "mask_consumers", "masked_in_place", "run_model",
           "sample_units", "tolerance", "narrowed", "narrowed_shapes"]

#: Outputs less precise than float32 are compared at no less than this many of their dtype's
#: machine epsilons. A pruned conv sums fewer terms than the masked one, in another order; in
#: float16 that moves an output by an ulp on CPUs whose kernels accumulate in float16 (measured:
#: 1.6e-4 of the largest output, a ResNet bottleneck, where another CPU gave the same bits).
LOW_PRECISION_EPS = 4


def tolerance(rtol: float, *dtypes: torch.dtype) -> float:
    """The relative tolerance :func:`verify` applies to an output of ``dtypes`` (the output's
    own, and the one its layers compute in): ``rtol`` (meant for float32), or
    ``LOW_PRECISION_EPS`` epsilons of the least precise float dtype."""
    eps = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point), default=0.0)
    if eps <= torch.finfo(torch.float32).eps:
        return rtol
    return max(rtol, LOW_PRECISION_EPS * eps)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: the largest output difference, absolute and relative."""

    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    inexact: int = 0  # inexact units removed from the reference too (see ``verify``)

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.rtol

    @property
    def compared(self) -> bool:
        """Whether outputs were compared (NaN differences: only shapes were checked)."""
        return self.max_rel_diff == self.max_rel_diff

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        beside = (f"; against the masked original with the plan's {self.inexact} inexact units "
                  "removed from it too" if self.inexact else "")
        return (f"VerifyResult({verdict}: max abs diff {self.max_abs_diff:.3g}, "
                f"max rel diff {self.max_rel_diff:.3g}, rtol {self.rtol:g}{beside})")


@dataclass(frozen=True)
class DenseRun:
    """One forward of the unpruned model on ``inputs`` (kept by identity): the shapes of its
    contract outputs and its FLOPs (:class:`pruners.flops.FlopCount`, None if not counted).

    Masking changes neither, so a check of inexact units, whose outputs are not compared,
    needs no masked forward of its own: on a large ViT that forward takes seconds.
    ``seconds``: how long the run took (it tells whether fake-tensor probes pay, ``screen``).
    ``fake``: the run was on fake tensors (``pruners.screen.dense_run``): shapes and FLOPs are
    the same, ``seconds`` is the fake run's, and probes on these inputs run fake.
    ``value_ops``: the ops by which forward used tensor values (``depgraph.ValueReads``;
    a fake run has none): the capture then traces concretely first.
    """

    inputs: Any
    shapes: list[tuple[int, ...]]
    flops: Any = None
    seconds: float = 0.0
    fake: bool = False
    value_ops: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, example_inputs: Any, outputs: Optional[Callable] = None,
           example_kwargs: Optional[dict] = None) -> "DenseRun":
        """Run ``model`` once, counting its FLOPs where the counter can follow it."""
        def run(m: nn.Module) -> list[torch.Tensor]:
            return run_model(m, example_inputs, outputs, example_kwargs)

        counted: dict = {}
        start = time.perf_counter()
        try:
            with ValueReads() as reads:
                got = _run_counted(run, model, counted, "dense")
        except Exception:  # noqa: BLE001 - the plain run says whether the model runs
            start = time.perf_counter()
            with ValueReads() as reads:
                got = run(model)
        return cls(example_inputs, [tuple(t.shape) for t in got], counted.get("dense"),
                   time.perf_counter() - start, value_ops=reads.ops)


def run_model(model: nn.Module, example_inputs: Any, outputs: Optional[Callable] = None,
              example_kwargs: Optional[dict] = None) -> list[torch.Tensor]:
    """Run ``model`` without gradients and return the contract outputs as a flat list."""
    args = as_args(example_inputs)
    with torch.no_grad():
        out = model(*args, **fresh(example_kwargs or {}))
    if outputs is not None:
        out = outputs(out)
    return [t for t in pytree.tree_leaves(plain_outputs(out)) if isinstance(t, torch.Tensor)]


def shared_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """A copy memo (``copying.copy_model``) that shares every parameter of ``model``.

    Safe for a copy that surgery prunes before anything else touches it: surgery swaps a new
    tensor into the copy for every parameter it changes and never writes into the old one, so
    the copy keeps only parameters the plan leaves alone; masking (in place, on the original,
    after the pruned copy ran) writes only into changed ones. A repair probe changes nearly
    every parameter, so copying them first (then slicing them again) tripled its memory
    traffic. Buffers are always copied: a forward in train mode updates them in place. The
    memo is new at each call (a copy fills the memo it is given).
    """
    return {id(p): p for p in model.parameters()}


def mask_consumers(model: nn.Module, graph: ChannelGraph, units: Iterable[int]) -> nn.Module:
    """Zero, in place, every consumer slice (conv/linear input columns) of ``units``.

    Units that two activations contract over (attention's q.k) have no consumer weight; for
    those every slice, producers included, is zeroed so the contraction sees zeros.
    """
    with torch.no_grad():
        for tensor, dim, idx in _consumer_slices(model, graph, units):
            tensor.index_fill_(dim, idx, 0.0)
    return model


def _consumer_slices(model: nn.Module, graph: ChannelGraph, units: Iterable[int]
                     ) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tensor, dim, indices) of every slice :func:`mask_consumers` zeroes."""
    removed = np.fromiter((int(u) for u in units), dtype=np.int64)
    contracted = np.array([u for u in removed.tolist() if graph.units[u].contracted],
                          dtype=np.int64)
    out = []
    for (param, dim), ids in graph.unit_index.items():
        hit = np.isin(ids, removed if (param, dim) in graph.consumers else contracted)
        if hit.any():
            tensor = lookup_tensor(model, param)
            out.append((tensor, dim, torch.as_tensor(np.nonzero(hit)[0], dtype=torch.long,
                                                     device=tensor.device)))
    return out


@contextlib.contextmanager
def masked_in_place(model: nn.Module, graph: ChannelGraph, units: Iterable[int]
                    ) -> Iterator[nn.Module]:
    """``model`` with the consumer slices of ``units`` zeroed inside the block, restored after
    (also when the block raises): the masked reference without a copy of the model, which on
    a large model is most of a repair probe's memory. Only the zeroed slices are kept aside."""
    saved = []
    try:
        with torch.no_grad():
            for tensor, dim, idx in _consumer_slices(model, graph, units):
                saved.append((tensor, dim, idx, tensor.index_select(dim, idx)))
                tensor.index_fill_(dim, idx, 0.0)
        yield model
    finally:
        with torch.no_grad():
            for tensor, dim, idx, values in reversed(saved):  # tied tensors: first value last
                tensor.index_copy_(dim, idx, values)


@contextlib.contextmanager
def training(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in train mode inside the block; its buffers (batch-norm statistics, an EMA)
    and every module's mode are restored after."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield model.train()
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, mode in modes.items():
            m.training = mode


class _Seen(Exception):
    """Raised from a hook once every verified submodule has run: the rest is not needed."""


def _run_at(model: nn.Module, names: Sequence[str], example_inputs: Any,
            example_kwargs: Optional[dict], stop_early: bool = False) -> list[torch.Tensor]:
    """Run ``model`` and return the outputs of the named submodules, in ``names`` order.

    ``stop_early`` ends the forward as soon as all of them have run (a detector's NMS and
    per-box heads after them are skipped: repair's probes only compare these outputs)."""
    seen: dict[str, Any] = {}
    handles = []

    def record(name: str, out: Any) -> None:
        seen.setdefault(name, out)
        if stop_early and len(seen) == len(names):
            raise _Seen

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, name=name: record(name, out)))
    try:
        run_model(model, example_inputs, None, example_kwargs)
    except _Seen:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise VerificationError(f"submodules {missing} did not run on the example inputs")
    return [t for n in names for t in pytree.tree_leaves(plain_outputs(seen[n]))
            if isinstance(t, torch.Tensor)]


def verify(model: nn.Module, graph: ChannelGraph, units: Iterable[int], example_inputs: Any, *,
           outputs: Optional[Callable] = None, example_kwargs: Optional[dict] = None,
           at: Optional[Sequence[str]] = None,
           pruned: Union[nn.Module, Callable[[], nn.Module], None] = None,
           rtol: float = 1e-4, train_mode: bool = False,
           stop_early: bool = False, train_inputs: Any = None,
           flops: Optional[dict] = None, dense: Optional[DenseRun] = None,
           screen: Optional["ShapeScreen"] = None, compare: bool = True) -> VerifyResult:
    """Zero-equivalence check of removing ``units`` from ``model`` (which is not modified).

    Args:
        model: the original model (evaluated as it is; put it in eval mode first).
        graph: its analysis.
        units: the removed units.
        example_inputs: inputs to run both models on.
        outputs: the output-contract selector given to ``capture``.
        at: compare the outputs of these submodules instead of the model's. For detectors,
            whose top-k and NMS turn float noise into different boxes, name the head.
        stop_early: with ``at``, end each forward once those submodules have run (faster;
            what runs after them is then not checked to run). Without it, only the pruned
            model runs whole (to check that it runs), where FLOPs are not counted or
            ``dense`` counted them on these inputs.
        train_inputs: inputs for the train-mode run (it only checks that the pruned model
            runs, so smaller ones do: ``repair.probe_inputs``); default ``example_inputs``.
        pruned: an already-pruned model to check, or a function that makes it (called once;
            where the check compares against a reference with inexact units removed, after
            that reference has run and is gone: on a 632M-parameter ViT the two together
            were 3.5 GB of new memory); by default a pruned copy is made.
        flops: a dict to fill with the FLOPs of the two forwards the check runs anyway
            (:class:`pruners.flops.FlopCount`, "before": the masked original, which runs
            every op the original does, or ``dense``'s count where the masked original
            stops at ``at``; "after": the pruned model); not with ``stop_early``.
        rtol: tolerance on ``max|a - b| / max|a|`` per output, for float32 and wider; float16
            and bfloat16 outputs, or layers that compute in them (``graph.precision``, as
            under ``torch.autocast``), get at least ``LOW_PRECISION_EPS`` of their epsilons
            (:func:`tolerance`; the result reports the one applied).
        train_mode: also run both in train mode (copies; only to see that the pruned one runs
            where the original does: code that only training runs, such as an EMA buffer
            update, can hold a width the eval trace never saw).
        dense: the unpruned model's run on these inputs. When ``units`` are not all exact
            (their outputs are not compared) and no ``at`` is given, the masked original is
            not run: the pruned outputs' shapes are checked against ``dense``'s, and the
            result's differences are NaN (not compared). ``flops["before"]`` is then
            ``dense``'s count.
        screen: fake-tensor runs of the model (``pruners.screen``); when its inputs are the
            train-mode run's, that run (which only has to run) is made on fake tensors.
        compare: False treats exact units as inexact (given ``dense`` on these inputs and no
            ``at``): only that the pruned model runs with the dense output shapes is checked,
            for a caller that compares their outputs in a later check.

    Units that are exact and inexact together (a plan that also narrows what a LayerNorm
    normalises), given ``dense`` on these inputs and no ``at``, are compared against the
    masked original with the inexact units removed from it as well: both models then
    normalise over the same channels, and the exact units' zero-equivalence holds between
    them (``VerifyResult.inexact`` says so). Only exact units alone (masked original) and
    inexact units alone (shapes, not compared) are checked as before.

    Raises:
        VerificationError: the pruned model does not run, or its outputs change shape.
    """
    units = list(units)
    if pruned is None:
        pruned = remove_units(copy_model(model, shared_params(model)), graph, units)
    inexact = [u for u in units if not graph.units[u].exact]
    exact = [u for u in units if graph.units[u].exact]
    beside = (compare and bool(exact) and bool(inexact) and not at and dense is not None
              and dense.inputs is example_inputs and (flops is None or dense.flops is not None))
    if at:
        def run(m: nn.Module) -> list[torch.Tensor]:
            return _run_at(m, list(at), example_inputs, example_kwargs, stop_early)
    else:
        def run(m: nn.Module) -> list[torch.Tensor]:
            return run_model(m, example_inputs, outputs, example_kwargs)
    if flops is not None and stop_early:
        raise ValueError("verify: counting FLOPs needs whole forwards (stop_early=False)")
    made = not isinstance(pruned, nn.Module)  # made after the reference, in its memory
    expected = _beside(model, graph, exact, inexact, run) if beside and made else None
    if made:
        pruned = pruned()
    try:  # first: when it fails (the common case in repair's probes) the reference is moot
        got = _run_counted(run, pruned, flops, "after")
    except Exception as exc:  # noqa: BLE001
        raise fails_to_run(exc) from exc
    if train_mode:  # before the reference run: on the small probe inputs it is the cheap
        # one, and a plan it fails needs no reference (RT-DETR-R101: 0.4 s against 1.8 s)
        _check_train_mode(model, pruned, example_inputs if train_inputs is None
                          else train_inputs, example_kwargs, screen)
    if beside and not made:
        expected = _beside(model, graph, exact, inexact, run)
    beside = expected is not None  # (a reference that does not run: shapes only, as before)
    compare = (dense is None or at or dense.inputs is not example_inputs or beside
               or (compare and not inexact))
    if beside:
        shapes = [tuple(t.shape) for t in expected]
        if flops is not None:
            flops["before"] = dense.flops
    elif compare:
        # compared only at ``at``, the reference stops there where the dense run counted the
        # whole model's FLOPs: past those points a detector's masked original keeps its own
        # detections, and its per-detection heads took 8 s of a Keypoint R-CNN's check
        counted = dense is not None and dense.inputs is example_inputs and dense.flops is not None
        early = bool(at) and (flops is None or counted)  # (as ``run`` with ``stop_early``)
        reference = (lambda m: _run_at(m, list(at), example_inputs, example_kwargs, True)) \
            if early else run
        with masked_in_place(model, graph, units) as masked:
            expected = narrowed(_run_counted(reference, masked, None if early else flops,
                                             "before"), graph.kept_at(at, units) if at else None)
        if early and flops is not None:
            flops["before"] = dense.flops
        shapes = [tuple(t.shape) for t in expected]
    else:
        shapes = dense.shapes
        if flops is not None and dense.flops is not None:
            flops["before"] = dense.flops
    check_shapes(shapes, [tuple(t.shape) for t in got])
    if not compare:
        return VerifyResult(float("nan"), float("nan"), rtol)
    max_abs = max_rel = 0.0
    for a, b in zip(expected, got):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        rtol = tolerance(rtol, a.dtype, graph.precision)
        diff = (a.double() - b.double()).abs().max().item()
        scale = a.double().abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(scale, 1e-12))
    return VerifyResult(max_abs, max_rel, rtol, len(inexact) if beside else 0)


def _beside(model: nn.Module, graph: ChannelGraph, exact: list[int], inexact: list[int],
            run: Callable[[nn.Module], list]) -> Optional[list]:
    """``run``'s outputs of the original with ``exact`` masked and ``inexact`` removed (a
    copy's surgery slices the masked tensors; the rest it shares, masked, until the block
    ends); None where that model does not run (the check then only compares shapes)."""
    with masked_in_place(model, graph, exact):
        try:
            reference = remove_units(copy_model(model, shared_params(model)), graph, inexact)
            return run(reference)
        except Exception:  # noqa: BLE001 - the pruned model ran; this reference is a bonus
            return None


def narrowed(tensors: list, kept: Optional[list]) -> list:
    """A check's reference outputs at verification points, cut to the channels a plan keeps
    (``ChannelGraph.kept_at``): a prunable width there (RT-DETR's encoder memory, handed to
    the decoder's top-k) is compared on its kept channels, not frozen for changing shape."""
    if kept is None or len(kept) != len(tensors):
        return tensors
    out = []
    for t, dims in zip(tensors, kept):
        if _narrows(tuple(t.shape), dims):
            for d, cut in enumerate(dims):
                if cut is not None:
                    t = t.index_select(d, torch.as_tensor(cut[1], device=t.device))
        out.append(t)
    return out


def narrowed_shapes(shapes: list[tuple[int, ...]], kept: Optional[list]
                    ) -> list[tuple[int, ...]]:
    """The shapes :func:`narrowed` gives."""
    if kept is None or len(kept) != len(shapes):
        return shapes
    return [tuple(s if cut is None else len(cut[1]) for s, cut in zip(shape, dims))
            if _narrows(shape, dims) else shape for shape, dims in zip(shapes, kept)]


def _narrows(shape: tuple[int, ...], dims: Optional[tuple]) -> bool:
    # the recorded widths must match: probes run on smaller images, whose spatial or token
    # dims differ, but never their channels
    return dims is not None and len(shape) == len(dims) and any(c is not None for c in dims) \
        and all(c is None or shape[d] == c[0] for d, c in enumerate(dims))


def one_line(exc: BaseException) -> str:
    """``exc`` as its type and the first line of its message, for an error that wraps it."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def fails_to_run(exc: BaseException) -> VerificationError:
    """The error for a pruned model whose forward raised ``exc`` (raise it ``from exc``)."""
    return VerificationError(f"the pruned model fails to run: {one_line(exc)}")


def check_shapes(expected: list[tuple[int, ...]], got: list[tuple[int, ...]]) -> None:
    """VerificationError unless the pruned model's outputs have the original's number and
    shapes."""
    if len(expected) != len(got):
        raise VerificationError(f"the pruned model returns {len(got)} tensors, the original "
                                f"{len(expected)}")
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            raise VerificationError(f"output {i} changed shape from {a} to {b}")


def _run_counted(run: Callable[[nn.Module], list], model: nn.Module, into: Optional[dict],
                 key: str) -> list:
    """``run(model)``, its FLOPs counted into ``into[key]`` when ``into`` is given."""
    if into is None:
        return run(model)
    from .flops import FlopCount, counting

    with counting(model) as counter:
        out = run(model)
    into[key] = FlopCount.of(counter)
    return out


#: How a check says the pruned model runs in eval mode but not in train mode.
TRAIN_MODE_FAILS = "the pruned model fails in train mode"


def _check_train_mode(original: nn.Module, pruned: nn.Module, example_inputs: Any,
                      example_kwargs: Optional[dict], screen: Optional["ShapeScreen"] = None
                      ) -> None:
    """The pruned model runs in train mode where the original does. The original's run (in
    place, its state restored) only excuses a failure, so it runs only after one: on a large
    model each forward is seconds, and the pruned model nearly always runs. With a ``screen``
    on these inputs the pruned model's run is on fake tensors (real where they cannot go)."""
    from .screen import FakeUnsupported, serves

    failure: Optional[BaseException] = None
    ran = False
    if serves(screen, example_inputs):
        try:
            failure, ran = screen.runs_in_train_mode(pruned), True
        except FakeUnsupported:
            pass
    if not ran:
        try:
            run_model(deepcopy_model(pruned).train(), example_inputs, None, example_kwargs)
        except Exception as exc:  # noqa: BLE001
            failure = exc
    if failure is None:
        return
    try:
        with training(original):
            run_model(original, example_inputs, None, example_kwargs)
    except Exception:  # noqa: BLE001 - e.g. batch norm on one value: nothing to compare
        return
    raise VerificationError(f"{TRAIN_MODE_FAILS}: {one_line(failure)}") from failure


def sample_units(graph: ChannelGraph, fraction: float, rng: np.random.Generator, *,
                 exact_only: bool = True) -> list[int]:
    """A random set of about ``fraction`` of the units that leaves every layer dim non-empty."""
    pool = graph.exact_units() if exact_only else [u.id for u in graph.units]
    if not pool:
        return []
    chosen = set(rng.choice(pool, size=max(1, int(round(fraction * len(pool)))),
                            replace=False).tolist())
    for ids in graph.unit_index.values():
        present = ids[ids >= 0]
        if len(present) == len(ids) and len(present) and set(present.tolist()) <= chosen:
            chosen.discard(int(present[0]))
    return sorted(chosen)
