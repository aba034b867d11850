"""Modules whose widths are pinned by Python attributes that surgery cannot rewrite.

Their parameters are frozen at capture, with the reason, instead of being found by the repair
probes one group at a time. TorchScript submodules are pinned (below); no eager module type is
at present: ``nn.MultiheadAttention``, pinned until its forward could follow pruned widths, now
becomes ``pruners.attention.PrunedMultiheadAttention`` in surgery.

To pin a module type, add it to ``FIXED_MODULES`` with the reason users will read.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FIXED_MODULES", "KEEPS_SCORE_SCALE", "fixed_params"]

FIXED_MODULES: dict[type, str] = {}

#: Modules (qualified class names, as capture records them) whose attention keeps its unpruned
#: score scale after surgery: ``nn.MultiheadAttention``'s pruned forward passes the old
#: ``1/sqrt(head_dim)``, so the default scale of the sdpa inside it does not make its heads'
#: channels inexact.
KEEPS_SCORE_SCALE: frozenset[str] = frozenset({"torch.nn.modules.activation.MultiheadAttention"})


_SCRIPTED = ("is TorchScript: its compiled code keeps its own copies of the parameters, so "
             "they cannot be resized; prune the eager module, then script the result")


def fixed_params(model: nn.Module) -> dict[str, str]:
    """FQN of every parameter owned by a pinned module -> why it keeps its shape.

    A TorchScript submodule is pinned too: the tracer sees its aten ops (so channels flow
    through it), but swapping its parameters does not reach its compiled code.
    """
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        why = next((w for cls, w in FIXED_MODULES.items() if isinstance(module, cls)), None)
        if why is None and isinstance(module, torch.jit.ScriptModule):
            why = _SCRIPTED
        if why is None:
            continue
        where = name or type(model).__name__
        for pname, _ in module.named_parameters():
            fqn = f"{name}.{pname}" if name else pname
            out.setdefault(fqn, f"{type(module).__name__} '{where}' {why}")  # outermost wins
    return out
