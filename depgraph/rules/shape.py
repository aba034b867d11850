"""Rules that move channels around without computing on them: concat, split, views, permutes,
spatial ops (pooling, upsampling, padding), indexing.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import torch

from .elementwise import broadcast_maps
from .registry import RuleContext, node_outputs, register

aten = torch.ops.aten

__all__ = ["reshape_map"]


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# getitem(outs, i): out atoms = outs[i] atoms
@register(operator.getitem)
def getitem_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    src = inputs[0]
    index = node.args[1]
    if isinstance(src, (tuple, list)) and isinstance(index, int) and index < len(src):
        return (src[index],)
    if isinstance(src, tuple) and src and not isinstance(src[0], (tuple, list, type(None))):
        ctx.freeze(src, f"{ctx.where()} indexes a tensor with Python indexing")
    return (None,)


# cat(xs, dim): out atoms[dim] = xs[0] atoms ++ xs[1] atoms ++ ...; other dims unify. Parts
# empty along dim add nothing; a constant part adds new atoms, frozen, so the other parts stay
# prunable (RAFT's motion features ++ its 2 flow channels).
@register(aten.cat, aten.concat, aten.concatenate)
def cat_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    rank = len(ctx.out_shape())
    dim = _dim(ctx.arg("dim", default=0), rank)
    # empty parts add nothing (the legacy (0,) tensor, an encoder's 0-channel placeholder)
    tensors = [(n, m) for n, m in zip(node.args[0], inputs[0]) if ctx.shape(n) != (0,)
               and not (len(ctx.shape(n)) == rank and ctx.shape(n)[dim] == 0)]
    parts = [m[dim] if m is not None else None for _, m in tensors]
    # a part with no channels in any dim (a constant, a graph input) adds channels of its own,
    # frozen; a part with channels in other dims only (patch tokens beside a class token
    # parameter) means ``dim`` is no channel dim there
    constant = [m is None or all(a is None for a in m) for _, m in tensors]
    if all(p is None for p in parts):
        cat_atoms = None
    elif any(p is None and not c for p, c in zip(parts, constant)):
        ctx.freeze(parts, f"{ctx.where()} concatenates channels with a fixed-size tensor")
        cat_atoms = None
    else:
        for i, (n, p) in enumerate(zip(tensors, parts)):
            if p is None:
                parts[i] = ctx.atoms.new(ctx.shape(n[0])[dim])
                ctx.freeze(parts[i], f"{ctx.where()} concatenates them from a fixed-size "
                           "tensor (a graph input or constant)")
        cat_atoms = np.concatenate(parts)
    out = list(_unify_other_dims(ctx, tensors, dim, rank))
    out[dim] = cat_atoms
    return (tuple(out),)


# stack(xs, dim): a new dim of size len(xs); every other dim unifies across xs.
@register(aten.stack)
def stack_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    tensors = list(zip(node.args[0], inputs[0]))
    rank = len(ctx.out_shape())
    dim = _dim(ctx.arg("dim", default=0), rank)
    inner = _unify_other_dims(ctx, tensors, None, rank - 1)
    return (tuple(inner[:dim]) + (None,) + tuple(inner[dim:]),)


def _unify_other_dims(ctx: RuleContext, tensors: list, skip: Optional[int], rank: int) -> list:
    out: list = [None] * rank
    for d in range(rank):
        if d == skip:
            continue
        maps = [m[d] if m is not None else None for _, m in tensors]
        carriers = [a for a in maps if a is not None]
        if carriers and len(carriers) < len(maps):
            ctx.freeze(carriers, f"{ctx.where()} joins channels with a fixed-size tensor")
            continue
        for other in carriers[1:]:
            ctx.unify(carriers[0], other)
        out[d] = carriers[0] if carriers else None
    return out


# split(x, sizes, dim): out[i] atoms[dim] = x atoms[dim][offset_i : offset_i + size_i].
# Equal parts (chunk, split into equal sizes, unbind) also unify the same relative index across
# parts, so every part keeps the same width and the unchanged Python code splits correctly.
@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split,
          aten.unsafe_chunk, aten.tensor_split, aten.unbind, aten.unsafe_split_with_sizes)
def split_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    outs = node.meta["val"]
    in_shape = ctx.shape(node.args[0])
    rank = len(in_shape)
    packet = node.target.overloadpacket
    dim = _dim(ctx.arg("dim", default=0), rank)
    if x is None:
        return tuple(None for _ in outs)
    sizes = [int(t.shape[dim]) if packet != aten.unbind else 1 for t in outs]
    atoms = x[dim]
    results = []
    offset = 0
    for t, size in zip(outs, sizes):
        part = None if atoms is None else atoms[offset:offset + size]
        offset += size
        if packet == aten.unbind:
            results.append(tuple(m for i, m in enumerate(x) if i != dim))
        else:
            results.append(tuple(part if i == dim else m for i, m in enumerate(x)))
    if atoms is not None:
        if packet == aten.unbind:
            ctx.freeze(atoms, f"{ctx.where()} unbinds a channel dim into separate tensors")
        elif len(set(sizes)) == 1 and len(sizes) > 1:
            ctx.unify_parts(atoms[:sizes[0] * len(sizes)], len(sizes))
    if packet in _SIZED_SPLITS and atoms is not None:
        ctx.python_sizes([(size, r[dim]) for size, r in zip(sizes, results)])
        if len(sizes) > 1:
            ctx.python_split([r[dim] for r in results])
    return tuple(results)


# splits whose part sizes the code gives as numbers (chunk and unbind give a count)
_SIZED_SPLITS = (aten.split, aten.split_with_sizes, aten.unsafe_split,
                 aten.unsafe_split_with_sizes)


# slice(x, dim, start, end, step): the full range passes through; a strict sub-range of a
# channel dim has bounds baked into the code, so its atoms freeze, except one equal part
# (``x[L:2L]`` of a ``3L`` dim): code that computes such bounds from the width (Swin V2 zeroes
# the k third of its qkv bias: ``length = numel // 3``) keeps working when every part keeps
# one width, as for chunk; code that wrote the numbers in fails its check, and repair freezes.
@register(aten.slice)
def slice_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    in_shape = ctx.shape(node.args[0])
    dim = _dim(ctx.arg("dim", default=0), len(in_shape))
    if ctx.out_shape()[dim] == in_shape[dim]:
        return (x,)
    if x[dim] is not None:
        start, end, step = slice(ctx.arg("start"), ctx.arg("end"),
                                 ctx.arg("step", default=1)).indices(in_shape[dim])
        parts = _equal_part(in_shape[dim], start, end, step) if start > 0 else 0
        if parts:  # (a prefix keeps its own reading below: the rest may go for free)
            ctx.unify_parts(x[dim], parts)
            return (tuple(m[start:end] if i == dim else m for i, m in enumerate(x)),)
        # x[:, :end] keeps the same channels however many follow end: those are dropped (and
        # removable for free if nothing else reads them); the taken ones keep their indices
        taken = x[dim][:end] if start == 0 and step == 1 else x[dim]
        ctx.freeze(taken, f"{ctx.where()} takes channels by fixed index bounds")
        if len(taken) < len(x[dim]):
            ctx.dropped.append(x[dim][end:])
    return (tuple(None if i == dim else m for i, m in enumerate(x)),)


#: The most equal parts a slice is read as one of (q/k/v thirds, halves, gates' quarters).
_MAX_PARTS = 8


def _equal_part(size: int, start: int, end: int, step: int) -> int:
    """The count of equal parts of ``size`` of which ``[start:end]`` is one, else 0."""
    width = end - start
    if step != 1 or width <= 1 or size % width or start % width:
        return 0
    parts = size // width
    return parts if 2 <= parts <= _MAX_PARTS else 0


# select(x, dim, i): removes dim; selecting one channel freezes the channel dim.
@register(aten.select)
def select_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    dim = _dim(ctx.arg("dim", default=0), len(x))
    if x[dim] is not None:
        ctx.freeze(x[dim], f"{ctx.where()} picks one channel by a fixed index")
    return (tuple(m for i, m in enumerate(x) if i != dim),)


# index_select(x, dim, index): picks entries of dim by a tensor of indices (the top-k positions
# a detector keeps); picking channels pins them, as ``index`` does (a table's rows are no
# channels unless they flow on); every other dim passes through.
@register(aten.index_select)
def index_select_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, index = inputs[0], inputs[2]
    ctx.pin(index, f"{ctx.where()} uses channels as indices")
    if x is None:
        return (None,)
    dim = _dim(ctx.arg("dim"), len(x))
    if x[dim] is not None:
        ctx.pin(x[dim], f"{ctx.where()} picks channels by index")
    return (tuple(None if i == dim else m for i, m in enumerate(x)),)


def _index_layout(indices: list, rank: int) -> tuple[list[int], list[int], list[int]]:
    """Advanced indexing's layout (NumPy's rule) for ``x[indices]`` with ``x`` of ``rank``:
    the dims the indices cover (a boolean mask covers as many as it has), and the other dims
    that come before and after the indices' broadcast dims, which stand where the first
    indexed dim was when the indexed dims are adjacent, else in front."""
    covered: list[list[int]] = []  # the dims of x each index entry covers
    d = 0
    for idx in indices:
        val = idx.meta.get("val") if isinstance(idx, torch.fx.Node) else None
        span = val.dim() if val is not None and val.dtype == torch.bool else 1
        covered.append(list(range(d, d + span)) if idx is not None else [])
        d += span
    indexed = [dim for dims in covered for dim in dims]
    kept = [dim for dim in range(rank) if dim not in indexed]
    used = [i for i, idx in enumerate(indices) if idx is not None]
    adjacent = used == list(range(used[0], used[-1] + 1)) if used else True
    at = covered[used[0]][0] if used and adjacent else 0
    before = [dim for dim in kept if dim < at] if adjacent else []
    return indexed, before, [dim for dim in kept if dim not in before]


# index(x, [i0, None, i2, ...]): advanced indexing (``table[position_index]``, ``x[mask]``).
# Dims with an index are replaced by the indices' broadcast dims, placed where the first one
# was when the indexed dims are adjacent, else in front (NumPy's rule); the other dims pass
# through. Picking channels, or using channels as indices, pins them.
@register(aten.index)
def index_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, indices = inputs[0], list(node.args[1])
    ctx.pin(inputs[1], f"{ctx.where()} uses channels as indices")  # skips the None entries
    if x is None:
        return (None,)
    indexed, before, after = _index_layout(indices, len(x))
    rank = len(ctx.out_shape())
    new = rank - len(before) - len(after)  # dims the broadcast indices add
    for dim in indexed:
        if x[dim] is not None:  # pinned: a table's rows are no channels unless they flow on
            ctx.pin(x[dim], f"{ctx.where()} picks channels by index")
    out = [x[dim] for dim in before] + [None] * new + [x[dim] for dim in after]
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.out_shape()
    sizes = [in_shape[dim] for dim in before] + list(out_shape[len(before):len(before) + new]) \
        + [in_shape[dim] for dim in after]
    if new < 0 or tuple(sizes) != out_shape:  # a layout this rule does not know: fail closed
        ctx.freeze(x, f"{ctx.where()} indexes in a layout the index rule does not follow")
        return (None,)
    return (tuple(out),)


#: ops that make a tensor from sizes alone: one made to be filled takes what is written into it
_FACTORIES = (aten.zeros, aten.empty, aten.full, aten.ones, aten.new_zeros, aten.new_empty,
              aten.new_full, aten.new_ones)
_INDEX_PUTS = (aten.index_put, aten.index_put_, aten._unsafe_index_put)


def _made_to_fill(arg: Any) -> bool:
    """Whether ``arg`` is a tensor made from sizes alone (through earlier index_puts)."""
    while isinstance(arg, torch.fx.Node) and getattr(arg.target, "overloadpacket", None) \
            in _INDEX_PUTS:
        arg = arg.args[0]
    return isinstance(arg, torch.fx.Node) and \
        getattr(arg.target, "overloadpacket", None) in _FACTORIES


# index_put(x, [i0, None, ...], v): x[indices] = v. v broadcasts against x[indices], laid out as
# ``index`` lays it out; where both carry channels they unify. A tensor made from sizes to be
# filled (MultiScaleRoIAlign's zeros of its input's width, filled level by level) takes the
# channels written into it; any other fixed-size x freezes them (a width fixed in Python
# would break the pruned model, so it must not be pruned). The dims written by index, and
# indices or masks that carry channels, are pinned.
@register(*_INDEX_PUTS)
def index_put_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, values = inputs[0], inputs[2]
    indices = list(node.args[1])
    ctx.pin(inputs[1], f"{ctx.where()} uses channels as indices")
    in_shape = ctx.shape(node.args[0])
    rank = len(in_shape)
    out = list(x) if x is not None else [None] * rank
    vals = [i.meta.get("val") for i in indices if i is not None]
    if any(not isinstance(v, torch.Tensor) or v.dtype == torch.bool for v in vals) \
            or not isinstance(node.args[2], torch.fx.Node):
        ctx.freeze([x, values], f"{ctx.where()} writes by a mask or in a layout the index_put "
                                "rule does not follow")
        return (None,)
    indexed, before, after = _index_layout(indices, rank)
    for d in indexed:
        if out[d] is not None:
            ctx.pin(out[d], f"{ctx.where()} writes into channels by index")
            out[d] = None
    view = [(d, in_shape[d]) for d in before] + \
        [(None, int(s)) for s in torch.broadcast_shapes(*[v.shape for v in vals])] + \
        [(d, in_shape[d]) for d in after]
    v_shape = ctx.shape(node.args[2])
    v_map = values if values is not None else (None,) * len(v_shape)
    lead = len(view) - len(v_shape)
    if lead < 0:
        ctx.freeze([x, values], f"{ctx.where()} writes in a layout the index_put rule does not "
                                "follow")
        return (None,)
    fill = _made_to_fill(node.args[0])
    for k, (d, size) in enumerate(view[lead:]):
        v_atoms = v_map[k]
        if d is None or v_shape[k] != size:  # index positions, or broadcast from 1
            if v_atoms is not None:
                ctx.freeze(v_atoms, f"{ctx.where()} writes channels where an index or a "
                                    "broadcast puts them")
            continue
        if v_atoms is not None and out[d] is not None:
            ctx.unify(out[d], v_atoms)
        elif v_atoms is not None:
            if fill:
                out[d] = v_atoms
            else:
                ctx.freeze(v_atoms, f"{ctx.where()} writes channels into a tensor of fixed "
                                    f"size {size}")
        elif out[d] is not None and size > 1:
            ctx.pin(out[d], f"{ctx.where()} writes a tensor of fixed size {size} into channels")
            out[d] = None
    return (tuple(out),)


# permute(x, order): out atoms[i] = x atoms[order[i]]
@register(aten.permute)
def permute_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    order = [_dim(d, len(x)) for d in ctx.arg("dims")]
    return (tuple(x[d] for d in order),)


# transpose(x, a, b) / t(x): swap two dims' atoms
@register(aten.transpose, aten.transpose_, aten.swapaxes, aten.swapdims, aten.t, aten.numpy_T)
def transpose_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    if len(x) < 2:
        return (x,)
    if node.target.overloadpacket in (aten.t, aten.numpy_T):
        a, b = 0, len(x) - 1
    else:
        a, b = _dim(ctx.arg("dim0", "axis0"), len(x)), _dim(ctx.arg("dim1", "axis1"), len(x))
    out = list(x)
    out[a], out[b] = out[b], out[a]
    return (tuple(out),)


# view/reshape/flatten/unflatten/squeeze/unsqueeze: see reshape_map.
@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
          aten.squeeze, aten.squeeze_, aten.unsqueeze, aten.unsqueeze_, aten.view_as,
          aten.reshape_as, aten.ravel)
def reshape_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    return (reshape_map(ctx, x, ctx.shape(node.args[0]), ctx.out_shape()),)


def _blocks(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``a`` and ``b`` with equal element counts."""
    blocks: list = []
    i = j = 0
    while i < len(a) and j < len(b):
        bi, bj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                bi.append(i)
                i += 1
            else:
                pb *= b[j]
                bj.append(j)
                j += 1
        blocks.append((bi, bj))
    if blocks:
        blocks[-1][0].extend(range(i, len(a)))
        blocks[-1][1].extend(range(j, len(b)))
    else:
        blocks.append((list(range(len(a))), list(range(len(b)))))
    return blocks


