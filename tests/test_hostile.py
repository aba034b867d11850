"""Odd and hostile input to prune(): it works, or fails with an error that names the culprit,
and the user's model is bitwise unchanged either way."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depgraph.errors import PruningError
from models import build, cbr, snapshot, unchanged
from pruners import prune
from pruners.allocate import InfeasibleTargetError

X = torch.randn(2, 3, 32, 32)


def prune_checked(model: nn.Module, inputs, **kw):
    """prune() at 50% FLOPs; checks the user's model is untouched and the result is exact."""
    before = snapshot(model)
    result = prune(model, inputs, target_flops=0.5, **kw)
    assert unchanged(model, before)
    assert 0.49 <= result.report.flops_ratio <= 0.50
    assert result.report.verify is not None and result.report.verify.ok
    return result


class TwoStreams(nn.Module):
    """Two inputs, fused by an add: the shapes of inputs the tests vary."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = cbr(3, 16), cbr(3, 16), nn.Conv2d(16, 4, 1)

    def forward(self, rgb, depth):
        return self.head(self.a(rgb) + self.b(depth))


class DictInput(TwoStreams):
    def forward(self, batch):
        return self.head(self.a(batch["rgb"]) + self.b(batch["depth"]))


class ListInput(TwoStreams):
    def forward(self, images):
        return self.head(self.a(images[0]) + self.b(images[1]))


@pytest.mark.parametrize("model, inputs", [
    (TwoStreams(), (X, X)),
    (TwoStreams(), {"rgb": X, "depth": X}),
    (DictInput(), ({"rgb": X, "depth": X},)),
    (DictInput(), {"batch": {"rgb": X, "depth": X}}),
    (ListInput(), ([X, X],)),
], ids=["tuple", "dict-as-kwargs", "dict-argument", "dict-argument-by-name", "list-argument"])
def test_input_structures(model, inputs):
    result = prune_checked(model, inputs)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    assert result.model(*args, **kwargs).shape == model(*args, **kwargs).shape


def test_train_mode_is_kept_and_statistics_untouched():
    model = build("resnet_basic")[0].train()
    result = prune_checked(model, X)
    assert result.model.training
    assert all(m.training for m in result.model.modules())


def test_inside_no_grad():
    with torch.no_grad():
        result = prune_checked(build("resnet_basic")[0], X)
    assert all(p.requires_grad for p in result.model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    model = build("resnet_bottleneck")[0].to(dtype)
    result = prune_checked(model, X.to(dtype))
    assert all(p.dtype == dtype for p in result.model.parameters())
    assert result.model(X.to(dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_verify_tolerance_follows_the_output_dtype(dtype):
    """A pruned conv rounds differently from the masked one: in float16/bfloat16 an output
    moves by an ulp on some CPUs, which the float32 tolerance (1e-4) would call a mismatch;
    a real difference still fails in every dtype."""
    from depgraph import analyze, capture
    from pruners.verify import verify

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).to(dtype).eval()
    x = X.to(dtype)
    graph = analyze(capture(model, x))
    scale = model(x).abs().max().item()

    def nudged(by: float) -> nn.Module:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other[2].bias[0] += by * scale
        return other

    small = verify(model, graph, [], x, pruned=nudged(1e-3))
    assert small.max_rel_diff > 1e-4  # over float32's tolerance
    assert small.ok == (dtype != torch.float32)
    assert not verify(model, graph, [], x, pruned=nudged(0.1)).ok


class _Autocast(nn.Module):
    """A float32 model whose forward runs under bfloat16 autocast (mixed-precision code that
    keeps the context in ``forward``): float32 outputs with bfloat16 rounding."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x).float()


def test_autocast_forward_is_verified_at_the_precision_it_computes_in():
    from depgraph import analyze, capture

    model = _Autocast(build("resnet_bottleneck")[0]).eval()
    assert analyze(capture(model, X)).precision == torch.bfloat16
    assert analyze(capture(model.inner, X)).precision == torch.float32
    result = prune_checked(model, X)  # a ResNet-18 so had failed every probe at 1e-4
    assert result.report.verify.rtol > 1e-3
    assert result.model(X).dtype == torch.float32


