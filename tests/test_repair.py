"""Repair: groups whose width the model's Python code fixes are found by running it."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from models import cbr
from pruners import (Plan, apply_plan, find_unprunable_groups, remove_units, repair_graph,
                     sample_units, verify)
from pruners.repair import link_input_widths
from pruners.repair import probe_inputs


class BakedSplit(nn.Module):
    """C2PSA-style split, with its sizes written into the code: no attribute to rewrite."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.cv1 = cbr(16, 16, 1)
        self.m = cbr(8, 8)
        self.cv2 = cbr(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).split((8, 8), dim=1)
        return self.head(self.cv2(torch.cat((a, self.m(b)), 1)))


class AttributeSplit(BakedSplit):
    """C2PSA itself: ``split((self.c, self.c))`` reads the width from an attribute."""

    def __init__(self):
        super().__init__()
        self.c = 8

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).split((self.c, self.c), dim=1)
        return self.head(self.cv2(torch.cat((a, self.m(b)), 1)))


def test_a_split_by_an_attribute_rewrites_it_and_the_plan_carries_it(tmp_path):
    from pruners import apply_plan
    x = torch.randn(1, 3, 8, 8)
    model = AttributeSplit().eval()
    g = analyze(capture(model, x))
    assert find_unprunable_groups(model, g, x) == {}
    (gid,) = [grp.id for grp in g.groups if ("cv1.0.weight", 0, 16) in grp.dims]
    units = list(g.groups[gid].units[:3])  # 3 channels of each half
    assert verify(model, g, units, x).ok
    plan = Plan.from_units(g, units)
    assert plan.sizes == {"": {8: 5, 16: 10}}  # each half, and the whole that is split
    plan.save(tmp_path / "plan.json")
    pruned = apply_plan(copy.deepcopy(model), Plan.load(tmp_path / "plan.json"))
    assert pruned.c == 5 and pruned.cv1[0].out_channels == 10
    # the same plan on a model whose split reads no attribute leaves it failing, as it must
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        apply_plan(BakedSplit().eval(), plan)(x)


def test_plans_that_rewrite_an_attribute_compose():
    from pruners import apply_plan
    x = torch.randn(1, 3, 8, 8)
    model = AttributeSplit().eval()
    g = analyze(capture(model, x))
    (gid,) = [grp.id for grp in g.groups if ("cv1.0.weight", 0, 16) in grp.dims]
    first = Plan.from_units(g, list(g.groups[gid].units[:3]))
    once = apply_plan(copy.deepcopy(model), first)
    g2 = analyze(capture(once, x))
    (_, (half, _)), = g2.sizes  # the units of each half of the split
    second = Plan.from_units(g2, half[-2:].tolist())
    assert first.then(second).sizes == {"": {8: 3, 16: 6}}
    both = apply_plan(copy.deepcopy(model), first.then(second))
    twice = apply_plan(once, second)
    assert both.c == twice.c == 3
    torch.testing.assert_close(both(x), twice(x))


