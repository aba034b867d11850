"""pruners.onnx_passes: each rewrite computes what the op it replaces computed, and only where
it is meant to apply."""

import io
import warnings

import numpy as np
import pytest
import torch

from pruners import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Softmax(torch.nn.Module):
    def __init__(self, dim: int, log: bool = False) -> None:
        super().__init__()
        self.dim, self.log = dim, log

    def forward(self, x):
        return x.log_softmax(self.dim) if self.log else x.softmax(self.dim)


class Dfl(torch.nn.Module):
    """YOLOv8's distribution focal loss head: a softmax over 16 bins, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 1, 1, bias=False)

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, 16, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def _proto(module, x, opset):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buffer, opset_version=opset, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("shape,dim,log,rewritten", [
    ((2, 16, 4, 50), 1, False, True),   # the DFL case: a non-last axis of a 4-D tensor
    ((1, 3, 5, 7, 6), 2, True, True),   # log-softmax, 5-D
    ((2, 16, 4, 50), -1, False, False),  # the last axis: onnxruntime's kernel's own case
    ((1, 40, 49), 1, False, False),     # rank 3: left to the kernel (as fast there)
])
def test_decompose_softmax_keeps_the_results(opset, shape, dim, log, rewritten):
    from pruners.onnx_passes import optimize

    x = torch.randn(*shape) * 4
    proto = _proto(Softmax(dim, log), x, opset)
    done = optimize(proto)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert done == ({"decompose_softmax": 1} if rewritten else {})
    assert ("Softmax" in ops or "LogSoftmax" in ops) is not rewritten
    expected = Softmax(dim, log)(x).numpy()
    np.testing.assert_allclose(_run(proto, x), expected, rtol=1e-5, atol=1e-6)


def test_export_onnx_decomposes_the_dfl_softmax_unless_told_not_to(tmp_path):
    x = torch.randn(1, 64, 80)
    model = Dfl().eval()
    default = export_onnx(model, x, str(tmp_path / "a.onnx"))
    assert default.optimized == {"decompose_softmax": 1} and default.max_rel_diff <= 1e-4
    assert "Softmax" not in {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    plain = export_onnx(model, x, str(tmp_path / "b.onnx"), optimize=False)
    assert plain.optimized == {}
    assert "Softmax" in {n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node}


def test_latency_timing_runs_the_graph_export_onnx_writes():
    """The onnxruntime/OpenVINO timings export with the same rewrites (so target_latency and
    round_to="auto" measure the file users deploy)."""
    from pruners.latency.timing import _onnx_bytes

    graph = onnx.load_from_string(_onnx_bytes(Dfl(), (torch.randn(1, 64, 80),))).graph
    assert "Softmax" not in {n.op_type for n in graph.node}
    assert "ReduceMax" in {n.op_type for n in graph.node}
