"""Layers only training runs (auxiliary heads): captured in train mode, they shrink with the
widths they read instead of freezing them (``depgraph.train_path``)."""

import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from depgraph.train_path import with_train_path
from models import cbr
import pruners
from pruners.verify import training


class AuxNet(nn.Module):
    """GoogLeNet's pattern: an auxiliary classifier on the stem's width, run in train mode."""

    def __init__(self, aux_reads_fixed: bool = False):
        super().__init__()
        self.stem, self.mid = cbr(3, 16), cbr(16, 32)
        self.head = nn.Conv2d(32, 10, 1)
        self.aux = nn.Sequential(nn.Conv2d(16 + 4 * aux_reads_fixed, 8, 1), nn.ReLU(),
                                 nn.Conv2d(8, 10, 1))
        self.aux_reads_fixed = aux_reads_fixed

    def forward(self, x):
        s = self.stem(x)
        y = self.head(self.mid(s)).mean((2, 3))
        if not self.training:
            return y
        if self.aux_reads_fixed:  # the stem's channels beside 4 the model fixes
            s = torch.cat([s, torch.ones_like(s[:, :4])], 1)
        return y, self.aux(s).mean((2, 3))


def _graphs(model, x):
    graph = analyze(capture(model, x))
    with training(model):
        train = analyze(capture(model, x))
    return graph, train


def test_train_only_layers_take_the_units_of_the_widths_they_read():
    model, x = AuxNet().eval(), torch.randn(2, 3, 16, 16)
    graph, train = _graphs(model, x)
    assert ("aux.0.weight", 1) not in graph.unit_index  # inference never runs it
    path = with_train_path(graph, train)
    assert path.layers == ["aux.0"] and not path.frozen
    stem = path.graph.unit_index[("stem.0.weight", 0)]
    assert (stem >= 0).all()
    assert (path.graph.unit_index[("aux.0.weight", 1)] == stem).all()
    # the aux head's own width touches no eval channel: it stays
    assert ("aux.0.weight", 0) not in path.graph.unit_index
    (group,) = {path.graph.units[u].group for u in stem.tolist()}
    assert ("aux.0.weight", 1, 16) in path.graph.groups[group].dims


def test_a_width_training_reads_beside_fixed_channels_freezes():
    model, x = AuxNet(aux_reads_fixed=True).eval(), torch.randn(2, 3, 16, 16)
    graph, train = _graphs(model, x)
    path = with_train_path(graph, train)
    assert (path.graph.unit_index[("stem.0.weight", 0)] < 0).all()
    assert sum(path.frozen.values()) > 0
    assert any("training needs this width" in f.reason for f in path.graph.frozen)


def test_prune_shrinks_a_train_only_head_with_its_input():
    torch.manual_seed(0)
    model, x = AuxNet().eval(), torch.randn(2, 3, 16, 16)
    result = pruners.prune(model, x, target_flops=0.5)
    small = result.model
    width = small.stem[0].out_channels
    assert width < 16 and small.aux[0].in_channels == width
    assert any("only in train mode" in n for n in result.report.notes)
    small.train()
    y, aux = small(x)  # trains: the auxiliary head reads the pruned width
    assert aux.shape == (2, 10)
    # the plan re-applies to a fresh model, auxiliary head included
    fresh = pruners.apply_plan(AuxNet().eval(), result.plan)
    assert fresh.aux[0].in_channels == width
    fresh.train()(x)


def test_without_a_train_path_the_width_training_reads_freezes(monkeypatch):
    """The same model, with the train-mode capture failing: the stem freezes, as before,
    and the note says why the layers were not tied."""
    import pruners.api as api

    def broken(model):
        raise RuntimeError("no train-mode trace")

    monkeypatch.setattr(api, "training", broken)
    model, x = AuxNet().eval(), torch.randn(2, 3, 16, 16)
    result = pruners.prune(model, x, target_flops=0.7)
    assert result.model.stem[0].out_channels == 16
    assert any("train-mode capture could not" in n for n in result.report.notes)
    result.model.train()(x)


