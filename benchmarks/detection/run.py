"""``python -m benchmarks.detection``: YOLO train -> prune -> fine-tune with Ultralytics' trainer.

Protocol (``FULL``; ``--quick`` is a reduced copy), all on the generated digits-det set:

1. Train YOLOv8n (10 classes) densely with Ultralytics' trainer for ``dense_epochs``.
2. For each FLOPs target and criterion (l2, taylor): ``prune_yolo`` the dense ``best.pt``,
   validate (mAP before fine-tuning), fine-tune with ``PrunedYOLO.train`` for ``ft_epochs``,
   validate again.
3. Baselines: the dense model; YOLOv8n narrowed by its YAML width multiple to the same FLOPs
   and trained from scratch for ``dense_epochs + ft_epochs``; Torch-Pruning on YOLOv8n (it
   fails on C2f: the row records the error) and on YOLOv5nu (dense-trained the same way,
   pruned with its MetaPruner and L2 importance, fine-tuned with the same trainer).
4. CPU latency (eager, batch 1, interleaved with the dense model, median of rounds).

Rows go to ``results/detection[_quick]_runs.jsonl``; ``--resume`` skips finished rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
WORK = RESULTS / ".models" / "detection"


@dataclass(frozen=True)
class Recipe:
    name: str
    targets: tuple[float, ...] = (0.5, 0.3)
    criteria: tuple[str, ...] = ("l2", "taylor")
    n_train: int = 1000
    n_val: int = 300
    imgsz: int = 160
    batch: int = 32
    dense_epochs: int = 25
    ft_epochs: int = 8
    lr0: float = 0.01
    ft_lr0: float = 0.002
    torch_pruning: bool = True


FULL = Recipe("full")
QUICK = Recipe("quick", targets=(0.5,), criteria=("l2",), n_train=200, n_val=60, imgsz=128,
               dense_epochs=3, ft_epochs=1, torch_pruning=False)


def _data(recipe: Recipe) -> str:
    return str(WORK / f"data_{recipe.name}" / "data.yaml")


def _train_args(recipe: Recipe, project: Path, name: str, epochs: int, lr0: float) -> dict:
    return dict(data=_data(recipe), epochs=epochs,
                imgsz=recipe.imgsz, batch=recipe.batch, workers=2, device="cpu", seed=0,
                deterministic=True, plots=False, project=str(project), name=name, exist_ok=True,
                optimizer="SGD", lr0=lr0, warmup_epochs=0 if lr0 < recipe.lr0 else 1,
                amp=False, verbose=False, val=True)


def _metrics(yolo, recipe: Recipe, data: str) -> dict:
    m = yolo.val(data=data, imgsz=recipe.imgsz, batch=recipe.batch, device="cpu", plots=False,
                 workers=0, verbose=False)
    return {"map50_95": float(m.box.map), "map50": float(m.box.map50)}


def _latency(dense: torch.nn.Module, model: torch.nn.Module, size: int, rounds: int = 7,
             calls: int = 10) -> tuple[float, float, float]:
    """(dense ms, pruned ms, spread of the dense rounds): interleaved rounds, medians."""
    x = torch.randn(1, 3, size, size)
    a, b = copy.deepcopy(dense).float().eval(), copy.deepcopy(model).float().eval()
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for m in (a, b):
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            for i, m in enumerate((a, b)):
                t = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[i].append(1000 * (time.perf_counter() - t) / calls)
    spread = (max(times[0]) - min(times[0])) / statistics.median(times[0])
    return statistics.median(times[0]), statistics.median(times[1]), spread


def _flops(model: torch.nn.Module, size: int) -> float:
    from pruners import measure

    return measure(copy.deepcopy(model).float().eval(), torch.randn(1, 3, size, size))[0]


def _narrow_yaml(recipe: Recipe, target: float, dense_flops: float) -> Path:
    """A YOLOv8n YAML whose width multiple gives at most ``target`` of the dense FLOPs."""
    import yaml
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    depth, width, top = cfg["scales"]["n"]
    lo, hi = 0.05, width
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = dict(cfg, scales={"n": [depth, mid, top]}, nc=10, scale="n")
        ratio = _flops(DetectionModel(copy.deepcopy(trial), nc=10, verbose=False),
                       recipe.imgsz) / dense_flops
        lo, hi = (mid, hi) if ratio <= target else (lo, mid)
    path = WORK / f"yolov8n-w{round(100 * target)}-{recipe.name}.yaml"
    body = {k: v for k, v in cfg.items() if k not in ("yaml_file", "scale", "channels")}
    path.write_text(yaml.safe_dump(dict(body, nc=10, scales={"n": [depth, lo, top]})))
    return path


def _dense(recipe: Recipe, cfg: str) -> Path:
    """Train ``cfg`` (10 classes) densely once; the path of its best.pt."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    name = f"dense-{Path(cfg).stem}"
    best = WORK / "runs" / recipe.name / name / "weights" / "best.pt"
    if not best.exists():
        yolo = YOLO(cfg)
        yolo.model = DetectionModel(cfg, nc=10, verbose=False)
        yolo.train(**_train_args(recipe, WORK / "runs" / recipe.name, name, recipe.dense_epochs,
                                 recipe.lr0))
    return best


