"""The cost model equals torch.utils.flop_counter.FlopCounterMode and the parameter count, at
full width and after pruning random units, on every hand-written model."""

import copy

import numpy as np
import pytest

from depgraph import analyze, capture
from depgraph.cost import cost_model
from models import MODELS, build
from pruners import measure, remove_units, sample_units


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_model_matches_flop_counter(name):
    model, x = build(name)
    graph = analyze(capture(model, x))
    cost = cost_model(graph)
    assert cost.full() == pytest.approx(measure(model, x), rel=1e-9)
    for seed, fraction in enumerate((0.3, 0.7)):
        units = sample_units(graph, fraction, np.random.default_rng(seed), exact_only=False)
        predicted = cost.evaluate(cost.kept_after(graph, set(units)))
        pruned = remove_units(copy.deepcopy(model), graph, units)
        assert predicted == pytest.approx(measure(pruned, x), rel=1e-9), f"seed {seed}"
