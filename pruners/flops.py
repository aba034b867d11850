"""FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``: the report's measured truth.

:func:`counting` is the one place that sets the counter up (formulas for the kernels the
installed torch does not count, parameters' ``requires_grad`` off so torch's module tracker
cannot assert, ``nn.MultiheadAttention``'s fused path off); :func:`measure` and
:func:`measure_modules` count one forward, with fake tensors when the model runs on them, and
:func:`pruners.verify.verify` counts the forwards it runs anyway (``flops=``), which
spares ``prune()`` two more passes of the whole model.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from depgraph.capture import as_args, fresh

__all__ = ["FlopCount", "counting", "measure", "measure_modules"]


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _recurrent(input_shape, hx_shapes, param_shapes, *args, out_shape=None, **kwargs) -> int:
    # every weight matrix (w_ih, w_hh, w_hr of each layer and direction) is applied once per
    # time step and batch element: 2 * steps * rows * cols, as depgraph.cost counts them
    steps = 1
    for s in input_shape[:-1]:
        steps *= s
    return sum(2 * steps * s[0] * s[1] for s in param_shapes if len(s) == 2)


def _mkldnn_rnn_layer(input_shape, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    # one layer and direction of an LSTM on CPU: both weights once per step and batch element
    steps = 1
    for s in input_shape[:-1]:
        steps *= s
    return 2 * steps * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


# Kernels the installed torch's FlopCounterMode may not count: the CPU flash-attention kernel
# nn.MultiheadAttention uses (torch 2.14 counts the flash/efficient/cudnn variants), and the
# fused recurrent layers (nothing is counted for them; GRU/RNN on CPU decompose into mm).
_EXTRA_FORMULAS = {getattr(torch.ops.aten, name): formula for name, formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa), ("lstm", _recurrent),
    ("gru", _recurrent), ("rnn_tanh", _recurrent), ("rnn_relu", _recurrent),
    ("mkldnn_rnn_layer", _mkldnn_rnn_layer))
    if hasattr(torch.ops.aten, name)}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward: the total, and per submodule by name (the root is "")."""

    total: int
    per_module: dict[str, int]

    @classmethod
    def of(cls, counter: FlopCounterMode) -> "FlopCount":
        per_module = {key.partition(".")[2]: sum(ops.values())  # the counter prefixes the
                      for key, ops in counter.get_flop_counts().items()  # root's class name
                      if key != "Global"}
        return cls(counter.get_total_flops(), per_module)


@contextlib.contextmanager
def counting(model: nn.Module) -> Iterator[FlopCounterMode]:
    """Count the FLOPs of what ``model`` runs inside the block (under ``no_grad``)."""
    with _quiet(model), _counter() as counter:
        yield counter


@contextlib.contextmanager
def _counter() -> Iterator[FlopCounterMode]:
    with FlopCounterMode(display=False, custom_mapping=_extra()) as counter, torch.no_grad():
        yield counter


@contextlib.contextmanager
def _quiet(model: nn.Module) -> Iterator[None]:
    # nn.MultiheadAttention's fused inference path is one op the counter does not know;
    # torch's module tracker (inside FlopCounterMode) hooks every input that requires grad
    # and asserts on a parameter passed to a submodule under no_grad (timm's PiT, CaiT)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    grads = [p for p in model.parameters() if p.is_leaf and p.requires_grad]
    try:
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p in grads:
            p.requires_grad_(True)


def _deform_conv2d(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # a conv's multiply-adds, as depgraph's rule counts them (the bilinear sampling aside)
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def _extra() -> dict:
    extra = {op: f for op, f in _EXTRA_FORMULAS.items()
             if op not in torch.utils.flop_counter.flop_registry}
    if "torchvision" in sys.modules:  # its ops exist once it is imported (by the model)
        extra[torch.ops.torchvision.deform_conv2d] = _deform_conv2d
    return extra


def _count(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict] = None
           ) -> FlopCounterMode:
    """Count FLOPs of one forward: with fake tensors (shapes only, several times faster on a
    large model) when the model runs on them, else for real (a detector whose box count
    depends on values cannot run on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from depgraph.capture import attributes_restored

    args, kwargs = as_args(example_inputs), fresh(example_kwargs or {})
    with _quiet(model):
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with attributes_restored(model), mode:  # a forward that caches tensors on self
                fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor,
                                                              (args, kwargs))
                with _counter() as counter:  # inside the fake mode: it sees the ops first
                    model(*fake_args, **fake_kwargs)
            return counter
        except Exception:  # noqa: BLE001 - data-dependent code: count on the real inputs
            pass
    with counting(model) as counter:
        model(*args, **kwargs)
    return counter


def measure(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict] = None
            ) -> tuple[int, int]:
    """(FLOPs, parameters), FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = _count(model, example_inputs, example_kwargs)
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def measure_modules(model: nn.Module, example_inputs: Any,
                    example_kwargs: Optional[dict] = None) -> tuple[int, int, dict[str, int]]:
    """:func:`measure` plus the FLOPs of every submodule by name, from the same pass."""
    count = FlopCount.of(_count(model, example_inputs, example_kwargs))
    return count.total, sum(p.numel() for p in model.parameters()), count.per_module
