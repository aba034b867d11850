"""Surgery: physically remove pruning units from a model.

Index selection on every parameter and buffer dim a unit owns, then the module attributes that
describe shapes are fixed: by the fixer of a known module type (``MODULE_FIXERS``), and for
other modules by rewriting the int attributes that hold a width that changed (their own
``self.dim``, a container's ``self.splits``); ``prune()`` verifies the result and reports
every rewrite. Transactional: every new tensor and attribute is computed first and
only then swapped in, so a failure leaves the model exactly as it was.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from depgraph.errors import SurgeryError
from depgraph.graph import ChannelGraph

from .attention import as_pruned

__all__ = ["remove_units", "apply_kept", "MODULE_FIXERS", "SCORE_SCALE_FIXES"]


@dataclass(frozen=True)
class _Swap:
    module: nn.Module
    name: str
    is_param: bool
    value: torch.Tensor


def _conv_attrs(m: nn.modules.conv._ConvNd, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    w = new.get("weight", m.weight)
    if getattr(m, "transposed", False):  # (torchvision's DeformConv2d has none)
        return {"in_channels": w.shape[0], "out_channels": w.shape[1] * m.groups}
    attrs: dict[str, Any] = {"out_channels": w.shape[0]}
    if m.groups > 1 and m.weight.shape[1] == 1:  # depthwise: whole groups went
        per_group_out = m.out_channels // m.groups
        attrs["groups"] = w.shape[0] // per_group_out
        attrs["in_channels"] = attrs["groups"]
    else:
        attrs["in_channels"] = w.shape[1] * m.groups
    return attrs


def _linear_attrs(m: nn.Linear, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    w = new.get("weight", m.weight)
    return {"in_features": w.shape[1], "out_features": w.shape[0]}


def _bn_attrs(m: nn.modules.batchnorm._NormBase, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    for name in ("weight", "running_mean"):
        t = new.get(name, getattr(m, name, None))
        if t is not None:
            return {"num_features": t.shape[0]}
    return {}


def _group_norm_attrs(m: nn.GroupNorm, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    w = new.get("weight", m.weight)
    if w is None:
        return {}
    attrs: dict[str, Any] = {"num_channels": w.shape[0]}
    if m.num_groups == m.num_channels:  # one channel per group: groups shrink with channels
        attrs["num_groups"] = w.shape[0]
    return attrs


def _layer_norm_attrs(m: nn.LayerNorm, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    w = new.get("weight", m.weight)
    return {"normalized_shape": tuple(w.shape)} if w is not None else {}


def _prelu_attrs(m: nn.PReLU, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"num_parameters": new.get("weight", m.weight).numel()}


def _rnn_attrs(m: nn.RNNBase, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    w_ih = new.get("weight_ih_l0", m.weight_ih_l0)
    w_hh = new.get("weight_hh_l0", m.weight_hh_l0)
    gates = m.weight_ih_l0.shape[0] // m.hidden_size  # 4 LSTM, 3 GRU, 1 RNN (old shapes)
    attrs: dict[str, Any] = {"input_size": w_ih.shape[1], "hidden_size": w_ih.shape[0] // gates}
    if getattr(m, "proj_size", 0):
        attrs["proj_size"] = w_hh.shape[1]
        if attrs["proj_size"] >= attrs["hidden_size"]:  # torch tells them apart by size
            raise SurgeryError(f"an LSTM's proj_size ({attrs['proj_size']}) must stay below its "
                               f"hidden_size ({attrs['hidden_size']}); keep more hidden units")
    return attrs


def _mha_attrs(m: nn.MultiheadAttention, new: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Widths from the new projections; the class becomes :class:`PrunedMultiheadAttention`,
    whose forward reads them from its tensors and keeps the unpruned score scale."""
    if m.in_proj_weight is not None:
        q = k = v = new.get("in_proj_weight", m.in_proj_weight)
        inner = q.shape[0] // 3
    else:
        q, k, v = (new.get(f"{p}_proj_weight", getattr(m, f"{p}_proj_weight")) for p in "qkv")
        inner = q.shape[0]
    if inner % m.num_heads:
        raise SurgeryError(f"{inner} projection channels do not split into {m.num_heads} heads")
    return {**as_pruned(m), "embed_dim": q.shape[1], "kdim": k.shape[1], "vdim": v.shape[1],
            "head_dim": inner // m.num_heads}


# Module type -> function(module, its new tensors by attribute name) -> attributes to set. A
# library's type that must not be imported here is named by its qualified name.
MODULE_FIXERS: list[tuple[type | str, Callable[..., dict[str, Any]]]] = [
    (nn.modules.conv._ConvNd, _conv_attrs),
    ("torchvision.ops.deform_conv.DeformConv2d", _conv_attrs),
    (nn.Linear, _linear_attrs),
    (nn.modules.batchnorm._NormBase, _bn_attrs),
    (nn.GroupNorm, _group_norm_attrs),
    (nn.LayerNorm, _layer_norm_attrs),
    (nn.PReLU, _prelu_attrs),
    (nn.RNNBase, _rnn_attrs),
    (nn.MultiheadAttention, _mha_attrs),
    (nn.Embedding, lambda m, new: {"embedding_dim": new.get("weight", m.weight).shape[1]}),
]


def _area_attention_q(module: nn.Module, old: int, new: int,
                      current: Callable[[nn.Module, str], Optional[torch.Tensor]]
                      ) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Ultralytics' ``AAttn`` multiplies q by ``self.head_dim ** -0.5`` in ``forward``: scale the
    rows that make q (the first ``head_dim`` of each head's q|k|v block of ``qkv``) by
    ``sqrt(new / old)``, in its batch norm (or its conv, once fused), so the scores stay the
    masked original's."""
    qkv = module.qkv
    holder = qkv.bn if isinstance(getattr(qkv, "bn", None), nn.BatchNorm2d) else qkv.conv
    rows = (torch.arange(module.num_heads)[:, None] * 3 * new + torch.arange(new)).flatten()
    out = []
    for name in ("weight", "bias"):
        tensor = current(holder, name)
        if tensor is None:
            continue
        if tensor.shape[0] != 3 * new * module.num_heads:
            raise SurgeryError(f"{type(module).__name__}: {name} of its qkv has "
                               f"{tensor.shape[0]} rows, not 3 x {module.num_heads} heads x "
                               f"{new}")
        scaled = tensor.detach().clone()
        scaled[rows.to(scaled.device)] *= (new / old) ** 0.5
        out.append((holder, name, nn.Parameter(scaled, requires_grad=tensor.requires_grad)))
    return out


#: Modules (qualified class names) whose ``forward`` scales attention scores by a width that
#: surgery rewrites (``q * self.head_dim ** -0.5``) -> function(module, old width, new width,
#: current(module, name) -> the tensor about to be committed) -> parameters to swap in, so
#: the pruned scores equal the masked original's. Without an entry the check finds the
#: difference and repair freezes the heads.
SCORE_SCALE_FIXES: dict[str, Callable[..., list[tuple[nn.Module, str, torch.Tensor]]]] = {
    "ultralytics.nn.modules.block.AAttn": _area_attention_q,
}


def _score_scale_swaps(attr_updates: list[tuple[nn.Module, str, Any]], swaps: list[_Swap]
                       ) -> list[_Swap]:
    """Swaps that keep scores where a ``SCORE_SCALE_FIXES`` module's ``head_dim`` changes."""
    pending = {(id(s.module), s.name): s.value for s in swaps}

    def current(module: nn.Module, name: str) -> Optional[torch.Tensor]:
        return pending.get((id(module), name), getattr(module, name, None))

    out = []
    for module, name, value in attr_updates:
        cls = type(module)
        fix = SCORE_SCALE_FIXES.get(f"{cls.__module__}.{cls.__qualname__}")
        old = getattr(module, name, None)
        if fix is not None and name == "head_dim" and value != old:
            out += [_Swap(m, n, True, t) for m, n, t in fix(module, old, value, current)]
    return out


def fixer_for(module: nn.Module) -> Optional[Callable[..., dict[str, Any]]]:
    """The ``MODULE_FIXERS`` entry for ``module``'s type (the first that matches), or None."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    return next((f for cls, f in MODULE_FIXERS
                 if (cls in names if isinstance(cls, str) else isinstance(module, cls))), None)


def _int_items(value: Any) -> Optional[list[int]]:
    """``value`` as a list of ints when it is an int or a list/tuple of ints (bools aside)."""
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return items
    return None


def _public_widths(module: nn.Module) -> dict[str, list[int]]:
    return {attr: items for attr, value in vars(module).items()
            if not attr.startswith("_") and attr != "training"
            and (items := _int_items(value)) is not None}


def _pinned_attrs(module: nn.Module, stays: frozenset[int]) -> set[str]:
    """``module``'s int attributes equal to a width in ``stays`` (see ``_own_width_rewrites``):
    the rewrites by value leave them alone. A head count is not one: it stays by design."""
    return {a for a, v in vars(module).items()
            if isinstance(v, int) and not isinstance(v, bool) and v in stays
            and a not in HEAD_COUNTS}


def _one_to_one(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """old width -> new width, for the widths that changed to one new value only."""
    seen: dict[int, set[int]] = {}
    for old, now in pairs:
        if old != now:
            seen.setdefault(int(old), set()).add(int(now))
    return {old: next(iter(news)) for old, news in seen.items() if len(news) == 1}


def _as_before(old: Any, items: list[int]) -> Any:
    return items[0] if isinstance(old, int) else type(old)(items)


def _own_width_rewrites(model: nn.Module, module: nn.Module, new: dict[str, torch.Tensor],
                        stays: frozenset[int] = frozenset()) -> list[tuple[nn.Module, str, Any]]:
    """A module no fixer knows, whose own tensors shrink: its int attributes that equal a
    changed width (``self.dim = 64`` read by ``forward``) follow it. Two different new widths
    for one old value is ambiguous: SurgeryError, rather than a guess. ``stays``: widths the
    graph saw this module's code pass that the plan keeps, wherever they appear (TNT's
    attention keeps ``hidden_dim`` equal to its input width and reshapes q/k by ``head_dim =
    hidden_dim / heads``; when only the input shrinks, both must stay)."""
    changed: dict[int, set[int]] = {}
    for name, t in new.items():
        for old, now in zip(getattr(module, name).shape, t.shape):
            if old != now and int(old) not in stays:
                changed.setdefault(int(old), set()).add(int(now))
    done = _pinned_attrs(module, stays)
    updates = _head_rewrites(module, _one_to_one(
        (old, now) for old, news in changed.items() for now in news), done)
    for attr, items in _public_widths(module).items():
        if attr in done:
            continue
        hit = [v for v in items if v in changed]
        if not hit:
            continue
        if any(len(changed[v]) > 1 for v in hit):
            where = next((n for n, m in model.named_modules() if m is module), "?")
            raise SurgeryError(
                f"{type(module).__name__} '{where}' keeps {attr}={getattr(module, attr)!r}, a "
                f"width that shrinks to different sizes along different dims; register a fixer "
                f"in pruners.surgery.MODULE_FIXERS (its type -> the attributes to set)")
        old = getattr(module, attr)
        updates.append((module, attr, _as_before(old, [next(iter(changed[v])) if v in changed
                                                       else v for v in items])))
    return updates


#: attribute names that count attention heads (the one factor of a head-split width that stays)
HEAD_COUNTS = ("num_heads", "n_heads", "heads", "nheads", "n_head", "num_attention_heads")


def _head_rewrites(module: nn.Module, changed: dict[int, int], done: set[str]
                   ) -> list[tuple[nn.Module, str, Any]]:
    """Attention that reshapes by stored head sizes (timm's ``qkv.reshape(B, N, 3,
    self.num_heads, self.head_dim)``, then ``reshape(B, N, self.attn_dim)``).

    Analysis keeps the number of heads and shrinks every head alike (the innermost dim of a
    head split carries the channels), so a changed width ``k * num_heads * head_dim`` (k = 1,
    2, 3: one projection, k/v, q/k/v) gives the new ``head_dim``, and an int equal to the old
    total (``attn_dim``) takes the new total. ``scale`` stays: the old 1/sqrt(head_dim) is what
    keeps the pruned scores equal to those of the masked original.
    """
    widths = {a: v for a, v in vars(module).items() if a not in done and not a.startswith("_")
              and isinstance(v, int) and not isinstance(v, bool) and v > 0}
    updates: list[tuple[nn.Module, str, Any]] = []
    for count in (a for a in HEAD_COUNTS if a in widths):
        heads = widths[count]
        for attr, per_head in widths.items():
            # the per-head width is named for it (head_dim, head_size, dim_head): a plain
            # ``dim`` with ``num_heads * dim`` equal to an MLP's width is not one
            if attr in HEAD_COUNTS or attr in done or "head" not in attr:
                continue
            hit = next((k for k in (1, 2, 3) if k * heads * per_head in changed
                        and changed[k * heads * per_head] % (k * heads) == 0), None)
            if hit is None:
                continue
            total, new_total = heads * per_head, changed[hit * heads * per_head] // hit
            updates.append((module, attr, new_total // heads))
            done.add(attr)
            for other, value in widths.items():
                if other not in done and other != count and value == total:
                    updates.append((module, other, new_total))
                    done.add(other)
    return updates


_WIDTHS = (("in_channels", "out_channels"), ("in_features", "out_features"),
           ("num_features", "num_features"), ("num_channels", "num_channels"),
           ("embedding_dim", "embedding_dim"))


def _widths(module: nn.Module, updates: dict[str, Any]) -> Optional[tuple[int, int, int, int]]:
    """(old in, old out, new in, new out) of a layer, with ``updates`` pending."""
    for a, b in _WIDTHS:
        if isinstance(getattr(module, a, None), int) and isinstance(getattr(module, b, None), int):
            return (getattr(module, a), getattr(module, b), updates.get(a, getattr(module, a)),
                    updates.get(b, getattr(module, b)))
    return None


def _container_rewrites(model: nn.Module, pending: list[tuple[nn.Module, str, Any]],
                        touched: set[int],
                        stays: Callable[[nn.Module], frozenset[int]] = lambda m: frozenset()
                        ) -> list[tuple[nn.Module, str, Any]]:
    """Containers that keep their children's widths in Python (timm's MixedConv2d splits its
    input by ``self.splits`` and stores ``in_channels``): a list equal to the children's old
    input (or output) widths, or an int equal to their sum, takes the new widths. ``stays``
    gives the widths a container's code passes that the plan keeps (``_own_width_rewrites``)."""
    by_module: dict[int, dict[str, Any]] = {}
    for module, attr, value in pending:
        by_module.setdefault(id(module), {})[attr] = value
    updates = []
    done = {(id(m), a) for m, a, _ in pending}
    for parent in model.modules():
        if id(parent) in touched or fixer_for(parent) is not None:
            continue
        children = list(parent.children())
        if not any(id(c) in by_module for c in children):
            continue
        widths = [_widths(c, by_module.get(id(c), {})) for c in children]
        known = [w for w in widths if w is not None]
        if not known:
            continue
        old_in, old_out, new_in, new_out = ([w[i] for w in known] for i in range(4))
        kept = stays(parent)
        names = {a for (i, a) in done if i == id(parent)} | _pinned_attrs(parent, kept)
        changed = _one_to_one(zip(old_in + old_out, new_in + new_out))
        updates += _head_rewrites(parent, {o: n for o, n in changed.items() if o not in kept},
                                  names)
        for attr, items in _public_widths(parent).items():
            if attr in names:
                continue
            old = getattr(parent, attr)
            rules = [(old_in, new_in), (old_out, new_out)]
            if isinstance(old, int):
                found = {sum(n) for o, n in rules if old == sum(o)}
            elif len(known) == len(children) == len(items):
                found = {tuple(n) for o, n in rules if items == o}
            else:
                found = set()
            # equal to the inputs and the outputs, which no longer agree: which is it?
            (new_val,) = found if len(found) == 1 else (None,)
            if new_val is not None and new_val not in (old, tuple(items)):
                updates.append((parent, attr, _as_before(old, list(new_val))
                                if isinstance(new_val, tuple) else new_val))
    return updates


