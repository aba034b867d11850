"""``prune()``: the one call users came for, as a short composition of the stages.

    plan_pruning: check inputs -> capture -> analyze -> repair probes -> score -> allocate
                  -> Plan -> trial surgery + verify (freeze what fails, allocate again)
    prune:        plan_pruning -> the trial's pruned model -> measure -> PruneReport

``plan_pruning`` returns the plan without touching the model, for inspection and for the
steps of :func:`pruners.prune_iteratively`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from depgraph import analyze, capture
from depgraph.analyze import check_head_mode
from depgraph.boundary import Boundary, handed_on, verification_points
from depgraph.cost import cost_model
from depgraph.errors import CaptureError, PruningError
from depgraph.graph import ChannelGraph
from depgraph.train_path import TrainPath, layer_owners, with_train_path

from .allocate import InfeasibleTargetError, Target, allocate
from .copying import copy_model, is_compiled, own_parameters
from .importance import Importance, check_importance, score_units
from .plan import Plan, apply_plan
from .recovery import adopt_state, check_methods, recover
from .reparam import Lifted, deepcopy_model, lift, restore, sparsity
from .repair import (find_unprunable_groups, freeze_unprunable, link_equal_sizes,
                     link_input_widths, probe_run)
from .report import (GroupChange, PruneReport, block_costs, layer_changes, measure_modules,
                     python_width_rewrites)
from .screen import ShapeScreen, dense_run, input_share
from .verify import (TRAIN_MODE_FAILS, DenseRun, VerifyResult, one_line, run_model,
                     shared_params, training, verify)

__all__ = ["prune", "plan_pruning", "PruneResult", "PlannedPruning", "PruneOptions"]


@dataclass(frozen=True)
class PruneOptions:
    """Every option of :func:`prune`, :func:`plan_pruning` and ``prune_iteratively``.

    Attributes:
        importance: "l2" (default), "l1", "random", "bn_scale", "fpgm", "taylor", "hessian",
            or ``f(model, graph) -> raw score per unit``.
        data: batches for the data-driven criteria ("taylor", "hessian"); a list or another
            re-iterable (a DataLoader) so iterative steps can read it again.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` for the data-driven criteria.
        strategy: "global" ranking across groups (default), "uniform" ratio per group,
            "sensitivity" (with ``sensitivity=``: least predicted metric loss per FLOP), or a
            function ``(graph, scores, cost, target) -> unit ids to remove``.
        sensitivity: the table of :func:`pruners.sensitivity` for ``strategy="sensitivity"``.
        round_to: keep every pruned group's width a multiple of this (8 or 16 for speed), or
            "auto": the multiple the backend's kernels reward, measured on the model's
            costliest layers (``pruners.latency.staircase``), then on the whole model
            planned at 1, 8, 16 and 32 and timed: the smallest multiple within 2% of the
            fastest per FLOP kept (the few layers a staircase samples can miss a step the
            whole model takes; for a latency target, the plan that keeps the most FLOPs for
            its time). The report's notes say which, and the times, and in eager mode on
            the CPU whether channels-last ran the plan 5% faster or more.
        min_channels: the fewest channels any layer dim keeps.
        max_ratio: the largest fraction of a group's units that may go.
        heads: how attention heads prune: "auto" (default: every head narrows alike, except
            where the head width cannot change, as under rotary embeddings: whole heads go
            there), "width" or "count" (whole heads wherever they do not freeze); see
            ``depgraph.analyze``.
        protect: modules or module-name patterns (``"model.22.*"``) whose channels stay.
        outputs: picks the output contract from the return value (``lambda o: o[0]``).
        example_kwargs: keyword arguments of ``forward`` besides ``example_inputs``.
        verify_at: submodules to compare in verification (a detector's head).
        verbose: print progress.
        progress: called with each stage's name as it finishes (a progress bar's update).
        recover: restore the pruned model without training, from ``calibration``: "bias",
            "reconstruct", "bn" or a tuple of them (see ``pruners.recovery``).
        calibration: unlabeled batches for ``recover``, each passed to ``forward`` as
            ``example_inputs`` is (a list, or ``(x for x, _ in loader)``).
        backend: where latency is measured for ``target_latency`` and ``round_to="auto"``:
            "eager" (PyTorch, in the memory format the model and its inputs have: convert
            both with ``.to(memory_format=torch.channels_last)`` first to prune for, and
            get back, a channels-last model, whose eager CPU convs skip layout conversions),
            "onnxruntime" or "openvino" (a CPU runtime running the ONNX export; OpenVINO
            when installed), or "cudagraph" (on ``device="cuda"``: the model and each layer
            captured as CUDA graphs and replayed, as a GPU deployment runs without a kernel
            launch per op).
        device: "cpu" or "cuda" (eager or cudagraph; a copy of the model is timed there,
            one layer at a time: in eager mode at small batches a GPU run is bound by kernel
            launches, and a target it cannot reach raises ``InfeasibleTargetError``).
        latency_dtype: the precision the model will be deployed in ("float16", "bfloat16"
            or a ``torch.dtype``; default float32): layers and whole models are timed as
            copies cast to it (the model itself is pruned as it is). Eager or cudagraph
            only; a GPU's tensor cores want float16 widths that are multiples of 8.
        threads: intra-op threads for timing (default: torch's current setting).
        latency_table: a :class:`pruners.latency.LatencyTable` to read and fill (its
            backend, device, threads and timer then apply); default: the JSON cache at
            ``pruners.latency.default_cache_path()`` for the backend, device and threads.
    """

    importance: Union[str, Importance] = "l2"
    data: Optional[Iterable[Any]] = None
    loss_fn: Optional[Callable] = None
    strategy: Union[str, Callable] = "global"
    round_to: Union[int, str] = 1
    min_channels: int = 1
    max_ratio: float = 0.9
    heads: str = "auto"
    protect: Optional[Sequence[Union[str, nn.Module]]] = None
    outputs: Optional[Callable] = None
    example_kwargs: Optional[dict] = None
    verify_at: Optional[Sequence[str]] = None
    verbose: bool = False
    progress: Optional[Callable[[str], None]] = None
    recover: Union[None, str, Sequence[str]] = None
    calibration: Optional[Iterable[Any]] = None
    sensitivity: Optional[Any] = None  # pruners.sensitivity.Sensitivity
    backend: str = "eager"
    device: str = "cpu"
    latency_dtype: Any = None  # None: float32
    threads: Optional[int] = None
    latency_table: Optional[Any] = None  # pruners.latency.LatencyTable

    def say(self, text: str) -> None:
        """Print a progress line where ``verbose`` asks for them."""
        if self.verbose:
            print(text)

    @classmethod
    def of(cls, options: dict[str, Any]) -> "PruneOptions":
        """Options from keywords; an unknown keyword raises a TypeError listing the known."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; prune() takes "
                            f"{', '.join(sorted(known))}")
        return cls(**options)


@dataclass
class PruneResult:
    """``model``: the pruned model; ``plan``: JSON-able plan; ``report``; ``graph``: analysis."""

    model: nn.Module
    plan: Plan
    report: PruneReport
    graph: ChannelGraph


@dataclass
class PlannedPruning:
    """What :func:`plan_pruning` decided, before any change to the user's model.

    ``removed`` are unit ids of ``graph``; ``plan`` is the same decision as kept indices;
    ``verify`` is the check of a trial surgery on a copy (None when the units are inexact).
    """

    plan: Plan
    graph: ChannelGraph
    removed: list[int]
    target: Target
    verify: Optional[VerifyResult]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    dead: list[int] = field(default_factory=list)  # removed for free (``dead_units``)
    # modules run after a data-dependent selection, whose FLOPs the target leaves out
    uncounted: tuple[str, ...] = ()
    # FLOPs of the check's forwards ("before": masked original, "after": pruned), if it ran
    flops: dict = field(default_factory=dict)
    # latency targets: the model that predicted it, and its prediction for this plan (fraction)
    latency: Optional[Any] = None  # pruners.latency.LatencyModel
    predicted_latency: Optional[float] = None
    round_to: int = 1  # the multiple used ("auto" resolved)


def make_target(target_flops: Optional[float] = None, target_params: Optional[float] = None,
                channel_ratio: Optional[float] = None,
                target_latency: Optional[float] = None) -> Target:
    """The one target given; ValueError for none or several."""
    given = {k: v for k, v in (("flops", target_flops), ("params", target_params),
                               ("channels", channel_ratio), ("latency", target_latency))
             if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of target_flops, target_params, target_latency, "
                         f"channel_ratio; got {', '.join(given) or 'none'}")
    (kind, value), = given.items()
    return Target(kind, float(value))


def _protect_patterns(model: nn.Module,
                      protect: Optional[Iterable[Union[str, nn.Module]]]) -> list[str]:
    """Module-name patterns; modules are named by where they sit in the user's ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    patterns = []
    for item in protect or ():
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"protect: {type(item).__name__} is not a submodule of the model")
            patterns.append(names[id(item)])
        else:
            patterns.append(str(item))
    return patterns


def _protected_units(graph: ChannelGraph, patterns: list[str]) -> set[int]:
    out: set[int] = set()
    for (param, _), ids in graph.unit_index.items():
        owner = param.rpartition(".")[0]
        if any(owner == p or fnmatch.fnmatchcase(owner, p) or owner.startswith(p + ".")
               for p in patterns):
            out.update(ids[ids >= 0].tolist())
    return out


def _why_frozen(graph: ChannelGraph, notes: list[str], top: int = 4) -> str:
    """The largest frozen sets and repair's findings, for an infeasible-target message."""
    frozen = sorted(graph.frozen, key=lambda f: -f.count)
    parts = [str(f) for f in frozen[:top]]
    if len(frozen) > top:
        parts.append(f"{len(frozen) - top} more in result.graph.frozen")
    parts += [n for n in notes if n.startswith("froze group")][:top]
    return "Frozen: " + "; ".join(parts) + "." if parts else ""


def _split_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict]
                  ) -> tuple[Any, Optional[dict]]:
    """A dict of inputs is keyword arguments when its keys name ``forward``'s parameters;
    otherwise it is the one argument (``forward(self, batch)``)."""
    if not isinstance(example_inputs, dict):
        return example_inputs, example_kwargs
    try:
        inspect.signature(model.forward).bind(**example_inputs)
    except TypeError:
        return (example_inputs,), example_kwargs
    return (), {**example_inputs, **(example_kwargs or {})}


class _Clock:
    """Seconds per stage, summed over repeats; tells ``progress`` as each stage ends."""

    def __init__(self, progress: Optional[Callable[[str], None]] = None) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()
        self._progress = progress

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now
        if self._progress is not None:
            self._progress(name)


def _working_copy(model: nn.Module, example_inputs: Any, opts: PruneOptions,
                  share_weights: bool = False) -> tuple[nn.Module, list[Lifted], DenseRun]:
    """An eval-mode deep copy with plain weights where ``model`` has pruning masks or weight
    parametrizations (see ``pruners.reparam``), checked to run on the example inputs; that
    run's output shapes and FLOPs are kept (``DenseRun``) for checks that need no reference.
    Where a real run would take seconds, it is made on fake tensors (``screen.dense_run``).
    ``share_weights``: its parameters use ``model``'s memory (``reparam.deepcopy_model``)."""
    check_importance(opts.importance, opts.data, opts.loss_fn)
    work = deepcopy_model(model, share_weights)
    lifted = lift(work)
    work.eval()
    try:  # a real run also warms what a forward caches by input shape (Ultralytics' anchors;
        # DDP's first-call buffer broadcast), which a trace of a cold model would record as code
        dense = dense_run(work, example_inputs, opts.outputs, opts.example_kwargs)
    except PruningError:  # it ran, and what it returned is refused (plain_outputs), named
        raise
    except Exception as exc:  # noqa: BLE001
        raise PruningError(f"the example inputs do not fit {type(model).__name__}: "
                           f"{one_line(exc)}. Pass what forward takes: a tensor, or a tuple of "
                           "arguments.") from exc
    if not dense.shapes:  # nothing would hold any width, and every check would compare nothing
        raise PruningError(f"{type(model).__name__} returned no tensor to keep and compare "
                           "(outputs are read through tuples, lists, dicts and dataclasses): "
                           "pass outputs=lambda out: <its tensors>")
    return work, lifted, dense


@contextlib.contextmanager
def _compiled_eagerly(model: Any) -> Iterator[None]:
    """Run ``torch.compile``'d modules (a whole model or its parts) eagerly while pruning:
    every probe and check would otherwise compile another pruned copy (72 s instead of 1 s
    for a compiled ResNet-18). The result keeps its wrappers and compiles on its first call."""
    if not (isinstance(model, nn.Module)
            and any(is_compiled(m) for m in model.modules())):
        yield
        return
    with torch.compiler.set_stance("force_eager"), warnings.catch_warnings():
        # the FLOP counter's global module hooks fire once more on the wrapper: it holds no
        # parameters of its own, so the counts are the same
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there"
                                " are global hooks")
        yield


def _check_model(model: Any) -> None:
    """TypeError for what prune() cannot take as it is, naming what to pass instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune() takes an nn.Module, got {type(model).__name__}")
    kind = type(model)
    if kind.__module__.startswith("ultralytics.") and hasattr(kind, "task_map"):
        raise TypeError(f"prune() got an Ultralytics {kind.__name__} object: use "
                        "pruners.ultralytics.prune_yolo(yolo, target_flops=...), which keeps it "
                        "trainable with yolo.train(), or prune(yolo.model, x, "
                        "outputs=lambda o: o[0]) for the bare network")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"prune() got a TorchScript module ({kind.__name__}): its code cannot be "
                        "traced channel by channel; pass the eager nn.Module it was scripted from")
    fsdp = [m for m in model.modules() if type(m).__name__ in ("FullyShardedDataParallel",)
            or any(b.__name__ == "FSDPModule" for b in type(m).__mro__)]
    if fsdp:
        raise TypeError("prune() got a model wrapped in FSDP, whose parameters are sharded "
                        "across ranks: prune the unwrapped model first, then wrap the result")


def _prepare(model: nn.Module, example_inputs: Any, target: Target, options: dict[str, Any]
             ) -> tuple[nn.Module, list[Lifted], DenseRun, Any, Target, PruneOptions, list[str],
                        _Clock]:
    """Validate everything cheap first, then the working copy: the arguments of ``_search``."""
    _check_model(model)
    opts = PruneOptions.of(options)
    if opts.strategy == "sensitivity" and opts.sensitivity is None:
        raise ValueError("strategy='sensitivity' needs sensitivity=<table from "
                         "pruners.sensitivity(model, inputs, evaluate=...)>")
    if check_methods(opts.recover) and opts.calibration is None:
        raise ValueError(f"recover={opts.recover!r} needs calibration= batches (unlabeled "
                         "inputs passed to forward like example_inputs)")
    example_inputs, kwargs = _split_inputs(model, example_inputs, opts.example_kwargs)
    opts = dataclasses.replace(opts, example_kwargs=kwargs)
    if not (opts.round_to == "auto" or (isinstance(opts.round_to, int) and opts.round_to >= 1)):
        raise ValueError(f"round_to must be a positive int or 'auto', got {opts.round_to!r}")
    check_head_mode(opts.heads)
    from .latency.table import check_backend

    check_backend(opts.backend, opts.device, opts.latency_dtype)
    patterns = _protect_patterns(model, opts.protect)
    clock = _Clock(opts.progress)
    # prune() writes into no parameter of the copy but to mask slices during a check, which
    # it restores bit for bit (verify.masked_in_place); the result owns its tensors
    work, lifted, dense = _working_copy(model, example_inputs, opts, share_weights=True)
    clock.lap("check inputs")
    return work, lifted, dense, example_inputs, target, opts, patterns, clock


@dataclass
class _Analysis:
    """Capture, analysis and repair of the working copy, made once per ``prune()`` and planned
    on by :func:`_plan` (a latency target plans up to three times). ``graph``, ``notes``,
    ``bad`` and ``deferred`` move on as plans freeze groups."""

    graph: ChannelGraph
    notes: list[str]  # the analysis's and repair's, and every group frozen since
    boundary: Optional[Boundary]
    kw: dict[str, Any]  # verify's keyword arguments for the example inputs
    probe: DenseRun  # the dense run on the probes' (half-size) inputs
    bad: dict[int, str]  # groups found failing, not yet frozen
    deferred: bool  # exact groups' outputs not yet compared (see _plan)
    hardware: Optional["_Hardware"]
    round_to: int  # the channel multiple ("auto" resolved by the hardware's table)
    train_path: bool = False  # the train-mode graph's couplings were tried (see _plan)
    train_graph: Any = None  # that graph once captured (False: its capture failed)
    used: frozenset = frozenset()  # parameters the eval capture reads

    @property
    def probing(self) -> dict[str, Any]:
        """verify's keyword arguments for probes, on the probes' (half-size) inputs."""
        return {**self.kw, "dense": self.probe}


def _search(work: nn.Module, lifted: list[Lifted], dense: DenseRun, example_inputs: Any,
            target: Target, opts: PruneOptions, patterns: list[str], clock: _Clock,
            hardware: Optional["_Hardware"] = None) -> tuple[PlannedPruning, nn.Module]:
    """Plan on ``work`` (an eval copy, not modified) and return the plan with the pruned copy
    it was verified on, its reparametrizations (``lifted``) restored (:func:`_analyse`, then
    :func:`_plan`)."""
    analysis = _analyse(work, lifted, dense, example_inputs, target, opts, clock, hardware)
    return _plan(analysis, work, lifted, example_inputs, target, opts, patterns, clock)


def _analyse(work: nn.Module, lifted: list[Lifted], dense: DenseRun, example_inputs: Any,
             target: Target, opts: PruneOptions, clock: _Clock,
             hardware: Optional["_Hardware"] = None) -> _Analysis:
    """Capture and analyse ``work``, find where to verify, and probe every group once for
    widths the model's code fixes (``pruners.repair``)."""
    opts.say(f"[prune] capturing {type(work).__name__} ...")
    cap = capture(work, example_inputs, example_kwargs=opts.example_kwargs, outputs=opts.outputs,
                  value_ops=dense.value_ops)
    clock.lap("capture")
    at = opts.verify_at
    boundary = verification_points(cap) if at is None else None
    if boundary is not None:
        at = list(boundary.modules)
    # the checks compare these modules' outputs: on the channels a plan keeps
    graph = analyze(cap, heads=opts.heads, watch=handed_on(cap, list(at)) if at else None)
    for item in lifted:
        if item.recomputed:  # spectral norm: sigma is recomputed on the smaller weight
            graph = graph.with_inexact(graph.units_of(item.fqn), f"spectral norm of '{item.fqn}'"
                                       " is recomputed on the pruned weight")
    clock.lap("analyze")
    opts.say(f"[prune] {graph}; probing groups the model's code may fix ...")
    notes = list(graph.notes)
    if boundary is not None:
        notes.append(str(boundary))
        if boundary.tail:
            # the target counts what runs before the selection, where every value is present
            graph = dataclasses.replace(graph, layers=[
                dataclasses.replace(layer, macs=0) if layer.node in boundary.tainted else layer
                for layer in graph.layers])
            notes.append(f"{', '.join(boundary.tail)} run once per selected value (proposal, "
                         f"detection), as many times as survive the selection: FLOPs are "
                         f"counted and targeted without them")
    kw = dict(outputs=opts.outputs, example_kwargs=opts.example_kwargs, at=at, dense=dense)
    if hardware is None:  # a caller that plans more than once measures once and passes it
        hardware = _Hardware.of(work, dense, opts, target)
        if hardware is not None:
            clock.lap("latency table")
    if hardware is not None:
        notes += hardware.notes
    round_to = hardware.round_to if hardware is not None else opts.round_to
    probe = hardware.probe if hardware is not None else probe_run(
        work, dense, outputs=opts.outputs, example_kwargs=opts.example_kwargs, at=at)
    small = probe.inputs
    # where a forward takes seconds, probes that only have to run are made on fake tensors:
    # the dense run on them, when fake and to the same outputs, is the screen already
    if probe.fake and not at:
        kw["screen"] = ShapeScreen(small, probe.shapes, opts.outputs, opts.example_kwargs,
                                   seconds=probe.seconds)
    else:
        kw["screen"] = ShapeScreen.of(
            work, small, outputs=opts.outputs, at=at, example_kwargs=opts.example_kwargs,
            real_s=None if dense.fake else dense.seconds * input_share(small, example_inputs))
    raised: dict[int, str] = {}
    # probes check their shapes against the dense run on their inputs; exact groups' outputs
    # are compared by the final check where the plan is all exact (most CNNs), else by
    # one-unit probes once the plan is known (_plan): no masked forward per probe here
    probing = {**kw, "dense": probe}
    deferred = at is None
    bad = find_unprunable_groups(work, graph, small, where=raised, compare=not deferred,
                                 **probing)
    graph, bad, linked = link_input_widths(work, graph, bad, raised, small, **probing)
    graph, bad, equal = link_equal_sizes(work, graph, bad, raised, small, **probing)
    linked += equal
    clock.lap("repair")
    return _Analysis(graph, notes + linked, boundary, kw, probe, bad, deferred, hardware,
                     round_to, used=_read_by(cap))


def _plan(analysis: _Analysis, work: nn.Module, lifted: list[Lifted], example_inputs: Any,
          target: Target, opts: PruneOptions, patterns: list[str], clock: _Clock
          ) -> tuple[PlannedPruning, nn.Module]:
    """Allocate toward ``target``, prune a copy and check it. Groups whose pruning breaks the
    model's code are frozen (in ``analysis``, for later plans too), and the plan is made
    again (at most three rounds)."""
    kw, hardware, round_to, boundary = (analysis.kw, analysis.hardware, analysis.round_to,
                                        analysis.boundary)
    small = analysis.probe.inputs

    def compare_groups() -> dict[int, str]:
        """Exact groups of the current graph whose one-unit probe's outputs differ."""
        return find_unprunable_groups(work, analysis.graph, small, exact_only=True,
                                      **{**analysis.probing, "screen": None})

    meta = {"model": type(work).__name__, "target": f"{target.kind}={target.value:g}"}
    raising: Optional[dict[int, str]] = None  # where the groups a plan found raised
    rounds, made = (4 if analysis.deferred else 3), 0
    while made < rounds:
        made += 1
        if analysis.bad and raising is not None:  # a plan failed: ties may mend what it found
            analysis.graph, analysis.bad, tied = link_equal_sizes(
                work, analysis.graph, analysis.bad, raising, small, train_mode=True,
                train_inputs=small, **{**analysis.probing, "screen": None})
            analysis.notes += tied
        if analysis.bad:
            _freeze(analysis, analysis.bad)
        graph, notes = analysis.graph, list(analysis.notes)
        opts.say(f"[prune] scoring units by {getattr(opts.importance, '__name__', opts.importance)} ...")
        scores = score_units(work, graph, opts.importance, data=opts.data, loss_fn=opts.loss_fn)
        clock.lap("score")
        dead = set(graph.dead_units())
        losses = opts.sensitivity.losses(graph) if opts.strategy == "sensitivity" else None
        cost = cost_model(graph)
        latency = hardware.model(cost) if hardware is not None and target.kind == "latency" \
            else None
        if latency is not None:
            clock.lap("latency table")

        def allocate_at(multiple: int) -> list[int]:
            return allocate(graph, scores, cost, target, strategy=opts.strategy,
                            round_to=multiple, min_channels=opts.min_channels,
                            max_ratio=opts.max_ratio, protected=_protected_units(graph, patterns),
                            free=dead, losses=losses, latency=latency)

        if hardware is not None and hardware.compare_models:
            round_to, note = hardware.by_model(graph, cost, allocate_at, opts.say)
            analysis.round_to = round_to
            if note is not None:  # in the staircase's note's place (appended if none)
                at = next((i for i, n in enumerate(analysis.notes)
                           if n.startswith("round_to='auto'")), len(analysis.notes))
                analysis.notes[at:at + 1] = [note]
                notes = list(analysis.notes)
            clock.lap("round_to auto")
        try:
            removed = allocate_at(round_to)
        except InfeasibleTargetError as exc:
            raise InfeasibleTargetError(f"{exc} {_why_frozen(graph, notes)}",
                                        exc.reachable) from None
        clock.lap("allocate")
        if losses is not None:
            gone = set(removed)
            loss = sum(f(sum(u in gone for u in graph.groups[g].units) / len(graph.groups[g].units))
                       for g, f in losses.items())
            notes.append(f"sensitivity allocation predicts metric {opts.sensitivity.baseline - loss:.4g}"
                         f" (unpruned {opts.sensitivity.baseline:.4g}; losses assumed additive); "
                         f"{len(graph.groups) - len(losses)} groups not in the table kept whole")
        plan = Plan.from_units(graph, removed, meta)
        opts.say(f"[prune] removing {len(removed)} of {len(graph.units)} units ...")
        built: list[nn.Module] = []

        def pruned_copy() -> nn.Module:
            """A copy sharing the parameters the plan leaves alone until the check has passed
            (surgery swaps in new tensors for the rest): on a 600M-parameter model, copying
            them all took seconds and a second full set of weights in memory. The check
            makes it, after any reference it builds first (``verify``)."""
            built.append(restore(apply_plan(copy_model(work, shared_params(work)), plan),
                                 lifted, plan.kept))
            return built[-1]

        kinds = {graph.units[u].exact for u in removed}
        exact = False not in kinds
        if len(kinds) < 2:  # not exact and inexact together: no reference to build first
            pruned_copy()
            clock.lap("surgery")
        probes: dict[int, list[int]] = {}
        for u in removed:
            probes.setdefault(graph.units[u].group, []).append(u)
        flops: dict = {}
        try:  # a plan that also removes inexact units is compared against the masked original
            # with those removed too (``verify``): no one-unit probes of its exact groups first
            check: Optional[VerifyResult] = verify(work, graph, removed, example_inputs,
                                                   pruned=built[0] if built else pruned_copy,
                                                   train_mode=True, train_inputs=small,
                                                   flops=flops, **kw)
            failed, raised = not check.ok and (exact or check.inexact > 0), False
        except PruningError as exc:
            check, failed, raised = None, True, True
            if TRAIN_MODE_FAILS in str(exc) and _train_path_first(analysis, work, opts):
                clock.lap("train path")  # a round that only added training's ties
                made -= 1
                continue
        pruned = built[0] if built else pruned_copy()
        if check is not None and not (exact or check.inexact):
            check = None  # normalisation statistics change: no exact reference was compared
        if check is None and not raised and analysis.deferred \
                and True in kinds:  # that reference did not run
            analysis.deferred, analysis.bad = False, compare_groups()
        if failed and analysis.deferred and check is not None:  # outputs differ: cheap first
            analysis.deferred, analysis.bad = False, compare_groups()
        raising = {}
        if raised:  # the plan does not run (often in train mode only): on the probes' inputs
            analysis.bad = find_unprunable_groups(work, graph, small, probes=probes,
                                                  train_mode=True, train_inputs=small,
                                                  where=raising,
                                                  **{**kw, "dense": analysis.probe})
        if failed and not analysis.bad:  # bisect the plan itself, at the example's size
            analysis.bad = find_unprunable_groups(work, graph, example_inputs, probes=probes,
                                                  train_mode=True, train_inputs=small,
                                                  where=raising, **kw)
        if failed and not analysis.bad and check is not None and check.inexact:
            # differs only with the inexact units removed as well, and no group alone: as
            # before that reference existed, its exact groups stand compared one unit each
            notes.append(f"the plan's outputs differ from the masked original with its "
                         f"inexact units removed too ({check}); no group was found at fault "
                         "alone, and each exact group's one-unit probe matched")
            check = None
        clock.lap("verify")
        if _add_train_path(analysis, work, opts):  # a round that only added training's ties
            clock.lap("train path")
            made -= 1
            continue
        if not analysis.bad:
            own_parameters(pruned, work)
            gone = dead & set(removed)
            if gone:
                notes.append(f"removed {len(gone)} dead channels for free (dropped by a slice "
                             "and read by nothing)")
            uncounted = boundary.tail_layers if boundary is not None else ()
            predicted = None if latency is None else \
                latency.predict(graph, cost, removed) / latency.full()
            return PlannedPruning(plan, graph, removed, target, check, notes,
                                  clock.seconds, sorted(gone), uncounted, flops, latency,
                                  predicted, round_to), pruned
    raise PruningError("the pruned model still fails after freezing the groups found "
                       "three times; please report this model")


def _train_graph(analysis: _Analysis, work: nn.Module, opts: PruneOptions
                 ) -> Optional[ChannelGraph]:
    """The graph of ``work`` captured in train mode (on the probes' inputs), made once per
    ``prune()``; None (and a note) where that capture or its analysis fails, or where
    parameters stay that neither trace's layers read."""
    if analysis.train_graph is None and _idle_in_training(analysis, work, opts):
        analysis.train_graph = False  # the rule below, decided without the capture
    if analysis.train_graph is None:
        opts.say("[prune] the plan fails in train mode: capturing the model in train mode ...")
        try:  # the concrete trace first: on the probes' small inputs it is the faster one
            # (RT-DETR-L: 3.7 s, export 5.9 s), and its path is the one these inputs take
            with training(work):
                try:
                    cap = capture(work, analysis.probe.inputs, method="concrete",
                                  example_kwargs=opts.example_kwargs)
                except CaptureError:
                    cap = capture(work, analysis.probe.inputs, method="export",
                                  example_kwargs=opts.example_kwargs)
            train = analyze(cap, heads=opts.heads)
            # a parameter eval never reads must be some layer's in the train-mode trace: one
            # read by neither trace, or only touched (RT-DETR's denoising embedding, summed
            # times 0 where its trainer's targets are missing), is used by code neither ran
            layers = {layer.module for layer in train.layers} | {
                layer.weight.rpartition(".")[0] for layer in train.layers if layer.weight}
            unseen = [name for name, _ in work.named_parameters() if name not in analysis.used
                      and name.rpartition(".")[0] not in layers]
        except Exception as exc:  # noqa: BLE001 - the groups freeze as before; noted
            analysis.train_graph = False
            analysis.notes.append(f"a train-mode capture could not tie layers only training "
                                  f"runs ({one_line(exc)}); the widths they read stay")
            return None
        analysis.train_graph = False if unseen else train
        if unseen:
            analysis.notes.append(_UNSEEN_NOTE.format(n=len(unseen), first=unseen[0]))
    return analysis.train_graph or None


def _idle_in_training(analysis: _Analysis, work: nn.Module, opts: PruneOptions) -> bool:
    """Whether a parameter inference never reads is read by no layer in a train-mode run
    either (``depgraph.train_path.layer_owners``: one eager run on the probes' inputs,
    seconds cheaper than the capture whose layers :func:`_train_graph` would check); noted
    when so. False where that run fails: the capture decides."""
    idle = [name for name, _ in work.named_parameters() if name not in analysis.used]
    if not idle:
        return False
    try:
        with training(work):
            owners = layer_owners(work, lambda: run_model(work, analysis.probe.inputs, None,
                                                          opts.example_kwargs))
    except Exception:  # noqa: BLE001 - the capture decides, as before
        return False
    unseen = [name for name in idle if name.rpartition(".")[0] not in owners]
    if unseen:
        analysis.notes.append(_UNSEEN_NOTE.format(n=len(unseen), first=unseen[0]))
    return bool(unseen)


_UNSEEN_NOTE = ("layers only training runs are not tied: {n} parameters are read by no layer "
                "either mode ran (e.g. '{first}'), so training may run code that reads the "
                "widths they have; those widths stay")


def _read_by(cap: Any) -> frozenset:
    """The parameters and buffers a capture's graph reads (placeholders with users)."""
    return frozenset(cap.param_names[n.name] for n in cap.graph.nodes
                     if n.op == "placeholder" and n.name in cap.param_names and n.users)


def _train_path_first(analysis: _Analysis, work: nn.Module, opts: PruneOptions) -> bool:
    """A plan failed in train mode: before bisecting it, add the train-mode graph's couplings
    (``depgraph.train_path``) where they tie layers only training runs (auxiliary classifiers,
    per-layer decoder heads) to the widths they read and freeze nothing, a pure gain: those
    layers then shrink with the widths, and the next plan is made on that graph."""
    if analysis.train_path:
        return False
    train = _train_graph(analysis, work, opts)
    if train is None:
        return False
    path = with_train_path(analysis.graph, train)
    if path.frozen or not (path.layers or path.tied):
        return False  # the bisection finds what fails; _add_train_path weighs the two
    analysis.train_path = True
    _adopt(analysis, path)
    return True


def _add_train_path(analysis: _Analysis, work: nn.Module, opts: PruneOptions) -> bool:
    """Where groups a plan broke fail in train mode, add the train-mode graph's couplings
    where they leave more channels prunable than freezing those groups: the groups failing
    otherwise freeze, and what training fixes freezes with its reason. Tried once per
    ``prune()``."""
    in_train = {g: why for g, why in analysis.bad.items() if TRAIN_MODE_FAILS in why}
    if analysis.train_path or not in_train:
        return False
    analysis.train_path = True
    train = _train_graph(analysis, work, opts)
    if train is None:
        return False
    others = {g: why for g, why in analysis.bad.items() if g not in in_train}
    path = with_train_path(freeze_unprunable(analysis.graph, others), train)
    if _prunable(path.graph) <= _prunable(freeze_unprunable(analysis.graph, analysis.bad)):
        return False
    _freeze(analysis, others)  # what fails in eval mode freezes as it would have
    _adopt(analysis, path)
    return True


def _adopt(analysis: _Analysis, path: TrainPath) -> None:
    """Plan on ``path``'s graph from now on, its changes noted."""
    analysis.graph, analysis.bad = path.graph, {}
    if path.layers:
        analysis.notes.append(
            f"{len(path.layers)} modules run only in train mode ({', '.join(path.layers[:4])}"
            f"{', ...' if len(path.layers) > 4 else ''}): captured in train mode too, they "
            f"shrink with the widths they read")
    analysis.notes += [f"froze {n} channels: {why}" for why, n in path.frozen.items()]


def _freeze(analysis: _Analysis, bad: dict[int, str]) -> None:
    """Freeze the groups ``bad`` names in ``analysis``, each noted with why."""
    graph = analysis.graph
    analysis.notes += [f"froze group {g} ({', '.join(graph.groups[g].layers[:3])}): {why}"
                       for g, why in sorted(bad.items())]
    analysis.graph, analysis.bad = freeze_unprunable(graph, bad), {}


def _prunable(graph: ChannelGraph) -> int:
    """Output channels of conv and linear layers that a plan may remove."""
    return sum(graph.prunable_share(kind)[0] for kind in ("conv", "linear"))


#: A latency target is re-aimed while the measured share is off by more than this (relative).
_LATENCY_SLACK = 0.03
#: ... and prune() raises when the plan it would return is slower than the target by more
#: than this (relative) and no plan of a lower aim exists: a miss it cannot close.
_LATENCY_MISS = 0.07
#: Plans a latency target makes at most, and one more while none is within _LATENCY_MISS.
_LATENCY_PLANS = 3


def _toward_latency(prepared: tuple, planned: PlannedPruning, pruned: nn.Module,
                    analysis: _Analysis) -> tuple[PlannedPruning, nn.Module, Any]:
    """Time the pruned model against the dense one; when the measured share of latency is
    off the target by more than ``_LATENCY_SLACK``, re-aim (:func:`_next_aim`) and plan
    again (twice, three times while none is within ``_LATENCY_MISS``). When several plans
    were made, they are timed again together with the dense model and the one closest to
    the target is kept: each plan's first timing ran at its own moment, and on a machine
    whose load changes between them the comparison of those timings picks the moment rather
    than the plan. When the one kept is then more than ``_LATENCY_MISS`` off, the target is
    re-aimed once more from that timing, and all are timed together again. Every plan is
    made on ``analysis`` (one capture, analysis and repair)."""
    from .latency import measure_models
    from .report import LatencyReport

    work, lifted, dense, example_inputs, target, opts, patterns, clock = prepared
    # the dense model (timed first by the latency model) and each plan: exported once for
    # the ONNX runtimes, their sessions dropped when the target is settled
    runners = analysis.hardware.runners

    def timed(candidates: list[nn.Module]):
        labels = [f"plan {i + 1}" for i in range(len(candidates))]
        m = measure_models({"dense": work, **dict(zip(labels, candidates))}, example_inputs,
                           backend=planned.latency.backend, device=planned.latency.device,
                           threads=planned.latency.threads, timer=planned.latency.timer,
                           dtype=planned.latency.dtype, runners=runners)
        return m, [m.ratio(label) for label in labels]

    def miss(ratio: float) -> float:
        return abs(ratio / target.value - 1)

    measured, (ratio,) = timed([pruned])
    clock.lap("latency")  # each timing is this stage's, not the next plan's first
    plans = [(planned, pruned)]
    aim = target.value
    tried = [(aim, ratio)]  # (aim, measured share)
    floor: Optional[InfeasibleTargetError] = None  # set when no lower aim can be planned

    def again() -> bool:
        """Plan once more: the last plan is off by more than the slack (a median is steady
        even if noisy), within ``_LATENCY_PLANS`` plans, or one beyond while no plan is
        within ``_LATENCY_MISS``: MobileNetV2 in eager mode once kept a plan at 0.457 after
        three."""
        if miss(ratio) <= _LATENCY_SLACK:
            return False
        return len(plans) < _LATENCY_PLANS or (
            len(plans) == _LATENCY_PLANS and min(miss(m) for _, m in tried) > _LATENCY_MISS)

    def plan_at(aim: float) -> bool:
        """A plan aimed at ``aim`` added to ``plans``; False (``floor`` set) where no plan
        of that aim can be made."""
        nonlocal floor
        try:
            plans.append(_plan(analysis, work, lifted, example_inputs, Target("latency", aim),
                               opts, patterns, clock))
        except InfeasibleTargetError as exc:
            floor = exc
            return False
        return True

    while again():
        aim = _next_aim(tried, target.value)
        if not plan_at(aim):
            break
        measured, (ratio,) = timed([plans[-1][1]])
        clock.lap("latency")
        tried.append((aim, ratio))

    def together() -> tuple[Any, list[float], int]:
        """Every plan timed again with the dense model, and the one closest to the target."""
        m, shares = timed([p for _, p in plans])
        clock.lap("latency")
        return m, shares, min(range(len(plans)), key=lambda i: miss(shares[i]))

    chosen = 0
    if len(plans) > 1:
        measured, ratios, chosen = together()
        if miss(ratios[chosen]) > _LATENCY_MISS and len(plans) <= _LATENCY_PLANS \
                and floor is None:
            # timed together, at one moment, the plans read otherwise than each did alone
            # (the machine changed between them): re-aim from this timing, once more
            aim = _next_aim([(p.target.value, r) for (p, _), r in zip(plans, ratios)],
                            target.value)
            if plan_at(aim):
                measured, ratios, chosen = together()
        plans[chosen][0].notes.append(
            f"{len(plans)} plans timed again together: measured shares "
            f"{', '.join(f'{r:.3f}' for r in ratios)}; kept plan {chosen + 1}")
    _latency_out_of_reach(target, [m for _, m in tried] if len(plans) == 1 else ratios,
                          planned.predicted_latency, planned.latency, floor is not None)
    runners.clear()
    planned, pruned = plans[chosen]
    if planned.target != target:
        planned.notes.append(f"latency target re-aimed at {planned.target.value:.4f} of the "
                             f"predicted dense latency to land at {target.value:g} measured")
        planned.target = target
    planned.notes += measured.notes
    d, p = measured.times["dense"], measured.times[f"plan {chosen + 1}"]
    report = LatencyReport(planned.latency.backend, planned.latency.device,
                           planned.latency.threads, d.median_ms, p.median_ms, d.spread, p.spread,
                           planned.predicted_latency, measured.noisy, measured.env, len(plans),
                           planned.latency.dtype)
    return planned, pruned, report


def _latency_out_of_reach(target: Target, measured: list[float], predicted: Optional[float],
                          latency: Any, at_floor: bool) -> None:
    """InfeasibleTargetError when even the fastest plan measured is slower than the target by
    more than ``_LATENCY_MISS``: the time pruning removes from the layers does not show in
    the whole model's (on a GPU in eager mode, a run bound by kernel launches, not widths).
    ``at_floor``: no plan of a lower aim exists, so the fastest measured is what is
    reachable; otherwise the plans ran out first and the reachable share is unknown."""
    best = min(measured)
    if best <= target.value * (1 + _LATENCY_MISS):
        return
    first = "" if predicted is None else f" (the first predicted {predicted:.3f})"
    why = ("no plan removes more" if at_floor else
           f"re-aiming {len(measured)} times did not close the gap")
    raise InfeasibleTargetError(
        f"target_latency={target.value:g} cannot be met with {latency.backend} on "
        f"{latency.device}: the plans made measured {', '.join(f'{m:.3f}' for m in measured)} "
        f"of the dense latency{first}, and {why}. What pruning removes from the layers does "
        f"not show as time here (a run bound by a fixed cost, such as kernel launches on a GPU "
        f"at a small batch). {'Ask for at least' if at_floor else 'The fastest plan measured'}"
        f" {best:.3f}; time at a larger batch, or use target_flops.",
        reachable=best if at_floor else None)


def _next_aim(tried: list[tuple[float, float]], target: float) -> float:
    """The next aim for a latency target from the (aim, measured share) pairs so far: on the
    line between the nearest measurements either side of the target, the dense model (aim 1,
    measured 1) being one above it; the last aim scaled by target / measured while every plan
    measured slower than the target. Between a plan that ran too fast and the dense model the
    line holds better than scaling: on MobileNetV2 in onnxruntime (one table, one timing),
    plans predicted at 0.539, 0.685 and 0.930 measured 0.408, 0.574 and 0.830, so 0.5 lies
    near 0.62; the line from the first to (1, 1) aims at 0.61, scaling at 0.66. A first plan
    measured at 0.32 was scaled to 0.77 and measured 0.69."""
    below = [p for p in tried if p[1] <= target]
    above = [p for p in tried if p[1] > target] + ([(1.0, 1.0)] if below else [])
    if below and above:
        (a0, m0), (a1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if m1 > m0:
            return min(1.0, a0 + (a1 - a0) * (target - m0) / (m1 - m0))
    aim, ratio = tried[-1]
    return min(1.0, aim * target / ratio)


def _runners() -> Any:
    from .latency import Runners  # imported with the latency stages only

    return Runners()


@dataclass
class _Hardware:
    """What latency targets and ``round_to="auto"`` measure once per ``_search``: the
    table, the model's conv/linear calls, the resolved multiple and the dense time."""

    table: Any  # pruners.latency.LatencyTable
    work: nn.Module
    example_inputs: Any
    run: Callable[[], Any]
    calls: list
    round_to: int
    notes: list[str]
    dense_s: Optional[float] = None
    context: Any = None  # eager: pruners.latency.InContext, the layers timed in the model
    smaller: Optional[Callable[[], Any]] = None  # the model at half resolution, if it runs
    probe: Optional[DenseRun] = None  # repair.probe_run, found once for every plan
    dtype: Optional[str] = None  # opts.latency_dtype's name: what layers and model are timed in
    # round_to="auto": whole pruned models are still to be timed at each candidate multiple
    # (by the first plan: ``by_model``)
    compare_models: bool = False
    # the multiple a latency table is timed at: the staircase's, kept when the whole models
    # choose another (their plans' widths lie on its grid or between its points)
    grid_step: int = 1
    # the whole models' runners, made once: the dense model's, for every plan's timing
    runners: Any = field(default_factory=_runners)  # latency.Runners

    @classmethod
    def of(cls, work: nn.Module, dense: DenseRun, opts: PruneOptions, target: Target
           ) -> Optional["_Hardware"]:
        if target.kind != "latency" and opts.round_to != "auto":
            return None
        from .latency import LatencyTable, auto_round_to, default_cache_path, layer_calls
        from .latency.timing import DTYPES, dtype_name

        table = opts.latency_table if opts.latency_table is not None else LatencyTable(
            default_cache_path(), backend=opts.backend, device=opts.device, threads=opts.threads)
        example_inputs = dense.inputs
        run = lambda: run_model(work, example_inputs, opts.outputs, opts.example_kwargs)  # noqa: E731
        calls = layer_calls(work, run)
        dtype = dtype_name(opts.latency_dtype)
        if dtype is not None:  # the layers as deployed: timed in that precision
            calls = [dataclasses.replace(c, shape=dataclasses.replace(c.shape, dtype=dtype))
                     if c.shape.dtype in DTYPES else c for c in calls]
        notes, round_to = [], opts.round_to
        if round_to == "auto":
            chosen = auto_round_to(calls, table)
            round_to = chosen.multiple
            notes.append(str(chosen))
        # found once here for every plan (repair probes on them; eager latency targets
        # also time the model on them to split the fixed part of its remainder)
        probe = probe_run(work, dense, outputs=opts.outputs, example_kwargs=opts.example_kwargs)
        small = probe.inputs
        smaller = None
        if target.kind == "latency" and opts.backend == "eager" and opts.device == "cpu" \
                and dtype in (None, "float32") and small is not example_inputs:
            smaller = lambda: run_model(work, small, opts.outputs,  # noqa: E731
                                        opts.example_kwargs)
        return cls(table, work, example_inputs, run, calls, int(round_to), notes,
                   smaller=smaller, probe=probe, dtype=dtype,
                   compare_models=opts.round_to == "auto", grid_step=int(round_to))

    def by_model(self, graph: ChannelGraph, cost: Any, allocate_at: Callable[[int], list[int]],
                 say: Callable[[str], None]) -> tuple[int, Optional[str]]:
        """``round_to="auto"`` settled on whole models: the model planned at each of
        ``MODEL_CANDIDATES`` and the staircase's pick (``allocate_at(multiple)`` -> units
        removed), pruned copies timed together with this backend, the multiple that runs
        fastest per FLOP kept (:func:`~pruners.latency.pick_by_model`), and a note saying
        so. Once per ``prune()``; multiples that cannot meet the target, or whose model does
        not run with the backend, are left out (none left: the staircase's pick, no note).
        A latency target's plans all stop at the predicted target, so the fastest per FLOP
        kept is the one keeping the most FLOPs for its time: on MobileNetV2 in onnxruntime
        the staircase's 8 kept 0.27-0.33 of the FLOPs at half the latency, 16 kept 0.46."""
        from .latency import measure_models
        from .latency.staircase import MODEL_CANDIDATES, MODEL_NEAR, MODEL_ROUNDS, pick_by_model

        self.compare_models = False
        full = cost.full()[0]
        models, kept = {}, {}
        for m in sorted({*MODEL_CANDIDATES, self.round_to}):
            try:
                removed = allocate_at(m)
            except InfeasibleTargetError:
                continue
            kept[m] = cost.evaluate(cost.kept_after(graph, set(removed)))[0] / max(full, 1e-12)
            models[m] = apply_plan(copy_model(self.work, shared_params(self.work)),
                                   Plan.from_units(graph, removed))
        if not models:
            return self.round_to, None
        say(f"[prune] round_to='auto': timing the model planned at multiples "
            f"{', '.join(map(str, models))} with {self.table.backend} ...")
        timed = {f"round_to {m}": model for m, model in models.items()}
        converted = self._channels_last(models)
        if converted is not None:
            timed["channels-last"] = converted
        try:
            measured = measure_models(timed, self.example_inputs, backend=self.table.backend,
                                      device=self.table.device, threads=self.table.threads,
                                      timer=self.table.timer, rounds=MODEL_ROUNDS,
                                      dtype=self.dtype)
        except RuntimeError:  # no model ran with the backend
            return self.round_to, None
        seconds = {m: measured.times[f"round_to {m}"].median_ms / 1e3 for m in models
                   if f"round_to {m}" in measured.times}
        staircase, self.round_to = self.round_to, pick_by_model(seconds, kept)
        times = ", ".join(f"{m}: {1e3 * t:.3g} at {kept[m]:.3f}" for m, t in seconds.items())
        dtype = "" if self.dtype in (None, "float32") else f" in {self.dtype}"
        return self.round_to, (
            f"round_to='auto' chose {self.round_to} for {self.table.backend} on "
            f"{self.table.device}{dtype} ({self.table.threads} threads): the whole model "
            f"planned at each multiple and timed (ms at FLOPs kept: {times}"
            f"{'; noisy' if measured.noisy else ''}) runs "
            f"fastest per FLOP kept at {self.round_to} (the smallest within "
            f"{100 * MODEL_NEAR:g}% of the best); the layers' staircases alone chose "
            f"{staircase}{self._layout_advice(measured, staircase)}")

    def _channels_last(self, models: dict[int, nn.Module]) -> Optional[nn.Module]:
        """In eager float32 on the CPU, for a contiguous model with 2-D convs: a channels-last
        copy of the staircase's multiple's plan, timed beside the candidates. Eager
        oneDNN convs convert contiguous activations to their blocked layout and back around
        every conv, a cost that follows the activations, which pruning shrinks less than the
        FLOPs (README's hardware table: the ``auto`` models ran 9-24% faster channels-last,
        their dense models from 7% slower to 15% faster)."""
        if (self.table.backend, self.table.device) != ("eager", "cpu") \
                or self.dtype not in (None, "float32") or self.round_to not in models:
            return None
        weights = [m.weight for m in self.work.modules()
                   if isinstance(m, nn.Conv2d) and m.weight.shape[-2:] != (1, 1)]
        if not weights or any(not w.is_contiguous() for w in weights):
            return None  # no 2-D convs, or already channels-last (or otherwise strided)
        # a copy of its own: .to() on the plan's model would convert the weights it shares
        # with the user's model in place
        return deepcopy_model(models[self.round_to]).to(memory_format=torch.channels_last)

    @staticmethod
    def _layout_advice(measured: Any, m: int) -> str:
        """The note's sentence on channels-last (the plan at multiple ``m`` timed so beside
        it), where that ran 5% faster or more."""
        if measured.noisy or "channels-last" not in measured.times:
            return ""
        fast = measured.times["channels-last"].median_ms
        slow = measured.times.get(f"round_to {m}")
        if slow is None or fast > 0.95 * slow.median_ms:
            return ""
        return (f"; channels-last, the model planned at {m} ran in {fast:.3g} ms against "
                f"{slow.median_ms:.3g} contiguous: run the pruned model so "
                "(model.to(memory_format=torch.channels_last); prune the converted model "
                "to plan and time in that layout)")

    def model(self, cost: Any) -> Any:
        """The latency model over ``cost``'s channel dims (the dense time measured once)."""
        from .latency import latency_model

        lm = latency_model(self.work, self.example_inputs, cost, self.table, run=self.run,
                           step=self.grid_step, dense_s=self.dense_s, calls=self.calls,
                           context=self.context, smaller=self.smaller, dtype=self.dtype,
                           runners=self.runners)
        self.dense_s, self.context = lm.dense_s, lm.context
        return lm


def plan_pruning(model: nn.Module, example_inputs: Any, *, target_flops: Optional[float] = None,
                 target_params: Optional[float] = None, channel_ratio: Optional[float] = None,
                 target_latency: Optional[float] = None, **options: Any) -> PlannedPruning:
    """Decide what to prune, without changing ``model``: the plan and the analysis behind it.

    Takes the same arguments as :func:`prune`. ``apply_plan(model, planned.plan)`` then
    prunes in place.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(8, 4, 1))
        >>> planned = plan_pruning(m, torch.randn(1, 3, 8, 8), channel_ratio=0.5)
        >>> len(planned.plan.kept["0.weight"][0]), m[0].out_channels
        (4, 8)
    """
    target = make_target(target_flops, target_params, channel_ratio, target_latency)
    with _compiled_eagerly(model):
        return _search(*_prepare(model, example_inputs, target, options))[0]


def prune(model: nn.Module, example_inputs: Any, *, target_flops: Optional[float] = None,
          target_params: Optional[float] = None, channel_ratio: Optional[float] = None,
          target_latency: Optional[float] = None, inplace: bool = False,
          **options: Any) -> PruneResult:
    """Prune ``model`` to a target and return the smaller model, its plan and a report.

    Args:
        model: any ``nn.Module``. Untouched unless ``inplace=True`` (and then only on success).
            Its weights are read where they are, not copied (a copy of a 600M-parameter model
            cost 2.5 GB): the checks zero slices of them for a forward and put the values back
            bit for bit, also when one raises, so do not run ``model`` in another thread
            meanwhile. The result owns all its tensors.
        example_inputs: a tensor, a tuple of ``forward`` arguments, or a dict of keyword
            arguments (a dict whose keys are not ``forward``'s parameters is passed as one
            argument).
        target_flops: keep at most this fraction of the FLOPs (e.g. 0.5).
        target_params: keep at most this fraction of the parameters.
        channel_ratio: remove this fraction of the channels of every group.
        target_latency: keep at most this fraction of the dense model's latency, measured
            with ``backend`` on ``device`` (allocation costs plans by a measured per-layer
            latency table; the pruned model is then timed against the dense one, and the
            target re-aimed up to twice when they disagree by more than 3%; the plans are
            then timed together and the closest kept).
        inplace: prune ``model`` itself and return it as ``result.model``.
        **options: see :class:`PruneOptions`: ``importance`` ("l2", "l1", "random",
            "bn_scale", "fpgm", "taylor", "hessian" or a function), ``data`` and ``loss_fn``
            for the data-driven criteria, ``strategy``, ``round_to``, ``min_channels``,
            ``max_ratio``, ``protect``, ``outputs``, ``example_kwargs``, ``verify_at``,
            ``verbose``.

    Returns:
        :class:`PruneResult`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an unknown option.
        ValueError: bad arguments (no or several targets, a target outside (0, 1], a
            data-driven criterion without ``data``/``loss_fn``).
        PruningError: the inputs do not fit the model (CaptureError), or the target is
            infeasible (InfeasibleTargetError, stating the smallest reachable value).

    Example:
        >>> import torch, torchvision
        >>> result = prune(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224),
        ...                target_flops=0.5)
        >>> 0.49 <= result.report.flops_ratio <= 0.50
        True
    """
    target = make_target(target_flops, target_params, channel_ratio, target_latency)
    with _compiled_eagerly(model):
        return _prune(model, example_inputs, target, inplace, options)


def _prune(model: nn.Module, example_inputs: Any, target: Target, inplace: bool,
           options: dict[str, Any]) -> PruneResult:
    """:func:`prune` once its target is made."""
    work, lifted, dense, example_inputs, target, opts, patterns, clock = prepared = _prepare(
        model, example_inputs, target, options)
    hardware = _Hardware.of(work, dense, opts, target)  # measured once for all plans
    if hardware is not None:
        clock.lap("latency table")
    analysis = _analyse(work, lifted, dense, example_inputs, target, opts, clock, hardware)
    planned, pruned = _plan(analysis, work, lifted, example_inputs, target, opts, patterns, clock)
    latency_report = None
    if target.kind == "latency":
        planned, pruned, latency_report = _toward_latency(prepared, planned, pruned, analysis)
        clock.lap("latency")
    kwargs = opts.example_kwargs
    recovery = None
    if check_methods(opts.recover):
        recovery = recover(work, pruned, planned.plan, opts.calibration, opts.recover,
                           example_kwargs=kwargs, outputs=opts.outputs)
        clock.lap("recover")
    counted = planned.flops
    if len(counted) == 2 and (recovery is None or not planned.uncounted):
        # the check's forwards, counted as they ran (recovery changes values, not widths;
        # only a per-detection tail's count follows the values)
        params0 = sum(p.numel() for p in work.parameters())
        params1 = sum(p.numel() for p in pruned.parameters())
        (flops0, per_module0), (flops1, per_module1) = (
            (counted[k].total, counted[k].per_module) for k in ("before", "after"))
    else:
        flops0, params0, per_module0 = measure_modules(work, example_inputs, kwargs)
        flops1, params1, per_module1 = measure_modules(pruned, example_inputs, kwargs)
    blocks = block_costs(work, pruned, per_module0, per_module1)
    if planned.uncounted:
        whole = flops1 / max(flops0, 1)
        # a module's count holds its children's: subtract each outermost one once (pruned
        # attention's in-projection runs in the module that holds out_proj)
        outer = [m for m in planned.uncounted
                 if not any(m.startswith(o + ".") for o in planned.uncounted)]
        flops0, flops1 = (total - sum(per.get(m, 0) for m in outer)
                          for total, per in ((flops0, per_module0), (flops1, per_module1)))
        planned.notes.append(f"the whole model measured {whole:.4f} of its FLOPs on the example,"
                             f" with as many proposals/detections as each model kept")
    clock.lap("measure")

    rewrites = python_width_rewrites(work, pruned)
    if rewrites:
        planned.notes.append(f"rewrote {len(rewrites)} widths held in Python attributes "
                             f"(verified): {'; '.join(rewrites[:8])}"
                             + (f"; {len(rewrites) - 8} more" if len(rewrites) > 8 else ""))
    graph, removed = planned.graph, set(planned.removed)
    groups = [GroupChange(g.id, g.layers, len(g.units),
                          sum(1 for u in g.units if u not in removed)) for g in graph.groups]
    notes = planned.notes
    masks_after = sparsity(pruned)
    notes += [f"pruning mask on '{name}': {100 * share:.1f}% zeros before, "
              f"{100 * masks_after.get(name, float('nan')):.1f}% after"
              for name, share in sparsity(model).items()]
    report = PruneReport(f"{target.kind}={target.value:g}", flops0, flops1, params0, params1,
                         groups, layer_changes(work, pruned), list(graph.frozen),
                         planned.verify, notes, planned.seconds, recovery=recovery,
                         blocks=blocks, latency=latency_report)
    achieved = {"flops": report.flops_ratio, "params": report.params_ratio,
                "latency": latency_report.ratio if latency_report else 1.0,
                "channels": 1.0}[target.kind]
    allocated = set(planned.removed) - set(planned.dead)  # dead channels may overshoot: fine
    if target.kind == "latency" and abs(achieved / target.value - 1) > 0.07:
        notes.append(f"measured latency kept {achieved:.4f} for a target of {target.value:g}: "
                     f"more than 7% off after {latency_report.attempts} plans (the latency "
                     "model's prediction and the whole model's time disagree)")
    elif target.kind in ("flops", "params") and achieved > target.value + 0.01:
        notes.append(f"measured {achieved:.4f} of the {target.kind} for a target of "
                     f"{target.value:g}: the pruned model costs more than its plan (a width the "
                     "cost model does not see; please report the model)")
    elif target.kind in ("flops", "params") and achieved < target.value - 0.01 and allocated \
            and not callable(opts.strategy):  # a caller's strategy decides widths itself
        notes.append(f"achieved {achieved:.4f} for a target of {target.value:g}: no set of units "
                     f"found lands within 1 point at this granularity "
                     f"(round_to={planned.round_to})")
    if model.training:
        pruned.train()
    if inplace:
        apply_plan(model, planned.plan)
        if recovery is not None:  # the recovered weights (and any bias it added) move over
            adopt_state(model, pruned)
        pruned = model
    opts.say(f"[prune] done: FLOPs {100 * report.flops_ratio:.2f}%, params "
             f"{100 * report.params_ratio:.2f}%")
    return PruneResult(pruned, planned.plan, report, graph)
