"""Surgery: module attributes, tensor properties, transactions, tied weights, errors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from depgraph import SurgeryError, analyze, capture
from models import build
from pruners import remove_units, run_model, sample_units


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                        for k in a)


def test_attributes_follow_the_new_shapes():
    model, x = build("depthwise_multiplier")
    g = analyze(capture(model, x))
    units = sample_units(g, 0.5, np.random.default_rng(0))
    pruned = remove_units(copy.deepcopy(model), g, units)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == m.weight.shape[0]
            assert m.in_channels == m.weight.shape[1] * m.groups
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.shape[0] == m.running_var.shape[0]
    # depthwise 16 -> 32 with multiplier 2: groups follow the kept input channels
    assert pruned.dw[0].groups == pruned.dw[0].in_channels == pruned.stem[0].out_channels
    assert pruned.dw[0].out_channels == 2 * pruned.dw[0].groups
    assert pruned.gpw[0].groups == 4  # grouped 1x1 keeps its 4 groups
    run_model(pruned, x)


def test_linear_layer_norm_group_norm_prelu_attributes():
    model, x = build("norms")
    g = analyze(capture(model, x))
    pruned = remove_units(copy.deepcopy(model), g, sample_units(g, 0.5, np.random.default_rng(0),
                                                                 exact_only=False))
    assert pruned.ln.normalized_shape == (pruned.c3.out_channels,)
    assert pruned.inorm.num_groups == pruned.inorm.num_channels == pruned.c2.out_channels
    model, x = build("conv1d_conv3d")
    g = analyze(capture(model, x))
    pruned = remove_units(copy.deepcopy(model), g, sample_units(g, 0.5, np.random.default_rng(0)))
    assert pruned.seq[2].num_parameters == pruned.seq[0].out_channels
    assert pruned.head.in_features == pruned.head.weight.shape[1] < 16


def test_dtype_device_requires_grad_and_grad_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    model[0].bias.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    g = analyze(capture(model, x))
    remove_units(model, g, [1, 2])
    assert model[0].weight.dtype == torch.float64
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert isinstance(model[0].weight, nn.Parameter)
    assert model[0].weight.grad.shape == model[0].weight.shape == (6, 3, 3, 3)
    assert model[2].weight.grad.shape == (4, 6, 1, 1)


def test_failed_surgery_leaves_the_model_unchanged():
    model, x = build("resnet_basic")
    g = analyze(capture(model, x))
    before = _state(model)
    group = g.groups[0]
    with pytest.raises(SurgeryError, match="no channels along dim"):
        remove_units(model, g, group.units)  # every unit of a group: a layer with 0 channels
    assert _same_state(before, _state(model))
    assert model.stem[0].out_channels == 16


def test_unknown_units_and_foreign_models_are_rejected():
    model, x = build("resnet_basic")
    g = analyze(capture(model, x))
    with pytest.raises(SurgeryError, match="unknown unit ids"):
        remove_units(model, g, [len(g.units) + 5])
    other, _ = build("vgg")
    before = _state(other)
    with pytest.raises(SurgeryError, match="has no module|has no parameter|shape"):
        remove_units(other, g, [0])
    assert _same_state(before, _state(other))


def test_tied_weights_shrink_everywhere_they_are_used():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.c.weight = self.b.weight  # tied
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.out(torch.relu(self.c(torch.relu(self.b(y)))))

    model = Tied().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(capture(model, x))
    remove_units(model, g, sample_units(g, 0.5, np.random.default_rng(0)))
    assert model.b.weight is model.c.weight
    assert model.c.in_channels == model.c.weight.shape[1]
    run_model(model, x)


@pytest.mark.parametrize("seed", range(3))
def test_take_copies_runs_and_scatters_alike(seed):
    """``take`` copies few runs of kept indices block by block and gathers scattered ones: both
    must equal index_select along each dim, in a tensor that shares nothing with the input."""
    from pruners.surgery import take

    rng = np.random.default_rng(seed)
    w = torch.randn(40, 24, 3, 3)
    one_hole = [(0, torch.tensor([i for i in range(40) if i != 7])),
                (1, torch.tensor([i for i in range(24) if i != 23]))]
    scattered = [(0, torch.from_numpy(np.sort(rng.choice(40, 17, replace=False)))),
                 (1, torch.from_numpy(np.sort(rng.choice(24, 9, replace=False))))]
    for cuts in (one_hole, scattered, one_hole[1:], scattered[:1]):
        expected = w
        for dim, idx in cuts:
            expected = expected.index_select(dim, idx)
        got = take(w, cuts)
        assert torch.equal(got, expected)
        got.zero_()
        assert w.abs().sum() > 0  # the original is untouched
