"""Models the benchmarks build by name, with random weights (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass
class Bench:
    """A model as the benchmarks see it.

    ``outputs`` picks the output contract from the model's return value (both tools keep it);
    ``head`` lists the modules Torch-Pruning's docs say to put in ``ignored_layers`` (the
    classifier, or a detector's prediction layers). Our engine is given no such list.
    """

    name: str
    model: nn.Module
    inputs: Any
    outputs: Optional[Callable] = None
    head: list[nn.Module] = field(default_factory=list)

    def batch(self, n: int) -> Any:
        """The example inputs with batch size ``n`` (a list of n images for detectors)."""
        if isinstance(self.inputs, list):
            return [self.inputs[0]] * n
        return self.inputs.expand(n, *self.inputs.shape[1:]).contiguous()

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TinyNet(nn.Module):
    """A small residual CNN for testing the harness in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                                   nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1),
                                   nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


def build(name: str) -> Bench:
    """Build a benchmark model by name, seeded, in eval mode.

    Names: ``tiny`` (:class:`TinyNet`), any torchvision classifier (``resnet50``),
    ``retinanet_resnet50_fpn``, or an Ultralytics config (``yolov8n``, ``yolo11s``).
    """
    torch.manual_seed(0)
    if name == "tiny":
        model = TinyNet().eval()
        return Bench(name, model, torch.randn(1, 3, 32, 32), head=[model.fc])
    if name.startswith("yolo"):
        from ultralytics import YOLO

        model = YOLO(f"{name}.yaml").model.eval()
        return Bench(name, model, torch.randn(1, 3, 640, 640), _first, head=[model.model[-1]])
    import torchvision

    if name == "retinanet_resnet50_fpn":
        model = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None).eval()
        head = [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
        return Bench(name, model, [torch.rand(3, 640, 640)], head=head)
    model = getattr(torchvision.models, name)().eval()
    return Bench(name, model, torch.randn(1, 3, 224, 224), head=[_classifier(model)])


def _classifier(model: nn.Module) -> nn.Module:
    """The last Linear layer: the classifier of a torchvision model."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _first(out: Any) -> Any:
    """A detector's predictions: the first of what it returns (the whole of a lone tensor)."""
    return out[0] if isinstance(out, (tuple, list)) else out
