"""A generated detection dataset ("digits-det"): handwritten digits on cluttered backgrounds.

Nothing is downloaded: the digits are scikit-learn's ``load_digits`` (1797 8x8 scans, 10
classes). Each image (``imgsz`` square, RGB) gets, from a seeded generator:

- a background: a random colour gradient, Gaussian noise, and clutter (random rectangles and
  line strokes in random colours);
- 1 to ``max_objects`` digits, each scaled to 10-35% of the image side with a random aspect
  jitter, pasted in a random colour at a random contrast, anywhere (they may overlap);
- distractor strokes cut from other digit scans (parts of digits, not labelled).

Training images use digit scans 0-1399, validation images scans 1400-1796 (other writers'
strokes). Labels are YOLO format (class cx cy w h, normalised), the tight box of the pasted
strokes. ``make_dataset`` writes ``images/``, ``labels/`` and ``data.yaml`` under ``root``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["make_dataset"]


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray((a * 255).astype(np.uint8))
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255


def _image(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, size: int,
           max_objects: int) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(0.1, 0.9, (2, 3))
    phi = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(phi) * xx + np.sin(phi) * yy)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    img = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(rng.integers(3, 8)):  # clutter: rectangles and strokes
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(2, max(3, size // 5), 2)
        if rng.random() < 0.5:
            h = max(1, h // 6)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 1, 3)
    boxes = []

    def paste(scan: np.ndarray, label: int | None) -> None:
        side = int(rng.uniform(0.10, 0.35) * size)
        h = max(6, int(side * rng.uniform(0.85, 1.15)))
        w = max(6, int(side * rng.uniform(0.7, 1.0)))
        mask = _resize(scan / 16.0, h, w)
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        region = img[y0:y0 + h, x0:x0 + w]
        bg = region.mean(axis=(0, 1))
        fg = np.clip(bg + rng.choice([-1, 1]) * rng.uniform(0.35, 0.7, 3), 0, 1)
        img[y0:y0 + h, x0:x0 + w] = region * (1 - mask[..., None]) + fg * mask[..., None]
        if label is not None:
            ys, xs = np.nonzero(mask > 0.25)
            if len(ys):
                bx0, bx1 = x0 + xs.min(), x0 + xs.max() + 1
                by0, by1 = y0 + ys.min(), y0 + ys.max() + 1
                boxes.append((int(label), (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size,
                              (bx1 - bx0) / size, (by1 - by0) / size))

    for _ in range(rng.integers(1, max_objects + 1)):
        i = int(rng.integers(0, len(scans)))
        paste(scans[i], labels[i])
    for _ in range(rng.integers(0, 3)):  # distractors: a cut-out half of another digit
        scan = scans[int(rng.integers(0, len(scans)))].copy()
        if rng.random() < 0.5:
            scan[:, : rng.integers(3, 6)] = 0
        else:
            scan[: rng.integers(3, 6)] = 0
        paste(scan, None)
    img = np.clip(img + rng.normal(0, 0.06, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), boxes


def _label_line(c: int, x: float, y: float, w: float, h: float, segment: bool) -> str:
    if not segment:
        return f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n"
    corners = ((x - w / 2, y - h / 2), (x + w / 2, y - h / 2), (x + w / 2, y + h / 2),
               (x - w / 2, y + h / 2))
    return f"{c} " + " ".join(f"{a:.6f} {b:.6f}" for a, b in corners) + "\n"


def make_dataset(root: str | Path, *, n_train: int = 2000, n_val: int = 400, imgsz: int = 160,
                 seed: int = 0, max_objects: int = 4, task: str = "detect") -> Path:
    """Write the dataset under ``root`` and return the path of its ``data.yaml``.

    ``task="segment"`` writes each box as a 4-point polygon (instance masks for YOLO-seg).
    The same arguments give the same files bit for bit.
    """
    if task not in ("detect", "segment"):
        raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans, labels = digits.images, digits.target
    root = Path(root)
    for split, n, lo, hi, offset in (("train", n_train, 0, 1400, 0),
                                      ("val", n_val, 1400, len(scans), 1)):
        rng = np.random.default_rng([seed, offset])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img, boxes = _image(rng, scans[lo:hi], labels[lo:hi], imgsz, max_objects)
            Image.fromarray(img).save(root / "images" / split / f"{k:05d}.png")
            (root / "labels" / split / f"{k:05d}.txt").write_text(
                "".join(_label_line(*box, segment=task == "segment") for box in boxes))
    names = "".join(f"  {i}: '{i}'\n" for i in range(10))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml
