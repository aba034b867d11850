"""The coverage zoo: every model family issue 4 names, built by name with random weights.

Names carry their source: ``tv:resnet50`` (torchvision classifier), ``tvdet:fcos_resnet50_fpn``
(torchvision detection/segmentation, eval mode, whole model), ``yolo:yolov8n-seg``
(Ultralytics YAML), ``timm:cspresnet50``. :func:`names` lists a scope.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import Bench, build as build_bench

DETECTION = {
    # name: (builder in torchvision.models.detection / .segmentation, image size). Defaults
    # only: prune() finds where the detectors' values become data-dependent (top-k, NMS) and
    # verifies and counts FLOPs before it (depgraph.boundary).
    "retinanet_resnet50_fpn": ("detection", 512),
    "fcos_resnet50_fpn": ("detection", 512),
    "ssd300_vgg16": ("detection", 300),
    "ssdlite320_mobilenet_v3_large": ("detection", 320),
    "fasterrcnn_resnet50_fpn": ("detection", 512),
    "fasterrcnn_mobilenet_v3_large_fpn": ("detection", 512),
    "maskrcnn_resnet50_fpn": ("detection", 512),
    "keypointrcnn_resnet50_fpn": ("detection", 512),
    "fcn_resnet50": ("segmentation", 256),
    "deeplabv3_resnet50": ("segmentation", 256),
    "lraspp_mobilenet_v3_large": ("segmentation", 256),
}

ULTRALYTICS = ["yolov3u", "yolov5nu", "yolov5su", "yolov6n", "yolov6s", "yolov8n", "yolov8s",
               "yolov8n-seg", "yolov8n-pose", "yolov8n-obb", "yolov8n-cls", "yolov9t", "yolov9s",
               "yolov10n", "yolov10s", "yolo11n", "yolo11s", "yolo12n", "yolo12s", "rtdetr-l",
               "yolov8x"]

#: One model per timm CNN family (the family named first).
TIMM = {
    "CSPNet": "cspresnet50", "CSPDarkNet": "cspdarknet53", "DarkNet": "darknet17",
    "RegNet": "regnety_008", "EfficientNet": "efficientnet_b0",
    "EfficientNetV2": "efficientnetv2_rw_t", "MobileNetV3": "mobilenetv3_large_100",
    "ConvNeXt": "convnext_atto", "Res2Net": "res2net50_14w_8s", "DLA": "dla34",
    "HRNet": "hrnet_w18_small", "GhostNet": "ghostnet_100", "RepVGG": "repvgg_a0",
    "ResNeSt": "resnest14d", "ReXNet": "rexnet_100", "MixNet": "mixnet_s", "DPN": "dpn68",
    "VoVNet": "ese_vovnet19b_dw", "SelecSLS": "selecsls42b", "GENet": "gernet_s",
    "SKNet": "skresnet18", "LCNet": "lcnet_050", "MNASNet": "mnasnet_100",
    "FBNet": "fbnetc_100", "HardCoReNAS": "hardcorenas_a", "TinyNet": "tinynet_a",
    "ResNet-D": "resnet26d", "SE-ResNeXt": "seresnext26d_32x4d", "NFNet": "nf_resnet26",
    "RegNetX": "regnetx_002", "DenseNet": "densenet121", "Xception": "xception41",
    "MobileOne": "mobileone_s0", "FastViT": "fastvit_t8", "EfficientViT": "efficientvit_b0",
}

SCOPES = ("tv", "tvdet", "yolo", "timm")


def names(scope: str = "all") -> list[str]:
    """Model names in a scope: one of :data:`SCOPES`, or "all"."""
    out = []
    if scope in ("tv", "all"):
        import torchvision

        out += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if scope in ("tvdet", "all"):
        out += [f"tvdet:{n}" for n in DETECTION]
    if scope in ("yolo", "all"):
        out += [f"yolo:{n}" for n in ULTRALYTICS]
    if scope in ("timm", "all"):
        out += [f"timm:{n}" for n in TIMM.values()]
    return out


def build(name: str) -> tuple[Bench, dict[str, Any]]:
    """(the model as a :class:`Bench`, extra ``prune()`` keyword arguments)."""
    source, _, model = name.partition(":")
    torch.manual_seed(0)
    if source == "tv":
        import torchvision

        size = 299 if model == "inception_v3" else 224
        net = torchvision.models.get_model(model, weights=None).eval()
        return Bench(name, net, torch.randn(1, 3, size, size)), {}
    if source == "tvdet":
        import torchvision

        kind, size = DETECTION[model]
        extra = {"weights_backbone": None}
        if kind == "detection" and not model.startswith("ssd"):  # SSDs fix their own size
            extra.update(min_size=size, max_size=size)
        if model.startswith(("fcn", "deeplab")):
            extra["aux_loss"] = False
        net = getattr(getattr(torchvision.models, kind), model)(weights=None, **extra).eval()
        inputs: Any = ([torch.rand(3, size, size)] if kind == "detection"
                       else torch.randn(1, 3, size, size))
        return Bench(name, net, inputs), {}
    if source == "yolo":
        bench = build_bench(model if model.startswith("yolo") else "yolov8n")
        if not model.startswith("yolo"):  # RT-DETR
            from ultralytics import RTDETR

            net = RTDETR(f"{model}.yaml").model.eval()
            bench = Bench(name, net, torch.randn(1, 3, 640, 640), bench.outputs)
            return bench, {}
        size = 224 if model.endswith("-cls") else 640
        bench.inputs = torch.randn(1, 3, size, size)
        if model.endswith("-cls"):
            bench.outputs = None
        bench.name = name
        return bench, {}
    if source == "timm":
        import timm

        net = timm.create_model(model, pretrained=False).eval()
        size = net.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        return Bench(name, net, torch.randn(1, 3, size, size)), {}
    raise KeyError(f"unknown model source in {name!r}; use one of {SCOPES}")