class HalfSplit(BakedSplit):
    """timm's CrossStage: ``x.split(self.expand_chs // 2)`` holds the whole, not the half."""

    def __init__(self):
        super().__init__()
        self.expand_chs = 16

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).split(self.expand_chs // 2, dim=1)
        return self.head(self.cv2(torch.cat((a, self.m(b)), 1)))


class RemainderSplit(nn.Module):
    """SHViT: ``split([self.pdim, self.dim - self.pdim])`` keeps a part and the whole."""

    def __init__(self):
        super().__init__()
        self.stem, self.m, self.head = cbr(3, 16), cbr(6, 6), cbr(16, 4, 1)
        self.dim, self.pdim = 16, 6

    def forward(self, x):
        x = self.stem(x)
        a, b = x.split([self.pdim, self.dim - self.pdim], dim=1)
        return self.head(torch.cat((self.m(a), b), 1) + x)


@pytest.mark.parametrize("make", [HalfSplit, RemainderSplit])
def test_a_split_by_a_width_derived_from_the_whole_rewrites_the_whole(make):
    """The attribute equal to what is split (not to a part) follows it; before, the group
    froze as "a width fixed in Python"."""
    x = torch.randn(1, 3, 8, 8)
    model = make().eval()
    g = analyze(capture(model, x))
    assert find_unprunable_groups(model, g, x) == {}
    split = "cv1.0.weight" if make is HalfSplit else "stem.0.weight"
    (gid,) = [grp.id for grp in g.groups if (split, 0, 16) in grp.dims]
    split_units = [u for u in g.groups[gid].units
                   if any(sl.param == split and sl.dim == 0 for sl in g.slices(u))]
    units = split_units[-3:]  # (RemainderSplit: from the part pdim leaves)
    assert verify(model, g, units, x).ok
    pruned = apply_plan(copy.deepcopy(model), Plan.from_units(g, units))
    whole = pruned.expand_chs if make is HalfSplit else pruned.dim
    assert whole == 16 - (6 if make is HalfSplit else 3)  # HalfSplit's units hold a pair
    pruned(x)


class CascadedHeads(nn.Module):
    """EfficientViT's cascaded attention: every head splits by ``[self.key_dim, self.key_dim,
    self.val_dim]``, and all but the last head's values join the next head's input chunk."""

    def __init__(self, dim: int = 24, heads: int = 3, key_dim: int = 4):
        super().__init__()
        self.key_dim, self.val_dim = key_dim, dim // heads
        self.stem = cbr(3, dim)
        self.qkvs = nn.ModuleList(nn.Conv2d(self.val_dim, 2 * key_dim + self.val_dim, 1)
                                  for _ in range(heads))
        self.proj, self.head = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        chunks, outs = x.chunk(len(self.qkvs), 1), []
        feat = chunks[0]
        for i, qkv in enumerate(self.qkvs):
            if i:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], 1)
            attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)
            feat = (v.flatten(2) @ attn.transpose(1, 2)).view(b, self.val_dim, h, w)
            outs.append(feat)
        return self.head(x + self.proj(torch.cat(outs, 1)))


class PartialAttention(nn.Module):
    """SHViT: ``self.pdim`` is the width of the input part the attention takes and of its
    values, which are different channels."""

    def __init__(self, dim: int = 16, pdim: int = 6, qk: int = 4):
        super().__init__()
        self.dim, self.pdim, self.qk = dim, pdim, qk
        self.stem, self.qkv = cbr(3, dim), nn.Conv2d(pdim, 2 * qk + pdim, 1)
        self.proj, self.head = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], 1)
        q, k, v = torch.split(self.qkv(x1), [self.qk, self.qk, self.pdim], 1)
        attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)
        x1 = (v.flatten(2) @ attn.transpose(1, 2)).reshape(b, self.pdim, h, w)
        return self.head(x + self.proj(torch.cat([x1, x2], 1)))


@pytest.mark.parametrize("make", [CascadedHeads, PartialAttention])
def test_widths_one_number_gives_are_tied_and_prune_together(make):
    """Before, CascadedHeads froze its stream (the last head's values kept ``val_dim``) and
    PartialAttention's plan failed (its values and input part shrank apart): the target was
    infeasible. Ties keep the widths one number gives equal, and the check passes."""
    from pruners import prune
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(1, 3, 8, 8)
    result = prune(model, x, target_flops=0.5)
    assert 0.47 <= result.report.flops_ratio <= 0.5
    assert result.report.verify is not None and result.report.verify.ok
    assert not any("fixed in Python" in f.reason for f in result.graph.frozen)
    assert any(n.startswith("tied channels of stem.0") for n in result.report.notes)
    assert result.model.stem[0].out_channels < 16
    assert result.model(x).shape == model(x).shape
    g = repair_graph(model, analyze(capture(model, x)), x)
    for seed in range(3):
        units = sample_units(g, 0.5, np.random.default_rng(seed))
        assert verify(model, g, units, x).ok


class ListSplit(nn.Module):
    """FocalNet's modulation: ``torch.split(x, self.input_split, 1)`` with ``input_split =
    [dim, dim, level + 1]``; q and the context are different groups of one width."""

    def __init__(self, dim: int = 8, level: int = 2):
        super().__init__()
        self.input_split = [dim, dim, level + 1]
        self.stem, self.f = cbr(3, 8), nn.Conv2d(8, 2 * dim + level + 1, 1)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.h, self.head = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        q, ctx, gates = torch.split(self.f(self.stem(x)), self.input_split, 1)
        return self.head(q * self.h(self.dw(ctx) * gates[:, :1]))


