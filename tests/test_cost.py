"""The cost model equals torch.utils.flop_counter.FlopCounterMode and the parameter count, at
full width and after pruning random units, on every hand-written model."""

import copy

import numpy as np
import pytest

from depgraph import analyze, capture
from depgraph.cost import cost_model
from models import MODELS, build
from pruners import measure, remove_units, sample_units


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_model_matches_flop_counter(name):
    model, x = build(name)
    graph = analyze(capture(model, x))
    cost = cost_model(graph)
    assert cost.full() == pytest.approx(measure(model, x), rel=1e-9)
    for seed, fraction in enumerate((0.3, 0.7)):
        units = sample_units(graph, fraction, np.random.default_rng(seed), exact_only=False)
        predicted = cost.evaluate(cost.kept_after(graph, set(units)))
        pruned = remove_units(copy.deepcopy(model), graph, units)
        assert predicted == pytest.approx(measure(pruned, x), rel=1e-9), f"seed {seed}"


def test_flops_counted_on_fake_tensors_equal_the_real_count_and_leave_the_model_alone():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pruners.flops import _count

    class Caching(torch.nn.Module):
        """Caches a tensor on self in forward (Ultralytics' Detect caches its anchors)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cache = x.mean()
            return self.conv(x)

    class Branchy(torch.nn.Module):  # values decide the path: fake tensors cannot run it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.mean() > 0 else self.b(x)

    cases = [(Caching(), torch.randn(1, 3, 16, 16)), (Branchy(), torch.rand(1, 3, 16, 16)),
             build("resnet_basic")]
    for model, x in cases:
        with FlopCounterMode(display=False) as real, torch.no_grad():
            model(x)
        assert _count(model, x).get_total_flops() == real.get_total_flops() > 0
        cache = getattr(model, "cache", None)
        assert not isinstance(cache, torch._subclasses.fake_tensor.FakeTensor)


def test_flops_count_timm_pit_whose_modules_trip_torchs_module_tracker():
    # torch's module tracker (in FlopCounterMode) asserts "Expected gradient function to be
    # set" on PiT's and CaiT's forward under no_grad; counting must not depend on it
    import torch

    timm = pytest.importorskip("timm")
    model = timm.create_model("pit_ti_224", pretrained=False).eval()
    flops, params = measure(model, torch.randn(1, 3, 224, 224))
    assert flops > 1e9 and params == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


class _CostAsLatency:
    """A latency model that is the FLOPs cost itself: allocation evaluates it after every
    chunk, as it must for a latency table (which may rise at a kernel's step)."""

    def __init__(self, cost):
        self.cost = cost

    def evaluate(self, kept):
        return self.cost.evaluate(kept)[0]

    def full(self):
        return self.cost.full()[0]


@pytest.mark.parametrize("name", ["resnet_bottleneck", "densenet", "class_token_vit", "fpn"])
@pytest.mark.parametrize("round_to", [1, 4])
def test_batched_allocation_removes_what_chunk_by_chunk_does(name, round_to):
    """A FLOPs target evaluates the cost once per batch of chunks, replaying a batch that
    crosses the target one chunk at a time; a latency target evaluates after every chunk.
    With the FLOPs cost as the latency, both must remove the same units, for any target."""
    from pruners import Target, allocate

    model, x = build(name)
    graph = analyze(capture(model, x))
    cost = cost_model(graph)
    scores = np.random.default_rng(0).random(len(graph.units))
    for value in (0.3, 0.5, 0.8):
        batched = allocate(graph, scores, cost, Target("flops", value), round_to=round_to)
        stepped = allocate(graph, scores, cost, Target("latency", value), round_to=round_to,
                           latency=_CostAsLatency(cost))
        assert batched == stepped, (value, len(batched), len(stepped))
        assert len(batched) > 0