def _row(recipe: Recipe, method: str, target: float, before: Optional[dict], yolo, dense_net,
         seconds: float, extra: Optional[dict] = None) -> dict:
    data = _data(recipe)
    after = _metrics(yolo, recipe, data)
    dense_ms, ms, spread = _latency(dense_net, yolo.model, recipe.imgsz)
    return {"method": method, "target": target,
            "flops_kept": _flops(yolo.model, recipe.imgsz) / _flops(dense_net, recipe.imgsz),
            "params_kept": sum(p.numel() for p in yolo.model.parameters())
            / sum(p.numel() for p in dense_net.parameters()),
            "map50_95_before": (before or {}).get("map50_95"),
            "map50_before": (before or {}).get("map50"),
            "map50_95": after["map50_95"], "map50": after["map50"],
            "latency_ms": round(ms, 3), "dense_latency_ms": round(dense_ms, 3),
            "dense_spread": round(spread, 3), "seconds": round(seconds, 1), **(extra or {})}


def jobs(recipe: Recipe) -> list[tuple[str, float]]:
    out = [("dense", 1.0)]
    for t in recipe.targets:
        out += [(f"ours/{c}", t) for c in recipe.criteria] + [("scratch", t)]
        if recipe.torch_pruning:
            out += [("tp/l2 yolov8n", t), ("tp/l2 yolov5nu", t)]
    return out


def run_job(recipe: Recipe, method: str, target: float) -> dict:
    from ultralytics import YOLO

    from pruners.ultralytics import prune_yolo

    data = _data(recipe)
    start = time.perf_counter()
    dense_best = _dense(recipe, "yolov8n.yaml")
    dense = YOLO(str(dense_best))
    runs = WORK / "runs" / recipe.name
    tag = f"{method.replace('/', '-').replace(' ', '-')}-{target:g}"
    if method == "dense":
        return _row(recipe, method, 1.0, None, dense, dense.model, time.perf_counter() - start)
    if method.startswith("ours/"):
        small, _ = prune_yolo(str(dense_best), target_flops=target, importance=method[5:],
                              data=data, imgsz=recipe.imgsz)
        before = _metrics(small, recipe, data)
        small.train(**_train_args(recipe, runs, tag, recipe.ft_epochs, recipe.ft_lr0))
        return _row(recipe, method, target, before, small, dense.model,
                    time.perf_counter() - start)
    if method == "scratch":
        cfg = _narrow_yaml(recipe, target, _flops(dense.model, recipe.imgsz))
        yolo = YOLO(str(cfg))
        yolo.train(**_train_args(recipe, runs, tag, recipe.dense_epochs + recipe.ft_epochs,
                                 recipe.lr0))
        return _row(recipe, method, target, None, yolo, dense.model, time.perf_counter() - start)
    if method.startswith("tp/"):
        return _torch_pruning(recipe, method, target, runs, tag, data, start)
    raise KeyError(method)


def _torch_pruning(recipe, method, target, runs, tag, data, start) -> dict:
    """Torch-Pruning's MetaPruner (L2, Detect head ignored, iterative steps to the target),
    then our trainer wrapper so Ultralytics trains the pruned module."""
    import torch_pruning as tp
    from ultralytics import YOLO

    from pruners.ultralytics import with_model

    cfg = "yolov8n.yaml" if "yolov8n" in method else "yolov5nu.yaml"
    best = _dense(recipe, cfg)
    dense = YOLO(str(best))
    net = copy.deepcopy(dense.model).float().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    x = torch.randn(1, 3, recipe.imgsz, recipe.imgsz)
    full = _flops(net, recipe.imgsz)
    pruner = tp.pruner.MetaPruner(net, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=1.0, iterative_steps=100,
                                  ignored_layers=[net.model[-1]])
    for _ in range(100):
        pruner.step()
        if _flops(net, recipe.imgsz) <= target * full:
            break
    small = with_model(dense, net)  # so Ultralytics' trainer keeps Torch-Pruning's module
    before = _metrics(small, recipe, data)
    small.train(**_train_args(recipe, runs, tag, recipe.ft_epochs, recipe.ft_lr0))
    return _row(recipe, method, target, before, small, dense.model, time.perf_counter() - start,
                {"model": Path(cfg).stem})


def environment() -> dict:
    import ultralytics

    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detection",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced recipe (minutes)")
    parser.add_argument("--resume", action="store_true", help="skip rows already written")
    args = parser.parse_args(argv)
    import logging

    from ultralytics.utils import LOGGER

    LOGGER.setLevel(logging.WARNING)  # the trainer's per-run banner would drown the progress bar
    recipe = QUICK if args.quick else FULL
    stem = "detection" if recipe is FULL else "detection_quick"
    runs = RESULTS / f"{stem}_runs.jsonl"
    done = set()
    if args.resume and runs.exists():
        done = {(r["method"], r["target"]) for r in map(json.loads, runs.read_text().splitlines())
                if "error" not in r}
    else:
        runs.unlink(missing_ok=True)
    data_dir = WORK / f"data_{recipe.name}"
    if not (data_dir / "data.yaml").exists():
        from .digits import make_dataset

        make_dataset(data_dir, n_train=recipe.n_train, n_val=recipe.n_val, imgsz=recipe.imgsz)
    (RESULTS / f"{stem}_recipe.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "environment": environment()}, indent=1))
    from tqdm import tqdm

    todo = [j for j in jobs(recipe) if j not in done]
    with open(runs, "a") as out:
        for method, target in tqdm(todo, desc="detection", unit="job"):
            try:
                row = run_job(recipe, method, target)
            except Exception as exc:  # noqa: BLE001 - a failing tool is a result row
                row = {"method": method, "target": target,
                       "error": f"{type(exc).__name__}: {exc}"[:300]}
            out.write(json.dumps(row) + "\n")
            out.flush()
    from .summary import write_summary

    print(write_summary(runs, RESULTS / stem, recipe))