def test_a_list_a_split_takes_is_rewritten_in_order_and_plans_carry_it(tmp_path):
    """Only q narrows: 8 stays a width elsewhere, so no rewrite by value can serve; the list
    equal to the split's sizes takes the new sizes in order (before, both groups froze)."""
    x = torch.randn(1, 3, 8, 8)
    model = ListSplit().eval()
    g = analyze(capture(model, x))
    assert find_unprunable_groups(model, g, x) == {}
    ids = g.unit_index[("f.weight", 0)]
    q, ctx = ids[:3].tolist(), ids[8:10].tolist()
    first, second = Plan.from_units(g, q), None
    assert first.splits == {"": [((8, 8, 3), (5, 8, 3))]}
    assert verify(model, g, q, x).ok and verify(model, g, q + ctx, x).ok
    first.save(tmp_path / "plan.json")
    once = apply_plan(copy.deepcopy(model), Plan.load(tmp_path / "plan.json"))
    assert once.input_split == [5, 8, 3]
    g2 = analyze(capture(once, x))
    second = Plan.from_units(g2, g2.unit_index[("f.weight", 0)][5:7].tolist())  # 2 of ctx
    both = first.then(second)
    assert both.splits == {"": [((8, 8, 3), (5, 6, 3))]}
    fresh = apply_plan(copy.deepcopy(model), both)
    assert fresh.input_split == apply_plan(once, second).input_split == [5, 6, 3]
    torch.testing.assert_close(fresh(x), once(x))


def test_repair_freezes_exactly_the_group_with_a_baked_width():
    model = BakedSplit().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    bad = find_unprunable_groups(model, g, x)
    assert len(bad) == 1
    (gid,) = bad
    assert "cv1.0" in g.groups[gid].layers
    assert "split_with_sizes" in bad[gid]
    repaired = repair_graph(model, g, x)
    assert len(repaired.units) == len(g.units) - len(g.groups[gid].units)
    assert any("fixed in Python" in f.reason for f in repaired.frozen)
    for seed in range(3):
        units = sample_units(repaired, 0.5, np.random.default_rng(seed))
        assert verify(model, repaired, units, x).ok


