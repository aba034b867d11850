"""A procedurally generated 10-class image set ("shapes10"), 32x32 RGB, no download.

Each image holds one foreground shape whose class is its form: disk, square, triangle, plus,
ring, X, two bars, diamond, half-disk, L. Everything else is nuisance, drawn per image from a
seeded generator:

- the shape's centre (anywhere with most of it inside), radius (5 to 11 px) and rotation
  (+-25 degrees, small enough that plus/X and square/diamond stay distinct);
- a background: a random linear colour gradient, plus Gaussian pixel noise;
- a foreground colour at a random contrast (either sign) to the background;
- two distractors: random thin line segments and a small blob, in random colours, which may
  overlap the shape.

The same seed gives the same images bit for bit (numpy's PCG64). The difficulty (noise,
contrast, distractors) is set so a CIFAR ResNet-20 trained for a few epochs does not saturate.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CLASSES", "make_shapes"]

CLASSES = ("disk", "square", "triangle", "plus", "ring", "x", "bars", "diamond", "half_disk",
           "l_shape")
SIZE = 32


def _masks(u: np.ndarray, v: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Inside-shape masks on rotated, radius-normalised coordinates (u, v) per image."""
    r = np.sqrt(u ** 2 + v ** 2)
    a, b = np.abs(u), np.abs(v)
    d = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)  # distances to the diagonals
    forms = [
        r < 1.0,                                                        # disk
        np.maximum(a, b) < 0.8,                                         # square
        (v > -0.55) & (v < 0.95 - 1.75 * a),                            # triangle
        ((a < 0.28) & (b < 1.0)) | ((b < 0.28) & (a < 1.0)),            # plus
        (r > 0.55) & (r < 1.0),                                         # ring
        ((d[0] < 0.24) | (d[1] < 0.24)) & (r < 1.05),                   # x
        (b > 0.22) & (b < 0.62) & (a < 0.95),                           # two bars
        a + b < 1.0,                                                    # diamond
        (r < 1.0) & (v > 0.0),                                          # half-disk
        ((u > -0.85) & (u < -0.35) & (b < 0.85)) | ((v > 0.35) & (v < 0.85) & (a < 0.85)),  # L
    ]
    stacked = np.stack(forms)  # (10, n, H, W)
    return stacked[label, np.arange(len(label))]


def make_shapes(n: int, seed: int, noise: float = 0.22) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, N x 3 x 32 x 32, roughly zero-mean) and their labels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, len(CLASSES), n)
    yy, xx = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5, indexing="ij")
    radius = rng.uniform(5.0, 11.0, n)[:, None, None]
    cx = rng.uniform(8.0, SIZE - 8.0, n)[:, None, None]
    cy = rng.uniform(8.0, SIZE - 8.0, n)[:, None, None]
    theta = np.deg2rad(rng.uniform(-25, 25, n))[:, None, None]
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    inside = _masks(u, v, label)[:, None]  # (n, 1, H, W)

    # background: a colour gradient in a random direction
    c0, c1 = rng.uniform(-0.8, 0.8, (2, n, 3, 1, 1))
    phi = rng.uniform(0, 2 * np.pi, n)[:, None, None, None]
    ramp = (np.cos(phi) * xx + np.sin(phi) * yy) / SIZE
    ramp = (ramp - ramp.min(axis=(2, 3), keepdims=True)) / np.ptp(ramp, axis=(2, 3), keepdims=True)
    image = c0 + (c1 - c0) * ramp
    # foreground: the background's mean colour shifted by a random contrast of either sign
    contrast = rng.uniform(0.35, 0.9, (n, 3, 1, 1)) * rng.choice([-1.0, 1.0], (n, 1, 1, 1))
    fg = image.mean(axis=(2, 3), keepdims=True) + contrast
    image = np.where(inside, fg, image)

    # distractors: two line segments and a blob
    for _ in range(2):
        p0 = rng.uniform(0, SIZE, (n, 2, 1, 1))
        angle = rng.uniform(0, np.pi, (n, 1, 1))
        length = rng.uniform(6, 20, (n, 1, 1))
        ex, ey = np.cos(angle), np.sin(angle)
        rx, ry = xx - p0[:, 0], yy - p0[:, 1]
        along = rx * ex + ry * ey
        across = np.abs(-rx * ey + ry * ex)
        line = ((across < 0.8) & (along > 0) & (along < length))[:, None]
        image = np.where(line, rng.uniform(-1, 1, (n, 3, 1, 1)), image)
    bc = rng.uniform(0, SIZE, (n, 2, 1, 1))
    blob = (((xx - bc[:, 0]) ** 2 + (yy - bc[:, 1]) ** 2) < rng.uniform(2, 9, (n, 1, 1)))[:, None]
    image = np.where(blob, rng.uniform(-1, 1, (n, 3, 1, 1)), image)

    image = image + rng.normal(0.0, noise, image.shape)
    return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(label.astype(np.int64))
