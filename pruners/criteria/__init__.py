"""Channel criteria: one module per family, one signature for all.

A criterion is ``f(model, graph, data: ScoreData) -> np.ndarray`` with one raw score per unit
(higher = keep). It scores a unit over every parameter slice that removing it removes (the
producer rows, the norm scales, the consumers' input columns), through :func:`unit_sums`.
``pruners.importance`` is the lookup by name and the per-group normalisation.
"""

from .base import Criterion, ScoreData, unit_sums
from .gradient import hessian, taylor
from .magnitude import bn_scale, fpgm, magnitude, random_scores

__all__ = ["Criterion", "ScoreData", "unit_sums", "magnitude", "bn_scale", "fpgm",
           "random_scores", "taylor", "hessian"]
