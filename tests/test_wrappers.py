"""Wrappers around a model: what prune() takes, and what it refuses with a clear message."""

import socket

import pytest
import torch
from torch import nn

from models import build
from pruners import prune, run_model


def test_data_parallel_prunes_like_the_bare_model():
    model, x = build("resnet_basic")
    result = prune(nn.DataParallel(model), x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert result.report.verify.ok
    assert isinstance(result.model, nn.DataParallel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_prunes_in_a_gloo_group():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        model, x = build("resnet_basic")
        result = prune(nn.parallel.DistributedDataParallel(model), x, target_flops=0.5)
        assert 0.49 <= result.report.flops_ratio <= 0.5
        assert [t.shape for t in run_model(result.model, x)] == [t.shape for t in run_model(model, x)]
    finally:
        dist.destroy_process_group()


def test_a_yolo_object_is_refused_with_what_to_call():
    ultralytics = pytest.importorskip("ultralytics")
    with pytest.raises(TypeError, match=r"prune_yolo\(yolo.*yolo\.model"):
        prune(ultralytics.YOLO("yolov8n.yaml"), torch.randn(1, 3, 64, 64), target_flops=0.5)


def test_a_whole_script_module_is_refused_with_what_to_pass():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    with pytest.raises(TypeError, match="pass the eager nn.Module"):
        prune(scripted, torch.randn(1, 3, 8, 8), target_flops=0.5)


def test_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="takes an nn.Module, got function"):
        prune(lambda t: t, torch.randn(1, 3, 8, 8), target_flops=0.5)


@pytest.mark.parametrize("part", [None, "body"])
def test_compiled_modules_run_eagerly_while_pruning_and_stay_compiled(part):
    compiled = []

    def backend(gm, example_inputs):  # a backend that records each compile and runs eagerly
        compiled.append(gm)
        return gm.forward

    model, x = build("resnet_basic")
    if part is None:
        model = torch.compile(model, backend=backend)
    else:
        setattr(model, part, torch.compile(getattr(model, part), backend=backend))
    result = prune(model, x, target_flops=0.5)
    assert compiled == []  # every probe and check would compile another pruned copy
    assert 0.49 <= result.report.flops_ratio <= 0.5 and result.report.verify.ok
    wrapped = result.model if part is None else getattr(result.model, part)
    assert type(wrapped).__name__ == "OptimizedModule"
    with torch.no_grad():
        eager = wrapped._orig_mod(x) if part is None else None
        out = result.model(x)
    assert compiled  # the result compiles on its first call, with the user's backend
    if eager is not None:
        torch.testing.assert_close(out, eager)


def test_a_plan_moves_between_a_compiled_model_and_the_plain_one():
    from pruners import apply_plan

    model, x = build("resnet_basic")
    plain = prune(model, x, target_flops=0.5)
    compiled = prune(torch.compile(model, backend="eager"), x, target_flops=0.5)
    assert all(p.startswith("_orig_mod.") for p in compiled.plan.kept)  # as its state_dict
    widths = {k: v.shape for k, v in plain.model.state_dict().items()}
    fresh = apply_plan(build("resnet_basic")[0], compiled.plan)  # made compiled, applied plain
    assert {k: v.shape for k, v in fresh.state_dict().items()} == widths
    wrapped = apply_plan(torch.compile(build("resnet_basic")[0], backend="eager"), plain.plan)
    assert {k: v.shape for k, v in wrapped._orig_mod.state_dict().items()} == widths


def test_a_compiled_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from pruners import export_onnx

    model, x = build("resnet_basic")
    model.body = torch.compile(model.body, backend="eager")
    small = prune(torch.compile(model, backend="eager"), x, target_flops=0.5).model
    out = export_onnx(small, x, str(tmp_path / "small.onnx"))  # TorchScript refuses dynamo code
    assert out.max_rel_diff <= 1e-4
    assert type(small).__name__ == "OptimizedModule"  # the wrappers are put back
    assert type(small._orig_mod.body).__name__ == "OptimizedModule"
