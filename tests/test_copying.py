"""The fast module copy repair's probes use, and the forwards a check can skip."""

import copy

import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from models import cbr
from pruners import verify
from pruners.copying import copy_model
from pruners.verify import DenseRun, shared_params


class Holder(nn.Module):
    """What a plain deepcopy must get right: a submodule held twice, a tensor held twice, a
    list attribute, a non-empty hook dict, a buffer, a GraphModule inside."""

    def __init__(self):
        super().__init__()
        self.stem, self.a = cbr(3, 8), cbr(8, 8)
        self.b = self.a  # the same module twice
        self.sizes = [8, 8]
        self.register_buffer("scale", torch.ones(8))
        self.traced = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()))
        self.calls = 0
        self.a.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.calls += 1

    def forward(self, x):
        return self.traced(self.b(self.a(self.stem(x))) * self.scale[:, None, None])


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_copy_model_copies_as_deepcopy_does():
    model = Holder().eval()
    x = torch.randn(1, 3, 8, 8)
    new, ref = copy_model(model), copy.deepcopy(model)
    assert _same(new, ref) and _same(new, model)
    assert new.a is new.b and new.a is not model.a  # shared stays shared, inside the copy
    assert new.sizes == [8, 8] and new.sizes is not model.sizes
    assert isinstance(new.traced, torch.fx.GraphModule) and new.traced is not model.traced
    # the copy's hook is bound to the copy, as deepcopy binds it (``a`` runs twice)
    out = new(x)
    assert new.calls == 2 and model.calls == 0 and ref.calls == 0
    assert torch.equal(out, model(x))
    # nothing is shared by default: writing into the copy leaves the original alone
    with torch.no_grad():
        for t in list(new.parameters()) + list(new.buffers()):
            t.add_(1)
    assert _same(model, ref)


def test_a_copy_keeps_every_module_s_mode_where_the_class_copies_itself_in_train_mode():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    # torchvision's feature extractor rebuilds itself in train mode when deep-copied
    model = create_feature_extractor(tv.models.resnet18(), {"layer2": "c3"}).eval()
    model.layer1.train()  # and a mixed-mode model keeps its mix
    assert copy.deepcopy(model).training  # what the stock copy does (if this fails, drop the fix)
    new = copy_model(model)
    assert {n: m.training for n, m in new.named_modules()} == {
        n: m.training for n, m in model.named_modules()}
    model.eval()
    new = copy_model(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new(x)["c3"], model(x)["c3"], rtol=0, atol=0)
    assert torch.equal(new.bn1.running_mean, model.bn1.running_mean)  # no statistics updated


def test_a_feature_extractor_prunes_with_its_features_as_outputs():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    from pruners import prune

    model = create_feature_extractor(tv.models.resnet18(), {"layer2": "c3", "layer4": "c5"})
    result = prune(model.eval(), torch.randn(1, 3, 64, 64), target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5 and result.report.verify.ok
    assert result.model.get_submodule("layer4.1.bn2").num_features == 512  # an output: kept


def test_probe_copies_share_parameters_but_not_buffers():
    model = Holder().eval()
    new = copy_model(model, shared_params(model))
    assert all(p is q for p, q in zip(model.parameters(), new.parameters()))
    assert new.scale is not model.scale and torch.equal(new.scale, model.scale)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.n = nn.GroupNorm(2, 8)  # statistics over channels: inexact units
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.n(self.a(x)))


def test_a_check_of_inexact_units_reuses_the_dense_run(monkeypatch):
    """No masked forward when nothing is compared; the output structure is still checked."""
    model = Normed().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    units = [u.id for u in g.units if not u.exact][:2]
    assert units  # the case exists
    dense = DenseRun.of(model, x)
    assert dense.shapes == [(1, 4, 8, 8)] and dense.flops.total > 0
    import sys

    module = sys.modules["pruners.verify"]
    runs = []
    real = module.masked_in_place
    monkeypatch.setattr(module, "masked_in_place", lambda *a: runs.append(1) or real(*a))
    flops = {}
    result = verify(model, g, units, x, dense=dense, flops=flops)
    assert runs == [] and flops["before"] is dense.flops and not result.ok
    verify(model, g, units, x)  # without it, the masked original runs
    assert runs == [1]
    # a dense run on other inputs is not used
    verify(model, g, units, x.clone(), dense=dense)
    assert runs == [1, 1]
    from depgraph.errors import VerificationError
    wrong = DenseRun(x, [(1, 5, 8, 8)], None)
    with pytest.raises(VerificationError, match="changed shape"):
        verify(model, g, units, x, dense=wrong)


class TrainOnly(nn.Module):
    """Runs in eval mode whatever ``a``'s width; in train mode only with its width of 8."""

    def __init__(self):
        super().__init__()
        self.s, self.a, self.b = cbr(3, 6), cbr(6, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(self.s(x))
        if self.training:
            y = y.view(y.shape[0], 2, 4, *y.shape[2:]).flatten(1, 2)
        return self.b(y)


def test_the_original_runs_in_train_mode_only_to_excuse_a_failure(monkeypatch):
    import sys

    from depgraph.errors import VerificationError

    module = sys.modules["pruners.verify"]
    model = TrainOnly().eval()
    x = torch.randn(2, 3, 8, 8)
    g = analyze(capture(model, x))
    (s_group,) = [grp for grp in g.groups if ("s.0.weight", 0, 6) in grp.dims]
    (a_group,) = [grp for grp in g.groups if ("a.0.weight", 0, 8) in grp.dims]
    calls = []
    real = module.training
    monkeypatch.setattr(module, "training", lambda m: calls.append(1) or real(m))
    assert verify(model, g, s_group.units[:1], x, train_mode=True).ok and calls == []
    with pytest.raises(VerificationError, match="train mode"):
        verify(model, g, a_group.units[:1], x, train_mode=True)
    assert calls == [1]  # the original ran, and works: the failure stands


def test_a_pruned_copy_owns_its_parameters_once_the_check_passed():
    """``prune`` copies the working model sharing parameters for surgery; the model it returns
    gets its own copies of those the plan left alone, ties kept."""
    from pruners.copying import own_parameters

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    model[1].weight = model[0].weight  # tied
    new = copy_model(model, shared_params(model))
    new[0].bias = nn.Parameter(torch.zeros(4))  # as surgery swaps a changed one
    own_parameters(new, model)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in new.parameters()}
    assert new[1].weight is new[0].weight and torch.equal(new[0].weight, model[0].weight)
    assert new[1].bias.requires_grad
