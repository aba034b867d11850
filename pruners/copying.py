"""``copy.deepcopy`` for module trees, without its per-object overhead on plain modules.

Repair copies the model once per probe (tens of probes on a transformer), and the stock
deepcopy spends most of that time reducing and rebuilding each module's dozen hook dicts
through ``__reduce_ex__``: 0.14 s per copy of MaxViT-T's 1,800 modules, about as long as a
forward. :func:`copy_model` gives the same result: a module whose class copies itself the
standard way (``nn.Module``'s own ``__getstate__``/``__setstate__``, no ``__deepcopy__`` or
``__reduce__``) is rebuilt from its ``__dict__`` directly, immutable values and empty
containers without a deepcopy call; anything else (a ``GraphModule``, a scripted module,
a list of layers held in a plain attribute) goes through ``copy.deepcopy`` with the same
memo, so shared tensors and modules stay shared exactly as deepcopy shares them.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["copy_model", "is_compiled", "own_parameters"]

_IMMUTABLE = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device,
                        torch.layout, torch.memory_format, torch.Size, type,
                        types.FunctionType, types.BuiltinFunctionType})
_EMPTY_OK = frozenset({dict, OrderedDict, set, list})
_MISSING = object()


def copy_model(model: nn.Module, memo: Optional[dict[int, Any]] = None) -> nn.Module:
    """A deep copy of ``model``, as ``copy.deepcopy(model, memo)`` would make it.

    ``memo`` maps ids of objects to what the copy uses instead (a parameter to share it, as
    ``verify.shared_params`` does); it is filled as with deepcopy.
    """
    return _copy(model, {} if memo is None else memo)


def is_compiled(module: Any) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (it holds the module as ``_orig_mod``,
    which also prefixes its parameters' names)."""
    return type(module).__name__ == "OptimizedModule"


def _plain(cls: type) -> bool:
    """Whether ``cls`` copies itself as ``nn.Module`` does, so its ``__dict__`` is its state."""
    return (getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ is nn.Module.__setstate__
            and not any("__slots__" in vars(k) for k in cls.__mro__))


def _copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    found = memo.get(id(module), _MISSING)
    if found is not _MISSING:
        return found
    cls = type(module)
    if not _plain(cls):
        return _same_modes(module, copy.deepcopy(module, memo))
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if key == "_compiled_call_impl":  # dropped by nn.Module.__getstate__
            continue
        if kind in _IMMUTABLE:
            state[key] = value
        elif key == "_modules" and kind is dict:
            state[key] = {n: None if m is None else _copy(m, memo) for n, m in value.items()}
        elif key in ("_parameters", "_buffers") and kind is dict:
            state[key] = {n: None if t is None else copy.deepcopy(t, memo)
                          for n, t in value.items()}
        elif kind in _EMPTY_OK and not value:
            state[key] = kind()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _same_modes(module: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (a copy of ``module`` by its own deepcopy) in ``module``'s train/eval modes.

    A class's own copy may rebuild it in train mode: ``GraphModule.__deepcopy__`` calls the
    class's ``__init__``, and torchvision's ``create_feature_extractor`` module (a
    ``DualGraphModule``) sets train mode there, so the copy of an eval model ran its
    BatchNorms on batch statistics. ``train()`` on the copy swaps such a module's graph too.
    """
    if new.training != module.training:
        new.train(module.training)
    copies = dict(new.named_modules(remove_duplicate=False))
    for name, sub in module.named_modules(remove_duplicate=False):
        twin = copies.get(name)
        if twin is not None and twin.training != sub.training:
            twin.training = sub.training
    return new


def own_parameters(model: nn.Module, other: nn.Module) -> None:
    """Give ``model`` its own copy of every parameter it still shares with ``other`` (tied
    parameters stay tied): a pruned copy made with shared parameters, before it leaves."""
    theirs = {id(p) for p in other.parameters()}
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in theirs:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = fresh[id(p)]
