"""The correctness property of shared/design.md on every hand-written architecture:
pruning random sets of units equals zeroing their consumer slices in the original."""

import copy

import numpy as np
import pytest

from depgraph import analyze, capture
from models import MODELS, build
from pruners import remove_units, run_model, sample_units, verify

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
SEEDS = range(4)


@pytest.fixture(scope="module", params=sorted(MODELS))
def analysed(request):
    model, x = build(request.param)
    return request.param, model, x, analyze(capture(model, x))


def test_random_unit_sets_are_zero_equivalent(analysed):
    name, model, x, graph = analysed
    assert graph.exact_units(), f"{name}: nothing prunable"
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        for fraction in FRACTIONS:
            units = sample_units(graph, fraction, rng)
            assert units
            result = verify(model, graph, units, x, rtol=1e-4)
            assert result.ok, f"{name} seed={seed} fraction={fraction}: {result}"


def test_every_single_unit_is_zero_equivalent(analysed):
    """Removing one unit at a time isolates a coupling that random sets could mask."""
    name, model, x, graph = analysed
    for unit in graph.exact_units()[:: max(1, len(graph.exact_units()) // 12)]:
        result = verify(model, graph, [unit], x)
        assert result.ok, f"{name} unit {unit}: {result}"


def test_inexact_units_prune_and_keep_output_shapes():
    """Units behind normalisation statistics cannot be checked exactly; they must still prune."""
    model, x = build("norms")
    graph = analyze(capture(model, x))
    inexact = [u for u in graph.units if not u.exact]
    # GroupNorm(4, 16) after c1: 16 / 4 = 4 units; LayerNorm(24) after c3: 24 units.
    assert len(inexact) == 4 + 24
    assert all("normalises" in u.note for u in inexact)
    units = sample_units(graph, 0.5, np.random.default_rng(0), exact_only=False)
    assert set(units) & {u.id for u in inexact}
    before = [t.shape for t in run_model(model, x)]
    pruned = remove_units(copy.deepcopy(model), graph, units)
    assert [t.shape for t in run_model(pruned, x)] == before
    assert pruned.gn.num_groups == 4 and pruned.gn.num_channels % 4 == 0


def test_pruned_parameter_count_matches_units(analysed):
    """Every removed unit takes exactly its slices: count weights removed from the first dim."""
    name, model, x, graph = analysed
    units = sample_units(graph, 0.5, np.random.default_rng(1))
    pruned = remove_units(copy.deepcopy(model), graph, units)
    removed = set(units)
    for (param, dim), ids in graph.unit_index.items():
        expected = int(sum(1 for i in ids.tolist() if i not in removed))
        module_name, _, attr = param.rpartition(".")
        module = pruned.get_submodule(module_name)
        tensor = getattr(module, attr)
        assert tensor.shape[dim] == expected, f"{name}: {param} dim {dim}"


def test_the_masked_reference_is_made_in_place_and_undone():
    """verify masks the original itself (no copy) and restores it: after the block, after an
    error inside it, and after the train-mode run that updates batch-norm statistics."""
    from models import snapshot, unchanged
    from pruners import masked_in_place

    model, x = build("resnet_basic")
    graph = analyze(capture(model, x))
    units = sample_units(graph, 0.5, np.random.default_rng(0))
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with masked_in_place(model, graph, units) as masked:
            assert masked is model and not unchanged(model, before)
            raise RuntimeError("inside the block")
    assert unchanged(model, before)
    result = verify(model, graph, units, x, train_mode=True)
    assert result.ok
    assert unchanged(model, before) and not any(m.training for m in model.modules())
