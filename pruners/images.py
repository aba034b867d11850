"""Calibration batches from a folder of images (for ``recover=`` from the command line).

Pillow is imported lazily (it comes with torchvision and Ultralytics); the core does not need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["image_batches", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def image_batches(folder: str, *, imgsz: int, batch: int = 16, batches: int = 8,
                  mean: Optional[tuple[float, ...]] = None,
                  std: Optional[tuple[float, ...]] = None) -> list[torch.Tensor]:
    """Up to ``batches`` batches of ``batch`` RGB images from ``folder`` (searched
    recursively, sorted by path), resized to ``imgsz`` x ``imgsz``, scaled to [0, 1] and,
    when ``mean``/``std`` are given, normalised. FileNotFoundError when there are none."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES)[: batch * batches]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_SUFFIXES))}) under {folder}")
    tensors = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((imgsz, imgsz), Image.BILINEAR)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        t = t.view(imgsz, imgsz, 3).permute(2, 0, 1).float() / 255
        if mean is not None and std is not None:
            t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        tensors.append(t)
    return [torch.stack(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]