def _size_rewrites(model: nn.Module, sizes: dict[str, dict[int, int]],
                   pending: list[tuple[nn.Module, str, Any]],
                   counts: Optional[dict[str, list[int]]] = None,
                   splits: Optional[dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]]
                   = None) -> list[tuple[nn.Module, str, Any]]:
    """A module's code splits or views by widths it keeps in attributes (C2PSA's
    ``split((self.c, self.c))``, an attention's ``split([self.key_dim, self.key_dim,
    self.head_dim])``): each public int (or list of ints) equal to such a width takes the new
    one. Attributes another rewrite already set, and modules with a fixer, are left alone, as
    are head-count attributes equal to one of the module's ``counts`` (LeViT's 16 heads of
    key width 16: the key width shrinks, the head count stays)."""
    done = {(id(m), a) for m, a, _ in pending}
    updates = []
    for name, module, changes in _without_fixers(model, sizes):
        stay = (counts or {}).get(name, ())
        done |= {(id(module), a) for a in HEAD_COUNTS if getattr(module, a, None) in stay}
        own = _public_widths(module)
        for attr, items in own.items():
            new = [changes.get(v, v) for v in items]
            if (id(module), attr) not in done and new != items:
                updates.append((module, attr, _as_before(getattr(module, attr), new)))
        if not any(changes.get(v, v) != v for items in own.values() for v in items):
            # no width of its own changes, so none of its numbers derive from one
            # (``self.head_dim * 2``): look for the sizes it splits by in its children
            split = {o for olds, _ in (splits or {}).get(name, ()) for o in olds}
            updates += _child_width_rewrites(name, module, {o: changes[o] for o in split
                                                            if changes.get(o, o) != o},
                                             sizes, done)
        done |= {(id(m), a) for m, a, _ in updates}  # a child's own record comes later
    return updates


