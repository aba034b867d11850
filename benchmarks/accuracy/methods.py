"""How each method turns the trained dense model into a smaller one (before fine-tuning).

``ours``: ``pruners.prune`` to the FLOPs target with global ranking and the named criterion.
``tp``: Torch-Pruning's MetaPruner with its matching importance, as its README uses it
(uniform per-layer ratio, the classifier in ``ignored_layers``); the ratio is bisected until
the FLOPs (counted the same way as ours) land at or just under the target. Data-driven
criteria see the same calibration batches in both tools, with the model in eval mode.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from pruners import measure, prune

from .train import ce

__all__ = ["prune_ours", "prune_tp", "prune_sensitivity", "narrowed", "TP_IMPORTANCE"]

X = torch.randn(1, 3, 32, 32)


def prune_ours(dense: nn.Module, target: float, criterion: str, calibration,
               recover=None) -> nn.Module:
    """``recover``: recovery methods run on the calibration images (labels unused)."""
    result = prune(dense, X, target_flops=target, importance=criterion,
                   data=calibration, loss_fn=ce, recover=recover,
                   calibration=[x for x, _ in calibration] if recover else None)
    return result.model


def prune_sensitivity(dense: nn.Module, target: float, criterion: str, calibration, validation,
                      table_path) -> nn.Module:
    """Ours with ``strategy="sensitivity"``: the table (cached at ``table_path``) scans every
    group at 10-90% with accuracy on ``validation`` images (not the test set)."""
    from pruners import Sensitivity, sensitivity

    if table_path.exists():
        table = Sensitivity.load(str(table_path))
    else:
        xv, yv = validation

        @torch.no_grad()
        def evaluate(model):
            return float((model(xv).argmax(1) == yv).float().mean())

        table = sensitivity(dense, X, evaluate=evaluate, criterion=criterion, data=calibration,
                            loss_fn=ce, progress=False)
        table.save(str(table_path))
    return prune(dense, X, target_flops=target, importance=criterion, data=calibration,
                 loss_fn=ce, strategy="sensitivity", sensitivity=table).model


def _tp_importance(criterion: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "fpgm": lambda: tp.importance.FPGMImportance(),
            "bn_scale": lambda: tp.importance.BNScaleImportance(),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "hessian": lambda: tp.importance.GroupHessianImportance()}[criterion]()


TP_IMPORTANCE = ("l1", "l2", "fpgm", "bn_scale", "taylor", "hessian")


def _tp_once(dense: nn.Module, ratio: float, criterion: str, calibration) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    imp = _tp_importance(criterion)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, X, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=head)
    if criterion == "taylor":
        model.zero_grad()
        for batch in calibration:
            ce(model, batch).backward()  # gradients accumulate over the batches
    elif criterion == "hessian":
        imp.zero_grad()
        for batch in calibration:
            model.zero_grad()
            ce(model, batch).backward()
            imp.accumulate_grad(model)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_tp(dense: nn.Module, target: float, criterion: str, calibration,
             iterations: int = 12) -> nn.Module:
    full = measure(dense, X)[0]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        model = _tp_once(dense, mid, criterion, calibration)
        ratio = measure(model, X)[0] / full
        if ratio <= target:
            hi, best = mid, (ratio, model)
            if ratio >= target - 0.005:
                break
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning did not reach {target} FLOPs with {criterion}")
    return best[1]


def narrowed(build: Callable[[], nn.Module], target: float) -> nn.Module:
    """The same architecture with every group narrowed by one ratio to the FLOPs target,
    freshly initialised (the train-from-scratch baseline)."""
    model = prune(build(), X, target_flops=target, strategy="uniform", importance="random").model
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model
