"""Rules fail closed: arguments read by schema name, tensors by keyword, unknown module widths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depgraph import analyze, capture
from depgraph.capture import normalize_arguments
from depgraph.errors import PruningError, SurgeryError
from pruners import find_unprunable_groups, prune, remove_units, run_model, sample_units, verify


class _Normed(nn.Module):
    """conv -> a reduction over channels whose dims are not the op's second argument."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.how == "norm":
            y = y / y.norm(dim=1, keepdim=True)
        elif self.how == "vector_norm":
            y = y * torch.linalg.vector_norm(y, 2, dim=1, keepdim=True)
        elif self.how == "normalize":
            y = F.normalize(y, dim=1)
        elif self.how == "sum":
            y = y * y.sum(1, keepdim=True)
        elif self.how == "cosine":  # cosine attention: q.k contracted, q and k normalised
            t = y.flatten(2).transpose(1, 2)
            q = F.normalize(t, dim=-1)
            attn = (q @ q.transpose(1, 2)).softmax(-1)
            y = (attn @ t).transpose(1, 2).reshape(y.shape)
        elif self.how == "amax":
            y = y - y.amax(1, keepdim=True)
        elif self.how == "min_norm":  # ord -inf: the smallest magnitude, which a zero changes
            y = y * torch.linalg.vector_norm(y, float("-inf"), dim=1, keepdim=True)
        elif self.how == "sigmoid_sum":  # a zeroed channel is 0.5 here: adds to the sum
            y = y * torch.sigmoid(y).sum(1, keepdim=True)
        return self.b(y)


@pytest.mark.parametrize("how", ["norm", "vector_norm", "normalize", "sum", "cosine"])
def test_a_sum_or_norm_over_channels_prunes_them_exactly(how):
    # linalg_vector_norm(x, ord, dim): the dims are the third argument; read as the second,
    # the norm looked like one over H, the channels passed through unmasked, and the check
    # below failed. Read by name, the channels are contracted: zero where they are made,
    # they add nothing to the norm, as removed
    model, x = _Normed(how).eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    units = graph.units_of("a.weight")
    assert len(units) == 8 and all(graph.units[u].contracted for u in units)
    for seed in range(3):
        removed = sample_units(graph, 0.5, np.random.default_rng(seed))
        assert removed and verify(model, graph, removed, x).ok


@pytest.mark.parametrize("how", ["amax", "min_norm"])
def test_a_reduction_a_zero_changes_freezes_the_channels(how):
    model, x = _Normed(how).eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    assert not graph.units_of("a.weight")
    assert any("reduces over channels" in f.reason for f in graph.frozen)


def test_a_sum_of_what_zero_does_not_stay_zero_is_caught_by_repair():
    """sigmoid(0) = 0.5: zeroed channels still add to the sum, so the check differs; repair
    sees it and freezes the group, and prune() says why nothing can go."""
    torch.manual_seed(0)
    model, x = _Normed("sigmoid_sum").eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    bad = find_unprunable_groups(model, graph, x)
    assert [graph.groups[g].layers[0] for g in bad] == ["a"]
    assert "differ" in next(iter(bad.values()))
    from pruners.allocate import InfeasibleTargetError

    with pytest.raises(InfeasibleTargetError, match="outputs differ") as info:
        prune(model, x, target_params=0.95)  # nothing else in it can go
    assert info.value.reachable == pytest.approx(1.0)


def _two_branch() -> tuple[nn.Module, torch.Tensor]:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.add(self.a(x), self.b(x)))

    return M().eval(), torch.randn(2, 3, 8, 8)


def test_a_tensor_passed_by_keyword_is_coupled():
    model, x = _two_branch()
    cap = capture(model, x)
    add = next(n for n in cap.graph.nodes if "add" in str(n.target))
    first, other = add.args[0], add.args[1]
    add.args, add.kwargs = (first,), {"other": other}  # as another tracer may write it
    normalize_arguments(cap.graph)
    assert add.args[:2] == (first, other) and "other" not in add.kwargs
    graph = analyze(cap)
    # both branches feed the add: one group holding both convs' outputs
    (group,) = [g for g in graph.groups if g.units]
    assert {"a.weight", "b.weight"} <= {d[0] for d in group.dims}
    units = sample_units(graph, 0.5, np.random.default_rng(0))
    assert verify(model, graph, units, x).ok


