"""The coverage zoo: the models users bring, built by name with random weights.

Names carry their source: ``tv:resnet50`` (torchvision classifier), ``tvdet:fcos_resnet50_fpn``
(torchvision detection/segmentation, eval mode, whole model), ``tvvideo:r3d_18``,
``tvflow:raft_small``, ``tvquant:quantized_resnet18`` (the float, quantizable variant),
``yolo:yolov8n-seg`` (Ultralytics config by model name), ``yaml:v8/yolov8-p2.yaml`` (a YAML file
of the installed Ultralytics, at its first scale), ``timm:cspresnet50``.

Scopes (:func:`names`): the chosen zoo (``tv``, ``tvdet``, ``yolo``, ``timm``, or ``all``), and
the ecosystem-wide ones: ``timm-all`` (the smallest variant of every timm family, see
:func:`timm_family`), ``tv-all`` (every model of ``torchvision.models.list_models()``) and
``ultra-all`` (every YAML under ``ultralytics/cfg/models``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import torch

from .models import Bench, _first, build as build_bench

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
WIDE_SCOPES = ("timm-all", "tv-all", "ultra-all")
#: The smallest variant of each timm family, by parameter count (``python -m benchmarks.zoo``).
TIMM_FAMILIES = os.path.join(os.path.dirname(__file__), "timm_families.json")
VIDEO_INPUT = (1, 3, 8, 112, 112)  # frames, height, width: a reduced clip for CPU runs
VIDEO_FIXED = {"mvit_v1_b": (1, 3, 16, 224, 224), "mvit_v2_s": (1, 3, 16, 224, 224),
               "s3d": (1, 3, 16, 224, 224)}  # models whose pooling or position tables fix it


def names(scope: str = "all") -> list[str]:
    """Model names in a scope: one of :data:`SCOPES`, "all", or one of :data:`WIDE_SCOPES`."""
    if scope == "timm-all":
        return [f"timm:{m['model']}" for m in timm_families().values()]
    if scope == "tv-all":
        return tv_all()
    if scope == "ultra-all":
        return [f"yaml:{p}" for p in ultralytics_yamls()]
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


def timm_family(name: str) -> str:
    """A timm model's family: its leading letters (with a ``tf_`` prefix kept, since those are
    TensorFlow ports with their own padding), plus a version suffix ``vN`` where the letters
    end in ``v`` (``convnextv2_atto`` -> ``convnextv2``, ``resnet50d`` -> ``resnet``,
    ``vit_tiny_patch16_224`` -> ``vit``, ``cs3darknet_s`` -> ``cs``)."""
    family = re.match(r"(tf_)?[a-z]+", name).group()
    version = re.match(r"\d+(?=_|$)", name[len(family):]) if family.endswith("v") else None
    return family + (version.group() if version else "")


def timm_families(refresh: bool = False) -> dict[str, dict]:
    """family -> {"model", "params", "members"}: the smallest variant of every family of
    ``timm.list_models()`` (timm's own ``test_*`` fixtures left out), by parameter count on
    the meta device. Cached in :data:`TIMM_FAMILIES` for the installed timm version."""
    import timm

    if not refresh and os.path.exists(TIMM_FAMILIES):
        with open(TIMM_FAMILIES) as f:
            cached = json.load(f)
        if cached["timm"] == timm.__version__:
            return cached["families"]
    families: dict[str, dict] = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        params = _timm_params(name)
        fam = families.setdefault(timm_family(name), {"model": None, "params": None,
                                                      "members": 0})
        fam["members"] += 1
        if params is not None and (fam["params"] is None or params < fam["params"]):
            fam.update(model=name, params=params)
        elif fam["model"] is None:
            fam["model"] = name  # none built on meta: the first, counted when it runs
    with open(TIMM_FAMILIES, "w") as f:
        json.dump({"timm": timm.__version__, "families": dict(sorted(families.items()))},
                  f, indent=1)
    return families


def _timm_params(name: str) -> int | None:
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in net.parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is counted later
        return None


def tv_all() -> list[str]:
    """Every model of ``torchvision.models.list_models()``, named by its kind."""
    import torchvision.models as tvm

    kinds = [("tvdet", tvm.detection), ("tvdet", tvm.segmentation), ("tvvideo", tvm.video),
             ("tvflow", tvm.optical_flow), ("tvquant", tvm.quantization), ("tv", tvm)]
    out = []
    for prefix, module in kinds:
        out += [f"{prefix}:{n}" for n in tvm.list_models(module=module)]
    return out


def ultralytics_yamls() -> list[str]:
    """Every model YAML shipped with the installed Ultralytics, relative to its cfg/models."""
    root = _ultralytics_models()
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files if f.endswith(".yaml"))


def _ultralytics_models() -> str:
    import ultralytics

    return os.path.join(os.path.dirname(ultralytics.__file__), "cfg", "models")


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

        kind, size = DETECTION.get(model) or _torchvision_kind(model)
        extra = {"weights_backbone": None}
        if kind == "detection" and not model.startswith("ssd"):  # SSDs fix their own size
            extra.update(min_size=size, max_size=size)
        if model.startswith(("fcn", "deeplab")):
            extra["aux_loss"] = False
        net = getattr(getattr(torchvision.models, kind), model)(weights=None, **extra).eval()
        inputs: Any = ([torch.rand(3, size, size)] if kind == "detection"
                       else torch.randn(1, 3, size, size))
        return Bench(name, net, inputs), {}
    if source == "tvvideo":
        import torchvision

        net = torchvision.models.get_model(model, weights=None).eval()
        return Bench(name, net, torch.randn(*VIDEO_FIXED.get(model, VIDEO_INPUT))), {}
    if source == "tvflow":  # two frames in, a list of flow refinements out
        import torchvision

        net = torchvision.models.get_model(model, weights=None).eval()
        frames = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
        return Bench(name, net, frames), {}
    if source == "tvquant":  # quantize=False: the float model, with its quant/dequant stubs
        import torchvision

        net = torchvision.models.get_model(model, weights=None, quantize=False).eval()
        size = 299 if "inception" in model else 224
        return Bench(name, net, torch.randn(1, 3, size, size)), {}
    if source == "yaml":
        return _ultralytics_yaml(name, model), {}
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


def _torchvision_kind(model: str) -> tuple[str, int]:
    """(detection or segmentation, image size) for a torchvision model not in DETECTION."""
    import torchvision.models as tvm

    if model in tvm.list_models(module=tvm.segmentation):
        return "segmentation", 256
    return "detection", 320 if "320" in model else 512


def _ultralytics_yaml(name: str, path: str) -> Bench:
    """A model from a shipped Ultralytics YAML, at its first scale (Ultralytics' own default
    for a file without a scale letter), with the class its file name asks for."""
    import ultralytics

    full = _no_download(os.path.join(_ultralytics_models(), path))
    stem = os.path.basename(path)
    if "rtdetr" in stem:
        wrapper = ultralytics.RTDETR(full)
    elif "yoloe" in stem:
        wrapper = ultralytics.YOLOE(full)
    elif "world" in stem:
        wrapper = ultralytics.YOLOWorld(full)
    else:
        wrapper = ultralytics.YOLO(full)
    net = wrapper.model.eval()
    size = 224 if wrapper.task == "classify" else 640
    outputs = None if wrapper.task == "classify" else _first
    return Bench(name, net, torch.randn(1, 3, size, size), outputs)


def _no_download(path: str) -> str:
    """The YAML itself, or, where a ``TorchVision`` layer asks for pretrained weights (a
    download), a copy in a temporary folder that asks for none."""
    import tempfile

    with open(path) as f:
        text = f.read()
    patched = re.sub(r"(TorchVision, \[\d+, \w+, )DEFAULT", r"\1null", text)
    if patched == text:
        return path
    copy = os.path.join(tempfile.mkdtemp(prefix="zoo_yaml_"), os.path.basename(path))
    with open(copy, "w") as f:
        f.write(patched)
    return copy


if __name__ == "__main__":  # python -m benchmarks.zoo: refresh the timm family list
    fams = timm_families(refresh="--keep" not in sys.argv)
    print(f"{len(fams)} timm families -> {TIMM_FAMILIES}")
