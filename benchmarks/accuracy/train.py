"""Training, evaluation and the data the accuracy benchmark shares between methods."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pruners import distill_loss

from .shapes import make_shapes

__all__ = ["Data", "load_data", "train", "accuracy", "ce", "onednn_trains"]


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def validation(self, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Images for choices made before fine-tuning (the sensitivity scan's metric): a third
        draw (seed 2), disjoint from the training and test sets."""
        return make_shapes(n, seed=2)

    def calibration(self, batches: int = 8, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed batches from the training set for data-driven criteria (both tools)."""
        return [(self.x_train[i * size:(i + 1) * size], self.y_train[i * size:(i + 1) * size])
                for i in range(batches)]


def load_data(n_train: int, n_test: int) -> Data:
    """shapes10: training images from seed 0, test images from seed 1 (disjoint draws)."""
    xtr, ytr = make_shapes(n_train, seed=0)
    xte, yte = make_shapes(n_test, seed=1)
    return Data(xtr, ytr, xte, yte)


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px (every class is flip-invariant
    as a form: a mirrored L is still an L)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(F.pad(x, (2, 2, 2, 2), mode="replicate"), (dy, dx), (2, 3))[..., 2:-2, 2:-2]


def onednn_trains(model: nn.Module) -> bool:
    """False where oneDNN's backward is known to corrupt memory on AVX2-only CPUs (torch
    2.14.1): a strided 1x1 conv reading under 8 channels per group, as a ResNet shortcut
    pruned to 2 channels (README, "Known limitations"). Such nets train on PyTorch's own
    kernels instead, on every CPU, so figures do not depend on which CPU ran them."""
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels // m.groups < 8 for m in model.modules())


@contextlib.contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off (``mkldnn.flags`` would also set TF32 and warn about it each time)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def train(model: nn.Module, data: Data, *, iterations: int, lr: float, seed: int,
          batch: int = 128, weight_decay: float = 5e-4, teacher: Optional[nn.Module] = None,
          kd_weight: float = 0.5, temperature: float = 4.0,
          penalty: Optional[Callable[[], torch.Tensor]] = None,
          after: Optional[Callable[[int], None]] = None) -> nn.Module:
    """SGD with Nesterov momentum and a cosine schedule over ``iterations`` steps.

    ``seed`` fixes the batch order and augmentation; ``teacher`` adds distillation
    (``(1 - kd_weight) * CE + kd_weight * KD``); ``penalty()`` is added to the loss;
    ``after(i)`` runs after step ``i`` (1-based), e.g. to evaluate along the way.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, iterations))))
    n = len(data.x_train)
    order = torch.randperm(n, generator=g)
    pos = 0
    model.train()
    if teacher is not None:
        teacher.eval()
    with _onednn(torch.backends.mkldnn.enabled and onednn_trains(model)):
        for step in range(iterations):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch]
            pos += batch
            x = _augment(data.x_train[idx], g).contiguous(memory_format=torch.channels_last)
            y = data.y_train[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(x)
                loss = (1 - kd_weight) * loss + kd_weight * distill_loss(out, soft, temperature)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after is not None:
                after(step + 1)
                model.train()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data.x_test), batch):
        x = data.x_test[i:i + batch].contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == data.y_test[i:i + batch]).sum())
    return correct / len(data.x_test)
