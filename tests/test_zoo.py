"""The zero-equivalence check on real models no one here wrote (torchvision, Ultralytics)."""

import numpy as np
import pytest
import torch

from depgraph import analyze, capture
from pruners import repair_graph, run_model, sample_units, verify

pytestmark = pytest.mark.zoo


def _check(name, model, x, report_share, outputs=None, fractions=(0.2, 0.6), at=None):
    model.eval()
    graph = analyze(capture(model, x, outputs=outputs))
    graph = repair_graph(model, graph, x, outputs=outputs, at=at)
    report_share(name, graph)
    assert graph.exact_units(), f"{name}: nothing prunable"
    reference = run_model(model, x, outputs)
    assert any(t.numel() for t in reference), f"{name}: empty outputs make a vacuous check"
    for seed, fraction in enumerate(fractions):
        units = sample_units(graph, fraction, np.random.default_rng(seed))
        result = verify(model, graph, units, x, outputs=outputs, at=at)
        assert result.ok, f"{name} fraction={fraction}: {result}"
    return graph


def _frozen_params(graph):
    return {(p, d) for f in graph.frozen for p, d, _ in f.dims}


TORCHVISION = ["resnet50", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
               "regnet_y_400mf"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_classifier(name, report_share):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    graph = _check(name, getattr(tv.models, name)(), torch.randn(1, 3, 160, 160), report_share)
    first_conv = next(l.weight for l in graph.layers if l.kind == "conv")
    classifier = [l.weight for l in graph.layers if l.kind == "linear"][-1]
    classifier_bias = classifier.rpartition(".")[0] + ".bias"
    # Frozen: only the stem's RGB input columns and the classifier's 1000 outputs.
    assert _frozen_params(graph) == {(first_conv, 1), (classifier, 0), (classifier_bias, 0)}


def test_retinanet_through_the_concrete_fallback(report_share):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None,
                                                       min_size=192, max_size=192,
                                                       score_thresh=0.0)  # random scores ~0.01
    x = [torch.rand(3, 192, 192)]
    cap = capture(model.eval(), x)
    assert cap.method == "concrete"
    # Compare the head's dense outputs: top-k and NMS make boxes discontinuous in float noise.
    graph = _check("retinanet_resnet50_fpn", model, x, report_share, fractions=(0.3,),
                   at=["head"])
    frozen_modules = {p.rpartition(".")[0] for p, _ in _frozen_params(graph)}
    assert frozen_modules == {"backbone.body.conv1", "head.classification_head.cls_logits",
                              "head.regression_head.bbox_reg"}


def _yolo(cfg):
    ultralytics = pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    return ultralytics.YOLO(cfg).model


def _predictions(out):
    return out[0]


def test_yolov8n(report_share):
    model = _yolo("yolov8n.yaml")
    graph = _check("yolov8n", model, torch.randn(1, 3, 256, 256), report_share, _predictions)
    # Frozen: the stem's RGB columns and the Detect head's last convs, whose channels are
    # the box distributions (DFL softmax) and class scores of the output.
    for param, dim in _frozen_params(graph):
        assert param == "model.0.conv.weight" and dim == 1 or \
            param.startswith(("model.22.cv2.", "model.22.cv3.", "model.22.dfl.")), param
        if param.startswith(("model.22.cv2.", "model.22.cv3.")):
            assert param.split(".")[4] == "2", param  # only the final 1x1 conv of each branch


def test_yolo11n(report_share):
    model = _yolo("yolo11n.yaml")
    graph = _check("yolo11n", model, torch.randn(1, 3, 256, 256), report_share, _predictions)
    # C2PSA's split((self.c, self.c)) and its attention's head sizes are rewritten, and the
    # attention's view back to the input's width is tied to it: nothing freezes there
    assert not [f.reason for f in graph.frozen if "fixed in Python" in f.reason]
    assert graph.unit_index[("model.10.m.0.attn.qkv.conv.weight", 0)].min() >= 0


def test_yolo12n_area_attention_prunes_exactly(report_share, monkeypatch):
    """A2C2f's area attention splits by ``self.head_dim`` (rewritten) and scales q by
    ``self.head_dim ** -0.5`` computed in its forward: surgery scales the rows that make q by
    ``sqrt(new / old)`` (``SCORE_SCALE_FIXES``), so its heads prune exactly; without that, the
    check sees the scores change. (A random YOLO12n's features have all but vanished by its
    attention, so the scale is checked on the block alone, fed a live input.)"""
    from ultralytics.nn.modules.block import AAttn

    from pruners import surgery

    model = _yolo("yolo12n.yaml")
    graph = _check("yolo12n", model, torch.randn(1, 3, 256, 256), report_share, _predictions)
    assert not [f.reason for f in graph.frozen if "fixed in Python" in f.reason]
    ids = graph.unit_index[("model.6.m.0.0.attn.qkv.conv.weight", 0)]
    assert ids.min() >= 0 and all(graph.units[u].exact for u in np.unique(ids))

    block = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), AAttn(64, 2, area=4),
                                torch.nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = analyze(capture(block, x))
    ids = graph.unit_index[("1.qkv.conv.weight", 0)]
    units = sorted({int(u) for u in ids})[:3]
    assert all(graph.units[u].exact for u in units)
    assert verify(block, graph, units, x).ok
    monkeypatch.setattr(surgery, "SCORE_SCALE_FIXES", {})
    assert not verify(block, graph, units, x).ok
