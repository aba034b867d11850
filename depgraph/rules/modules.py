"""Modules whose widths are pinned by Python attributes that surgery cannot rewrite.

The graph sees ``nn.MultiheadAttention`` as linears and an sdpa, but its forward checks the
query width against ``embed_dim`` and splits heads by ``embed_dim // num_heads``: no channel of
its projections can go without changing the head layout. Their parameters are frozen at
capture, with the reason, instead of being found by the repair probes one group at a time.

To pin another module type, add it here with the reason users will read.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FIXED_MODULES", "fixed_params"]

FIXED_MODULES: dict[type, str] = {
    nn.MultiheadAttention: "stores embed_dim and num_heads, which fix every width of its "
                           "projections",
}


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
