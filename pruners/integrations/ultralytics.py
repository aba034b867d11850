"""Ultralytics YOLO: prune a detector, then fine-tune, validate and export it with Ultralytics.

``YOLO.train()`` normally rebuilds the network from its YAML and copies over only the weights
whose shapes match, so a pruned model would silently train at full width with partly random
weights. :func:`prune_yolo` returns a :class:`PrunedYOLO` instead: a ``YOLO`` whose trainer
keeps the pruned module (EMA, AMP check, checkpoints, ``resume=True`` and validation are
Ultralytics' own). Checkpoints pickle the module, so ``YOLO("best.pt")`` reloads the pruned
widths for val/predict/export; :func:`load_pruned` reloads them for further training.

Ultralytics is imported only when these functions run.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..api import PruneResult, prune

__all__ = ["prune_yolo", "load_pruned", "PrunedYOLO", "with_model", "yolo_batches", "yolo_loss",
           "is_pruned"]

_MARK = "pruning"  # attribute on the pruned DetectionModel: {"plan": ..., "target": ...}


def _contract(out: Any) -> Any:
    """Every Ultralytics task returns its predictions first in eval mode (detect, segment's
    [preds, proto], pose, obb, classify's probabilities); the rest are raw maps."""
    return out[0] if isinstance(out, (tuple, list)) else out


def is_pruned(model: Any) -> bool:
    """Whether ``model`` is a module this integration pruned (survives pickling)."""
    return isinstance(model, nn.Module) and isinstance(getattr(model, _MARK, None), dict)


def _yolo_class():
    from ultralytics import YOLO

    return _pruned_class(YOLO)


@functools.lru_cache(maxsize=None)
def _pruned_class(base: type) -> type:
    """``base`` (Ultralytics' ``YOLO``, ``RTDETR``, ...) whose ``train()`` keeps the pruned
    architecture (see module docstring); its own task map picks the trainer and validator."""
    base = getattr(base, "_unpruned", base)

    def train(self, trainer=None, **kwargs):
        chosen = trainer or self._smart_load("trainer")
        return base.train(self, trainer=_keep_model(chosen, self.model), **kwargs)

    name = f"Pruned{base.__name__}"
    return type(name, (base,), {"train": train, "_unpruned": base, "__qualname__": name,
                                "__module__": __name__, "__doc__": f"A ``{base.__name__}`` "
                                "whose ``train()`` keeps the pruned widths."})


def _model_class(net: nn.Module) -> type:
    """The Ultralytics model class that trains and validates ``net``: ``RTDETR`` for an
    RT-DETR network (its own trainer, loss matching and validator), else ``YOLO``."""
    from ultralytics import RTDETR, YOLO

    return RTDETR if type(net).__name__ == "RTDETRDetectionModel" else YOLO


def _keep_model(base: type, model: nn.Module) -> type:
    """``base`` trainer whose ``get_model`` returns the pruned module instead of a rebuild."""

    class PrunedTrainer(base):
        def get_model(self, cfg=None, weights=None, verbose=True):
            source = weights if is_pruned(weights) else model  # resume: the checkpoint's
            nc = getattr(source.model[-1], "nc", None) if hasattr(source, "model") else None
            if nc is not None and "nc" in self.data and int(self.data["nc"]) != int(nc):
                from depgraph.errors import PruningError

                raise PruningError(
                    f"the pruned model predicts {nc} classes but the dataset "
                    f"'{self.args.data}' has {self.data['nc']}: prune a model trained (or built) "
                    f"for this dataset's classes")
            out = copy.deepcopy(source).float()
            for p in out.parameters():
                p.requires_grad_(True)
            return out

    PrunedTrainer.__name__ = PrunedTrainer.__qualname__ = f"Pruned{base.__name__}"
    return PrunedTrainer


def __getattr__(name: str):
    if name == "PrunedYOLO":  # built on first use, so importing this module needs no Ultralytics
        return _yolo_class()
    raise AttributeError(name)


def as_ultralytics(source: Any):
    """The Ultralytics object for a ``YOLO``/``RTDETR`` object or a checkpoint/YAML path (an
    RT-DETR's loaded with ``RTDETR``, as Ultralytics requires)."""
    from ultralytics import RTDETR, YOLO

    if isinstance(source, (YOLO, RTDETR)):
        return source
    if isinstance(source, (str, Path)):
        if not str(source).endswith((".yaml", ".yml")) and not Path(source).exists():
            raise FileNotFoundError(f"no such checkpoint: {source}")
        if "rtdetr" in Path(source).name.lower():  # Ultralytics' YOLO() refuses these
            return RTDETR(str(source))
        yolo = YOLO(str(source))
        cls = _model_class(yolo.model)  # a fine-tuned RT-DETR's best.pt
        return yolo if cls is YOLO else cls(str(source))
    raise TypeError(f"prune_yolo takes a YOLO or RTDETR object or a checkpoint/YAML path, got "
                    f"{type(source).__name__}; for a bare DetectionModel use pruners.prune("
                    f"model, x, outputs=lambda o: o[0])")


def yolo_batches(data: str, *, task: str = "detect", imgsz: int = 640, batch: int = 16,
                 batches: int = 8, split: str = "train") -> list[dict]:
    """The first ``batches`` batches of a dataset YAML, preprocessed as the trainer does."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    if task == "classify":
        raise ValueError("data-driven criteria for classification YOLOs are not supported yet; "
                         "use importance='l2'")
    cfg = get_cfg(overrides={"imgsz": imgsz, "task": task, "batch": batch, "workers": 0})
    info = check_det_dataset(data)
    dataset = build_yolo_dataset(cfg, info[split], batch, info, mode="val", stride=32)
    loader = build_dataloader(dataset, batch, workers=0, shuffle=False)
    out = []
    for i, b in enumerate(loader):
        if i >= batches:
            break
        b = dict(b)
        b["img"] = b["img"].float() / 255
        out.append(b)
    return out


def yolo_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The trainer's own loss (box + cls + dfl, and masks/keypoints/angles per task), summed."""
    args = getattr(model, "args", None)
    if args is None or isinstance(args, dict):  # the loss reads its gains (box, cls, dfl) here
        from ultralytics.cfg import get_cfg

        model.args = get_cfg(overrides={k: v for k, v in (args or {}).items()
                                        if k in ("box", "cls", "dfl", "pose", "kobj")})
    loss, _ = model.loss(batch)
    return loss.sum()


def prune_yolo(model: Any, *, target_flops: Optional[float] = None,
               target_params: Optional[float] = None, target_latency: Optional[float] = None,
               round_to: Union[int, str] = 8,
               importance: str = "l2", data: Optional[str] = None, imgsz: int = 640,
               batches: int = 8, batch: int = 16, **options: Any) -> tuple[Any, PruneResult]:
    """Prune an Ultralytics model and return ``(PrunedYOLO, PruneResult)`` (a ``PrunedRTDETR``
    for an RT-DETR: each keeps its own trainer, loss and validator).

    Args:
        model: a ``YOLO`` or ``RTDETR`` object, a checkpoint path (``best.pt``) or a YAML
            name (an RT-DETR's is loaded with ``RTDETR``, which Ultralytics requires).
        target_flops / target_params / target_latency: the fraction to keep (one of them;
            latency is measured with ``backend=`` "eager" or "onnxruntime", see ``prune``).
        round_to: channel multiple (8 by default, for real speed), or "auto" (measured).
        importance: any criterion of ``prune()``; "taylor"/"hessian" read ``batches`` batches
            of the dataset ``data`` (a dataset YAML) through the trainer's own loss.
        imgsz: the example input's size (also the calibration images').
        **options: the rest of :class:`pruners.PruneOptions`; ``recover=`` ("bn", "bias",
            "reconstruct") takes its calibration images from ``data`` unless
            ``calibration=`` is given (batches, or another dataset YAML to read them from).

    The output contract is each task's predictions (detect, segment, pose, obb, classify), so
    no layer list is needed. The user's ``YOLO`` object is not changed.

    Example:
        >>> from ultralytics import YOLO
        >>> small, result = prune_yolo(YOLO("yolov8n.yaml"), target_flops=0.5, imgsz=320)
        >>> 0.49 <= result.report.flops_ratio <= 0.5
        True
    """
    yolo = as_ultralytics(model)
    task = yolo.task
    size = 224 if task == "classify" and imgsz == 640 else imgsz
    wants_images = options.get("recover") and options.get("calibration") is None
    loaded = None
    if importance in ("taylor", "hessian") or wants_images:
        if data is None:
            need = f"importance={importance!r}" if not wants_images else \
                f"recover={options['recover']!r}"
            raise ValueError(f"{need} needs data=<dataset YAML> to read calibration batches")
        loaded = yolo_batches(data, task=task, imgsz=size, batch=batch, batches=batches)
    if importance in ("taylor", "hessian"):
        options.update(data=loaded, loss_fn=yolo_loss)
    if wants_images:
        options["calibration"] = [b["img"] for b in loaded]
    elif isinstance(options.get("calibration"), str):  # a dataset YAML of its own
        options["calibration"] = [b["img"] for b in yolo_batches(
            options["calibration"], task=task, imgsz=size, batch=batch, batches=batches)]
    net = yolo.model
    was_training = net.training
    x = torch.randn(1, 3, size, size, device=next(net.parameters()).device)
    result = prune(net.eval(), x, target_flops=target_flops, target_params=target_params,
                   target_latency=target_latency, round_to=round_to, importance=importance, outputs=_contract, **options)
    net.train(was_training)
    small = result.model
    setattr(small, _MARK, {"plan": result.plan.to_dict(), "target": result.report.target,
                           "flops_ratio": result.report.flops_ratio, "imgsz": size})
    _sync_python_widths(small)
    return with_model(yolo, small), result


def with_model(yolo: Any, net: nn.Module):
    """A :class:`PrunedYOLO` like ``yolo`` (task, overrides, callbacks) holding ``net``.

    ``net`` is marked as pruned if it is not yet, so its trainer keeps it. A YOLO is an
    nn.Module holding its network in ``_modules``: every dict of its state is copied (a plain
    ``copy.copy`` would share them, and training the copy would replace the original's).
    """
    if not is_pruned(net):
        setattr(net, _MARK, {})
    pruned = object.__new__(_pruned_class(type(yolo)))
    pruned.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v
                            for k, v in yolo.__dict__.items()})
    pruned.model = net
    pruned.predictor = pruned.trainer = pruned.metrics = None
    return pruned


