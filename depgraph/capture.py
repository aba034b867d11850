"""Capture a model as an aten-level ``torch.fx`` graph with shapes and parameter names.

Two tracers, one result type:

* ``torch.export.export(..., strict=False)`` (the default): symbolic, never runs the model.
* a concrete trace, ``make_fx(functional_call(...), tracing_mode="real", pre_dispatch=True)``,
  for models ``torch.export`` rejects (data-dependent post-processing such as torchvision's
  detectors). It runs the model once on the example inputs, on copies of the buffers. Where
  a forward is known to use values (:class:`ValueReads`, counted on a run the caller makes
  anyway), it is tried first: ``torch.export`` fails on those only after seconds of tracing.

Both produce the same "training IR" op set (``aten.conv2d``, ``aten.batch_norm``,
``aten.linear``, in-place ops kept), so one rule table serves both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CaptureError, PruningError
from .rules.modules import fixed_params

__all__ = ["Capture", "capture", "OutputSelector", "ValueReads", "as_args", "plain_outputs"]

OutputSelector = Callable[[Any], Any]


@dataclass
class Capture:
    """A traced model.

    Attributes:
        graph: the aten-level graph; every tensor node has ``meta["val"]`` (shape, dtype).
        param_names: placeholder node name -> fully qualified name of the parameter or buffer.
        input_names: placeholder node names of the user inputs, in call order.
        output_nodes: the nodes whose values form the model's output contract.
        method: ``"export"`` or ``"concrete"``, the tracer that produced the graph.
        notes: why a fallback was taken, if one was.
        fixed: parameters of modules whose widths Python attributes pin
            (:mod:`depgraph.rules.modules`), with the reason.
    """

    graph: torch.fx.Graph
    param_names: dict[str, str]
    input_names: list[str]
    output_nodes: list[torch.fx.Node]
    method: str
    notes: list[str] = field(default_factory=list)
    buffers: set[str] = field(default_factory=set)  # FQNs in param_names that are buffers
    fixed: dict[str, str] = field(default_factory=dict)  # FQN -> why its shape may not change
    aliases: dict[str, str] = field(default_factory=dict)  # tied FQN -> the first FQN of it

    def __str__(self) -> str:
        n_ops = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return (f"Capture(method={self.method}, ops={n_ops}, params={len(self.param_names)}, "
                f"outputs={len(self.output_nodes)})")


def plain_outputs(out: Any) -> Any:
    """``out`` with the containers pytree does not know opened: a dataclass into a dict of its
    fields, a dict or list subclass into a dict or list.

    pytree sees a container it has no registration for as one opaque leaf: the tensors inside
    would be no output at all, so nothing would hold their widths and no check would compare
    them. Every reading of a model's outputs goes through here first; an object of another
    kind that holds tensors is refused (``PruningError``), naming it."""
    def open_leaf(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) or leaf is None:
            return leaf
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            return {f.name: plain_outputs(getattr(leaf, f.name))
                    for f in dataclasses.fields(leaf)}
        if isinstance(leaf, Mapping):
            return {k: plain_outputs(v) for k, v in leaf.items()}
        if isinstance(leaf, (list, tuple)):
            return [plain_outputs(v) for v in leaf]
        held = [k for k, v in getattr(leaf, "__dict__", {}).items()
                if isinstance(v, torch.Tensor)]
        if held:
            raise PruningError(f"the model returned a {type(leaf).__name__} holding tensors "
                               f"({', '.join(held[:4])}), which no check can read as outputs: "
                               f"pass outputs=lambda out: <its tensors>")
        return leaf

    return pytree.tree_map(open_leaf, out)


class _Selected(torch.nn.Module):
    """Wraps a model so that only the contract outputs are returned (and so traced as outputs)."""

    def __init__(self, model: torch.nn.Module, select: Optional[OutputSelector]) -> None:
        super().__init__()
        self.model = model
        self.select = select

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        return plain_outputs(self.select(out) if self.select is not None else out)


_PREFIX = "model."


def _strip(fqn: str) -> str:
    return fqn[len(_PREFIX):] if fqn.startswith(_PREFIX) else fqn


def as_args(example_inputs: Any) -> tuple:
    """``forward``'s positional arguments: a tuple as given, anything else as one argument,
    every tensor a fresh copy (:func:`fresh`)."""
    return fresh(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))


def fresh(inputs: Any) -> Any:
    """``inputs`` with every tensor copied: a forward that normalises its input in place
    (``x.sub_(mean)``) then sees the same values on every run, and the caller's tensors stay
    as they were (runs that had shared one tensor compared different inputs)."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(t.requires_grad)

    return pytree.tree_map_only(torch.Tensor, copy, inputs)


