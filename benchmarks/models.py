"""Models the benchmarks build by name, with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def build(name: str) -> tuple[torch.nn.Module, Any, Optional[Callable]]:
    """``(model, example_inputs, outputs selector)`` for a benchmark model name.

    Names: any torchvision classifier (``resnet50``), ``retinanet_resnet50_fpn``, or an
    Ultralytics config (``yolov8n``, ``yolo11s``).
    """
    torch.manual_seed(0)
    if name.startswith("yolo"):
        from ultralytics import YOLO

        return YOLO(f"{name}.yaml").model.eval(), torch.randn(1, 3, 640, 640), _first
    import torchvision

    if name == "retinanet_resnet50_fpn":
        model = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None)
        return model.eval(), [torch.rand(3, 640, 640)], None
    return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224), None


def _first(out: Any) -> Any:
    return out[0]