class AuxNetWithFeature(AuxNet):
    """AuxNet whose training also returns a feature ``e`` that inference only reads: training
    fixes ``e``'s width, so the train path costs ``e`` and frees the stem."""

    def __init__(self):
        super().__init__()
        self.e, self.f = cbr(16, 4, 1), nn.Conv2d(4, 10, 1)

    def forward(self, x):
        s = self.stem(x)
        e = self.e(s)
        y = (self.head(self.mid(s)) + self.f(e)).mean((2, 3))
        if not self.training:
            return y
        return y, self.aux(s).mean((2, 3)), e


def test_a_train_path_that_freezes_is_weighed_against_freezing_the_failing_groups():
    torch.manual_seed(0)
    model, x = AuxNetWithFeature().eval(), torch.randn(2, 3, 16, 16)
    graph, train = _graphs(model, x)
    assert sum(with_train_path(graph, train).frozen.values()) > 0  # so not taken at once
    result = pruners.prune(model, x, target_flops=0.6)
    small = result.model
    assert small.stem[0].out_channels < 16 and small.aux[0].in_channels == small.stem[0].out_channels
    assert small.e[0].out_channels == 4  # training returns it: frozen, with the reason
    assert any("training needs this width" in f.reason for f in result.graph.frozen)
    assert len(small.train()(x)) == 3


def test_a_train_path_that_frees_nothing_is_not_taken():
    """Training reads the stem beside channels the model fixes: the train path would freeze
    the stem as freezing it does, so the bisection's freeze stands, with its own reason."""
    torch.manual_seed(0)
    model, x = AuxNet(aux_reads_fixed=True).eval(), torch.randn(2, 3, 16, 16)
    result = pruners.prune(model, x, target_flops=0.7)
    assert result.model.stem[0].out_channels == 16
    assert any("fails in train mode" in f.reason for f in result.graph.frozen)
    assert not any("only in train mode" in n for n in result.report.notes)
    result.model.train()(x)


def test_a_train_path_is_declined_where_neither_trace_reads_some_parameter():
    """RT-DETR's denoising embeds targets only its trainer passes: neither the eval nor the
    train-mode trace runs it, so the widths it reads cannot be known to be free. The stem
    freezes as before, and the note names such a parameter."""

    class Unseen(AuxNet):
        def __init__(self):
            super().__init__()
            self.targets_only = nn.Linear(16, 4)  # read only when targets are given

    import sys

    api = sys.modules["pruners.api"]
    captures = []
    real = api.capture
    torch.manual_seed(0)
    model, x = Unseen().eval(), torch.randn(2, 3, 16, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "capture", lambda *a, **k: captures.append(1) or real(*a, **k))
        result = pruners.prune(model, x, target_flops=0.7)
    assert result.model.stem[0].out_channels == 16
    assert any("targets_only." in n and "no layer either mode" in n for n in result.report.notes)
    assert len(captures) == 1  # declined by one eager run, without a train-mode capture


def test_layer_owners_finds_modules_that_run_layers_in_train_mode():
    """What the decline above reads: modules a layer op runs inside, and the owners of
    weights a layer op reads directly; not a parameter only indexed and scaled."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
            self.proj = nn.Linear(8, 4)  # its weight read by the parent's F.linear
            self.embed = nn.Embedding(5, 4)  # only touched, times 0
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            y = self.fc(h) + nn.functional.linear(h, self.proj.weight)
            return self.norm(y + self.embed.weight[0] * 0)

    from depgraph.train_path import layer_owners

    model = Net()
    owners = layer_owners(model, lambda: model(torch.randn(1, 3, 8, 8)))
    assert {"conv", "fc", "proj", "norm"} <= owners and "embed" not in owners