def test_repair_keeps_a_graph_without_problems():
    model = nn.Sequential(cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    assert repair_graph(model, g, x) is g


def test_repair_catches_a_baked_width_that_fails_silently():
    """split(4) on 8 channels still runs once they are 6 ([4, 2]), but computes garbage."""

    class SilentSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = cbr(3, 8)
            self.b = cbr(8, 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            lo, hi = self.a(x).split(4, dim=1)
            return self.head(self.b(torch.cat((hi, lo), 1)))

    model = SilentSplit().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    bad = find_unprunable_groups(model, g, x)
    assert [g.groups[k].layers[0] for k in bad] == ["a.0"]
    assert "differ" in next(iter(bad.values()))


class FixedSize(nn.Module):
    """A learned position map of one size, as a ViT's position embedding: no other size runs."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.pos = nn.Parameter(torch.randn(1, 8, 128, 128))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.stem(x) + self.pos)


def test_probes_run_at_half_size_where_the_model_allows_and_still_find_baked_widths():
    x = torch.randn(1, 3, 128, 128)
    model = BakedSplit().eval()
    small = probe_inputs(model, x)
    assert small.shape == (1, 3, 64, 64)
    assert probe_inputs(FixedSize().eval(), x) is x
    assert probe_inputs(model, torch.randn(1, 3, 100, 100)).shape[-1] == 100  # too small
    g = analyze(capture(model, x))
    assert find_unprunable_groups(model, g, small) == find_unprunable_groups(model, g, x)


def test_units_that_hold_a_whole_layer_dim_are_not_probed():
    """ShuffleNetV2's channel shuffles fold some layer dims into a single unit; a probe that
    removed it would empty the layer (a SurgeryError, not a finding)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = tv.models.shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 64, 64)
    g = analyze(capture(model, x))
    sole = {int(ids[0]) for ids in g.unit_index.values() if len(ids) and (ids == ids[0]).all()
            and ids[0] >= 0}
    assert sole  # the case exists in this model
    assert find_unprunable_groups(model, g, x) == {}


def _baked_blocks(monkeypatch):
    """Eight BakedSplit blocks in a row, each failing inside its own forward; the list that
    ``calls`` fills with one item per repair probe."""
    from pruners import repair

    model = nn.Sequential(*[BakedSplit() for _ in range(8)]).eval()
    for block in model[1:]:
        block.stem = cbr(4, 16)
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    calls = []
    real = repair.verify
    monkeypatch.setattr(repair, "verify", lambda *a, **k: calls.append(1) or real(*a, **k))
    return model, g, x, calls


def test_the_module_that_raised_narrows_the_search(monkeypatch):
    """The probe that fails names the block, whose few groups are probed first; the same
    groups are found with fewer probes than a blind bisection over every group."""
    from pruners import repair

    model, g, x, calls = _baked_blocks(monkeypatch)
    bad = find_unprunable_groups(model, g, x)
    assert sorted(g.groups[gid].layers[0] for gid in bad) == [f"{i}.cv1.0" for i in range(8)]
    localized, calls[:] = len(calls), []
    monkeypatch.setattr(repair, "_raising_module", lambda exc: None)
    assert find_unprunable_groups(model, g, x) == bad
    assert localized < len(calls)


def test_a_group_found_has_its_likes_in_the_other_blocks_probed_next(monkeypatch):
    """Once ``0.cv1`` fails alone, ``1.cv1`` ... ``7.cv1`` (the same layers but for the block
    number) are probed alone next, instead of probing every other group again each time:
    the same groups, fewer probes."""
    from pruners import repair

    model, g, x, calls = _baked_blocks(monkeypatch)
    bad = find_unprunable_groups(model, g, x)
    with_likes, calls[:] = len(calls), []
    monkeypatch.setattr(repair, "_layout", frozenset)  # every group its own layout
    assert find_unprunable_groups(model, g, x) == bad
    assert with_likes < len(calls)
    assert with_likes <= len(bad) + 3  # one probe per group found, and a few to start and end


class TrainOnlyAux(nn.Module):
    """A block with a layer only training runs (YOLO26-pose's ``cv4_sigma``, GoogLeNet's aux
    heads): never traced, so nothing prunes its input columns with the feature it reads."""

    def __init__(self, cin: int = 4):
        super().__init__()
        self.a, self.b, self.c = cbr(cin, 16), cbr(16, 16), cbr(16, 4)
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        if self.training:
            self.aux_out = self.aux(y)
        return self.c(y)


def test_a_layer_only_training_runs_points_at_its_enclosing_block(monkeypatch):
    """The probe fails inside ``k.aux``, which no group reaches into: its block ``k`` is the
    narrowest module that some group does, so its groups are probed first."""
    from pruners import repair

    model = nn.Sequential(TrainOnlyAux(3), *[TrainOnlyAux() for _ in range(7)]).eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    calls = []
    real = repair.verify
    monkeypatch.setattr(repair, "verify", lambda *a, **k: calls.append(1) or real(*a, **k))
    bad = find_unprunable_groups(model, g, x, train_mode=True)
    assert sorted(g.groups[gid].layers[0] for gid in bad) == [f"{i}.b.0" for i in range(8)]
    localized, calls[:] = len(calls), []
    monkeypatch.setattr(repair, "_enclosing", lambda module, names: module)
    assert find_unprunable_groups(model, g, x, train_mode=True) == bad
    assert localized < len(calls)


class InputWidthAttention(nn.Module):
    """Swin's attention in small: the heads' width is read from the input (``C =
    x.shape[-1]``), so the qkv rows must stay three times the residual width; no norm and a
    fixed score scale, so the check is exact."""

    def __init__(self, dim: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
                                 for _ in range(blocks))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        for qkv, proj, mlp in zip(self.qkv, self.proj, self.mlp):
            b, n, c = t.shape
            q, k, v = qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * 0.25).softmax(-1)
            t = t + proj((attn @ v).transpose(1, 2).reshape(b, n, c))
            t = t + mlp(t)
        return self.head(t.mean(1))


def test_attention_reading_its_width_from_the_input_is_tied_to_it():
    """Neither the residual width nor the heads can shrink alone; tied (qkv row j to residual
    channel j), they shrink together and the model stays exact."""
    from pruners import prune

    torch.manual_seed(0)
    model, x = InputWidthAttention().eval(), torch.randn(2, 3, 16, 16)
    g = analyze(capture(model, x))
    raised: dict = {}
    bad = find_unprunable_groups(model, g, x, where=raised)
    assert len(bad) == 3 and set(raised) == set(bad)  # the residual and both blocks' heads
    linked, rest, notes = link_input_widths(model, g, bad, raised, x)
    assert rest == {} and len(notes) == 1 and "tied the heads" in notes[0]
    assert len(linked.groups) == len(g.groups) - 2
    for seed in range(3):
        units = sample_units(linked, 0.5, np.random.default_rng(seed))
        assert verify(model, linked, units, x).ok
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert result.report.verify is not None and result.report.verify.ok
    residual = result.model.embed.out_channels
    assert residual < 32 and residual % 4 == 0
    assert all(q.out_features == 3 * residual for q in result.model.qkv)
    assert any("tied the heads" in n for n in result.report.notes)


