"""Channels that only training reads: the train-mode graph's couplings, added to the eval one.

Some models run layers in train mode that inference skips: GoogLeNet's and Inception's
auxiliary classifiers, RT-DETR's score heads on every decoder layer but the last, YOLOv10's
one-to-many head. The eval capture never sees those layers, so a width they read shrinks
without them and the pruned model no longer trains (repair then froze the whole width:
5,120 channels of RT-DETR's decoder). Capturing the model once more in train mode and
analysing that graph gives the couplings training adds; :func:`with_train_path` folds them
into the eval graph position by position, so the train-only layers are pruned with the widths
they read. What the eval graph says (its layers and FLOPs, outputs, verification points,
widths held in Python) stays as it was: training only ties units together, adds the slices of
layers inference does not run, and freezes what it cannot change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .graph import ChannelGraph, Group

__all__ = ["TrainPath", "with_train_path", "layer_owners"]

#: Op names (besides the ops whose rules record layers) that count as a layer's in
#: :func:`layer_owners`: eager dispatch runs fused or decomposed forms a trace may not
#: (``_scaled_dot_product_flash_attention_for_cpu``, ``_fused_rms_norm``); erring towards
#: counting keeps the capture that decides.
_LAYER_WORDS = ("conv", "linear", "mm", "norm", "embedding", "scaled_dot_product", "einsum")


#: Ops that copy a parameter without changing what it holds (casts, clones).
_COPIES = ("_to_copy", "clone", "contiguous", "detach", "lift_fresh", "to")


def layer_owners(model: nn.Module, run: Callable[[], Any]) -> set[str]:
    """Names of the modules of ``model`` that an analysis of ``run()`` would find layers in:
    those inside whose forward (innermost) a layer op runs (conv, linear, matmul, attention,
    a norm, an embedding lookup), and the owners of parameters such an op reads directly.

    One eager run, watched at dispatch: a second of a large model where a capture in train
    mode takes several. ``prune()`` asks it before capturing the train mode, to decline
    when a parameter inference never reads is read by no layer of training either
    (RT-DETR's denoising embedding). Modules are told by their calls, so one called by
    ``module.forward(x)`` rather than ``module(x)`` is missed, as a trace's module stack
    misses it too.
    """
    from .rules import lookup

    names = {m: n for n, m in model.named_modules()}
    params = {id(p): n.rpartition(".")[0] for n, p in model.named_parameters()}
    stack: list[str] = []
    owners: set[str] = set()

    def is_layer(func: Any) -> bool:  # the rule table's layer ops, or a name that says so
        rule = lookup(func)
        return (rule is not None and rule.__module__.endswith("rules.layers")) or any(
            w in func.overloadpacket.__name__ for w in _LAYER_WORDS)

    # views and copies of a parameter (``weight.t()`` inside ``F.linear``, ``w.to(dtype)``)
    # read it as directly as the parameter: id -> (owner, the tensor, kept alive so that its
    # id is not reused)
    derived: dict[int, tuple[str, Any]] = {}

    def owner(a: Any) -> Any:
        return params.get(id(a)) or (derived[id(a)][0] if id(a) in derived else None)

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            read = [o for o in map(owner, args) if o is not None]
            if is_layer(func):
                if stack:
                    owners.add(stack[-1])
                owners.update(read)
            elif read and isinstance(out, torch.Tensor) and (
                    func.is_view or func.overloadpacket.__name__ in _COPIES):
                derived[id(out)] = (read[0], out)
            return out

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names.get(module, "?"))

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        with Watch(), torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return owners


@dataclasses.dataclass
class TrainPath:
    """The eval graph with training's couplings (``graph``), and what they did."""

    graph: ChannelGraph
    layers: list[str]  # modules only training runs whose channels now follow the plan
    tied: int  # eval units merged because training reads them as one channel
    frozen: dict[str, int]  # reason -> channels frozen because training fixes them


def with_train_path(graph: ChannelGraph, train: ChannelGraph) -> TrainPath:
    """``graph`` (of the eval capture) with the couplings of ``train`` (the same model's
    train-mode capture) added.

    For each parameter dim both graphs index, channel ``i`` of a train unit and channel ``i``
    of an eval unit are one channel: the eval units one train unit touches are merged. Where
    the train graph fixes a channel that the eval graph prunes, or ties it to one the eval
    graph fixes, that eval unit's group is frozen (training needs the width). Parameter dims
    only the train graph has (layers inference skips) take the eval unit of their train unit;
    a train unit that touches no eval channel (an auxiliary head's own hidden width) stays
    fixed.
    """
    n = len(graph.units)
    pairs: list[np.ndarray] = []  # (train unit, eval unit) of every position both prune
    fixed_by_train: dict[str, set[int]] = {}  # reason -> eval units training fixes
    tainted: set[int] = set()  # train units reaching a channel the eval graph fixes
    for key, t_ids in train.unit_index.items():
        e_ids = graph.unit_index.get(key)
        if e_ids is None or len(e_ids) != len(t_ids):
            continue
        both = (t_ids >= 0) & (e_ids >= 0)
        pairs.append(np.stack([t_ids[both], e_ids[both]], axis=1))
        tainted.update(np.unique(t_ids[(t_ids >= 0) & (e_ids < 0)]).tolist())
        lost = np.unique(e_ids[(t_ids < 0) & (e_ids >= 0)])
        if len(lost):
            fixed_by_train.setdefault(_reason(train, key), set()).update(lost.tolist())
    pair_arr = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    # every train unit's eval units, as one representative and the ties to it
    rep = np.full(len(train.units) + 1, -1, dtype=np.int64)  # last slot: -1 -> -1
    ties: list[tuple[int, int]] = []
    if len(pair_arr):
        order = np.lexsort((pair_arr[:, 1], pair_arr[:, 0]))
        pair_arr = pair_arr[order]
        starts = np.r_[0, np.nonzero(np.diff(pair_arr[:, 0]))[0] + 1]
        rep[pair_arr[starts, 0]] = pair_arr[starts, 1]
        first = rep[pair_arr[:, 0]]
        differ = first != pair_arr[:, 1]
        ties = sorted(set(zip(first[differ].tolist(), pair_arr[differ, 1].tolist())))
    for t in tainted:
        if rep[t] >= 0:
            fixed_by_train.setdefault("training reads these channels together with channels "
                                      "inference keeps fixed", set()).add(int(rep[t]))
    # parameter dims only training has: the eval unit of each train unit
    unit_index = dict(graph.unit_index)
    param_shapes = dict(graph.param_shapes)
    consumers = set(graph.consumers)
    dims_of: dict[int, list[tuple[str, int, int]]] = {}
    layers: dict[str, None] = {}
    for key, t_ids in train.unit_index.items():
        if key in graph.unit_index:
            continue
        ids = rep[t_ids]
        if not (ids >= 0).any():
            continue
        unit_index[key] = ids
        param_shapes[key[0]] = train.param_shapes[key[0]]
        if key in train.consumers:
            consumers.add(key)
        layers.setdefault(key[0].rpartition(".")[0], None)
        for g in {graph.units[u].group for u in np.unique(ids[ids >= 0]).tolist()}:
            dims_of.setdefault(g, []).append((key[0], key[1], len(ids)))
    groups = [Group(g.id, g.units, g.dims + tuple(dims_of.get(g.id, ())), g.frozen)
              for g in graph.groups]
    extended = dataclasses.replace(graph, groups=groups, unit_index=unit_index,
                                   param_shapes=param_shapes, consumers=consumers,
                                   notes=list(graph.notes))
    if ties:
        merged, mapping = extended.with_merged(ties)
    else:
        merged, mapping = extended, np.append(np.arange(n, dtype=np.int64), -1)
    reasons: dict[int, str] = {}
    frozen: dict[str, int] = {}
    for why, units in fixed_by_train.items():
        for u in units:
            g = int(merged.units[int(mapping[u])].group)
            reasons.setdefault(g, f"training needs this width: {why}")
    if reasons:
        members = {g: np.asarray(merged.groups[g].units) for g in reasons}
        for g, why in reasons.items():
            frozen[why] = frozen.get(why, 0) + sum(
                int(np.isin(ids, members[g]).sum()) for ids in merged.unit_index.values())
        merged = merged.without_groups(reasons)
    return TrainPath(merged, list(layers), len(ties), frozen)


def _reason(train: ChannelGraph, key: tuple[str, int]) -> str:
    """Why the train graph fixes channels of ``key`` (the first of its frozen reasons)."""
    param, dim = key
    for f in train.frozen:
        if any(p == param and d == dim for p, d, _ in f.dims):
            return f"in train mode, {f.reason}"
    return "in train mode these channels are fixed"