class Tied(nn.Module):
    """Two convs that share one weight tensor: pruning one must prune the other alike."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x) * 2)], 1))


def test_tied_parameters_stay_tied():
    result = prune_checked(Tied(), X)
    assert result.model.a.weight is result.model.b.weight
    assert result.model.a.out_channels < 16


class ChannelBuffers(nn.Module):
    """Buffers shaped by a channel count: a scale on the eval path, and an EMA of ``b``'s
    output that only training updates (so the eval trace never sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 128, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, 128, 1, 1) + 0.5)
        self.b = cbr(128, 16)
        self.register_buffer("ema", torch.zeros(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x) * self.scale))
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * y.detach().mean((0, 2, 3)))
        return self.head(y)


def test_buffers_shaped_by_channels():
    result = prune_checked(ChannelBuffers(), X)
    m = result.model
    assert m.scale.shape[1] == m.a.out_channels < 128
    # The EMA's width is read by code the eval trace never ran: the post-check in train mode
    # finds it, and the train-mode capture makes the EMA shrink with b's output.
    assert m.ema.shape[0] == m.b[0].out_channels < 16
    assert any("train mode" in note for note in result.report.notes)
    m.train()(X)


class Mutating(nn.Module):
    """A forward that records state on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = cbr(3, 16), nn.Conv2d(16, 4, 1)
        self.calls, self.last_shape = 0, None

    def forward(self, x):
        self.calls += 1
        y = self.a(x)
        self.last_shape = tuple(y.shape)
        return self.head(y)


def test_forward_that_mutates_attributes():
    model = Mutating()
    prune_checked(model, X)
    assert model.calls == 0 and model.last_shape is None


class RawParameters(nn.Module):
    """Weights used through the functional API, not an nn.Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(F.conv2d(x, self.w, self.bias, padding=1)))


def test_functional_parameters():
    result = prune_checked(RawParameters(), X)
    assert result.model.w.shape[0] == result.model.bias.shape[0] < 16


def test_missing_argument_names_the_model_and_the_argument():
    """(Wrong channels and uncapturable models: tests/test_prune.py.)"""
    model = TwoStreams()
    before = snapshot(model)
    with pytest.raises(PruningError) as info:
        prune(model, X, target_flops=0.5)
    for word in ["do not fit", "TwoStreams", "depth"]:
        assert word in str(info.value)
    assert unchanged(model, before)


class ChannelSoftmax(nn.Module):
    """A softmax across channels mixes them: the stem's channels are frozen, the rest prune."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.head = cbr(3, 32), cbr(32, 64), nn.Conv2d(64, 4, 1)

    def forward(self, x):
        return self.head(self.mid(torch.softmax(self.stem(x), 1)))


def test_infeasible_target_says_what_is_frozen_and_a_reachable_target_works():
    model = ChannelSoftmax()
    before = snapshot(model)
    with pytest.raises(InfeasibleTargetError) as info:
        prune(model, X, target_flops=0.1)
    assert unchanged(model, before)
    message = str(info.value)
    assert "Frozen:" in message and "softmax" in message
    reachable = info.value.reachable
    assert reachable is not None and 0.1 < reachable < 1
    target = min(1.0, reachable + 0.005)
    result = prune(model, X, target_flops=target)
    assert target - 0.01 <= result.report.flops_ratio <= target


class _NormalisesInPlace(nn.Module):
    """Normalises its input in place, as some preprocessing code does (``x.sub_(mean)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(3, 32), cbr(32, 32), nn.Conv2d(32, 8, 1))

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5).div_(0.25)
        scale.mul_(2)  # a keyword tensor too
        return self.body(x) * scale


def test_a_forward_that_changes_its_inputs_in_place(tmp_path):
    x, scale = torch.randn(1, 3, 16, 16), torch.ones(1)
    given = (x.clone(), scale.clone())
    model = _NormalisesInPlace().eval()
    result = prune(model, x, target_flops=0.5, example_kwargs={"scale": scale})
    assert 0.49 <= result.report.flops_ratio <= 0.5  # every run saw the same values
    assert result.report.verify is not None and result.report.verify.ok
    assert torch.equal(x, given[0]) and torch.equal(scale, given[1])  # the caller's tensors
    pytest.importorskip("onnxruntime")
    from pruners import export_onnx

    class Bound(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x, scale=torch.ones(1))

    assert export_onnx(Bound(result.model), x, str(tmp_path / "m.onnx")).max_rel_diff <= 1e-4
    assert torch.equal(x, given[0])