def _capture_export(wrapped: _Selected, args: tuple, kwargs: dict) -> Capture:
    from torch.export.graph_signature import InputKind, OutputKind

    # torch.export prints the whole partial graph to stderr when it gives up; the fallback
    # makes that noise, not an error the user must read.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(wrapped, args, kwargs, strict=False)
    _inline_wrappers(ep.graph_module)
    sig = ep.graph_signature
    param_names: dict[str, str] = {}
    input_names: list[str] = []
    buffers: set[str] = set()
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            param_names[name] = _strip(spec.target)
            if spec.kind == InputKind.BUFFER:
                buffers.add(_strip(spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            input_names.append(name)
    user_outputs = {spec.arg.name for spec in sig.output_specs
                    if spec.kind == OutputKind.USER_OUTPUT and hasattr(spec.arg, "name")}
    graph = ep.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = [n for n in pytree.tree_leaves(out_node.args[0])
               if isinstance(n, torch.fx.Node) and n.name in user_outputs]
    return Capture(graph, param_names, input_names, outputs, "export", buffers=buffers)


_WRAPPERS = ("wrap_with_autocast", "wrap_with_set_grad_enabled")


def _inline_wrappers(gm: torch.fx.GraphModule) -> None:
    """Splice the bodies of ``with torch.autocast(...)`` / grad-mode blocks into the graph.

    torch.export keeps such a block as one higher-order op over a subgraph (timm's EfficientViT
    computes its linear attention so); the ops inside move channels like any others, and the
    analysis does not execute the graph, so the block's dtype does not matter to it.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) not in _WRAPPERS:
            continue
        at = next(i for i, a in enumerate(node.args)
                  if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        body = getattr(gm, node.args[at].target)
        _inline_wrappers(body)
        env: dict[torch.fx.Node, Any] = dict(zip(
            [n for n in body.graph.nodes if n.op == "placeholder"], node.args[at + 1:]))
        result: Any = ()
        with graph.inserting_before(node):
            for n in body.graph.nodes:
                if n.op == "output":
                    result = n.args[0]
                elif n.op != "placeholder":
                    env[n] = graph.node_copy(n, lambda a: env[a])
        outs = [env[o] if isinstance(o, torch.fx.Node) else o for o in result]
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        holder = node.args[at]
        graph.erase_node(node)
        if not holder.users:
            graph.erase_node(holder)


def _capture_concrete(wrapped: _Selected, args: tuple, kwargs: dict) -> Capture:
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    model = wrapped.model
    params = dict(model.named_parameters())
    # Copies, so a train-mode forward does not update the user's running statistics.
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def run(p: dict, b: dict, a: tuple, k: dict) -> Any:
        out = functional_call(model, {**p, **b}, a, k)
        return plain_outputs(wrapped.select(out) if wrapped.select is not None else out)

    # Values read in Python (a detector's box count, a branch on a mean) are fixed at the
    # example's values, as its shapes are; checked below. make_fx gives each node a fake
    # value under the fake mode it finds in the tracing context, and with none there it built
    # a new mode per node (a stack capture each): one shared mode halves Mask R-CNN's trace.
    with _module_calls(model) as calls, tracing(TracingContext(FakeTensorMode(
            allow_fallback_kernels=True))):
        gm = make_fx(run, tracing_mode="real", pre_dispatch=True,
                     _error_on_data_dependent_ops=False)(params, buffers, args, kwargs)
    _set_module_stacks(gm.graph, calls)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat_p = pytree.tree_leaves(params)
    flat_b = pytree.tree_leaves(buffers)
    flat_in = pytree.tree_leaves((args, kwargs))
    if len(placeholders) != len(flat_p) + len(flat_b) + len(flat_in):
        raise CaptureError("concrete trace produced an unexpected number of graph inputs")
    names = list(params) + list(buffers)
    param_names = {ph.name: fqn for ph, fqn in zip(placeholders, names)}
    input_names = [ph.name for ph in placeholders[len(names):]]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [n for n in pytree.tree_leaves(out_node.args[0]) if isinstance(n, torch.fx.Node)]
    notes = []
    scalar = (torch.ops.aten.item, torch.ops.aten._local_scalar_dense)
    reads = [n for n in gm.graph.nodes if getattr(n.target, "overloadpacket", None) in scalar]
    if reads:
        # A path taken on a value is safe to analyse only if no weight was left off it: code
        # that did not run could read channels the graph never tied to it.
        idle = [param_names[ph.name] for ph in placeholders[:len(flat_p)] if not ph.users]
        if idle:
            raise CaptureError(f"forward branches on tensor values (data-dependent control flow)"
                               f" and the example took a path that skips {len(idle)} "
                               f"parameters ({', '.join(idle[:4])}); pruning could break the "
                               "path not taken")
        notes.append(f"forward reads {len(reads)} tensor values in Python (data-dependent "
                     "control flow); the analysis follows the example's path, on which every "
                     "parameter is used")
    return Capture(gm.graph, param_names, input_names, outputs, "concrete",
                   buffers=set(buffers), notes=notes)


@contextlib.contextmanager
def _module_calls(model: torch.nn.Module):
    """Record (module name, type, first node, end node) of every submodule call while make_fx
    traces: nodes are created in call order, so a call owns the nodes made during it."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    names = {id(m): n for n, m in model.named_modules() if n}
    calls: list[tuple[str, type, int, int]] = []
    open_calls: list[tuple[str, int]] = []

    def count() -> int:
        mode = get_proxy_mode()
        return len(mode.tracer.graph.nodes) if mode is not None else -1

    def enter(module: torch.nn.Module, _args: Any) -> None:
        if id(module) in names:
            open_calls.append((names[id(module)], count()))

    def leave(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        if id(module) in names and open_calls:
            name, start = open_calls.pop()
            calls.append((name, type(module), start, count()))

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _set_module_stacks(graph: torch.fx.Graph, calls: list) -> None:
    """``nn_module_stack`` metadata as torch.export writes it (outermost first), from calls."""
    nodes = list(graph.nodes)
    stacks: list[dict] = [{} for _ in nodes]
    for name, kind, start, end in sorted((c for c in calls if c[2] >= 0),
                                         key=lambda c: (c[2], -c[3])):
        path = f"L['self'].model.{name}"
        for i in range(start, min(end, len(nodes))):
            stacks[i][path] = (path, kind)
    for node, stack in zip(nodes, stacks):
        if stack and "nn_module_stack" not in node.meta:
            node.meta["nn_module_stack"] = stack


class ValueReads(TorchDispatchMode):
    """Counts, by op, what a forward run inside it does with tensor values that
    ``torch.export`` cannot follow: values read in Python (``item``, ``bool(t)``) and outputs
    whose shape depends on values (``nonzero``, indexing by a mask, ``unique``), which a
    detector's post-processing then sizes Python by. ``ops`` is empty for most models."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func is torch.ops.aten.index.Tensor:  # by a mask; a gather by indices is fine
            name = "index by a mask" if any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1]) else None
        elif _VALUE_TAGS.isdisjoint(func.tags):
            name = None
        if name is not None:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


_VALUE_TAGS = frozenset({torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape})


def sizes_by_values(value_ops: dict[str, int]) -> bool:
    """Whether ops :class:`ValueReads` counted make a shape from values (``nonzero``, indexing
    by a mask, ``unique``): a detector's post-processing, on which ``torch.export`` fails only
    after tracing the model. Values read in Python alone do not count: a model's first run at
    a shape often reads some while it fills a cache (Ultralytics' anchors read each level's
    stride), and a concrete trace of a large model takes far more memory than an export
    (YOLOv8x at 640 px: 1 GB more)."""
    for name in value_ops:
        packet = getattr(torch.ops.aten, name, None)
        if name == "index by a mask" or (packet is not None and any(
                torch.Tag.dynamic_output_shape in getattr(packet, o).tags
                for o in packet.overloads())):
            return True
    return False


def capture(model: torch.nn.Module, example_inputs: Any, *,
            example_kwargs: Optional[dict] = None,
            outputs: Optional[OutputSelector] = None,
            method: str = "auto", value_ops: Optional[dict[str, int]] = None) -> Capture:
    """Trace ``model`` on ``example_inputs`` into an aten graph.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor or a tuple of positional arguments (tensors, lists, dicts).
        example_kwargs: keyword arguments for ``forward``.
        outputs: picks the model's output contract from its return value, e.g.
            ``lambda out: out[0]`` for an Ultralytics detector, whose second output holds raw
            per-level maps. Default: everything ``forward`` returns.
        method: ``"export"``, ``"concrete"`` or ``"auto"`` (export, then concrete on failure).
        value_ops: what :class:`ValueReads` counted on a run of ``forward`` on these inputs;
            where it counted ops whose output shape depends on values
            (:func:`sizes_by_values`), ``"auto"`` tries the concrete trace first (export after
            it, on failure): export fails on those ops, on SSD after 9 s of tracing.

    Returns:
        A :class:`Capture`.

    Raises:
        CaptureError: neither tracer could trace the model; the message holds both causes.

    Example:
        >>> import torch
        >>> cap = capture(torch.nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
        >>> cap.method
        'export'
    """
    if method not in ("auto", "export", "concrete"):
        raise ValueError(f"method must be 'auto', 'export' or 'concrete', got {method!r}")
    args = as_args(example_inputs)
    kwargs = fresh(dict(example_kwargs or {}))
    with attributes_restored(model):
        cap = _capture(model, args, kwargs, outputs, method, value_ops or {})
    normalize_arguments(cap.graph)
    cap.fixed = fixed_params(model)
    cap.aliases = _aliases(model)
    # one name per tensor: a tied weight's placeholders all name its first FQN
    cap.param_names = {k: cap.aliases.get(v, v) for k, v in cap.param_names.items()}
    cap.buffers = {cap.aliases.get(b, b) for b in cap.buffers}
    return cap


def normalize_arguments(graph: torch.fx.Graph) -> None:
    """Put every aten call's arguments in its schema's positions, in place.

    Rules read arguments by position; the tracers pass some by keyword (``other=``,
    ``dim=``) and leave defaults out. After this, every positional parameter of the overload
    is in ``node.args`` (defaults filled in) and ``node.kwargs`` holds only keyword-only ones,
    so a rule cannot miss a tensor given by keyword or read ``ord`` where it meant ``dim``.
    """
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        normalized = _by_schema(node.target._schema, node.args, node.kwargs)
        if normalized is not None and normalized != (tuple(node.args), dict(node.kwargs)):
            node.args, node.kwargs = normalized


def _by_schema(schema: Any, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    kwargs = dict(kwargs)
    out = []
    for i, param in enumerate(a for a in schema.arguments if not a.kwarg_only):
        if i < len(args):
            out.append(args[i])
        elif param.name in kwargs:
            out.append(kwargs.pop(param.name))
        elif param.has_default_value():
            out.append(param.default_value)
        else:
            return None  # not a call of this schema: leave it as traced
    if len(args) > len(out):
        return None
    return tuple(out), kwargs


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second and later names of tied parameters/buffers -> the first name of the tensor."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        out.update({name: first[id(tensor)]} if id(tensor) in first else {})
        first.setdefault(id(tensor), name)
    return out


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict,
             outputs: Optional[OutputSelector], method: str, value_ops: dict[str, int]
             ) -> Capture:
    wrapped = _Selected(model, outputs)
    notes: list[str] = []
    errors: list[str] = []
    if method == "auto" and sizes_by_values(value_ops):
        try:
            cap = _capture_concrete(wrapped, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - export may still do
            errors.append(f"concrete trace: {type(exc).__name__}: {_first_line(exc)}")
        else:
            if not any(n.startswith("forward reads") for n in cap.notes):  # said already
                used = ", ".join(f"{op} x{n}" for op, n in sorted(value_ops.items()))
                cap.notes.append(f"forward uses tensor values torch.export cannot follow "
                                 f"({used}): traced concretely, on the example's path")
            return cap
        try:
            return _capture_export(wrapped, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - both causes, in the usual order
            errors.insert(0, f"torch.export: {type(exc).__name__}: {_first_line(exc)}")
            raise CaptureError(_capture_message(model, errors)) from exc
    if method in ("auto", "export"):
        try:
            return _capture_export(wrapped, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracer failure means: try the other one
            errors.append(f"torch.export: {type(exc).__name__}: {_first_line(exc)}")
            notes.append(f"torch.export failed ({type(exc).__name__}); used the concrete trace")
            if method == "export":
                raise CaptureError(_capture_message(model, errors)) from exc
    try:
        cap = _capture_concrete(wrapped, args, kwargs)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"concrete trace: {type(exc).__name__}: {_first_line(exc)}")
        raise CaptureError(_capture_message(model, errors)) from exc
    cap.notes.extend(notes)
    return cap


@contextlib.contextmanager
def attributes_restored(model: torch.nn.Module):
    """Undo attribute assignments made by ``forward`` during tracing.

    Tracing with fake tensors runs the model's Python code: a forward that caches
    ``self.anchors = ...`` (Ultralytics' Detect does) would otherwise leave fake tensors on the
    user's model.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # TorchScript code cannot assign Python attributes; its dicts are wrappers
        state = dict(module.__dict__)
        inner = {k: dict(v) for k, v in state.items() if k in ("_parameters", "_buffers")}
        saved.append((module, state, inner))
    try:
        yield
    finally:
        for module, state, inner in saved:
            for key in list(module.__dict__):
                if key not in state:
                    del module.__dict__[key]
            for key, value in state.items():
                if module.__dict__.get(key) is not value:
                    module.__dict__[key] = value
            for key, value in inner.items():
                current = module.__dict__[key]
                if current != value:
                    current.clear()
                    current.update(value)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else "(no message)"


def _capture_message(model: torch.nn.Module, errors: list[str]) -> str:
    return (f"could not capture {type(model).__name__}: " + "; ".join(errors) +
            ". Check that the example inputs are ones the model accepts (run model(*inputs) "
            "once), and that forward has no Python side effects that depend on tensor values.")

