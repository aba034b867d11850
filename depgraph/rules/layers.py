"""Rules for ops with weights: convolution, linear, matmul, attention, einsum, and the norms.

Each rule unifies the input's channel atoms with the weight dim that reads them (and tells the
context that this dim is a *consumer*, which verification zeroes), returns the weight dim that
writes the output channels, and records a :class:`LayerUse` for reports and the cost model.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .elementwise import broadcast_maps
from .modules import KEEPS_SCORE_SCALE
from .registry import LayerUse, RuleContext, register

aten = torch.ops.aten

_NO_SOURCE = "reads a tensor whose channels are fixed (a graph input or constant)"


def _record(ctx: RuleContext, kind: str, weight, in_dim: Optional[int], out_dim: Optional[int],
            macs: int, atoms: Optional[tuple] = None) -> None:
    """Record a layer call; ``atoms``: the channel atoms its cost scales with, where no weight
    dim says so (activation-by-activation products)."""
    ctx.layers.append(LayerUse(ctx.node.name, kind, ctx.param(weight), in_dim, out_dim,
                               ctx.module(), int(macs)))
    if atoms is not None:
        ctx.layer_atoms[len(ctx.layers) - 1] = atoms


def _conv_args(node) -> tuple[bool, int]:
    """(transposed, groups) for every convolution overload."""
    packet = node.target.overloadpacket
    args = node.args
    if packet in (aten.convolution, aten._convolution):
        return bool(args[6]), int(args[8])
    if packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d):
        return True, int(args[6]) if len(args) > 6 else int(node.kwargs.get("groups", 1))
    return False, int(args[6]) if len(args) > 6 else int(node.kwargs.get("groups", 1))


# conv(x, W[O, I/g, k...], b[O]):
#   groups == 1:        x atoms[C] == W atoms[1];             out atoms[C] = W atoms[0]
#   depthwise (I/g==1): x atom[c] == W atoms[0][c*m:(c+1)*m];  out atoms[C] = W atoms[0]
#                       (whole groups are pruned; ``groups`` shrinks with them)
#   grouped:            x atom[j + k*I/g] == W atoms[1][j] for every group k, and W atoms[0][j]
#                       is unified across groups (each group keeps the same width).
# conv_transpose(x, W[I, O/g, k...]): the roles of W's dims 0 and 1 swap.
@register(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution,
          aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, w, b = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    transposed, groups = _conv_args(node)
    x_shape, w_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node.args[1]), ctx.out_shape()
    ch = 1 if len(x_shape) == len(w_shape) else 0
    xc = x[ch] if x is not None else None
    w = w if w is not None else (None,) * len(w_shape)
    if x is not None:
        ctx.freeze([m for i, m in enumerate(x) if i != ch], f"{ctx.where()} convolves over this dim")
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    w_in, w_out = w[in_dim], w[out_dim]
    if all(m is None for m in w):  # a weight built in forward: its sizes are fixed
        ctx.freeze(xc, f"{ctx.where()} uses a constant weight of fixed size")
        out_atoms = None
    elif transposed:
        out_atoms = _conv_transpose(ctx, xc, w_in, w_out, groups)
    else:
        out_atoms = _conv_forward(ctx, xc, w_in, w_out, groups, w_shape)
    if b is not None and b[0] is not None:
        ctx.unify(b[0], out_atoms) if out_atoms is not None else ctx.freeze(b, _NO_SOURCE)
    ctx.consumer(node.args[1], in_dim)
    macs = math.prod(out_shape) * math.prod(w_shape[1:]) if not transposed else \
        math.prod(x_shape) * math.prod(w_shape[1:])
    # a weight computed in forward (weight standardisation) names no parameter: its channel
    # dims say what the cost scales with
    computed = None if ctx.param(node.args[1]) else tuple(m for m in (w_out, w_in)
                                                            if m is not None)
    _record(ctx, "conv_transpose" if transposed else "conv", node.args[1], in_dim, out_dim, macs,
            atoms=computed or None)
    out = [None] * len(out_shape)
    out[ch] = out_atoms
    return (tuple(out),)


def _conv_forward(ctx: RuleContext, xc, w_in, w_out, groups: int, w_shape: tuple):
    if groups == 1:
        if xc is None:
            ctx.freeze(w_in, f"{ctx.where()} {_NO_SOURCE}")
        else:
            ctx.unify(xc, w_in)
        return w_out
    per_group_in, out_channels = w_shape[1], w_shape[0]
    if per_group_in == 1:  # depthwise (with channel multiplier m)
        m = out_channels // groups
        if xc is None:
            ctx.freeze(w_out, f"{ctx.where()} is depthwise over a fixed-size input")
        else:
            ctx.unify(np.repeat(xc, m), w_out)
        return w_out
    ctx.unify_parts(w_out, groups)
    if xc is None:
        ctx.freeze(w_in, f"{ctx.where()} {_NO_SOURCE}")
    else:
        for part in xc.reshape(groups, per_group_in):
            ctx.unify(part, w_in)
    return w_out


def _conv_transpose(ctx: RuleContext, xc, w_in, w_out, groups: int):
    if xc is None:
        ctx.freeze(w_in, f"{ctx.where()} {_NO_SOURCE}")
    else:
        ctx.unify(xc, w_in)
    if groups > 1:
        ctx.unify_parts(w_in, groups)
        return np.tile(w_out, groups) if w_out is not None else None
    return w_out


# deform_conv2d(x, W[O, I/g, kh, kw], offset, mask, b, ..., groups, offset_groups): a conv that
#   samples x at learned offsets (torchvision.ops.DeformConv2d). x, W and b as conv's; offset and
#   mask hold 2 x or 1 x offset_groups x kh x kw positions, fixed: frozen. Each offset group
#   reads an equal share of x's channels, so the shares unify by relative index (as groups do).
@register("torchvision::deform_conv2d")
def deform_conv_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, w, offset, mask, b = inputs[:5]
    w_shape, out_shape = ctx.shape(node.args[1]), ctx.out_shape()
    for positions in (offset, mask):
        ctx.freeze(positions, f"{ctx.where()} reads this tensor as sampling positions")
    xc = x[1] if x is not None else None
    if x is not None:
        ctx.freeze(list(x[2:]), f"{ctx.where()} convolves over this dim")
    ctx.unify_parts(xc, int(ctx.arg("offset_groups")))
    if w is None or all(m is None for m in w):
        ctx.freeze(xc, f"{ctx.where()} uses a constant weight of fixed size")
        out_atoms = None
    else:
        out_atoms = _conv_forward(ctx, xc, w[1], w[0], int(ctx.arg("groups")), w_shape)
    if b is not None and b[0] is not None:
        ctx.unify(b[0], out_atoms) if out_atoms is not None else ctx.freeze(b, _NO_SOURCE)
    ctx.consumer(node.args[1], 1)
    _record(ctx, "conv", node.args[1], 1, 0, math.prod(out_shape) * math.prod(w_shape[1:]))
    out = [None] * len(out_shape)
    out[1] = out_atoms
    return (tuple(out),)


# embedding(W[V, D], indices[...]) -> [..., D]: out atoms[-1] = W atoms[1]. The vocabulary rows
#   (W atoms[0]) are picked by the input's values: never pruned. A head tied to W reads the
#   same atoms on its input columns.
@register(aten.embedding)
def embedding_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    w = inputs[0]
    rank = len(ctx.shape(node.args[1]))
    if w is None:
        return (None,)
    ctx.freeze(w[0], f"{ctx.where()}: its rows are picked by the input's indices")
    return ((None,) * rank + (w[1],),)


# linear(x[..., I], W[O, I], b[O]): x atoms[-1] == W atoms[1]; out atoms[-1] = W atoms[0] == b.
@register(aten.linear)
def linear_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    w_shape = ctx.shape(node.args[1])
    w = w if w is not None else (None,) * len(w_shape)
    if x is None or x[-1] is None:
        ctx.freeze(w[1], f"{ctx.where()} {_NO_SOURCE}")
    elif w[1] is None:
        ctx.freeze(x[-1], f"{ctx.where()} uses a constant weight of fixed size")
    else:
        ctx.unify(x[-1], w[1])
    if b is not None and b[0] is not None:
        ctx.unify(b[0], w[0])
    ctx.consumer(node.args[1], 1)
    out_shape = ctx.out_shape()
    lead = tuple(x[:-1]) if x is not None else (None,) * (len(out_shape) - 1)
    # a linear over another dim than the channels (token mixing: x[B, C, N] @ W[N, N]) costs
    # in proportion to the channels it is applied to as well as to its weight's widths; so
    # does one whose weight is computed (cross-attention's k/v rows split from in_proj_weight),
    # which names no parameter whose dims would say it
    batch = [m for m in lead if m is not None]
    atoms = tuple(m for m in (*batch, w[0], w[1]) if m is not None) \
        if batch or ctx.param(node.args[1]) is None else None
    _record(ctx, "linear", node.args[1], 1, 0, math.prod(out_shape) * w_shape[1], atoms=atoms)
    return (lead + (w[0],),)


def matmul_maps(ctx: RuleContext, a_node, a, b_node, b) -> tuple:
    """a[..., n, k] @ b[..., k, m]: a atoms[-1] == b atoms[-2]; batch dims broadcast."""
    a_shape, b_shape, out_shape = ctx.shape(a_node), ctx.shape(b_node), ctx.out_shape()
    a = a if a is not None else (None,) * len(a_shape)
    b = b if b is not None else (None,) * len(b_shape)
    a_vec, b_vec = len(a_shape) == 1, len(b_shape) == 1
    if a_vec:
        a, a_shape = (None,) + tuple(a), (1,) + a_shape
    if b_vec:
        b, b_shape = tuple(b) + (None,), b_shape + (1,)
    ka, kb = a[-1], b[-2]
    if ctx.param(a_node) is None and ctx.param(b_node) is None:
        ctx.attention.add(ctx.module() or "")
    if ka is not None and kb is not None:
        ctx.unify(ka, kb)
        if ctx.param(a_node) is None and ctx.param(b_node) is None:
            ctx.mark_contracted(ka)
    elif (ka is None) != (kb is None):
        ctx.freeze([ka, kb], f"{ctx.where()} contracts channels with a fixed-size dim")
    ctx.consumer(b_node, len(b_shape) - 2)
    ctx.consumer(a_node, len(a_shape) - 1)
    batch_shape = out_shape[:len(out_shape) - (0 if a_vec else 1) - (0 if b_vec else 1)]
    batch = broadcast_maps(ctx, [a_shape[:-2], b_shape[:-2]], [a[:-2], b[:-2]], batch_shape)
    out = tuple(batch) + (() if a_vec else (a[-2],)) + (() if b_vec else (b[-1],))
    weight = b_node if ctx.param(b_node) else a_node
    # cost = out_numel * k: scales with every channel dim of the output and the contracted one
    _record(ctx, "matmul", weight, None, None, math.prod(out_shape) * a_shape[-1],
            atoms=tuple(m for m in (ka, *out) if m is not None))
    return out


#: Ops whose FLOPs count even when no channel flows into them (a product of two activations
#: whose widths are fixed, such as attention over a window an unsupported op built): the
#: analysis runs their rules anyway, so the cost model holds their fixed cost.
COSTED_WITHOUT_CHANNELS = frozenset({aten.mm, aten.bmm, aten.matmul, aten.addmm, aten.baddbmm,
                                     aten.addbmm, aten.scaled_dot_product_attention,
                                     aten.einsum})


# mm/bmm/matmul(a, b): see matmul_maps.
@register(aten.mm, aten.bmm, aten.matmul)
def matmul_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    return (matmul_maps(ctx, node.args[0], inputs[0], node.args[1], inputs[1]),)


# addmm/baddbmm(c, a, b): matmul, then c broadcasts against the result.
@register(aten.addmm, aten.baddbmm, aten.addbmm)
def addmm_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    out = matmul_maps(ctx, node.args[1], inputs[1], node.args[2], inputs[2])
    c = inputs[0]
    shapes = [ctx.shape(node.args[0]), ctx.out_shape()]
    return (broadcast_maps(ctx, shapes, [c, out], ctx.out_shape()),)


# sdpa(q[..., L, E], k[..., S, E], v[..., S, Ev]): q atoms[-1] == k atoms[-1];
# out atoms = q atoms[:-1] ++ v atoms[-1]. The default 1/sqrt(E) scale depends on E: inexact,
# unless surgery keeps the unpruned scale for the module that runs it (KEEPS_SCORE_SCALE).
@register(aten.scaled_dot_product_attention)
def sdpa_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    q, k, v = inputs[0], inputs[1], inputs[2]
    ctx.attention.add(ctx.module() or "")
    shapes = [ctx.shape(n) for n in node.args[:3]]
    q, k, v = [m if m is not None else (None,) * len(s) for m, s in zip((q, k, v), shapes)]
    if (q[-1] is None) != (k[-1] is None):
        ctx.freeze([q[-1], k[-1]], f"{ctx.where()} contracts channels with a fixed-size dim")
    else:
        ctx.unify(q[-1], k[-1])
        ctx.mark_contracted(q[-1])
        if (ctx.arg("scale") is None and q[-1] is not None
                and ctx.module_type() not in KEEPS_SCORE_SCALE):
            ctx.mark_inexact(q[-1], f"{ctx.where()} scales scores by 1/sqrt(head width)")
    ctx.freeze([k[-2], v[-2]], f"{ctx.where()} attends over this dim")
    if len(inputs) > 3:  # a mask added to the scores: its dims are positions, not channels
        ctx.freeze(inputs[3], f"{ctx.where()} adds this attention mask to the scores")
    batch = broadcast_maps(ctx, [s[:-2] for s in shapes], [m[:-2] for m in (q, k, v)],
                           ctx.out_shape()[:-2])
    # cost: q @ k^T scales with E, (scores) @ v with Ev, both with the heads where they carry
    # channels (whole heads pruned); L and S are never channels here
    scores = math.prod(ctx.out_shape()[:-1]) * shapes[1][-2]
    heads = tuple(m for m in batch if m is not None)
    for width, atoms in ((shapes[0][-1], q[-1]), (shapes[2][-1], v[-1])):
        carried = heads + ((atoms,) if atoms is not None else ())
        _record(ctx, "matmul", None, None, None, scores * width, atoms=carried or None)
    return (tuple(batch) + (q[-2], v[-1]),)


# einsum(eq, [x, y, ...]): one letter names one dim. A letter's dims are unified across the
# operands and the output; a letter summed away with channels on it is contracted (masked like
# attention scores when no weight reads it). Cost: the product of every letter's size, scaled by
# the kept fraction of each letter that carries channels. Ellipsis and repeated letters within
# one operand (diagonals) freeze everything involved.
@register(aten.einsum)
def einsum_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    equation, operands = str(node.args[0]).replace(" ", ""), list(node.args[1])
    maps = list(inputs[1] or [None] * len(operands))
    shapes = [ctx.shape(n) for n in operands]
    maps = [m if m is not None else (None,) * len(s) for m, s in zip(maps, shapes)]
    lhs, arrow, rhs = equation.partition("->")
    specs = lhs.split(",")
    if not arrow:
        rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    if "." in equation or any(len(set(s)) != len(s) for s in specs) or \
            [len(s) for s in specs] != [len(s) for s in shapes]:
        ctx.freeze(maps, f"{ctx.where()}: einsum '{equation}' (ellipsis or diagonal) is not "
                         "supported")
        return (None,)
    letters: dict[str, list] = {}
    for spec, m, shape, operand in zip(specs, maps, shapes, operands):
        for d, c in enumerate(spec):
            letters.setdefault(c, []).append((m[d], shape[d], operand, d))
    atom_of: dict[str, Optional[np.ndarray]] = {}
    for c, uses in letters.items():
        wide = [u for u in uses if u[1] != 1]  # size-1 dims broadcast
        arrays = [u[0] for u in wide if u[0] is not None]
        if arrays and len(arrays) != len(wide):
            ctx.freeze(arrays, f"{ctx.where()} aligns channels with a fixed-size dim "
                               f"(einsum letter '{c}')")
        for a in arrays[1:]:
            ctx.unify(arrays[0], a)
        atom_of[c] = arrays[0] if arrays else None
        if c not in rhs and atom_of[c] is not None:
            for _, _, operand, d in wide:
                ctx.consumer(operand, d)
            if all(ctx.param(u[2]) is None for u in wide):
                ctx.mark_contracted(atom_of[c])
    if len(operands) > 1:
        weight = next((n for n in operands if ctx.param(n)), None)
        if weight is None:
            ctx.attention.add(ctx.module() or "")
        _record(ctx, "matmul", weight, None, None,
                math.prod(max(u[1] for u in uses) for uses in letters.values()),
                atoms=tuple(a for a in atom_of.values() if a is not None))
    return (tuple(atom_of.get(c) for c in rhs),)


def _per_channel_outputs(node, x: tuple, xc, ch: int) -> tuple:
    """Main output keeps x's atoms; 1-D per-channel side outputs (stats) carry the channel."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return (x,)
    out = []
    for v in val:
        if isinstance(v, torch.Tensor) and len(v.shape) == len(x):
            out.append(x)
        elif isinstance(v, torch.Tensor) and len(v.shape) == 1 and xc is not None \
                and v.shape[0] == len(xc):
            out.append((xc,))
        else:
            out.append(None)
    return tuple(out)