def test_a_channel_tensor_given_keyword_only_freezes():
    # the unknown-op barrier and rules only read positional inputs: what remains in kwargs after
    # normalisation must freeze, not vanish from the analysis
    model, x = _two_branch()
    cap = capture(model, x)
    add = next(n for n in cap.graph.nodes if "add" in str(n.target))
    add.target = torch.ops.aten.searchsorted.Tensor  # (sorted, self, *, ..., sorter=None)
    add.args, add.kwargs = (add.args[0], add.args[0]), {"sorter": add.args[1]}
    graph = analyze(cap)
    assert not graph.units_of("b.weight")
    assert any("unsupported op searchsorted" in f.reason and
               any(d[0] == "b.weight" for d in f.dims) for f in graph.frozen)


class Scale(nn.Module):
    """A per-channel scale that keeps its width in Python, as user layers often do."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, self.dim, 1, 1)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.b = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.s(self.a(x)))


def test_surgery_rewrites_the_width_an_unknown_module_keeps():
    model, x = _Scaled().eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    units = sorted(graph.units_of("s.gamma"))[:3]
    assert units, "the scale's channels are prunable in the graph"
    assert verify(model, graph, units, x).ok
    pruned = remove_units(model, graph, units)
    assert pruned.s.dim == 5 and pruned.s.gamma.shape == (5,)


class _Ambiguous(nn.Module):
    """Two tensors of width 8 that shrink differently, and one ``self.width = 8``."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.u, self.v = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.u.view(1, -1, 1, 1), y * self.v.view(1, -1, 1, 1)


class _TwoWays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.s = _Ambiguous()
        self.c, self.d = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.s(self.a(x), self.b(x))
        return self.c(p) + self.d(q)


def test_surgery_refuses_a_width_attribute_it_cannot_map():
    model, x = _TwoWays().eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    units = sorted(graph.units_of("s.u"))[:1] + sorted(graph.units_of("s.v"))[:3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"_Ambiguous 's' keeps width=8.*MODULE_FIXERS"):
        remove_units(model, graph, units)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.s.width == 8


def test_prune_reports_the_rewrite_and_verifies_it():
    model, x = _Scaled().eval(), torch.randn(2, 3, 8, 8)
    result = prune(model, x, channel_ratio=0.5)
    assert result.model.s.gamma.shape == (4,) and result.model.s.dim == 4
    assert any("rewrote 1 widths held in Python" in n and "s.dim: 8 -> 4" in n
               for n in result.report.notes)
    assert result.report.verify is not None and result.report.verify.ok


class _Mixed(nn.ModuleDict):
    """MixNet's mixed conv: the input is split by a stored ``self.splits``."""

    def __init__(self) -> None:
        super().__init__({"0": nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          "1": nn.Conv2d(8, 8, 5, padding=2, groups=8)})
        self.splits, self.in_channels, self.out_channels = [8, 8], 16, 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.values(), parts)], 1)


def test_a_container_holding_its_childrens_widths_is_rewritten():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), _Mixed(), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    result = prune(model, torch.randn(1, 3, 16, 16), target_flops=0.5)
    mixed = result.model[2]
    assert mixed.splits == [c.in_channels for c in mixed.values()] and sum(mixed.splits) < 16
    assert mixed.in_channels == sum(mixed.splits) == mixed.out_channels
    assert not any("froze group" in n for n in result.report.notes)
    assert result.report.verify is not None and result.report.verify.ok


def test_stored_head_sizes_are_rewritten_so_attention_heads_prune():
    """Issue 14: timm's ``Attention`` reshapes q/k/v by ``self.num_heads, self.head_dim`` and
    merges by ``self.attn_dim``; repair used to freeze its groups. Every head now keeps the same
    narrower width, ``head_dim`` and ``attn_dim`` follow, and the count of heads stays."""
    from models import build

    model, x = build("stored_heads")
    graph = analyze(capture(model, x))
    qkv_out = graph.unit_index[("attn.qkv.weight", 0)]  # 3 x 4 heads x 8: one unit per dim
    assert (qkv_out >= 0).all() and len(set(qkv_out.tolist())) == 8, qkv_out
    units = sorted(set(qkv_out.tolist()))[:3]
    assert verify(model, graph, units, x).ok
    pruned = remove_units(model, graph, units)
    attn = pruned.attn
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (4, 5, 20)  # 4 heads of 8 -> of 5
    assert attn.qkv.out_features == 3 * attn.attn_dim == 60 and attn.proj.in_features == 20
    assert attn.scale == 8 ** -0.5  # kept: the pruned scores equal the masked original's


