"""Attention heads prune by width (every head narrows alike) or by count (whole heads go).

``heads="auto"`` keeps the width rule except where a head's width cannot change (rotary
tables, a norm over the head width): there whole heads go, the head count attribute is
rewritten and the pruned model matches the masked original exactly (sdpa's default scale
depends on the head width, which stays)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from depgraph.cost import cost_model
from models import RotaryViT, build
from pruners import measure, prune, remove_units, sample_units, verify
from pruners.allocate import InfeasibleTargetError, unit_step


def _graphs(name):
    model, x = build(name)
    cap = capture(model, x)
    return model, x, {mode: analyze(cap, heads=mode) for mode in ("width", "auto", "count")}


def _units_in(graph, key):
    ids = graph.unit_index.get(key, np.full(1, -1))
    return np.unique(ids[ids >= 0])


def test_auto_prunes_whole_heads_where_the_head_width_is_fixed():
    model, x, graphs = _graphs("rotary_vit")
    width, auto = graphs["width"], graphs["auto"]
    q = ("attn.0.q_proj.weight", 0)
    # by width, rotary tables freeze q's and k's head width: nothing of q prunes
    assert len(_units_in(width, q)) == 0
    # whole heads: 4 units, each all 16 rows of one head, shared by q, k, v and o's columns
    heads = _units_in(auto, q)
    assert len(heads) == 4
    rows = auto.unit_index[q]
    for u in heads:
        assert np.array_equal(np.nonzero(rows == u)[0], np.arange(16) + 16 * list(heads).index(u))
    assert set(heads) == set(_units_in(auto, ("attn.0.o_proj.weight", 1)))
    assert set(heads) == set(_units_in(auto, ("attn.0.k_proj.weight", 0)))
    assert any("whole attention heads in 2 modules" in n for n in auto.notes)
    for seed in range(3):
        units = sample_units(auto, 0.5, np.random.default_rng(seed))
        assert verify(model, auto, units, x).ok, seed


def test_auto_keeps_the_width_rule_where_heads_can_narrow():
    _, _, graphs = _graphs("stored_heads")
    assert graphs["auto"].unit_index.keys() == graphs["width"].unit_index.keys()
    for key, ids in graphs["width"].unit_index.items():
        assert np.array_equal(ids, graphs["auto"].unit_index[key]), key
    assert not any("whole attention heads" in n for n in graphs["auto"].notes)


@pytest.mark.parametrize("name", ["stored_heads", "token_mixer"])
def test_whole_heads_on_request_match_the_masked_original_and_the_flop_counter(name):
    model, x, graphs = _graphs(name)
    graph = graphs["count"]
    assert any("whole attention heads" in n for n in graph.notes)
    cost = cost_model(graph)
    for seed in range(3):
        units = sample_units(graph, 0.5, np.random.default_rng(seed))
        assert verify(model, graph, units, x).ok, seed
        pruned = remove_units(copy.deepcopy(model), graph, units)
        assert cost.evaluate(cost.kept_after(graph, set(units))) == \
            pytest.approx(measure(pruned, x), rel=1e-9), seed


def test_whole_heads_on_request_fall_back_to_widths_where_they_would_freeze():
    # nn.MultiheadAttention's decomposition also splits its packed projection into q/k/v
    # (``unflatten(-1, (3, E))``, then picked by index): taken as heads, those would freeze
    _, _, graphs = _graphs("mha_block")
    width, count = graphs["width"], graphs["count"]
    key = ("attn.in_proj_weight", 0)
    assert (count.unit_index[key] >= 0).sum() == (width.unit_index[key] >= 0).sum() == 96
    assert any("whole heads would freeze in 'attn'" in n for n in count.notes)


def test_prune_rewrites_the_head_count_and_keeps_the_head_width():
    model, x = build("rotary_vit")
    result = prune(model, x, target_flops=0.6)
    assert result.report.verify.ok
    assert abs(result.report.flops_ratio - 0.6) <= 0.01
    blocks = list(result.model.attn)
    assert all(b.head_dim == 16 for b in blocks)
    assert [b.num_heads for b in blocks] == [b.q_proj.out_features // 16 for b in blocks]
    assert sum(b.num_heads for b in blocks) < 8
    assert result.model(x).shape == model(x).shape


def test_a_head_count_equal_to_the_head_width_keeps_the_width_rule():
    # 4 heads of width 4: a rewrite by value cannot tell num_heads from head_dim, so whole
    # heads are not offered there (they were, and head_dim was rewritten in num_heads' place)
    torch.manual_seed(0)
    model, x = RotaryViT(num_heads=4, head_dim=4).eval(), torch.randn(2, 3, 16, 16)
    graph = analyze(capture(model, x))
    assert not any("whole attention heads" in n for n in graph.notes)
    assert (graph.unit_index[("attn.0.q_proj.weight", 0)] < 0).all()
    try:
        result = prune(model, x, target_flops=0.7)
    except InfeasibleTargetError:
        return
    assert result.report.flops_ratio <= 0.71
    assert all(b.num_heads == 4 and b.head_dim == 4 for b in result.model.attn)


def test_round_to_counts_channels_not_heads():
    _, _, graphs = _graphs("rotary_vit")
    graph = graphs["auto"]
    gid = graph.units[int(graph.unit_index[("attn.0.q_proj.weight", 0)][0])].group
    assert unit_step(graph, gid, 8) == 1 and unit_step(graph, gid, 16) == 1
    assert unit_step(graph, gid, 32) == 2  # two heads of 16 make 32 channels
    plain = next(g.id for g in graph.groups if gid != g.id)
    assert unit_step(graph, plain, 8) == 8
    model, x = build("rotary_vit")
    result = prune(model, x, target_flops=0.6, round_to=8)
    assert sum(b.num_heads for b in result.model.attn) < 8


def test_an_unknown_head_mode_is_refused():
    model, x = build("rotary_vit")
    with pytest.raises(ValueError, match="heads="):
        prune(model, x, target_flops=0.5, heads="some")
    with pytest.raises(ValueError, match="heads="):
        analyze(capture(model, x), heads="some")


class _DFL(nn.Module):
    """Ultralytics' distribution focal loss decode: 64 channels viewed as 4 sides x 16 bins,
    a softmax over the bins: a head split, with no attention around it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, x):
        b, _, a = x.shape
        return self.proj(x.view(b, 4, 16, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class _BoxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.box, self.dfl = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 64, 1), _DFL()

    def forward(self, x):
        return self.dfl(self.box(torch.relu(self.stem(x))).flatten(2))


def test_whole_heads_are_tried_only_where_attention_runs():
    """A detector's frozen per-anchor view is a head split with no heads to drop: no second
    analysis for it; the rotary ViT's attention modules get one."""
    from depgraph.analyze import _analyze_once

    _, fixed, split = _analyze_once(capture(_BoxHead().eval(), torch.randn(1, 3, 8, 8)),
                                    frozenset())
    assert "dfl" in split and not fixed
    model, x = build("rotary_vit")
    _, fixed, _ = _analyze_once(capture(model, x), frozenset())
    assert fixed and all(m.startswith("attn.") for m in fixed)