_BN_PARAMS = (1, 2, 3, 4)  # weight, bias, running_mean, running_var


# batch_norm/instance_norm(x, w, b, mean, var): x atoms[1] == w == b == mean == var (per channel).
# Statistics taken from the input (training=True, instance norm, no running stats) reduce over
# every other dim: channels there (a weight flattened for weight standardisation) are inexact.
@register(aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
          aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
          aten.instance_norm, aten.cudnn_batch_norm, aten.miopen_batch_norm)
def batch_norm_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    x_shape = ctx.shape(node.args[0])
    ch = 1 if len(x_shape) > 1 else 0
    xc = x[ch] if x is not None else None
    params = [inputs[i] for i in _BN_PARAMS if i < len(inputs) and inputs[i] is not None]
    for p in params:
        if xc is None:
            ctx.freeze(p, f"{ctx.where()} normalises a fixed-size input")
        else:
            ctx.unify(xc, p[0])
    batch_stats = node.target.overloadpacket == aten.instance_norm or \
        bool(ctx.arg("training", "use_input_stats", default=False))
    reduced = [m for i, m in enumerate(x or ()) if i != ch and m is not None]
    if batch_stats and reduced:
        ctx.mark_inexact(reduced, f"{ctx.where()} takes statistics over channels")
    _record(ctx, "batch_norm", node.args[1] if len(node.args) > 1 else None, None, 0,
            math.prod(x_shape))
    if x is None:
        return tuple(None for _ in _per_channel_outputs(node, (None,) * len(x_shape), None, ch))
    return _per_channel_outputs(node, x, xc, ch)


