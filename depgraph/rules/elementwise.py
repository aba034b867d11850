"""Elementwise families: pass-through (unary, activations) and broadcasting (add, mul, where).

Channel identities:
    unary(x):            out atoms = x atoms
    glu(x, dim):         out atoms[dim] = first half of x atoms[dim] == second half
    binary(a, b):        out atoms[d] = a atoms[d] == b atoms[d] (unified), right-aligned like
                         broadcasting; a channel dim met by a plain (constant) tensor of the same
                         size, or broadcast from size 1, is frozen.
"""

from __future__ import annotations


import torch

from .registry import RuleContext, node_outputs, register

aten = torch.ops.aten

__all__ = ["broadcast_maps"]

# Ops whose output equals their first tensor argument's channel layout.
UNARY = [
    aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.mish,
    aten.mish_, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.hardtanh,
    aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_, aten.selu, aten.selu_, aten.celu,
    aten.celu_, aten.softplus, aten.log_sigmoid, aten.exp, aten.exp_, aten.log, aten.log_,
    aten.sqrt, aten.rsqrt, aten.abs, aten.neg, aten.reciprocal, aten.square, aten.sin, aten.cos,
    aten.erf, aten.floor, aten.ceil, aten.round, aten.sign, aten.logit, aten.threshold,
    aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_min_, aten.clamp_max, aten.clamp_max_,
    aten.clip, aten.clip_, aten.dropout, aten.dropout_, aten.feature_dropout,
    aten.feature_dropout_, aten.alpha_dropout, aten.alpha_dropout_, aten.feature_alpha_dropout,
    aten.feature_alpha_dropout_, aten.native_dropout, aten.clone, aten.contiguous, aten.detach,
    aten.detach_, aten.alias, aten.lift_fresh_copy, aten.to, aten._to_copy, aten.type_as,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
    aten.randn_like, aten.fill, aten.fill_, aten.zero_, aten.nan_to_num, aten.isnan,
    aten.isinf, aten.logical_not, aten.bitwise_not, aten.silu_backward,
]

BINARY = [
    aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.mul, aten.mul_, aten.div,
    aten.div_, aten.pow, aten.pow_, aten.maximum, aten.minimum, aten.fmod, aten.remainder,
    aten.floor_divide, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_and,
    aten.logical_or, aten.bitwise_and, aten.bitwise_or, aten.where, aten.masked_fill,
    aten.masked_fill_, aten.lerp, aten.addcmul, aten.addcdiv, aten.copy_, aten.atan2,
    aten.hypot, aten.xlogy, aten.copysign,
]


# unary(x): out atoms = x atoms. Ops with a (dropout, mask) tuple output pass to element 0.
@register(*UNARY)
def pointwise_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0] if inputs and isinstance(inputs[0], tuple) else None
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(x if isinstance(v, torch.Tensor) and x is not None and len(v.shape) == len(x)
                     else None for v in val)
    if x is not None and len(ctx.out_shape()) != len(x):
        ctx.freeze(x, f"{ctx.where()} changes the tensor rank")
        return (None,)
    ctx.carry_statistic(node.args[0])
    return (x,)


# binary(a, b): out atoms[d] = unify(a[d], b[d]) after right-aligned broadcasting.
@register(*BINARY)
def broadcasting_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    if isinstance(node.meta.get("val"), (tuple, list)):  # where(cond) is nonzero(): indices
        ctx.freeze(inputs, f"{ctx.where()} turns values into indices")
        return tuple(None for _ in node_outputs(node))
    operands = [(arg, m) for arg, m in zip(node.args, inputs, strict=True)
                if isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)]
    if len(operands) == 1:  # with a number: a statistic stays one (std = var.add(eps))
        ctx.carry_statistic(operands[0][0])
    return (broadcast_maps(ctx, [ctx.shape(a) for a, _ in operands], [m for _, m in operands],
                           ctx.out_shape()),)


def broadcast_maps(ctx: RuleContext, shapes: list, maps: list, out_shape: tuple) -> tuple:
    """Right-align ``maps`` against ``out_shape``, unify equal-size channel dims, freeze the rest
    (a channel dim met by a fixed-size one of the same size: the result's dim is fixed)."""
    rank = len(out_shape)
    result: list = [None] * rank
    for d in range(rank):
        size = out_shape[d]
        carriers, plain = [], False
        for shape, amap in zip(shapes, maps):
            k = d - (rank - len(shape))
            if k < 0:
                continue
            atoms = amap[k] if amap is not None else None
            if shape[k] == size:
                if atoms is None:
                    plain = size > 1 or plain
                else:
                    carriers.append(atoms)
            elif atoms is not None:  # size 1 broadcast against a wider dim
                ctx.freeze(atoms, f"{ctx.where()} broadcasts a single channel over {size}")
        if not carriers:
            continue
        if plain:
            # pinned: reported only where they are channels (a rotary table's own dims,
            # multiplied into whole heads of a fixed width, are none)
            ctx.pin(carriers, f"{ctx.where()} combines channels with a tensor of fixed size "
                              f"{size} (an input or constant) along dim {d}")
            # the dim is fixed from here on: it carries no channels (None), not frozen ones
            # that a later op would take for channels (a relative-position table's head dim
            # added to the scores' head count, then merged with the head width by a view)
            continue
        for other in carriers[1:]:
            ctx.unify(carriers[0], other)
        result[d] = carriers[0]
    return tuple(result)


# glu(x, dim): the halves a, b of dim give a * sigmoid(b): out atom i is a's i, unified with b's i.
@register(aten.glu)
def glu_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    if x is None:
        return (None,)
    d = ctx.arg("dim", default=-1) % len(x)
    half = ctx.out_shape()[d]
    if x[d] is not None:
        ctx.unify(x[d][:half], x[d][half:])
    return (tuple(x[:d]) + (None if x[d] is None else x[d][:half],) + tuple(x[d + 1:]),)


# prelu(x, w): w has one slope per channel (dim 1 of x) or a single shared slope.
@register(aten.prelu, aten._prelu_kernel)
def prelu_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, w = inputs[0], inputs[1]
    if x is None:
        return (None,)
    ch = 1 if len(x) > 1 else 0
    if w is not None and w[0] is not None and len(w[0]) == ctx.shape(node.args[0])[ch]:
        if x[ch] is None:
            ctx.freeze(w, f"{ctx.where()} has per-channel slopes on a fixed-size input")
        else:
            ctx.unify(x[ch], w[0])
    return (x,)


# new_full(x, size, ...), x.size(), x.item(): x supplies only dtype, device or a scalar;
# no channel flows to the result and none is constrained.
@register(aten.new_full, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_empty_strided,
          aten.sym_size, aten.sym_numel, aten.sym_stride, aten.size, aten.numel, aten.dim,
          aten.item, aten._local_scalar_dense, aten._assert_tensor_metadata)
def metadata_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    return tuple(None for _ in node_outputs(node))