def _child_width_rewrites(name: str, module: nn.Module, changes: dict[int, int],
                          sizes: dict[str, dict[int, int]], done: set[tuple[int, str]]
                          ) -> list[tuple[nn.Module, str, Any]]:
    """Sizes a module's code splits by that it holds in no attribute of its own, but reads
    from a child's (RAFT's ``torch.split(context, [self.update_block.hidden_state_size,
    ...])``): the one int attribute of one direct child (no layer, no fixer) equal to such a
    size takes the new one. Called only for modules none of whose own widths change (else a
    number may derive from one: ``self.head_dim * 2``), and for split sizes only (a view's
    channel width of 64 is no child's ``window_area = 64``). Two candidates is ambiguous, and
    so is a child whose own code passes that size and keeps it or changes it differently: no
    rewrite (the check then fails, with its reason)."""
    updates = []
    for old, now in changes.items():
        found = []
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if fixer_for(child) is not None or sizes.get(full, {}).get(old, now) != now:
                continue
            found += [(child, attr) for attr, items in _public_widths(child).items()
                      if items == [old] and isinstance(getattr(child, attr), int)
                      and (id(child), attr) not in done]
        if len(found) == 1:
            updates.append((*found[0], now))
    return updates


def _split_rewrites(model: nn.Module,
                    splits: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]],
                    pending: list[tuple[nn.Module, str, Any]]) -> list[tuple[nn.Module, str, Any]]:
    """A module whose code splits by a list it keeps (FocalNet's ``torch.split(x,
    self.input_split, 1)``): the list (or tuple) equal to a split's old sizes takes the new
    ones, position by position. Two splits with those old sizes that change differently: no
    rewrite (the check then fails with its reason). Modules with a fixer are left alone."""
    done = {(id(m), a) for m, a, _ in pending}
    updates = []
    for _, module, pairs in _without_fixers(model, splits):
        news: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        for old, new in pairs:
            news.setdefault(tuple(old), set()).add(tuple(new))
        for attr, items in _public_widths(module).items():
            value = getattr(module, attr)
            found = news.get(tuple(items), set())
            if isinstance(value, (list, tuple)) and (id(module), attr) not in done and \
                    len(found) == 1:
                updates.append((module, attr, type(value)(next(iter(found)))))
    return updates


