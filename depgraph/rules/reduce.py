"""Reductions and ops that mix values along one dim (softmax, cumsum).

Channel identities:
    mean/var/std(x, dims):  reduced channel dims are normalisation statistics: inexact;
                            kept dims pass through, reduced dims vanish (or become size 1,
                            remembered as a statistic of those atoms: ``expand`` back to as
                            many elements carries them again, see shape.expand_rule).
    sum/norm(x, dims):      a channel that is zero adds nothing to a sum or a p-norm (p > 0):
                            the pruned model's sum is the masked original's when verification
                            zeroes those channels where they are made, as for attention's q.k
                            (contracted). F.normalize over channels (cosine attention, SSD's
                            L2Norm, an embedding head) prunes exactly so.
    amax/prod/...(x, dims): a zero can change a max, a product, a logsumexp: the atoms freeze.
    softmax(x, dim):        mixes along dim: its atoms freeze; every dim passes through.
"""

from __future__ import annotations

import torch

from .registry import RuleContext, node_outputs, register

aten = torch.ops.aten

_STATISTICS = [aten.mean, aten.var, aten.std, aten.var_mean, aten.std_mean]
#: a channel that is zero adds nothing to these (norms: for p > 0)
_ADDITIVE = frozenset({aten.sum, aten.nansum, aten.norm, aten.linalg_vector_norm})
_MIXING_REDUCTIONS = [
    aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.prod, aten.argmax, aten.argmin,
    aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.any, aten.all, aten.nansum,
    aten.median, aten.mode, aten.aminmax,
]


def _reduced_dims(ctx: RuleContext, node, rank: int) -> list[int]:
    dims = ctx.arg("dim")  # by name: norm(x, p, dim) and mean(x, dim) differ in position
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) \
            or not isinstance(dims, (int, list, tuple)):
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims)


def _adds_zero(ctx: RuleContext, node) -> bool:
    """Whether a zero element leaves this reduction's value as it is (see ``_ADDITIVE``)."""
    packet = node.target.overloadpacket
    if packet not in _ADDITIVE:
        return False
    if packet in (aten.sum, aten.nansum):
        return True
    p = ctx.arg("ord" if packet == aten.linalg_vector_norm else "p", default=2)
    return p is None or (isinstance(p, (int, float)) and p > 0)


# reduce(x, dims): see the module docstring.
@register(*_STATISTICS, *_MIXING_REDUCTIONS)
def reduction_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    outs = node_outputs(node)
    if x is None:
        return (None,) * len(outs)
    rank = len(x)
    reduced = _reduced_dims(ctx, node, rank) if rank else []
    channel = [x[d] for d in reduced if x[d] is not None]
    if channel:
        if node.target.overloadpacket in _STATISTICS:
            ctx.mark_inexact(channel, f"{ctx.where()} takes statistics over channels")
        elif _adds_zero(ctx, node):
            for atoms in channel:
                ctx.mark_contracted(atoms)
        else:
            ctx.freeze(channel, f"{ctx.where()} reduces over channels")
    keepdim = isinstance(outs[0], torch.Tensor) and len(outs[0].shape) == rank
    out = tuple(None if d in reduced else m for d, m in enumerate(x) if keepdim or d not in reduced)
    if keepdim and len(outs) == 1 and node.target.overloadpacket in _STATISTICS:
        held = {d: x[d] for d in reduced if x[d] is not None}
        if held:
            ctx.statistics[node.name] = held
    return (out,) * len(outs)


# softmax/cumsum(x, dim): values mix along dim; frozen there, everything passes through.
@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum,
          aten.cumprod, aten.cummax, aten.cummin, aten.special_softmax, aten.sort, aten.topk,
          aten.flip, aten.roll, aten.logcumsumexp)
def mixing_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x = inputs[0]
    outs = node_outputs(node)
    if x is None:
        return (None,) * len(outs)
    packet = node.target.overloadpacket
    if packet == aten.topk:
        dim = ctx.arg("dim", default=-1)
    elif packet in (aten.flip, aten.roll):
        dims = ctx.arg("dims")
        dims = [dims] if isinstance(dims, int) else list(dims or range(len(x)))
        ctx.freeze([x[d % len(x)] for d in dims], f"{ctx.where()} reorders this dim")
        return (x,)
    else:
        dim = ctx.arg("dim", default=-1)
    d = dim % len(x) if len(x) else 0
    if len(x) and x[d] is not None:
        ctx.freeze(x[d], f"{ctx.where()} mixes values along channels")
    if isinstance(outs[0], torch.Tensor) and tuple(outs[0].shape) != ctx.shape(node.args[0]):
        x = tuple(None if i == d else m for i, m in enumerate(x))
    return (x,) * len(outs)
