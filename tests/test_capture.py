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


class Gathers(nn.Module):
    """Indexing by positions (a relative-position table, as Swin's) uses no values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.register_buffer("order", torch.arange(7, -1, -1))

    def forward(self, x):
        return self.a(x)[:, self.order]


def test_value_reads_counts_what_export_cannot_follow_and_nothing_else():
    from depgraph import ValueReads

    x = torch.randn(1, 3, 8, 8)
    for model, expected in [(Gathers().eval(), {}), (DataDependent().eval(), {"nonzero": 1}),
                            (ValueScale().eval(), {"_local_scalar_dense": 1})]:
        with torch.no_grad(), ValueReads() as reads:
            model(x)
        assert reads.ops == expected, type(model).__name__

    class Masked(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() + x.unique().sum()

    with ValueReads() as reads:
        Masked()(x)
    assert reads.ops == {"index by a mask": 1, "_unique2": 1}


def _export_attempts(monkeypatch) -> list:
    """The list that gets one item per torch.export attempt of capture."""
    import sys

    module = sys.modules["depgraph.capture"]
    tried: list = []
    real_export = module._capture_export
    monkeypatch.setattr(module, "_capture_export",
                        lambda *a: tried.append(1) or real_export(*a))
    return tried


def test_a_forward_known_to_use_values_is_traced_concretely_without_trying_export(monkeypatch):
    """torch.export fails on such a forward only after tracing most of it (SSD: 9 s)."""
    tried = _export_attempts(monkeypatch)
    model, x = DataDependent().eval(), torch.randn(1, 3, 8, 8)
    cap = capture(model, x, value_ops={"nonzero": 1})
    assert cap.method == "concrete" and not tried
    assert any("nonzero x1" in n and "concretely" in n for n in cap.notes)
    assert len(analyze(cap).units) == 8
    # where the concrete trace fails, export still gets its turn, and both causes are named
    with pytest.raises(CaptureError, match=r"torch.export: .*; concrete trace: .*skips 2 "):
        capture(ValueBranch(), x, value_ops={"_local_scalar_dense": 1})
    assert tried


def test_values_read_in_python_alone_leave_export_first(monkeypatch):
    """Ultralytics' first run at a shape reads each level's stride while it caches anchors
    (``_local_scalar_dense`` x3): that made every YOLO trace concretely, and YOLOv8x's
    capture take 1 GB more memory. Only ops that size a tensor by values go concrete first."""
    from depgraph.capture import sizes_by_values

    assert not sizes_by_values({"_local_scalar_dense": 3})
    assert sizes_by_values({"nonzero": 1}) and sizes_by_values({"index by a mask": 2})
    tried = _export_attempts(monkeypatch)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    cap = capture(plain, torch.randn(1, 3, 8, 8), value_ops={"_local_scalar_dense": 3})
    assert cap.method == "export" and tried == [1]


def test_prune_traces_a_value_using_model_concretely_at_once(monkeypatch):
    from pruners import prune

    tried = _export_attempts(monkeypatch)
    torch.manual_seed(0)
    model, x = DataDependent().eval(), torch.randn(1, 3, 16, 16)
    result = prune(model, x, target_flops=0.6)
    assert not tried and any("nonzero x1" in n for n in result.report.notes)
    torch.testing.assert_close(model(x).shape, result.model(x).shape)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    prune(plain, x, target_flops=0.6)
    assert tried  # a model that uses no values is exported as before
