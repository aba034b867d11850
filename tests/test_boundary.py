"""The engine finds where a model's values become data-dependent and verifies just before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depgraph import capture
from depgraph.boundary import verification_points
from models import build
from pruners import prune


class ToyDetector(nn.Module):
    """Backbone, a score head, then top-k positions whose features a box head reads."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(64, 32, 1))
        self.head = nn.Conv2d(32, 1, 1)
        self.box_head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        self.picks = 8

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        scores = self.head(f).flatten(1)
        keep = scores[0].topk(self.picks).indices
        picked = f.flatten(2).transpose(1, 2).index_select(1, keep)
        return self.box_head(picked), scores


def test_the_boundary_is_the_modules_before_the_selection():
    model, x = ToyDetector().eval(), torch.randn(1, 3, 16, 16)
    boundary = verification_points(capture(model, x))
    assert boundary is not None
    assert boundary.modules == ("backbone", "head")
    assert boundary.tail == ("box_head.0", "box_head.2")
    assert any(op.startswith("topk") for op in boundary.ops)


def test_a_model_without_selections_has_no_boundary():
    model, x = build("resnet_basic")
    assert verification_points(capture(model, x)) is None


def test_prune_verifies_at_the_boundary_and_targets_the_flops_before_it():
    model, x = ToyDetector().eval(), torch.randn(1, 3, 16, 16)
    result = prune(model, x, target_flops=0.5)
    notes = " ".join(result.report.notes)
    assert "verified at backbone, head" in notes and "topk" in notes
    assert "box_head" in notes  # its FLOPs depend on the count: said, and not targeted
    assert result.report.verify is not None and result.report.verify.ok
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert result.model.backbone[0].out_channels < 64
    # the backbone's output is compared on the channels the plan keeps: its width prunes too
    assert result.model.backbone[4].out_channels < 32
    assert not any("changed shape" in f.reason for f in result.report.frozen)


class PackedHead(nn.Module):
    """A tail module that runs a packed weight's chunks itself (as pruned attention runs its
    ``in_proj_weight``) and then a child layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = nn.Parameter(torch.randn(512, 32) * 0.1)
        self.out = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.packed.chunk(2)
        return self.out(torch.nn.functional.linear(x, a) * torch.nn.functional.linear(x, b))


class LateToy(ToyDetector):
    """ToyDetector with that head, and a layer on the clean features after the selection (as
    RT-DETR's decoder projects the encoder's memory), so every check runs the tail too."""

    def __init__(self) -> None:
        super().__init__()
        self.box_head, self.picks, self.late = PackedHead(), 64, nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        boxes, scores = super().forward(x)
        return boxes, scores, self.late(self.backbone(x))


def test_a_tail_module_with_a_packed_weight_and_a_child_is_left_out_once():
    model, x = LateToy().eval(), torch.randn(1, 3, 16, 16)
    boundary = verification_points(capture(model, x))
    assert set(boundary.tail_layers) == {"box_head", "box_head.out"}
    assert "late" in boundary.modules
    result = prune(model, x, target_flops=0.5)  # the head left out, its child subtracted once
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert any("whole model measured" in n for n in result.report.notes)


def test_a_given_verify_at_wins():
    model, x = ToyDetector().eval(), torch.randn(1, 3, 16, 16)
    result = prune(model, x, target_flops=0.5, verify_at=["backbone"])
    assert not any("verified at" in n for n in result.report.notes)


@pytest.mark.zoo
def test_faster_rcnn_prunes_with_defaults():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=256, max_size=256).eval()
    result = prune(model, ([torch.rand(3, 256, 256)],), target_flops=0.5)
    assert result.report.verify is not None and result.report.verify.ok
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert any("verified at backbone, rpn.head" in n for n in result.report.notes)
    out = result.model([torch.rand(3, 256, 256)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    # the FPN's width prunes: roi_align pools each channel, and the per-level results are
    # written into zeros made of that width (verified on the kept channels at the backbone)
    small = result.model
    assert small.backbone.fpn.layer_blocks[0][0].out_channels < 256
    assert small.roi_heads.box_head.fc6.in_features == \
        small.backbone.fpn.layer_blocks[0][0].out_channels * 7 * 7
    small.train()  # and it trains, as torchvision computes its losses
    losses = small([torch.rand(3, 256, 256)], [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]),
                                                 "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())


def _tail_runs(model: ToyDetector) -> list[bool]:
    """One item per run of a box head: True for ``model``'s own, False for a copy's."""
    runs: list[bool] = []
    model.box_head.register_forward_hook(lambda m, i, o: runs.append(m is model.box_head))
    return runs


def test_the_masked_reference_stops_at_the_boundary_where_the_dense_run_counted():
    """Only the pruned model has to run whole (to show that it runs); the masked original is
    compared at the boundary, so its per-detection tail is skipped and the dense run's FLOPs
    stand for it."""
    from depgraph import analyze
    from pruners import verify
    from pruners.verify import DenseRun

    torch.manual_seed(0)
    model, x = ToyDetector().eval(), torch.randn(1, 3, 16, 16)
    graph = analyze(capture(model, x))
    units = next(g for g in graph.groups if "backbone.0" in g.layers).units[:4]
    dense = DenseRun.of(model, x)
    runs = _tail_runs(model)
    flops: dict = {}
    at = ["backbone", "head"]
    assert verify(model, graph, units, x, at=at, flops=flops, dense=dense).ok
    assert runs == [False] and flops["before"] == dense.flops
    assert flops["after"].total < dense.flops.total
    runs.clear()
    flops = {}
    assert verify(model, graph, units, x, at=at, flops=flops).ok  # no dense count: whole
    assert runs == [False, True] and flops["before"].total == dense.flops.total


def test_probes_half_size_run_stops_at_the_boundary():
    from pruners.repair import probe_run
    from pruners.verify import DenseRun

    model, x = ToyDetector().eval(), torch.randn(1, 3, 128, 128)
    dense = DenseRun.of(model, x)
    runs = _tail_runs(model)
    probe = probe_run(model, dense, at=["backbone", "head"])
    assert probe.inputs.shape[-1] == 64 and runs == []
    assert probe_run(model, dense).inputs.shape[-1] == 64 and runs == [True]


def test_a_check_at_a_module_compares_the_channels_the_plan_keeps():
    from depgraph import VerificationError, analyze
    from depgraph.boundary import handed_on
    from pruners import verify

    model, x = ToyDetector().eval(), torch.randn(1, 3, 16, 16)
    cap = capture(model, x)
    at = ["backbone", "head"]
    graph = analyze(cap, watch=handed_on(cap, at))
    assert handed_on(cap, at) == {"backbone": ("conv2d_2",), "head": ("conv2d_3",)}
    out = graph.unit_index[("backbone.4.weight", 0)]
    units = sorted(set(out[::3].tolist()))  # a third of the backbone's output channels
    result = verify(model, graph, units, x, at=at)
    assert result.ok and result.max_abs_diff == 0.0
    with pytest.raises(VerificationError, match="changed shape"):  # unrecorded: whole
        verify(model, analyze(cap), units, x, at=at)
