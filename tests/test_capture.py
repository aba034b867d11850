"""Capture: both tracers, parameter names, input forms, and leaving the model untouched."""

import pytest
import torch
from torch import nn

from depgraph import CaptureError, analyze, capture
from models import ValueBranch
from pruners import verify


class DataDependent(nn.Module):
    """A branch on a data-dependent *size*, as torchvision's detectors have in post-processing:
    torch.export cannot guard on it, a concrete trace sees the real size."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        positive = torch.nonzero(x.flatten() > 0)
        if positive.shape[0] > 3:
            y = y * 2
        return self.b(y)


def test_branch_on_a_tensor_value_that_skips_a_layer_fails_with_both_causes():
    with pytest.raises(CaptureError, match=r"torch.export: .*; concrete trace: .*skips 2 "
                                           r"parameters \(b.weight, b.bias\)"):
        capture(ValueBranch(), torch.randn(1, 3, 8, 8))


class ValueScale(DataDependent):
    """A branch on a tensor value that every path takes through the same layers (as R-CNN
    heads do on their detection count): captured along the example's path, with a note."""

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y * 2 if y.mean() > 0 else y / 2
        return self.b(y)


def test_branch_on_a_tensor_value_through_every_layer_is_captured_with_a_note():
    model, x = ValueScale().eval(), torch.randn(1, 3, 8, 8)
    cap = capture(model, x)
    assert cap.method == "concrete"
    assert any("data-dependent" in n and "every parameter" in n for n in cap.notes)
    graph = analyze(cap)
    assert len(graph.units) == 8
    assert verify(model, graph, [0, 3, 5], x).ok


def test_export_is_used_when_it_works_and_names_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    cap = capture(model, torch.randn(1, 3, 8, 8))
    assert cap.method == "export"
    assert set(cap.param_names.values()) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                            "1.running_mean", "1.running_var",
                                            "1.num_batches_tracked"}
    assert all("val" in n.meta for n in cap.graph.nodes if n.op == "call_function")


def test_concrete_fallback_on_data_dependent_control_flow():
    model = DataDependent().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(CaptureError, match="torch.export"):
        capture(model, x, method="export")
    cap = capture(model, x)
    assert cap.method == "concrete"
    assert any("torch.export failed" in n for n in cap.notes)
    g = analyze(cap)
    assert len(g.units) == 8
    assert verify(model, g, [0, 3, 7], x).ok


def test_forward_attribute_assignments_are_undone():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.anchors = torch.zeros(0)

        def forward(self, x):
            self.anchors = torch.ones(x.shape[-1])  # as Ultralytics' Detect caches anchors
            self.shape = x.shape
            return self.conv(x) + self.anchors

    model = Caching()
    capture(model, torch.randn(1, 3, 4, 4))
    assert model.anchors.numel() == 0 and type(model.anchors) is torch.Tensor
    assert not hasattr(model, "shape")


def test_inputs_as_tuple_kwargs_list_and_dict():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, pair, extra=None, *, scale=None):
            x = pair[0] + pair[1]
            x = self.a(x) * scale["s"]
            return self.b(x + (extra if extra is not None else 0))

    model = Multi()
    pair = [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    cap = capture(model, (pair, torch.randn(1, 8, 4, 4)), example_kwargs={"scale": {"s": 2.0}})
    # two tensors of the list, `extra`, and the float inside the kwargs dict
    assert len(cap.input_names) == 4
    g = analyze(cap)
    # `extra` is a graph input added to a's output: those channels must freeze.
    assert len(g.units) == 0
    assert any("fixed size" in f.reason for f in g.frozen)


def test_inputs_that_do_not_fit_give_a_capture_error_naming_the_cause():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(CaptureError, match=r"could not capture Sequential.*channels|size"):
        capture(model, torch.randn(1, 5, 8, 8))


def test_model_is_not_modified_by_capture_in_train_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, torch.randn(2, 3, 8, 8), method="concrete")
    capture(model, torch.randn(2, 3, 8, 8), method="export")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
