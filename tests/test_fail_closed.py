"""Rules fail closed: arguments read by schema name, tensors by keyword, unknown module widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depgraph import analyze, capture
from depgraph.capture import normalize_arguments
from depgraph.errors import SurgeryError
from pruners import prune, remove_units, sample_units, verify


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
        else:
            y = F.normalize(y, dim=1)
        return self.b(y)


@pytest.mark.parametrize("how", ["norm", "vector_norm", "normalize"])
def test_a_norm_over_channels_freezes_them(how):
    # linalg_vector_norm(x, ord, dim): the dims are the third argument; read as the second,
    # the norm looked like one over H and the channels pruned as if nothing mixed them
    model, x = _Normed(how).eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    assert not graph.units_of("a.weight")
    assert any("reduces over channels" in f.reason for f in graph.frozen)


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


def test_surgery_refuses_an_unknown_module_with_a_width_attribute():
    model, x = _Scaled().eval(), torch.randn(2, 3, 8, 8)
    graph = analyze(capture(model, x))
    units = graph.units_of("s.gamma")
    assert units, "the scale's channels are prunable in the graph"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"Scale 's' .*dim=8.*MODULE_FIXERS"):
        remove_units(model, graph, sorted(units)[:2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_freezes_what_surgery_cannot_update_and_says_why():
    model, x = _Scaled().eval(), torch.randn(2, 3, 8, 8)
    result = prune(model, x, channel_ratio=0.5)
    assert result.model.s.gamma.shape == (8,)  # its group is kept whole
    assert result.model.s.dim == 8
    assert any("Scale 's'" in n and "dim=8" in n for n in result.report.notes)
    assert result.report.verify is None or result.report.verify.ok
