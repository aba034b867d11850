"""The one registry of channel rules, keyed by aten overload packet, and the rule context.

A rule has one signature::

    rule(ctx: RuleContext, node: torch.fx.Node, inputs: list) -> tuple[AtomMap | None, ...]

``inputs`` is aligned with ``node.args``: an fx node argument is replaced by its atom map
(``None`` when the value carries no channels), a list of nodes by a list of maps, anything else
by ``None``. The result is aligned with the node's outputs (one entry for a single tensor).
Rules never look at the union-find: they only *record* unions, freezes and layer facts on the
context, which the analysis resolves once at the end.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.fx
from torch._ops import OpOverload, OpOverloadPacket

from ..atoms import AtomTable

__all__ = ["RuleContext", "LayerUse", "register", "lookup", "registered_ops", "node_outputs"]

Rule = Callable[["RuleContext", torch.fx.Node, list], tuple]
_RULES: dict[Any, Rule] = {}
_PYTHON_KEYS = (operator.getitem,)


def _key(target: Any) -> Any:
    return target.overloadpacket if isinstance(target, OpOverload) else target


def _library_op(op: Any) -> bool:
    """``"torchvision::deform_conv2d"``: an op of a library that may not be loaded, which
    the rule table must not import (its packet exists only once the library is)."""
    return isinstance(op, str) and "::" in op


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for each overload packet in ``ops`` (e.g. ``aten.add``), or for a
    library's op by qualified name (``"torchvision::deform_conv2d"``).

    Raises:
        TypeError: a key is an overload (``aten.add.Tensor``) or a Python function.
        ValueError: an op already has a rule; one op, one rule.
    """

    def decorator(rule: Rule) -> Rule:
        for op in ops:
            if not isinstance(op, OpOverloadPacket) and op not in _PYTHON_KEYS \
                    and not _library_op(op):
                raise TypeError(f"rules are keyed by overload packet, e.g. torch.ops.aten.add, "
                                f"not {op!r}")
            if op in _RULES:
                raise ValueError(f"{op} already has the rule {_RULES[op].__name__}")
            _RULES[op] = rule
        return rule

    return decorator


def lookup(target: Any) -> Optional[Rule]:
    key = _key(target)
    rule = _RULES.get(key)
    if rule is None and isinstance(key, OpOverloadPacket):
        rule = _RULES.get(key._qualified_op_name)
    return rule


def node_outputs(node: torch.fx.Node) -> list:
    """The node's output values as a list: one entry for a single tensor."""
    val = node.meta.get("val")
    return list(val) if isinstance(val, (tuple, list)) else [val]


def registered_ops() -> list[str]:
    return sorted(k.replace("::", ".") if _library_op(k) else str(k) for k in _RULES)


@dataclass(frozen=True)
class LayerUse:
    """One call of a layer with weights (conv, linear, norm), as seen in the graph.

    ``in_dim``/``out_dim`` index the weight's dims that read and write channels; ``macs`` is the
    multiply-accumulate count of this call at full width, used by the cost model.
    """

    node: str
    kind: str
    weight: Optional[str]
    in_dim: Optional[int]
    out_dim: Optional[int]
    module: Optional[str]
    macs: int = 0


