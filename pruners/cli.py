"""``python -m pruners``: prune a model from the command line.

    python -m pruners prune SOURCE --target-flops 0.5 [--round-to 8|auto] [--importance taylor
        --data data.yaml] [--recover reconstruct bn --calibration data.yaml|FOLDER]
        --out pruned.pt [--plan plan.json] [--onnx pruned.onnx] [--report report.html]

SOURCE is an Ultralytics checkpoint or YAML (``best.pt``, ``yolov8n.yaml``), ``tv:NAME`` (a
torchvision model, random weights) or ``timm:NAME``. The command only parses arguments and
calls the public API (``prune_yolo`` or ``prune``); on bad input it prints one line, exits
with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .latency.timing import BACKENDS, DTYPES

__all__ = ["main"]

_STAGES = 9  # check inputs, capture, analyze, repair, score, allocate, surgery, verify, measure


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pruners",
                                description="Structured channel pruning for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prune", help="prune a model to a FLOPs or parameter target",
                       description=__doc__.split("\n\n")[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("source", help="Ultralytics .pt/.yaml, tv:NAME (torchvision) or timm:NAME")
    target = q.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops", type=float, help="fraction of the FLOPs to keep")
    target.add_argument("--target-params", type=float, help="fraction of the params to keep")
    target.add_argument("--target-latency", type=float,
                        help="fraction of the dense latency to keep, measured with --backend")
    q.add_argument("--round-to", type=_round_to, default=None,
                   help="channel multiple, or 'auto' to measure the one the backend's kernels "
                        "reward (default: 8 for Ultralytics models, 1 otherwise)")
    q.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="where latency is measured for --target-latency / --round-to auto "
                        "(cudagraph: CUDA-graph replays, with --device cuda)")
    q.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where latency is measured")
    q.add_argument("--latency-dtype", choices=DTYPES, default="float32",
                   help="the precision the model is deployed in: latency is timed on copies "
                        "cast to it (eager and cudagraph)")
    q.add_argument("--threads", type=int, default=None,
                   help="threads for latency measurements (default: torch's setting)")
    q.add_argument("--importance", default="l2",
                   help="l2 (default), l1, random, bn_scale, fpgm, taylor, hessian")
    q.add_argument("--data", help="dataset YAML for taylor/hessian (Ultralytics models)")
    q.add_argument("--imgsz", type=int, default=None,
                   help="example input size (default: 640 for detectors, 224 for classifiers)")
    q.add_argument("--recover", nargs="+", choices=("bias", "reconstruct", "bn"),
                   help="restore the pruned model without training (see pruners.recovery)")
    q.add_argument("--calibration",
                   help="images for --recover: a dataset YAML (Ultralytics models) or a folder "
                        "of images (default for Ultralytics models: --data)")
    q.add_argument("--out", required=True, help="where to write the pruned model (.pt)")
    q.add_argument("--plan", help="also write the JSON plan here")
    q.add_argument("--onnx", help="also export an ONNX file here (checked with onnxruntime)")
    q.add_argument("--report", help="also write the report as one self-contained HTML page")
    q.add_argument("--quiet", action="store_true", help="no progress bar, no report")
    return p


def _round_to(text: str) -> Any:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round-to takes a positive int or 'auto', got "
                                         f"{text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--round-to must be at least 1, got {value}")
    return value


def _progress(quiet: bool, stages: int = _STAGES):
    if quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=stages, desc="pruning", unit="stage", file=sys.stderr)

    def step(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1 if bar.n < bar.total else 0)

    return bar, step


def _build(source: str) -> tuple[str, Any]:
    """("yolo", YOLO) or ("module", nn.Module) for a SOURCE."""
    kind, _, name = source.partition(":")
    if kind == "tv" and name:
        import torchvision

        return "module", torchvision.models.get_model(name, weights=None).eval()
    if kind == "timm" and name:
        import timm

        return "module", timm.create_model(name, pretrained=False).eval()
    path = Path(source)
    if path.suffix in (".pt", ".yaml", ".yml"):
        from .integrations.ultralytics import as_ultralytics

        return "yolo", as_ultralytics(source)  # YOLO, or RTDETR for an RT-DETR
    raise ValueError(f"unknown source {source!r}: give an Ultralytics .pt/.yaml, tv:NAME or "
                     "timm:NAME")


def _run(args: argparse.Namespace) -> str:
    import torch

    from .export import export_onnx
    from .integrations.ultralytics import _contract as yolo_outputs, prune_yolo

    for path in filter(None, (args.out, args.plan, args.onnx, args.report)):
        if not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"output folder of {path} does not exist")
    try:
        kind, model = _build(args.source)
    except (RuntimeError, KeyError, ValueError) as exc:  # timm/torchvision: unknown names
        raise ValueError(f"cannot build {args.source}: {str(exc).splitlines()[0]}") from None
    if args.recover and not (args.calibration or (kind == "yolo" and args.data)):
        raise ValueError("--recover needs --calibration (a dataset YAML or a folder of images)")
    folder = args.calibration and Path(args.calibration).is_dir()
    if args.calibration and not folder and not Path(args.calibration).exists():
        raise FileNotFoundError(f"no such calibration data: {args.calibration}")
    if args.calibration and not folder and kind != "yolo":
        raise ValueError("--calibration for torchvision/timm models is a folder of images")
    bar, step = _progress(args.quiet, _STAGES + bool(args.recover))
    target = dict(target_flops=args.target_flops, target_params=args.target_params,
                  target_latency=args.target_latency)
    hardware = dict(backend=args.backend, device=args.device, threads=args.threads,
                    latency_dtype=args.latency_dtype)
    try:
        if kind == "yolo":
            opts = dict(round_to=args.round_to or 8, importance=args.importance, data=args.data,
                        progress=step, **hardware)
            if args.imgsz:
                opts["imgsz"] = args.imgsz
            if args.recover:
                opts["recover"] = tuple(args.recover)
                if folder:
                    from .images import image_batches

                    opts["calibration"] = image_batches(args.calibration,
                                                        imgsz=opts.get("imgsz", 640))
                elif args.calibration:  # a dataset YAML: prune_yolo reads it as the trainer does
                    opts["calibration"] = args.calibration
            small, result = prune_yolo(model, **target, **opts)
            size = small.model.pruning["imgsz"]
            net = small.model
        else:
            if args.importance in ("taylor", "hessian"):
                raise ValueError(f"--importance {args.importance} needs a labelled dataset; from "
                                 "the command line it is supported for Ultralytics models "
                                 "(--data data.yaml)")
            from . import prune

            size = args.imgsz or 224
            extra = {}
            if args.recover:
                from .images import IMAGENET_MEAN, IMAGENET_STD, image_batches

                extra = dict(recover=tuple(args.recover), calibration=image_batches(
                    args.calibration, imgsz=size, mean=IMAGENET_MEAN, std=IMAGENET_STD))
            result = prune(model, torch.randn(1, 3, size, size), **target,
                           round_to=args.round_to or 1, importance=args.importance,
                           progress=step, **hardware, **extra)
            net = small = result.model
    finally:
        if bar is not None:
            bar.close()
    # Everything is computed; write each file beside its target, then move them into place.
    written: list[tuple[str, str]] = []
    try:
        tmp = args.out + ".tmp"
        small.save(tmp) if kind == "yolo" else torch.save(small, tmp)
        written.append((tmp, args.out))
        if args.plan:
            result.plan.save(args.plan + ".tmp")
            written.append((args.plan + ".tmp", args.plan))
        if args.onnx:
            export_onnx(net.float().eval(), torch.randn(1, 3, size, size), args.onnx + ".tmp",
                        outputs=yolo_outputs if kind == "yolo" else None)
            written.append((args.onnx + ".tmp", args.onnx))
        if args.report:
            result.report.save_html(args.report + ".tmp", title=f"{args.source} pruned")
            written.append((args.report + ".tmp", args.report))
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, final in written:
        os.replace(tmp, final)
    return str(result.report)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input or infeasible target)."""
    args = _parser().parse_args(argv)
    from depgraph.errors import PruningError

    try:
        report = _run(args)
    except (PruningError, ValueError, TypeError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(report)
    return 0