def _without_fixers(model: nn.Module, by_name: dict[str, Any]
                    ) -> Iterable[tuple[str, nn.Module, Any]]:
    """``(name, module, value)`` for each name of ``by_name`` that names a module without a
    fixer.
    A name the tracer made up has nothing to rewrite (a width the code still needs then
    fails the check, with its reason)."""
    for name, value in by_name.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if fixer_for(module) is None:
            yield name, module, value


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_param) that holds it (tied weights too)."""
    owners: dict[int, list] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name, True))
        for name, b in module._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((module, name, False))
    return owners


def lookup_tensor(model: nn.Module, fqn: str) -> torch.Tensor:
    """The parameter or buffer called ``fqn``; SurgeryError if the model has none."""
    module_name, _, attr = fqn.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise SurgeryError(f"the plan names '{fqn}', but the model has no module "
                           f"'{module_name}'; was it analysed from a different model?") from exc
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers.get(attr)
    if tensor is None:
        raise SurgeryError(f"the plan names '{fqn}', but '{module_name or type(model).__name__}' "
                           f"has no parameter or buffer '{attr}'")
    return tensor


def remove_units(model: nn.Module, graph: ChannelGraph, units: Iterable[int]) -> nn.Module:
    """Remove ``units`` of ``graph`` from ``model`` in place and return it.

    Raises:
        SurgeryError: an unknown unit, a parameter missing from the model, a shape that no
            longer matches the analysis, or a layer that would lose every channel. The model
            is unchanged when this is raised.

    Example:
        >>> import torch
        >>> from depgraph import analyze, capture
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
        >>> g = analyze(capture(m, torch.randn(1, 3, 8, 8)))
        >>> remove_units(m, g, [0, 1])[0].out_channels
        6
    """
    removed = set(int(u) for u in units)
    bad = [u for u in removed if not 0 <= u < len(graph.units)]
    if bad:
        raise SurgeryError(f"unknown unit ids {sorted(bad)[:10]}; the graph has "
                           f"{len(graph.units)} units")
    kept = {key: idx for key, idx in graph.kept_indices(removed).items()
            if len(idx) != graph.param_shapes[key[0]][key[1]]}
    sizes = graph.size_changes(removed)
    return apply_kept(model, kept, graph.param_shapes, sizes, graph.split_changes(removed),
                      graph.count_clashes(sizes))


#: Above this many blocks (the product of each cut's runs of kept indices), ``take`` gathers.
_MAX_BLOCKS = 64


#: The channels-last format of a tensor of each rank that has one (conv weights, activations).
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """``tensor``'s memory format: channels-last (a conv weight of a model converted with
    ``.to(memory_format=torch.channels_last)``, whose eager CPU convs then skip the layout
    conversions) or contiguous. A pruned weight keeps it, or the pruned model would run
    contiguous convs on channels-last activations."""
    last = CHANNELS_LAST.get(tensor.dim())
    if last is not None and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=last):
        return last
    return torch.contiguous_format


def take(tensor: torch.Tensor, cuts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """A new tensor holding ``tensor`` at the sorted indices ``idx`` along each ``(dim, idx)``,
    in ``tensor``'s :func:`memory_format`.

    Where the kept indices form a few runs (a repair probe drops one channel per group), the
    runs are copied block by block into one new tensor: on a 600M-parameter model, gathering
    one dim after the other took seconds, through an intermediate as large as the weight.
    Otherwise (a real plan keeps scattered channels) ``index_select`` along each dim.
    """
    cuts = [(dim, idx.to(tensor.device)) for dim, idx in cuts]
    layout = memory_format(tensor)
    breaks = [(torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist()
              for _, idx in cuts]  # where a new run of consecutive indices starts
    if any(len(idx) == 0 for _, idx in cuts) or \
            math.prod(len(b) + 1 for b in breaks) > _MAX_BLOCKS:
        # the dim that keeps the smallest share first: the intermediate is smallest
        for dim, idx in sorted(cuts, key=lambda c: len(c[1]) / tensor.shape[c[0]]):
            tensor = tensor.index_select(dim, idx)
        return tensor.contiguous(memory_format=layout)
    shape = list(tensor.shape)
    runs = []  # per cut: (source start, destination start, length) of each run
    for (dim, idx), starts in zip(cuts, breaks):
        shape[dim] = len(idx)
        bounds = [0] + starts + [len(idx)]
        firsts = idx[bounds[:-1]].tolist()
        runs.append([(f, a, b - a) for f, a, b in zip(firsts, bounds, bounds[1:])])
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device, memory_format=layout)
    for combo in itertools.product(*runs):
        src, dst = tensor, out
        for (dim, _), (start, at, n) in zip(cuts, combo):
            src, dst = src.narrow(dim, start, n), dst.narrow(dim, at, n)
        dst.copy_(src)
    return out


def apply_kept(model: nn.Module, kept: dict[tuple[str, int], Any],
               shapes: dict[str, tuple[int, ...]],
               sizes: Optional[dict[str, dict[int, int]]] = None,
               splits: Optional[dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = None,
               counts: Optional[dict[str, list[int]]] = None) -> nn.Module:
    """Keep only ``kept[(param, dim)]`` indices of each listed dim; fix module attributes.

    ``shapes`` are the original shapes, checked against the model before anything changes.
    ``sizes[module]`` (old -> new) rewrites that module's int attributes holding a width its
    code passes as a number (``ChannelGraph.size_changes``); ``splits[module]`` (old sizes,
    new sizes) rewrites its list attributes equal to a split's old sizes, in order, first;
    ``counts[module]``: head counts its head-count attributes keep though a width of that
    value shrinks.
    """
    by_param: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (fqn, dim), idx in sorted(kept.items()):
        if len(idx) == 0:
            raise SurgeryError(f"removing these units leaves '{fqn}' with no channels along "
                               f"dim {dim}; keep at least one unit of its group")
        by_param.setdefault(fqn, []).append((dim, torch.as_tensor(idx, dtype=torch.long)))

    owners = _owners(model)
    swaps: list[_Swap] = []
    new_by_module: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    with torch.no_grad():
        for fqn, cuts in by_param.items():
            old = lookup_tensor(model, fqn)
            if tuple(old.shape) != tuple(shapes[fqn]):
                raise SurgeryError(f"'{fqn}' has shape {tuple(old.shape)} but was analysed with "
                                   f"{tuple(shapes[fqn])}; re-run analysis on this model")
            new = take(old.detach(), cuts)  # a copy: never shares ``old``'s memory
            holders = owners.get(id(old), [])
            value: torch.Tensor
            if isinstance(old, nn.Parameter):
                value = nn.Parameter(new, requires_grad=old.requires_grad)
                if old.grad is not None:
                    value.grad = take(old.grad, cuts)
            else:
                value = new
            for module, name, is_param in holders:
                swaps.append(_Swap(module, name, is_param, value))
                new_by_module.setdefault(id(module), (module, {}))[1][name] = value

    names = {id(m): n for n, m in model.named_modules()} if sizes else {}

    def stays(module: nn.Module) -> frozenset[int]:
        """Widths ``module``'s code passes (as the graph saw) that the plan keeps."""
        widths = sizes.get(names[id(module)], {}) if id(module) in names else {}
        return frozenset(old for old, now in widths.items() if old == now)

    attr_updates: list[tuple[nn.Module, str, Any]] = []
    for module, new in new_by_module.values():
        fixer = fixer_for(module)
        if fixer is None:
            attr_updates += _own_width_rewrites(model, module, new, stays(module))
            continue
        try:
            attrs = fixer(module, new)
        except Exception as exc:  # noqa: BLE001
            raise SurgeryError(f"could not update the attributes of {type(module).__name__}"
                               f": {exc}") from exc
        attr_updates.extend((module, k, v) for k, v in attrs.items())
    # what the graph saw the code pass as a number first: it says which width an attribute
    # is, where a container's children may have equal input and output widths
    attr_updates += _split_rewrites(model, splits or {}, attr_updates)
    attr_updates += _size_rewrites(model, sizes or {}, attr_updates, counts or {}, splits or {})
    attr_updates += _container_rewrites(model, attr_updates, {id(m) for m, _ in
                                                              new_by_module.values()}, stays)

    swaps += _score_scale_swaps(attr_updates, swaps)  # after the slices they scale: they win

    # Commit: nothing below can fail for a well-formed module.
    for s in swaps:
        (s.module._parameters if s.is_param else s.module._buffers)[s.name] = s.value
    for module, name, value in attr_updates:
        setattr(module, name, value)
    for module, _ in new_by_module.values():
        if isinstance(module, nn.RNNBase):  # its forward reads a list of the weights it holds
            module._init_flat_weights()
    return model