class SquareHeads(nn.Module):
    """timm-style attention with as many heads as each head is wide (Swin-B's last stage:
    32 x 32): the number 4 is both ``num_heads``, which stays, and ``head_dim``, which may not."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.embed, self.qkv = nn.Linear(8, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        t = self.embed(x)
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return self.head(t.mean(1))


def test_a_head_count_equal_to_the_head_width_is_not_rewritten():
    from pruners import apply_plan
    model, x = SquareHeads().eval(), torch.randn(2, 5, 8)
    g = analyze(capture(model, x))
    rows = g.unit_index[("qkv.weight", 0)]
    units = sorted({int(u) for u in rows if u >= 0})[:1]  # one position of every head
    plan = Plan.from_units(g, units)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert (pruned.num_heads, pruned.head_dim) == (4, 3)
    assert verify(model, g, units, x).ok


class SilentSplitNorm(nn.Module):
    """``split(4)`` that runs wrong once 8 channels become 6, beside a GroupNorm branch whose
    channels are inexact (pruning changes its statistics): the final check of a plan that
    prunes both compares it against the masked original with the inexact units removed too."""

    def __init__(self, norm: bool = True):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 2, 1)
        self.c = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1),
                               nn.GroupNorm(1, 32) if norm else nn.BatchNorm2d(32), nn.ReLU())
        self.d = nn.Conv2d(32, 2, 3, padding=1)

    def forward(self, x):
        lo, hi = self.a(x).split(4, dim=1)
        return self.head(self.b(torch.cat((hi, lo), 1))) + self.d(self.c(x))


@pytest.mark.parametrize("norm", [True, False], ids=["mixed_plan", "exact_plan"])
def test_prune_freezes_a_silently_wrong_group_whether_or_not_its_check_compares(norm):
    """Repair's probes compare no outputs; the final check does, for an all-exact plan
    against the masked original, for a mixed one against the masked original with the
    plan's inexact units removed as well."""
    from pruners import prune

    model = SilentSplitNorm(norm).eval()
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, target_flops=0.6)
    assert result.model.a[0].out_channels == 8
    assert result.model.c[0].out_channels < 32
    assert any("a.0" in n and "differ" in n for n in result.report.notes)
    check = result.report.verify
    assert check is not None and check.ok and (check.inexact > 0) == norm
    assert ("inexact units removed from it too" in str(result.report)) == norm


def test_a_mixed_plan_is_compared_with_its_inexact_units_removed_from_the_reference(
        monkeypatch):
    """Exact and inexact units together: the reference is the masked original with the
    inexact units pruned too, so the check compares, catches a silently wrong exact group,
    and a plan that passes needs no one-unit probes of its exact groups first."""
    import sys

    from pruners import prune
    from pruners.verify import DenseRun

    model, x = SilentSplitNorm().eval(), torch.randn(2, 3, 16, 16)
    g = analyze(capture(model, x))
    dense = DenseRun.of(model, x)
    b_out = [u.id for u in g.units if ("b.0.weight", 0, 8) in g.groups[u.group].dims]
    a_out = [u.id for u in g.units if ("a.0.weight", 0, 8) in g.groups[u.group].dims]
    c_out = [u.id for u in g.units if ("c.0.weight", 0, 32) in g.groups[u.group].dims]
    assert b_out and a_out and c_out and not g.units[c_out[0]].exact
    good = verify(model, g, b_out[:2] + c_out[:4], x, dense=dense)
    assert good.inexact == 4 and good.compared and good.ok
    bad = verify(model, g, a_out[:1] + c_out[:4], x, dense=dense)  # split(4) of 6: wrong
    assert bad.inexact == 4 and not bad.ok
    only_inexact = verify(model, g, c_out[:4], x, dense=dense)
    assert not only_inexact.compared and only_inexact.inexact == 0
    made = []  # the pruned model made by the check, after its reference (memory reused)

    def maker(units):
        return lambda: made.append(units) or remove_units(copy.deepcopy(model), g, units)

    lazy = verify(model, g, b_out[:2] + c_out[:4], x, dense=dense,
                  pruned=maker(b_out[:2] + c_out[:4]))
    assert lazy.ok and lazy.inexact == 4 and lazy.max_abs_diff == good.max_abs_diff
    lazy_bad = verify(model, g, a_out[:1] + c_out[:4], x, dense=dense,
                      pruned=maker(a_out[:1] + c_out[:4]))
    assert not lazy_bad.ok and lazy_bad.max_abs_diff == bad.max_abs_diff and len(made) == 2
    api = sys.modules["pruners.api"]
    probed = []
    real = api.find_unprunable_groups
    monkeypatch.setattr(api, "find_unprunable_groups",
                        lambda *a, **k: probed.append(k.get("exact_only")) or real(*a, **k))
    clean = prune(SilentSplitNorm().eval(), x, target_flops=0.6, protect=["a"])
    assert clean.report.verify is not None and clean.report.verify.inexact > 0
    assert True not in probed  # no exact-group probes: the check compared the plan


