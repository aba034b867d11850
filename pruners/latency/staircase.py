"""``round_to="auto"``: the channel multiple that the backend's kernels reward, measured.

Kernels work on blocks of channels (16 fp32 lanes with AVX-512, 8 with AVX2, tensor-core
tiles on GPUs), so a layer's time climbs in steps: one channel past a multiple costs a whole
block. :func:`staircase` times the model's costliest layer at every width of a window;
:func:`pick_round_to` keeps the smallest multiple whose widths run clearly faster than the
trend through all widths (1 when none does: every channel costs alike).

A staircase samples a few layers, the costliest by MACs, and those can show no step where
the whole model does: channels-last in eager PyTorch, MobileNetV2's 1x1 convs timed alone
stepped at no multiple, yet its plan at ``round_to=16`` ran 10% faster than at
``round_to=1``, whose widths differ from it by the rounding only (27% in OpenVINO). So
``prune`` also times the whole model planned at each of :data:`MODEL_CANDIDATES` (and the
staircase's pick) and :func:`pick_by_model` keeps the multiple that runs fastest per FLOP
(for a latency target, whose plans stop at one predicted time: the one keeping most FLOPs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .model import LayerCall
from .table import LatencyTable, LayerShape

__all__ = ["staircase", "pick_round_to", "RoundTo", "auto_round_to", "CANDIDATES",
           "MODEL_CANDIDATES", "MODEL_NEAR", "MODEL_ROUNDS", "pick_by_model"]

#: Multiples considered, smallest first.
CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
#: Multiples whose whole pruned models are timed against each other (with the staircase's).
MODEL_CANDIDATES = (1, 8, 16, 32)
#: A multiple whose model's time per FLOP kept is within this share of the best one's counts
#: as fast as it; the smallest such multiple is kept (finer widths: a finer allocation).
MODEL_NEAR = 0.02
#: Rounds of :func:`~.timing.measure_models` for that comparison (each model every round).
MODEL_ROUNDS = 15


@dataclass(frozen=True)
class RoundTo:
    """The multiple chosen, the channels' worth of time its widths save against the trend,
    and the layers timed."""

    multiple: int
    gain: float
    layers: tuple[str, ...]
    backend: str
    device: str
    threads: int
    dtype: str = "float32"

    def __str__(self) -> str:
        dtype = "" if self.dtype == "float32" else f" in {self.dtype}"
        return (f"round_to='auto' chose {self.multiple} for {self.backend} on {self.device}"
                f"{dtype} ({self.threads} threads): on {', '.join(self.layers) or 'no layer'}, "
                f"widths that are multiples of {self.multiple} save the time of "
                f"{self.gain:.1f} channels against the trend of their neighbours")


def staircase(shape: LayerShape, widths: Sequence[int], table: LatencyTable,
              rounds: int = 5) -> dict[int, float]:
    """Seconds of ``shape`` at every output width in ``widths`` (input width unchanged; a
    depthwise layer changes both), followed by a 1x1 layer back to its full width, from the
    table where it has them.

    Missing widths are timed together (:meth:`LatencyTable.alone_many`: ``rounds`` rounds,
    all widths once per round in a rotated order, keeping each width's fastest round): a
    drift in machine load then lands on every width alike instead of faking a step.
    """
    # followed by a 1x1 layer back to the full width, the varied width is internal to a
    # graph, as in the model: onnxruntime converts layouts only at a graph's edges
    chained = dataclasses.replace(shape, follow=shape.out_channels)
    shapes = {w: chained.at(shape.in_channels, w) for w in widths}
    times = table.alone_many(list(shapes.values()), rounds=rounds)
    return dict(zip(shapes, times))


def pick_round_to(times: dict[int, float]) -> tuple[int, float]:
    """``(multiple, gain)`` for one layer's times by width (see :func:`_choose`)."""
    return _choose(_gains(times))


#: A multiple ``m`` is a real step of the kernels when its widths save at least this share
#: of ``m`` channels against the trend (a staircase of ``m`` saves about half of them) ...
PERIOD = 0.35
#: ... and the smallest such multiple within this share of the best saving is taken.
NEAR = 0.7


def _gains(times: dict[int, float]) -> dict[int, float]:
    """Per candidate ``m``: the median, over the widths that are multiples of ``m``, of the
    time they save against the least-squares line through every width, in channels' worth
    of that line's slope. A staircase (one channel past a multiple pays for a whole block)
    and valleys (a multiple takes a faster kernel path) both show; a median makes one spike
    harmless; each ``m`` needs three multiples in the window."""
    widths = np.array(sorted(times), dtype=np.float64)
    t = np.array([times[int(w)] for w in widths])
    if len(widths) < 8:
        return {}
    slope, intercept = np.polyfit(widths, t, 1)
    if slope * np.ptp(widths) <= 1e-3 * float(np.mean(t)):  # flat: width does not matter
        return {}
    saved = (slope * widths + intercept - t) / slope
    return {m: float(np.median(saved[widths % m == 0])) for m in CANDIDATES
            if m > 1 and (widths % m == 0).sum() >= 3}


def _choose(gains: dict[int, float]) -> tuple[int, float]:
    """The smallest real step (saving ``PERIOD * m`` channels or more) within ``NEAR`` of
    the best saving; 1 when no multiple saves enough (every channel costs alike)."""
    real = {m: g for m, g in gains.items() if g >= PERIOD * m}
    if not real:
        return 1, 0.0
    best = max(real.values())
    m = min(k for k, g in real.items() if g >= NEAR * best)
    return m, real[m]


def auto_round_to(calls: list[LayerCall], table: LatencyTable, window: int = 96,
                  layers: int = 3) -> RoundTo:
    """Pick the multiple from the staircases of the ``layers`` costliest conv/linear shapes
    of ``calls`` (as :func:`pruners.latency.layer_calls` returns; by MACs, at least 48 output
    channels), each over ``window`` output widths around half its width; each multiple's
    gain is the median over those layers."""
    def macs(call: LayerCall) -> float:
        s = call.shape
        k = float(np.prod(s.kernel)) if s.kernel else 1.0
        return call.out_numel * k * s.in_channels / s.groups

    seen, picked = set(), []
    for call in sorted((c for c in calls if c.shape.out_channels >= 48), key=macs, reverse=True):
        if call.shape not in seen:
            seen.add(call.shape)
            picked.append(call)
        if len(picked) == layers:
            break
    if not picked:
        return RoundTo(1, 0.0, (), table.backend, table.device, table.threads)
    per_layer = []
    for call in picked:
        width = call.shape.out_channels
        lo = max(1, width // 2 - window // 2)
        per_layer.append(staircase(call.shape, range(lo, min(width, lo + window) + 1), table))
    table.save()
    gains = [_gains(times) for times in per_layer]
    merged = {m: float(np.median([g[m] for g in gains if m in g]))
              for m in CANDIDATES if any(m in g for g in gains)}
    multiple, gain = _choose(merged)
    return RoundTo(multiple, gain, tuple(c.module for c in picked), table.backend, table.device,
                   table.threads, picked[0].shape.dtype)


def pick_by_model(seconds: dict[int, float], flops_kept: dict[int, float],
                  near: float = MODEL_NEAR) -> int:
    """The multiple to keep from whole pruned models timed together: ``seconds`` and
    ``flops_kept`` (share of the dense FLOPs) by multiple. Plans at different multiples land
    a little apart around the target, so they are compared by time per FLOP kept (the
    inverse of efficiency); the smallest multiple within ``near`` of the best wins."""
    if not seconds:
        raise ValueError("no pruned model was timed")
    per_flop = {m: t / max(flops_kept[m], 1e-9) for m, t in seconds.items()}
    best = min(per_flop.values())
    return min(m for m, v in per_flop.items() if v <= best * (1 + near))
