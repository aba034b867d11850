"""``python -m pruners prune`` (issue "Detectors end to end", item 4)."""

import re
import subprocess
import sys

import pytest
import torch

from pruners.cli import main

pytest.importorskip("torchvision")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_prunes_a_torchvision_model_and_writes_every_output(tmp_path, capsys):
    out, plan, onnx = tmp_path / "m.pt", tmp_path / "plan.json", tmp_path / "m.onnx"
    pytest.importorskip("onnxruntime")
    page = tmp_path / "report.html"
    code = main(["prune", "tv:resnet18", "--target-flops", "0.5", "--imgsz", "64",
                 "--round-to", "8", "--out", str(out), "--plan", str(plan), "--onnx", str(onnx),
                 "--report", str(page)])
    assert code == 0
    assert _files(tmp_path) == ["m.onnx", "m.pt", "plan.json", "report.html"]
    assert "id='widths'" in page.read_text()
    model = torch.load(out, weights_only=False)
    assert model.layer1[0].conv1.out_channels % 8 == 0
    from pruners import Plan, apply_plan, measure
    import torchvision

    fresh = apply_plan(torchvision.models.resnet18(), Plan.load(str(plan)))
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    x = torch.randn(1, 3, 64, 64)
    assert measure(model, x)[0] / measure(torchvision.models.resnet18(), x)[0] <= 0.5
    assert "FLOPs" in capsys.readouterr().out  # the report


def test_prunes_an_ultralytics_yaml(tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    out = tmp_path / "y.pt"
    assert main(["prune", "yolov8n.yaml", "--target-flops", "0.5", "--imgsz", "128",
                 "--out", str(out), "--quiet"]) == 0
    reloaded = YOLO(str(out))
    assert reloaded.model.pruning["flops_ratio"] <= 0.5
    assert reloaded.model.model[0].conv.out_channels % 8 == 0


def test_prunes_an_rtdetr_yaml_into_a_checkpoint_that_trains_as_one(tmp_path):
    pytest.importorskip("ultralytics")
    from pruners.ultralytics import load_pruned

    out = tmp_path / "rt.pt"  # Ultralytics' YOLO() refuses RT-DETR YAMLs: RTDETR builds it
    assert main(["prune", "rtdetr-l.yaml", "--target-flops", "0.5", "--imgsz", "64",
                 "--out", str(out), "--quiet"]) == 0
    again = load_pruned(out)
    assert type(again).__name__ == "PrunedRTDETR"  # not the plain class Ultralytics loads
    assert again.model.pruning["flops_ratio"] <= 0.5


@pytest.mark.parametrize("args, message", [
    (["missing.pt", "--target-flops", "0.5"], "no such checkpoint"),
    (["tv:no_such_net", "--target-flops", "0.5"], "cannot build tv:no_such_net"),
    (["timm:no_such_net", "--target-flops", "0.5"], "cannot build timm:no_such_net"),
    (["model.onnx", "--target-flops", "0.5"], "unknown source"),
    (["tv:resnet18", "--target-flops", "0.001", "--imgsz", "64"], "cannot be met"),
    (["tv:resnet18", "--target-flops", "1.5"], "must be in \\(0, 1\\]"),
    (["tv:resnet18", "--target-flops", "0.5", "--importance", "taylor"], "needs a labelled"),
    (["tv:resnet18", "--target-flops", "0.5", "--importance", "nope", "--imgsz", "64"],
     "unknown importance"),
    (["tv:resnet18", "--target-flops", "0.5", "--recover", "bn"], "needs --calibration"),
    (["tv:resnet18", "--target-flops", "0.5", "--recover", "bn", "--calibration", "nowhere"],
     "no such calibration data"),
    (["tv:resnet18", "--target-latency", "0.5", "--backend", "cudagraph", "--imgsz", "64"],
     "needs device='cuda'"),
    (["tv:resnet18", "--target-latency", "0.5", "--backend", "onnxruntime", "--latency-dtype",
      "float16", "--imgsz", "64"], "float32 only"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    if args[0].startswith("timm:"):
        pytest.importorskip("timm")
    code = main(["prune", *args, "--out", str(tmp_path / "out.pt"), "--plan",
                 str(tmp_path / "plan.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert _files(tmp_path) == []


def _image_folder(folder, n=6, size=40):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_recovers_from_a_folder_of_images(tmp_path, capsys):
    images = _image_folder(tmp_path / "images")
    out = tmp_path / "out" / "m.pt"
    out.parent.mkdir()
    code = main(["prune", "tv:resnet18", "--target-flops", "0.5", "--imgsz", "64", "--recover",
                 "bn", "bias", "--calibration", str(images), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and _files(out.parent) == ["m.pt"]
    assert "recover bias: output error" in text and "recover bn: output error" in text
    assert "6 samples" in text  # the six images of the folder


def test_an_empty_calibration_folder_is_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["prune", "tv:resnet18", "--target-flops", "0.5", "--recover", "bn",
                 "--calibration", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"),
                 "--quiet"])
    assert code == 2 and "no images" in capsys.readouterr().err
    assert _files(tmp_path) == ["empty"]


def test_missing_output_folder_is_bad_input(tmp_path, capsys):
    code = main(["prune", "tv:resnet18", "--target-flops", "0.5", "--out",
                 str(tmp_path / "no" / "out.pt"), "--quiet"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "pruners", "prune", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--target-flops", "--target-params", "--round-to", "--importance", "--data",
                 "--imgsz", "--out", "--plan", "--onnx", "--recover", "--calibration",
                 "--report", "--backend", "--device", "--latency-dtype"):
        assert flag in out