def reshape_map(ctx: RuleContext, x: tuple, in_shape: tuple, out_shape: tuple) -> tuple:
    """Atoms through a reshape.

    Dims are paired into blocks of equal element count. Within a block:
      merge (C, H, W) -> C*H*W:  out atoms = each channel atom repeated H*W times (flatten).
                                 When several merged dims carry atoms (a weight's (I, kh, kw)
                                 flattened for weight standardisation, heads x head width), the
                                 outermost carries them and the inner ones freeze: pruning an
                                 outer channel removes one contiguous run of the merged dim,
                                 which is what the pruned tensor's reshape gives.
      split C*H*W -> (C, H, W):  the inverse of a merge: the out dim whose index alone
                                 determines the atom carries it (outermost if several do).
      split C -> (G, C/G):       no dim does; the innermost dim of size > 1 carries the atoms and
                                 the same relative index is unified across the outer dims, so
                                 the number of groups or heads stays and their width shrinks
                                 (what code like ``x.view(b, groups, c // groups, h, w)`` expects).
                                 In a module of ``ctx.whole_heads`` the dim outside it (the
                                 heads) carries them instead: all channels of a head are one
                                 unit, the head width stays and the count shrinks (rotary
                                 tables and per-head norms fix the width).
    """
    out: list = [None] * len(out_shape)
    counts: list[int] = []  # dims a channel dim splits off that keep their size (heads)
    for bi, bj in _blocks(in_shape, out_shape):
        bearing = [d for d in bi if x[d] is not None]
        if not bearing:
            continue
        if [in_shape[d] for d in bi] == [out_shape[d] for d in bj] and len(bi) == len(bj):
            for di, dj in zip(bi, bj):
                out[dj] = x[di]
            continue
        # a dim of size 1 (a batch of one whose atom a parameter's broadcast gave it) carries
        # no channel that could go: the outermost wider dim carries, the rest are pinned
        k = next((d for d in bearing if in_shape[d] > 1), bearing[0])
        if len(bearing) > 1:
            ctx.pin([x[d] for d in bearing if d != k],
                    f"{ctx.where()} flattens this dim into an outer channel dim")
        total = int(np.prod([in_shape[d] for d in bi]))
        flat = np.arange(total, dtype=np.int64)
        stride_in = int(np.prod([in_shape[d] for d in bi if d > k]))
        atoms = x[k][(flat // stride_in) % in_shape[k]]
        carrier, position = _explaining_dim(atoms, flat, out_shape, bj)
        if carrier is None:
            sized = [d for d in bj if out_shape[d] > 1]
            # a head count equal to another of the view's sizes (2 heads of width 2, the 3
            # of q/k/v with 3 heads) is a number no rewrite by value can tell apart: widths
            heads = len(sized) > 1 and ctx.module() in ctx.whole_heads and \
                [out_shape[d] for d in sized].count(out_shape[sized[-2]]) == 1
            carrier = sized[-2] if heads else sized[-1] if sized else bj[-1]
            position = _position(flat, out_shape, bj, carrier)
            if len(sized) > 1:
                ctx.head_splits.append((ctx.module(), atoms))
        order = np.argsort(position, kind="stable")
        same = position[order][1:] == position[order][:-1]
        same &= atoms[order][1:] != atoms[order][:-1]
        if same.any():
            ctx.unify(atoms[order][:-1][same], atoms[order][1:][same])
        _, first = np.unique(position, return_index=True)  # first element of each position
        out[carrier] = atoms[first]
        counts += [d for d in bj if d != carrier and out_shape[d] > 1]
    # e.g. view(B, self.num_heads, self.head_dim, N): head_dim may follow a plan, num_heads not
    ctx.python_sizes([(out_shape[d], out[d]) for d in range(len(out_shape))
                      if out[d] is not None or d in counts])
    return tuple(out)


def _position(flat: np.ndarray, shape: tuple, block: list, dim: int) -> np.ndarray:
    """Index along ``dim`` of each element of a block of dims (flat, row-major)."""
    stride = int(np.prod([shape[d] for d in block if d > dim]))
    return (flat // stride) % shape[dim]


def _explaining_dim(atoms: np.ndarray, flat: np.ndarray, shape: tuple, block: list
                    ) -> tuple[Optional[int], Optional[np.ndarray]]:
    """The outermost dim of ``block`` whose index alone determines each element's atom, and
    that index per element; (None, None) when no dim does."""
    for d in block:
        position = _position(flat, shape, block, d)
        along = np.empty(shape[d], dtype=atoms.dtype)
        along[position] = atoms
        if np.array_equal(along[position], atoms):
            return d, position
    return None, None


# expand(x, sizes): a dim broadcast from 1 cannot carry channels, unless it holds a statistic
# over channels (``x.var(dims, keepdim=True)``) expanded back to as many: it carries those.
# expand_as(x, other) takes its sizes from other, whose channels it then carries
# (F.normalize expands the norm as x): the two broadcast as an elementwise op's operands do.
@register(aten.expand, aten.expand_as, aten.broadcast_to)
def expand_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if node.target.overloadpacket == aten.expand_as and inputs[1] is not None:
        shapes = [ctx.shape(node.args[0]), ctx.shape(node.args[1])]
        return (broadcast_maps(ctx, shapes, [x, inputs[1]], ctx.out_shape()),)
    if x is None:
        return (None,)
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.out_shape()
    out = list(broadcast_maps(ctx, [in_shape], [x], out_shape))
    lead = len(out_shape) - len(in_shape)
    for d, atoms in ctx.statistics.get(node.args[0].name, {}).items():
        if in_shape[d] == 1 and out_shape[d + lead] == len(atoms):  # a statistic, expanded
            out[d + lead] = atoms                                   # back over its atoms
    return (tuple(out),)


# repeat(x, reps): a channel dim tiled more than once cannot shrink independently: freeze.
@register(aten.repeat, aten.tile, aten.repeat_interleave)
def repeat_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    out_shape = ctx.out_shape()
    in_shape = ctx.shape(node.args[0])
    lead = len(out_shape) - len(in_shape)
    result = [None] * lead
    for d, m in enumerate(x):
        if m is not None and out_shape[d + lead] != in_shape[d]:
            ctx.freeze(m, f"{ctx.where()} repeats a channel dim")
            m = None
        result.append(m)
    return (tuple(result),)


# Spatial ops act on the trailing ``n`` dims; leading dims (batch, channels) pass through.
_SPATIAL = {
    aten.max_pool1d: 1, aten.max_pool2d: 2, aten.max_pool3d: 3, aten.avg_pool1d: 1,
    aten.avg_pool2d: 2, aten.avg_pool3d: 3, aten.adaptive_avg_pool1d: 1,
    aten.adaptive_avg_pool2d: 2, aten.adaptive_avg_pool3d: 3, aten.adaptive_max_pool1d: 1,
    aten.adaptive_max_pool2d: 2, aten.adaptive_max_pool3d: 3, aten.max_pool2d_with_indices: 2,
    aten.max_pool3d_with_indices: 3, aten._adaptive_avg_pool2d: 2,
    aten.upsample_nearest1d: 1, aten.upsample_nearest2d: 2, aten.upsample_nearest3d: 3,
    aten.upsample_linear1d: 1, aten.upsample_bilinear2d: 2, aten.upsample_bicubic2d: 2,
    aten.upsample_trilinear3d: 3, aten._upsample_nearest_exact2d: 2,
    aten._upsample_bilinear2d_aa: 2, aten.reflection_pad1d: 1, aten.reflection_pad2d: 2,
    aten.reflection_pad3d: 3, aten.replication_pad1d: 1, aten.replication_pad2d: 2,
    aten.replication_pad3d: 3,
}


# pool/upsample/pad(x): out atoms[:-n] = x atoms[:-n]; spatial dims carry no channels.
@register(*_SPATIAL)
def spatial_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    n = _SPATIAL[node.target.overloadpacket]
    keep = len(x) - n
    ctx.freeze(list(x[keep:]), f"{ctx.where()} treats this dim as spatial")
    out = tuple(x[:keep]) + (None,) * n
    return tuple(out if isinstance(v, torch.Tensor) else None for v in node_outputs(node))


# max_unpool(x, indices): indices say where in its own channel's plane each value goes: x's and
#   the indices' leading dims pair up (as broadcasting's do) and pass; spatial dims carry none.
@register(aten.max_unpool2d, aten.max_unpool3d)
def max_unpool_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    n = 2 if node.target.overloadpacket == aten.max_unpool2d else 3
    shapes = [ctx.shape(node.args[0]), ctx.shape(node.args[1])]
    maps = list(inputs[:2])
    for m in maps:
        if m is not None:
            ctx.freeze(list(m[-n:]), f"{ctx.where()} treats this dim as spatial")
    lead = [s[:-n] for s in shapes]
    if all(m is None for m in maps):
        return (None,)
    out = broadcast_maps(ctx, lead, [m[:-n] if m is not None else None for m in maps],
                         ctx.out_shape()[:-n])
    return (tuple(out) + (None,) * n,)


# grid_sample(x[N, C, *S], grid[N, *P, k]) -> [N, C, *P]: each channel is sampled on its own at
#   the grid's points. N pairs x's with the grid's (as broadcasting does; deformable attention
#   folds its heads into it), C passes, the output's positions are the grid's. The grid's last
#   dim holds coordinates and x's spatial dims are interpolated over: their atoms freeze.
@register(aten.grid_sampler, aten.grid_sampler_2d, aten.grid_sampler_3d)
def grid_sample_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, grid = inputs[0], inputs[1]
    x_shape, grid_shape = ctx.shape(node.args[0]), ctx.shape(node.args[1])
    if x is not None:
        ctx.freeze(list(x[2:]), f"{ctx.where()} samples this dim at the grid's points")
    if grid is not None:
        ctx.freeze(grid[-1], f"{ctx.where()} reads this dim as coordinates")
    if x is None and grid is None:
        return (None,)
    batch = broadcast_maps(ctx, [x_shape[:1], grid_shape[:1]],
                           [m[:1] if m is not None else None for m in (x, grid)],
                           ctx.out_shape()[:1])
    points = tuple(grid[1:-1]) if grid is not None else (None,) * (len(grid_shape) - 2)
    return (batch + (x[1] if x is not None else None,) + points,)


# x.unfold(dim, size, step): sliding windows along dim (HaloNet's key/value blocks): dim holds
#   the windows' starts and a new last dim their elements; other dims pass. Windows over a
#   channel dim overlap channels: those freeze.
@register(aten.unfold)
def sliding_windows_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    d = _dim(ctx.arg("dimension"), len(x))
    if x[d] is not None:
        ctx.freeze(x[d], f"{ctx.where()} takes sliding windows along this dim")
    return (tuple(None if i == d else m for i, m in enumerate(x)) + (None,),)


# roi_align/roi_pool(x[N, C, H, W], rois[K, 5], ...) -> [K, C, ph, pw] (torchvision; an
#   R-CNN's box head input): each channel is pooled on its own over each box; the boxes' dim
#   holds coordinates and x's spatial dims are interpolated over: their atoms freeze.
@register("torchvision::roi_align", "torchvision::roi_pool")
def roi_pool_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, rois = inputs[0], inputs[1]
    ctx.freeze(rois, f"{ctx.where()} reads this tensor as boxes")
    if x is None:
        return tuple(None for _ in node_outputs(node))
    ctx.freeze(list(x[2:]), f"{ctx.where()} pools this dim over each box")
    out = (None, x[1]) + (None,) * (len(x) - 2)
    # roi_pool also returns the argmax positions, shaped as the pooled values
    return tuple(out if isinstance(v, torch.Tensor) else None for v in node_outputs(node))


# unfold / im2col(x[N, C, H, W], k) -> [N, C*kh*kw, L]: out channels c*kh*kw .. c*kh*kw+kh*kw-1
#   are channel c's patch: each in atom repeated kh*kw times (as flatten does); L carries none.
@register(aten.im2col)
def im2col_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    patch = int(np.prod(ctx.arg("kernel_size")))
    ctx.freeze(list(x[-2:]), f"{ctx.where()} treats this dim as spatial")
    channels = np.repeat(x[-3], patch) if x[-3] is not None else None
    return (tuple(x[:-3]) + (channels, None),)


# fold / col2im(x[N, C*kh*kw, L], size, k) -> [N, C, H, W]: the inverse of im2col: each block of
#   kh*kw atoms is one out channel's patch, so they unify and are the out atom (as pixel_shuffle).
@register(aten.col2im)
def col2im_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    patch = int(np.prod(ctx.arg("kernel_size")))
    ctx.freeze(x[-1], f"{ctx.where()} treats this dim as spatial")
    if x[-2] is None:
        return (tuple(x[:-2]) + (None, None, None),)
    return (tuple(x[:-2]) + (_merged_blocks(ctx, x[-2], patch), None, None),)


# channel_shuffle(x[N, C, ...], g): out channel j*g + i is in channel i*(C/g) + j, i.e.
#   view(N, g, C/g) -> transpose -> view(N, C): the g groups keep one width (the same relative
#   index unifies across them) and the out atoms are the groups interleaved.
@register(aten.channel_shuffle, aten.native_channel_shuffle)
def channel_shuffle_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None or x[1] is None:
        return (x,)
    groups = int(ctx.arg("groups"))
    ctx.unify_parts(x[1], groups)
    return (tuple(x[:1]) + (x[1].reshape(groups, -1).T.reshape(-1).copy(),) + tuple(x[2:]),)


# pixel_shuffle(x[N, C*r*r, H, W], r) -> [N, C, H*r, W*r]: out channel c is made of in channels
#   c*r*r .. c*r*r + r*r - 1 (they become its r x r spatial block), so those r*r atoms unify
#   and are the out atom: the producer prunes in blocks of r*r.
@register(aten.pixel_shuffle)
def pixel_shuffle_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None or x[-3] is None:
        return (None,) if x is None else (tuple(x[:-3]) + (None, None, None),)
    r2 = int(ctx.arg("upscale_factor")) ** 2
    ctx.freeze(list(x[-2:]), f"{ctx.where()} treats this dim as spatial")
    return (tuple(x[:-3]) + (_merged_blocks(ctx, x[-3], r2), None, None),)


def _merged_blocks(ctx: RuleContext, atoms: np.ndarray, size: int) -> np.ndarray:
    """Channels that become one out channel in consecutive blocks of ``size`` (pixel shuffle,
    fold): each block's atoms unify; one atom per block."""
    blocks = atoms.reshape(-1, size)
    for k in range(1, size):
        ctx.unify(blocks[:, 0], blocks[:, k])
    return blocks[:, 0].copy()


# pixel_unshuffle(x[N, C, H, W], r) -> [N, C*r*r, H/r, W/r]: out channels c*r*r .. c*r*r + r*r - 1
#   all come from in channel c: out atoms = each in atom repeated r*r times (as flatten does).
@register(aten.pixel_unshuffle)
def pixel_unshuffle_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None or x[-3] is None:
        return (None,) if x is None else (tuple(x[:-3]) + (None, None, None),)
    r2 = int(ctx.arg("downscale_factor")) ** 2
    ctx.freeze(list(x[-2:]), f"{ctx.where()} treats this dim as spatial")
    return (tuple(x[:-3]) + (np.repeat(x[-3], r2), None, None),)


# pad(x, pad): pads the trailing len(pad)//2 dims; padding a channel dim freezes it.
@register(aten.constant_pad_nd, aten.pad)
def pad_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    pads = list(ctx.arg("pad"))
    out = list(x)
    for i in range(len(pads) // 2):
        d = len(x) - 1 - i
        if (pads[2 * i] or pads[2 * i + 1]) and out[d] is not None:
            ctx.freeze(out[d], f"{ctx.where()} pads a channel dim")
            out[d] = None
    return (tuple(out),)