def test_prune_reports_the_head_rewrite_and_lands_on_target():
    from models import build

    model, x = build("stored_heads")
    result = prune(model, x, target_flops=0.5)
    attn = result.model.attn
    assert attn.head_dim < 8 and attn.num_heads == 4 and attn.attn_dim == 4 * attn.head_dim
    assert any("attn.head_dim: 8 -> " in n for n in result.report.notes), result.report.notes
    assert not any("froze group" in n for n in result.report.notes), result.report.notes
    assert abs(result.report.flops_ratio - 0.5) <= 0.01


class _SplitHeads(nn.Module):
    """TNT's attention: q/k and v project separately, ``hidden_dim`` (the head split) equals
    the input width, and only q/k reshape by the stored ``head_dim``."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.hidden_dim, self.num_heads, self.head_dim = dim, heads, dim // heads
        self.qk, self.v = nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k = self.qk(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)


def test_an_input_as_wide_as_the_heads_shrinks_without_touching_them():
    """When only the input shrinks (12 -> 9), ``head_dim`` and ``hidden_dim`` equal to that
    input's old width, or a quarter of it, must stay: the graph saw the code pass them for the
    q/k heads, which keep their width. They used to follow the input, and q/k's reshape
    broke (TNT-S froze its residual stream)."""
    model = nn.Sequential(nn.Linear(5, 12), _SplitHeads(), nn.Linear(12, 4)).eval()
    x = torch.randn(2, 6, 5)
    graph = analyze(capture(model, x))
    stream = sorted(set(graph.unit_index[("0.weight", 0)].tolist()))
    assert len(stream) == 12
    units = stream[:3]
    assert verify(model, graph, units, x).ok
    attn = remove_units(model, graph, units)[1]
    assert attn.qk.in_features == attn.v.in_features == 9
    assert (attn.num_heads, attn.head_dim, attn.hidden_dim) == (3, 4, 12)


class _Features(nn.Module):
    """Returns its logits and feature map in a container of the user's own."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.wrap = wrap
        self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor):
        f = F.relu(self.b(F.relu(self.a(x))))
        return self.wrap(self.fc(f.mean((2, 3))), f)


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    features: torch.Tensor


class _Dict(dict):
    """A dict subclass, which pytree leaves unopened."""


@pytest.mark.parametrize("wrap", [_Out, lambda logits, features: _Dict(
    logits=logits, features=features)], ids=["dataclass", "dict-subclass"])
def test_outputs_held_in_a_dataclass_or_dict_subclass_keep_their_widths(wrap):
    model, x = _Features(wrap).eval(), torch.randn(1, 3, 16, 16)
    result = prune(model, x, target_flops=0.6)
    assert result.model.b.out_channels == 16  # an output, kept
    assert result.model.a.out_channels < 16
    # and it is compared: the check sees two tensors, each with its shape
    assert [tuple(t.shape) for t in run_model(model, x)] == [(1, 10), (1, 16, 12, 12)]


def test_outputs_no_check_can_read_are_refused_with_what_to_pass():
    class Box:
        def __init__(self, logits, features):
            self.logits, self.features = logits, features

    model, x = _Features(Box).eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(PruningError, match="returned a Box holding tensors .logits, features"
                       ".*outputs=lambda"):
        prune(model, x, target_flops=0.5)
    nothing = nn.Sequential(_Features(lambda logits, features: None))
    with pytest.raises(PruningError, match="returned no tensor.*outputs=lambda"):
        prune(nothing.eval(), x, target_flops=0.5)
    result = prune(model, x, target_flops=0.6, outputs=lambda o: (o.logits, o.features))
    assert result.model(x).features.shape == model(x).features.shape