# group_norm(x, G, w, b): channels split into G groups that share statistics. With one channel
# per group it is per-channel (exact). Otherwise the same relative index is unified across groups
# (G stays, each group shrinks) and pruning changes the group statistics: inexact.
@register(aten.group_norm, aten.native_group_norm)
def group_norm_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    native = node.target.overloadpacket == aten.native_group_norm
    groups = int(ctx.arg("group", "num_groups"))
    w, b = (inputs[1], inputs[2]) if native else (inputs[2], inputs[3])
    x_shape = ctx.shape(node.args[0])
    xc = x[1] if x is not None else None
    for p in (w, b):
        if p is None:
            continue
        if xc is None:
            ctx.freeze(p, f"{ctx.where()} normalises a fixed-size input")
        else:
            ctx.unify(xc, p[0])
    if xc is not None and len(xc) != groups:
        ctx.unify_parts(xc, groups)
        ctx.mark_inexact(xc, f"{ctx.where()} normalises over groups of channels")
    _record(ctx, "group_norm", node.args[2 if not native else 1], None, 0, math.prod(x_shape))
    if native:
        return (x, None, None)
    return (x,)


# layer_norm(x, shape, w, b): normalises over the trailing len(shape) dims; w, b share their
# atoms. Pruning a normalised channel changes the statistics: inexact.
@register(aten.layer_norm, aten.native_layer_norm, aten.rms_norm)
def layer_norm_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    k = len(ctx.arg("normalized_shape"))
    x_shape = ctx.shape(node.args[0])
    params = [m for m in inputs[2:4] if isinstance(m, tuple)]
    for j in range(k):
        d = len(x_shape) - k + j
        xd = x[d] if x is not None else None
        for p in params:
            if xd is None:
                ctx.freeze(p[j], f"{ctx.where()} normalises a fixed-size dim")
            else:
                ctx.unify(xd, p[j])
        if xd is not None:
            ctx.mark_inexact(xd, f"{ctx.where()} normalises over channels")
    _record(ctx, "layer_norm", node.args[2] if len(node.args) > 2 else None, None, 0,
            math.prod(x_shape))
    if node.target.overloadpacket == aten.native_layer_norm:
        return (x, None, None)
    return (x,)