@dataclass
class RuleContext:
    """What rules may read (shapes, arguments, parameter names) and record (facts)."""

    atoms: AtomTable
    param_names: dict[str, str]
    unions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    frozen: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # frozen too, but reported only where they turn out to be channels (see ``pin``)
    pinned: list[tuple[np.ndarray, str]] = field(default_factory=list)
    inexact: list[tuple[np.ndarray, str]] = field(default_factory=list)
    contracted: list[np.ndarray] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    layers: list[LayerUse] = field(default_factory=list)
    # layer index -> atom arrays whose kept fraction scales that layer's cost (for ops with no
    # weight, e.g. attention's q @ k: contracted and output channel dims)
    layer_atoms: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)
    # atoms of activations that live inside one op and never leave it (a recurrent layer's
    # hidden states between its stacked layers): prunable like any activation's
    internal: list[np.ndarray] = field(default_factory=list)
    # atoms an op discards (the channels past a prefix slice's end): dead unless read elsewhere
    dropped: list[np.ndarray] = field(default_factory=list)
    # (module, (size, atoms or None) per width) of widths the module's code passes as Python
    # numbers (split sizes, a view's dims): surgery rewrites the int attributes that hold them
    sizes: list[tuple[str, tuple[tuple[int, Optional[np.ndarray]], ...]]] = \
        field(default_factory=list)
    # (module, atoms of each part) of every split by such sizes (see ``python_split``)
    splits: list[tuple[str, tuple[np.ndarray, ...]]] = field(default_factory=list)
    # modules whose head splits (a channel dim viewed as heads x head width) prune whole heads
    # rather than every head's width (see ``reshape_map``); the analysis chooses them
    whole_heads: frozenset[str] = frozenset()
    # (module, atoms) of every head split: the analysis checks whether a split's channels
    # froze, to offer whole heads there instead (or to take them back where those froze too)
    head_splits: list[tuple[Optional[str], np.ndarray]] = field(default_factory=list)
    # modules that multiply two activations (attention's scores and weighted values): a head
    # split elsewhere (a detector's per-anchor view) has no heads that could go whole
    attention: set[str] = field(default_factory=set)
    # node -> its dims of size 1 that hold a statistic over these atoms (a keepdim mean or
    # var), through elementwise ops with constants: expanding such a dim back to as many
    # elements gives them back (EvoNorm's group std, expanded as its input, divides it)
    statistics: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    node: Optional[torch.fx.Node] = None

    def carry_statistic(self, source: Any) -> None:
        """The current node holds the statistic ``source`` (a node) holds, if any."""
        if isinstance(source, torch.fx.Node) and source.name in self.statistics:
            self.statistics[self.node.name] = self.statistics[source.name]

    # ---- reading -------------------------------------------------------------------------
    def shape(self, value: Any) -> tuple[int, ...]:
        """Static shape of a node's tensor value (``value`` may be a node or a tensor)."""
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else value
        return tuple(int(s) for s in val.shape)

    def out_shape(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def arg(self, *names: str, default: Any = None) -> Any:
        """The argument the op's schema calls ``names[0]`` (or an alias, e.g. swapaxes'
        "axis0" for "dim0"), by name, never by a position that differs across overloads
        (``linalg_vector_norm(x, ord, dim)`` vs ``mean(x, dim)``). Capture put every
        positional parameter in its schema position; keyword-only ones are in kwargs."""
        positions = _positions(self.node.target)
        for name in names:
            if name in positions:
                i = positions[name]
                return self.node.args[i] if i < len(self.node.args) else default
            if name in self.node.kwargs:
                return self.node.kwargs[name]
        return default

    def param(self, value: Any) -> Optional[str]:
        """FQN of the parameter or buffer a node argument is, or None if it is computed."""
        if isinstance(value, torch.fx.Node) and value.op == "placeholder":
            return self.param_names.get(value.name)
        return None

    def where(self) -> str:
        node = self.node
        stack = node.meta.get("nn_module_stack")
        module = next(reversed(stack.values()))[0] if stack else None
        target = getattr(node.target, "__name__", str(node.target))
        text = f"{target} at node '{node.name}'"
        return text + (f" in module '{_clean(module)}'" if module else "")

    def module(self) -> Optional[str]:
        stack = self.node.meta.get("nn_module_stack")
        return _clean(next(reversed(stack.values()))[0]) if stack else None

    def module_type(self) -> Optional[str]:
        """Qualified class name of the innermost module running this node, if known."""
        stack = self.node.meta.get("nn_module_stack")
        if not stack:
            return None
        cls = next(reversed(stack.values()))[1]
        return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"

    # ---- recording -----------------------------------------------------------------------
    def unify(self, a: Optional[np.ndarray], b: Optional[np.ndarray]) -> None:
        """Atoms ``a[i]`` and ``b[i]`` must be pruned together."""
        if a is None or b is None or a is b:
            return
        if len(a) != len(b):
            raise ValueError(f"{self.where()}: cannot unify {len(a)} with {len(b)} channels")
        self.unions.append((a, b))

    def unify_parts(self, atoms: Optional[np.ndarray], parts: int) -> None:
        """The ``parts`` equal consecutive parts of ``atoms`` keep one width: index ``j`` of
        every part is pruned together (groups of a conv or a norm, equal chunks)."""
        if atoms is None or parts <= 1:
            return
        rows = atoms.reshape(parts, -1)
        self.unify(rows[:-1].reshape(-1), rows[1:].reshape(-1))

    def freeze(self, atoms: Any, why: str) -> None:
        """Never prune these atoms (an array, an atom map, or a list of either)."""
        for arr in _arrays(atoms):
            self.frozen.append((arr, why))

    def pin(self, atoms: Any, why: str) -> None:
        """Never prune these atoms, which may well not be channels at all (a conv kernel's
        dims flattened under its input channels): they are frozen, and reported as frozen
        only if they reach an activation."""
        for arr in _arrays(atoms):
            self.pinned.append((arr, why))

    def mark_inexact(self, atoms: Any, why: str) -> None:
        """Prunable, but pruning changes values beyond the removed channels (normalisation)."""
        for arr in _arrays(atoms):
            self.inexact.append((arr, why))

    def mark_contracted(self, atoms: Optional[np.ndarray]) -> None:
        """Two activations are multiplied and summed over these atoms (attention scores).

        No weight reads them, so verification masks such units by zeroing every slice.
        """
        if atoms is not None:
            self.contracted.append(atoms)

    def python_sizes(self, parts: Sequence[tuple[int, Optional[np.ndarray]]]) -> None:
        """The code of the module running this node passed these widths as numbers (``x.split(
        (self.c, self.c))``): (size, its atoms; None for a count that never changes, such as
        the heads of a head split). Where pruning changes one, the module's attributes equal to
        it follow, unless the same number also names a width that stays or changes
        differently (32 heads of width 32). Callers leave out sizes that are no channel
        width at all (batch, positions): a spatial 8 x 8 = 64 must not pin ``head_dim = 64``."""
        module = self.module()
        if module is not None and any(a is not None for _, a in parts):
            self.sizes.append((module, tuple(parts)))

    def python_split(self, parts: Sequence[np.ndarray]) -> None:
        """The module's code splits one dim's channels into ``parts`` (their atoms) by sizes
        it passes as numbers. Besides each part's width (``python_sizes``), a width it keeps
        for the whole (CSP's ``x.split(self.expand_chs // 2)``, SHViT's ``split([self.pdim,
        self.dim - self.pdim])``) follows the plan where no part has that width, and a list
        equal to the sizes in order (FocalNet's ``self.input_split``) takes the new ones."""
        module = self.module()
        if module is not None:
            self.splits.append((module, tuple(parts)))

    def consumer(self, weight: Any, dim: int) -> None:
        """``weight`` reads channels along ``dim``: verification zeroes those slices."""
        fqn = self.param(weight)
        if fqn is not None:
            self.consumers.append((fqn, dim))


_POSITIONS: dict[Any, dict[str, int]] = {}


def _positions(target: Any) -> dict[str, int]:
    """Schema parameter name -> position, for an aten overload (empty for Python targets)."""
    if target not in _POSITIONS:
        params = target._schema.arguments if isinstance(target, OpOverload) else []
        _POSITIONS[target] = {a.name: i for i, a in
                              enumerate(a for a in params if not a.kwarg_only)}
    return _POSITIONS[target]


def _clean(module: Optional[str]) -> Optional[str]:
    if module is None:
        return None
    # torch.export names modules by attribute path, e.g. "L['self'].model.layer1" or "model.x"
    # and a sliced Sequential's children by the slice too (RT-DETR's ``self.model[:-1]``:
    # "model.slice(None, -1, None).6"), though they keep their names in the model
    module = ".".join(p for p in module.split(".") if not p.startswith("slice("))
    for prefix in ("L['self'].model.", "L['self'].", "model."):
        if module.startswith(prefix):
            return module[len(prefix):]
    return "" if module in ("model", "L['self']") else module


def _arrays(atoms: Any):
    if atoms is None:
        return
    if isinstance(atoms, np.ndarray):
        yield atoms
    elif isinstance(atoms, (tuple, list)):
        for item in atoms:
            yield from _arrays(item)

