"""Property test: on random DAG CNNs, capture, analysis, surgery and zero-equivalence hold."""

from __future__ import annotations

import copy

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from depgraph import analyze, capture  # noqa: E402
from pruners import remove_units, run_model, sample_units, verify  # noqa: E402
from random_arch import networks  # noqa: E402

EXAMPLES = 200


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), fraction=st.sampled_from([0.1, 0.3, 0.6, 0.9]), seed=st.integers(0, 99))
def test_random_architectures_prune_exactly(net, fraction, seed):
    model, x = net
    graph = analyze(capture(model, x))
    shapes = [t.shape for t in run_model(model, x)]
    # Every op the generator uses has a channel rule: nothing is frozen as unsupported.
    unsupported = [f.reason for f in graph.frozen if "unsupported op" in f.reason]
    assert not unsupported, f"{unsupported}\n{model.describe()}"
    if not graph.exact_units():
        return
    units = sample_units(graph, fraction, np.random.default_rng(seed))
    if not units:  # each drawn unit spans a whole layer dim (e.g. chunk halves couple into one)
        return
    result = verify(model, graph, units, x, rtol=1e-4)
    assert result.ok, f"{result}\n{model.describe()}"
    pruned = remove_units(copy.deepcopy(model), graph, units)
    assert [t.shape for t in run_model(pruned, x)] == shapes
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