def test_probes_that_compare_nothing_run_no_real_forward_after_the_screen(monkeypatch):
    """With the screen serving, every one-unit probe's shapes are known from fake runs: when
    outputs are not compared (prune()'s first pass), nothing runs for real; when they are,
    the exact groups' probes do (pruned and masked forwards)."""
    import sys

    from pruners.repair import probe_run
    from pruners.screen import ShapeScreen
    from pruners.verify import DenseRun

    model, x = BakedSplit().eval(), torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    dense = DenseRun.of(model, x)
    screen = ShapeScreen.of(model, x)
    verify_mod = sys.modules["pruners.verify"]
    real = []
    run = verify_mod.run_model
    monkeypatch.setattr(verify_mod, "run_model", lambda *a, **k: real.append(1) or run(*a, **k))
    bad = find_unprunable_groups(model, g, x, screen=screen, dense=probe_run(model, dense),
                                 compare=False)
    assert len(bad) == 1 and "split_with_sizes" in next(iter(bad.values()))
    assert real == []
    assert find_unprunable_groups(model, g, x, screen=screen, dense=dense) == bad
    assert len(real) >= 2


class NormedReshape(nn.Module):
    """A block that views its projection back by its input's width, behind a GroupNorm (the
    input's channels are inexact): the input and the projection can shrink only together,
    so a unit of every group at once runs while either alone fails."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8)
        self.v, self.out = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        t = self.norm(self.embed(x))
        b, c, h, w = t.shape
        return self.out(self.v(t).reshape(b, c, h * w).reshape(b, c, h, w))


def test_fake_and_real_probes_find_what_fails_only_alone():
    """Exact and inexact groups are probed apart on fake tensors as for real: together, the
    input's and the projection's one-unit probes agree and nothing would be found."""
    from pruners.screen import ShapeScreen
    from pruners.verify import DenseRun

    model, x = NormedReshape().eval(), torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    assert sorted(all(g.units[u].exact for u in grp.units) for grp in g.groups) == [False, True]
    dense = DenseRun.of(model, x)
    real = find_unprunable_groups(model, g, x, compare=False, dense=dense)
    fake = find_unprunable_groups(model, g, x, compare=False, dense=dense,
                                  screen=ShapeScreen.of(model, x))
    assert len(real) == 2 and fake == real


def test_a_tie_to_an_inexact_input_is_inexact_and_the_block_prunes():
    """Tied units are exact only if every unit tied is: the projection's rows (exact) tied
    to the GroupNorm'd input (inexact) may not be compared with the masked original, which
    froze the block before."""
    from pruners import prune
    from pruners.verify import DenseRun

    model, x = NormedReshape().eval(), torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    dense, raised = DenseRun.of(model, x), {}
    bad = find_unprunable_groups(model, g, x, where=raised, compare=False, dense=dense)
    tied, rest, notes = link_input_widths(model, g, bad, raised, x, dense=dense)
    assert rest == {} and len(tied.groups) == 1 and "tied the heads" in notes[0]
    assert not any(u.exact for u in tied.units)
    result = prune(model, x, target_flops=0.6)
    assert result.model.v.out_channels == result.model.embed.out_channels < 8
    assert result.model(x).shape == model(x).shape


def test_iterative_pruning_in_place_carries_the_rewrites():
    """``prune_iteratively(inplace=True)`` re-applies the composed plan to the user's model:
    it had dropped the plan's widths held in Python, so ``c`` stayed 8 and the model broke."""
    from pruners import prune_iteratively
    x = torch.randn(1, 3, 8, 8)
    model = AttributeSplit().eval()
    def split_first(m, graph):  # the split's channels rank lowest
        return np.array([0.0 if any(sl.param == "cv1.0.weight" and sl.dim == 0
                                    for sl in graph.slices(u.id)) else 1.0
                         for u in graph.units])

    result = prune_iteratively(model, x, channel_ratio=0.3, steps=2, inplace=True,
                               importance=split_first)
    assert result.model is model and model.c == model.cv1[0].out_channels // 2 < 8
    assert result.plan.sizes[""][8] == model.c
    assert model(x).shape == (1, 4, 8, 8)