def _sync_python_widths(model: nn.Module) -> None:
    """Rewrite hidden widths that Ultralytics blocks keep in Python beside their layers.

    C2f and its kin split ``cv1``'s output with ``chunk(2)`` in ``forward`` (which the engine
    prunes in equal halves) but with ``split((self.c, self.c))`` in ``forward_split``, the
    path the exporter switches to; ``self.c`` must follow the pruned half width.
    """
    for module in model.modules():
        c, cv1 = getattr(module, "c", None), getattr(module, "cv1", None)
        conv = getattr(cv1, "conv", cv1)
        if isinstance(c, int) and isinstance(conv, nn.Conv2d) and hasattr(module, "forward_split"):
            module.c = conv.out_channels // 2


def load_pruned(path: Union[str, Path]):
    """A checkpoint written by a pruned model's training (or ``PrunedYOLO.save``) as a
    :class:`PrunedYOLO`, so that training again keeps the widths. Plain ``YOLO(path)`` also
    keeps them for val/predict/export."""
    from depgraph.errors import PruningError

    if not Path(path).exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    yolo = _yolo_class()(str(path))
    if not is_pruned(yolo.model):
        raise PruningError(f"{path} holds an unpruned model; use prune_yolo on it first")
    cls = _pruned_class(_model_class(yolo.model))  # Ultralytics may have swapped the class
    return yolo if type(yolo) is cls else cls(str(path))
