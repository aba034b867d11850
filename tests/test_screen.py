"""Fake-tensor probes: the same groups found as with real runs, fewer real forwards."""

import sys

import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from depgraph.errors import VerificationError
from models import cbr
from pruners import find_unprunable_groups, verify
from pruners.repair import link_input_widths
from pruners.screen import ShapeScreen
from pruners.verify import DenseRun
from test_repair import BakedSplit, InputWidthAttention, TrainOnlyAux


def _counting(monkeypatch):
    """The list that gets one item per real probe repair makes."""
    from pruners import repair

    calls = []
    real = repair.verify
    monkeypatch.setattr(repair, "verify", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


class SilentSplit(nn.Module):
    """``split(4)`` of 8 channels still runs once they are 6, wrongly: only values show it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        lo, hi = self.a(x).split(4, dim=1)
        return self.head(self.b(torch.cat((hi, lo), 1)))


class Blocks(nn.Sequential):
    """Blocks with a width baked into a split (raises), one that fails silently, and one
    that is fine."""

    def __init__(self):
        super().__init__(BakedSplit(), nn.Conv2d(4, 3, 1), SilentSplit(), cbr(2, 8), cbr(8, 4))


@pytest.mark.parametrize("build", [Blocks, InputWidthAttention])
def test_a_screen_finds_the_same_groups_with_fewer_real_probes(build, monkeypatch):
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(1, 3, 16, 16)
    g = analyze(capture(model, x))
    calls = _counting(monkeypatch)
    where_real: dict = {}
    real = find_unprunable_groups(model, g, x, where=where_real)
    real_calls, calls[:] = len(calls), []
    screen = ShapeScreen.of(model, x)
    assert screen is not None and screen.shapes == [tuple(model(x).shape)]
    where: dict = {}
    screened = find_unprunable_groups(model, g, x, where=where, screen=screen)
    assert real and screened == real and where == where_real
    assert len(calls) < real_calls
    # the groups that only values expose are still found, by a real probe
    if build is Blocks:
        assert any("differ" in why for why in screened.values())
        assert any("split_with_sizes" in why for why in screened.values())
    else:  # and the heads tie to their input as without the screen
        tied = link_input_widths(model, g, real, where, x, screen=screen)
        assert tied[1:] == link_input_widths(model, g, real, where_real, x)[1:]


class ValueBranch(nn.Module):
    """Takes a branch on a value only once its width changed: fake tensors cannot follow it,
    and the real model runs it fine (times one)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if y.shape[1] != 8:
            y = y * float(bool((y >= 0).all()))
        return self.b(y)


def test_a_probe_fake_tensors_cannot_follow_is_run_for_real(monkeypatch):
    model, x = ValueBranch().eval(), torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    screen = ShapeScreen.of(model, x)
    assert screen is not None  # the unpruned model takes no branch on values
    calls = _counting(monkeypatch)
    assert find_unprunable_groups(model, g, x, screen=screen) == {}
    assert calls  # the real probes decided


def test_no_screen_for_a_model_that_needs_values():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x

    model = nn.Sequential(cbr(3, 8), Gate(), nn.Conv2d(8, 2, 1)).eval()
    assert ShapeScreen.of(model, torch.randn(1, 3, 8, 8)) is None


def test_a_screen_is_offered_only_where_it_pays():
    model, x = nn.Sequential(cbr(3, 8), nn.Conv2d(8, 2, 1)).eval(), torch.randn(1, 3, 8, 8)
    assert ShapeScreen.of(model, x, real_s=0.01) is None  # real runs are cheap enough
    assert ShapeScreen.of(model, x, real_s=1e6) is not None
    dense = DenseRun.of(model, x)
    assert dense.seconds > 0 and dense.shapes == [(1, 2, 8, 8)]


class Cached(nn.Module):
    """Keeps a tensor made in forward, as Ultralytics' heads keep their anchors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), nn.Conv2d(8, 2, 1)
        self.grid = None

    def forward(self, x):
        if self.grid is None or self.grid.shape != x.shape[-2:]:
            self.grid = torch.ones(x.shape[-2:])
        return self.b(self.a(x)) * self.grid


def test_fake_runs_leave_the_model_as_it_was():
    model, x = Cached().eval(), torch.randn(1, 3, 8, 8)
    model(x)
    grid = model.grid
    g = analyze(capture(model, x))
    screen = ShapeScreen.of(model, torch.randn(1, 3, 4, 4))  # another size: forward re-caches
    screen.check(model, g, g.groups[0].units[:1])
    assert model.grid is grid and not isinstance(model.grid, torch._subclasses.FakeTensor)
    torch.testing.assert_close(model(x), model(x))


def test_the_train_mode_check_runs_on_fake_tensors_and_still_fails(monkeypatch):
    """An aux layer only training runs reads a pruned width: the fake train-mode run raises as
    the real one does; where all is well no real train-mode forward is made."""
    import sys

    verify_module = sys.modules["pruners.verify"]
    model = nn.Sequential(TrainOnlyAux(3), TrainOnlyAux()).eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    screen = ShapeScreen.of(model, x)
    bad = [u for grp in g.groups if grp.layers[0] == "0.b.0" for u in grp.units[:1]]
    with pytest.raises(VerificationError, match="train mode"):
        verify(model, g, bad, x, train_mode=True, screen=screen)
    runs = []
    real_run = verify_module.deepcopy_model
    monkeypatch.setattr(verify_module, "deepcopy_model", lambda m: runs.append(1) or real_run(m))
    good = [u for grp in g.groups if grp.layers[0] == "0.a.0" for u in grp.units[:1]]
    assert bad and good
    assert verify(model, g, good, x, train_mode=True, screen=screen).ok
    assert not runs
    assert verify(model, g, good, x, train_mode=True).ok and runs  # without: a real one


def test_prune_with_a_screen_matches_prune_without(monkeypatch):
    """prune() screens where a real forward is slow; made to screen a small model, it returns
    the same model."""
    from pruners import prune, screen as screen_module

    torch.manual_seed(0)
    model, x = InputWidthAttention().eval(), torch.randn(2, 3, 16, 16)
    plain = prune(model, x, target_flops=0.5)
    monkeypatch.setattr(screen_module, "_MIN_REAL_S", 0.0)
    monkeypatch.setattr(screen_module, "_CHEAPER", float("inf"))
    made = []
    real_of = ShapeScreen.of.__func__
    monkeypatch.setattr(ShapeScreen, "of", classmethod(
        lambda cls, *a, **k: made.append(real_of(cls, *a, **k)) or made[-1]))
    screened = prune(model, x, target_flops=0.5)
    assert made and made[0] is not None
    assert screened.plan.sizes == plain.plan.sizes
    assert screened.report.notes == plain.report.notes
    torch.testing.assert_close(screened.model(x), plain.model(x))


def _real_forwards(model):
    """The list that gets one item per real (not fake-tensor) forward of ``model``."""
    from torch._guards import detect_fake_mode

    real = []
    model.register_forward_pre_hook(
        lambda m, args: None if detect_fake_mode() is not None else real.append(1))
    return real


def test_a_costly_models_first_run_is_fake_with_the_same_shapes_and_flops(monkeypatch):
    from pruners import screen as screen_module

    model, x = InputWidthAttention().eval(), torch.randn(1, 3, 16, 16)
    real = DenseRun.of(model, x)
    assert not screen_module.dense_run(model, x).fake  # cheap: real
    monkeypatch.setattr(screen_module, "_FAKE_DENSE_FLOPS", 1.0)
    runs = _real_forwards(model)
    fake = screen_module.dense_run(model, x)
    assert fake.fake and not runs
    assert fake.shapes == real.shapes and fake.flops == real.flops and fake.flops.total > 0


class Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LazyConv2d(8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.a(x))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


@pytest.mark.parametrize("build", [Cached, Lazy, lambda: nn.Sequential(cbr(3, 8), Gate())])
def test_a_first_run_stays_real_where_the_model_keeps_state_or_needs_values(build, monkeypatch):
    """A forward that caches (Ultralytics' anchors), a lazy layer, a branch on values: the
    real run warms the model for the capture after it, or is the only one that runs."""
    from pruners import screen as screen_module

    monkeypatch.setattr(screen_module, "_FAKE_DENSE_FLOPS", 1.0)
    model, x = build().eval(), torch.randn(1, 3, 16, 16)
    runs = _real_forwards(model)
    dense = screen_module.dense_run(model, x)
    assert not dense.fake and runs == [1] and dense.shapes == [tuple(model(x).shape)]
    if isinstance(model, Cached):
        assert model.grid is not None and not isinstance(model.grid, torch._subclasses.FakeTensor)


def test_a_first_run_that_raises_is_refused_naming_the_mismatch(monkeypatch):
    from depgraph import PruningError
    from pruners import prune, screen as screen_module

    monkeypatch.setattr(screen_module, "_FAKE_DENSE_FLOPS", 1.0)
    model = nn.Sequential(cbr(3, 8), nn.Conv2d(8, 2, 1)).eval()
    with pytest.raises(PruningError, match="expected input.* to have 3 channels"):
        prune(model, torch.randn(1, 4, 16, 16), target_flops=0.5)


def test_prune_with_a_fake_first_run_matches_prune_with_a_real_one(monkeypatch):
    """Made to run a small model's first forward (and its half-size one) on fake tensors,
    prune() returns the same model, with the same FLOPs counted."""
    from pruners import prune, screen as screen_module

    torch.manual_seed(0)
    model, x = InputWidthAttention().eval(), torch.randn(1, 3, 128, 128)  # probes at 64
    plain = prune(model, x, target_flops=0.5)
    monkeypatch.setattr(screen_module, "_FAKE_DENSE_FLOPS", 1.0)
    api, made = sys.modules["pruners.api"], []
    for name in ("dense_run", "probe_run"):
        real_run = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, _run=real_run, **k:
                            made.append(_run(*a, **k)) or made[-1])
    faked = prune(model, x, target_flops=0.5)
    assert [(run.fake, run.inputs.shape[-1]) for run in made] == [(True, 128), (True, 64)]
    assert faked.plan.sizes == plain.plan.sizes
    assert faked.report.notes == plain.report.notes
    assert faked.report.flops_before == plain.report.flops_before
    assert faked.report.flops_after == plain.report.flops_after
    torch.testing.assert_close(faked.model(x), plain.model(x))