class TrainOnlyReader(nn.Module):
    """``a``'s width is read by a layer only training runs (RT-DETR's score heads of the
    decoder layers but the last); ``b`` is an unrelated group of the same width."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = cbr(3, 8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.aux, self.ha, self.hb = nn.Linear(8, 2), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.a(x).flatten(2), self.b(x).flatten(2)  # widths of 8 in one module
        out = self.ha(a.unflatten(2, x.shape[2:])) + self.hb(b.unflatten(2, x.shape[2:]))
        if self.training:
            out = out + self.aux(a.mean(-1)).sum()
        return out


def test_a_group_a_plan_breaks_in_train_mode_is_not_tied_by_an_eval_probe(monkeypatch):
    """The plan fails in train mode at ``aux``; a tie of ``a`` to ``b`` (equal widths in one
    module) runs in eval mode, so it was kept, and the next plan froze both. The tie's probe
    now runs in train mode as the plan's did: only ``a`` freezes, ``b`` prunes (with the
    train-mode capture that would let ``aux`` follow ``a`` failing)."""
    import pruners.api as api
    from pruners import prune

    def no_train_capture(model):
        raise RuntimeError("no train-mode capture")

    monkeypatch.setattr(api, "training", no_train_capture)
    torch.manual_seed(0)
    model, x = TrainOnlyReader().eval(), torch.randn(1, 3, 8, 8)
    result = prune(model, x, target_flops=0.6)
    assert result.model.a.out_channels == 8 and result.model.b.out_channels < 8
    assert not any(n.startswith("tied channels") for n in result.report.notes)
    assert any("fails in train mode" in f.reason for f in result.graph.frozen)


def test_a_layer_only_training_runs_shrinks_with_the_width_it_reads():
    """The same model with the train-mode capture: ``aux`` takes ``a``'s units, so ``a``
    prunes too, untied from ``b``, and the pruned model trains."""
    from pruners import prune
    torch.manual_seed(0)
    model, x = TrainOnlyReader().eval(), torch.randn(1, 3, 8, 8)
    result = prune(model, x, target_flops=0.6)
    small = result.model
    assert small.a.out_channels < 8 and small.aux.in_features == small.a.out_channels
    assert not any(n.startswith("tied channels") for n in result.report.notes)
    assert small.train()(x).shape == (1, 4, 8, 8)


class EqualCountAttention(nn.Module):
    """LeViT's downsampling attention, with as many heads as the key width: ``view(B, N,
    self.num_heads, -1).split([self.key_dim, self.val_dim], 3)``."""

    def __init__(self, dim: int = 16, heads: int = 4, key_dim: int = 4, val_dim: int = 8):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.kv = nn.Linear(dim, heads * (key_dim + val_dim))
        self.q = nn.Linear(dim, heads * key_dim)
        self.proj = nn.Linear(heads * val_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], 3)
        q = self.q(x).view(b, n, self.num_heads, self.key_dim)
        attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).softmax(-1)
        return x + self.proj((attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, -1))


def test_a_key_width_equal_to_the_head_count_shrinks_and_the_count_stays(tmp_path):
    """4 heads of key width 4: the view passes 4 as the head count (which stays) and the split
    4 as the key width (which shrinks). Before, no attribute could be rewritten (the key
    width's group froze); now ``key_dim`` follows and ``num_heads`` stays, in plans too."""
    torch.manual_seed(0)
    model, x = EqualCountAttention().eval(), torch.randn(1, 6, 16)
    g = analyze(capture(model, x))
    ids = g.unit_index[("q.weight", 0)]
    units = sorted(set(ids[ids >= 0].tolist()))[:1]  # one position of every head's keys
    assert find_unprunable_groups(model, g, x) == {}
    assert verify(model, g, units, x).ok
    plan = Plan.from_units(g, units)
    assert plan.counts == {"": [4]}
    plan.save(tmp_path / "plan.json")
    pruned = apply_plan(copy.deepcopy(model), Plan.load(tmp_path / "plan.json"))
    assert (pruned.num_heads, pruned.key_dim, pruned.val_dim) == (4, 3, 8)
    assert pruned(x).shape == model(x).shape


class _Update(nn.Module):
    def __init__(self, hidden: int = 24, context: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(hidden + context + 2, hidden, 1)

    def forward(self, h, c, flow):
        return h * torch.sigmoid(self.conv(torch.cat([h, c, flow], 1)))


class ChildHeldSplit(nn.Module):
    """RAFT's shape: the root splits its features by a child's attribute (``self.update.
    hidden``) and the rest by what the tensor holds; the child concatenates a fixed-size tensor
    (RAFT's 2 flow channels) with pruned ones, and the code refuses an empty part."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 40)
        self.update = _Update()
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        f = self.stem(x)
        rest = f.shape[1] - self.update.hidden
        if rest <= 0:
            raise ValueError(f"{f.shape[1]} channels leave no context after {self.update.hidden}")
        h, c = torch.split(f, [self.update.hidden, rest], 1)
        flow = torch.ones(x.shape[0], 2, x.shape[2], x.shape[3])
        for _ in range(2):
            h = self.update(torch.tanh(h), torch.relu(c), flow)
        return self.head(h)


def test_a_width_read_from_a_childs_attribute_and_a_fixed_concat_part_prune():
    """Before: the flow's fixed channels froze every part of the concat, and the root's split
    by ``self.update.hidden`` froze the hidden channels ("a width fixed in Python")."""
    from pruners import prune
    x = torch.randn(1, 3, 8, 8)
    model = ChildHeldSplit().eval()
    g = analyze(capture(model, x))
    flow_only = [f for f in g.frozen if "concatenates" in f.reason]
    assert sum(n for _, _, n in flow_only[0].dims) > 0 and len(flow_only) == 1
    assert all(n == 2 for _, _, n in flow_only[0].dims)  # the 2 flow channels, nothing else
    assert find_unprunable_groups(model, g, x) == {}
    result = prune(model, x, target_flops=0.4)
    pruned = result.model
    assert pruned.update.hidden < 24 and pruned.update.conv.out_channels == pruned.update.hidden
    assert pruned.stem[0].out_channels - pruned.update.hidden < 16  # the context shrank too
    assert "update.hidden: 24 -> " in str(result.report)
    assert result.report.verify is not None and result.report.verify.ok
    assert pruned(x).shape == (1, 4, 8, 8)
    again = apply_plan(ChildHeldSplit().eval(), result.plan)  # the plan carries the rewrite
    assert again.update.hidden == pruned.update.hidden


def test_each_part_of_a_split_by_python_sizes_keeps_its_floor():
    """The stem's 40 channels keep 4 (max_ratio 0.9); each part of the split keeps its own
    floor too (2 of the context's 16), or the code's own check (no empty context) fails."""
    from depgraph.cost import cost_model
    from pruners.allocate import Target, allocate
    x = torch.randn(1, 3, 8, 8)
    model = ChildHeldSplit().eval()
    g = analyze(capture(model, x))
    (_, (hidden, context)), = g.splits
    scores = np.ones(len(g.units))
    scores[context] = 0.0  # the context's channels go first
    removed = set(allocate(g, scores, cost_model(g), Target("flops", 0.45), max_ratio=0.9))
    assert len(removed) > 16
    assert sum(int(u) not in removed for u in context) == 2
    pruned = apply_plan(copy.deepcopy(model), Plan.from_units(g, sorted(removed)))
    pruned(x)


class _Widths(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim


def test_a_child_keeps_its_width_when_the_parents_own_width_explains_the_number():
    """C2PSA's ``split((self.c, self.c))`` also passes the whole, 16, which ``self.c`` (8)
    explains: a child's unrelated ``dim = 16`` is not taken for it."""
    x = torch.randn(1, 3, 8, 8)
    model = AttributeSplit().eval()
    model.extra = _Widths(16)
    g = analyze(capture(model, x))
    (gid,) = [grp.id for grp in g.groups if ("cv1.0.weight", 0, 16) in grp.dims]
    pruned = apply_plan(copy.deepcopy(model), Plan.from_units(g, list(g.groups[gid].units[:3])))
    assert pruned.c == 5 and pruned.extra.dim == 16
