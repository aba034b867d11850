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
4. CPU latency, as a separate phase after all training (so it can be taken, or re-taken with
   ``--latency-only``, on a quiet machine): every final model saved by step 2-3 and the dense
   one, eager, batch 1, interleaved round-robin, median of rounds and the spread.

5. Recovery without training (``recover/<methods>``): l2 pruning with ``recover=`` on 8
   calibration batches of the training images; mAP before any fine-tuning.

Rows go to ``results/detection[_quick]_runs.jsonl``, latencies to
``results/detection[_quick]_latency.json``; ``--resume`` skips finished rows; ``--seeds 1 2``
adds fine-tuning/scratch seeds (the dense model, the "trained best.pt", is trained once).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
WORK = RESULTS / ".models" / "detection"
ROUNDS, CALLS = 21, 20  # latency phase: interleaved rounds of batch-1 calls per model


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
    seeds: tuple[int, ...] = (0,)
    recovery: tuple[str, ...] = ("none", "bn", "bias", "reconstruct", "bias+bn", "reconstruct+bn")


FULL = Recipe("full")
QUICK = Recipe("quick", targets=(0.5,), criteria=("l2",), n_train=200, n_val=60, imgsz=128,
               dense_epochs=3, ft_epochs=1, torch_pruning=False, recovery=("none", "bias+bn"))


def _data(recipe: Recipe) -> str:
    return str(WORK / f"data_{recipe.name}" / "data.yaml")


def _train_args(recipe: Recipe, project: Path, name: str, epochs: int, lr0: float,
                seed: int = 0) -> dict:
    return dict(data=_data(recipe), epochs=epochs,
                imgsz=recipe.imgsz, batch=recipe.batch, workers=2, device="cpu", seed=seed,
                deterministic=True, plots=False, project=str(project), name=name, exist_ok=True,
                optimizer="SGD", lr0=lr0, warmup_epochs=0 if lr0 < recipe.lr0 else 1,
                amp=False, verbose=False, val=True)


def _metrics(yolo, recipe: Recipe, data: str) -> dict:
    m = yolo.val(data=data, imgsz=recipe.imgsz, batch=recipe.batch, device="cpu", plots=False,
                 workers=0, verbose=False)
    return {"map50_95": float(m.box.map), "map50": float(m.box.map50)}


def _latency(models: dict[str, torch.nn.Module], size: int, rounds: int = ROUNDS,
             calls: int = CALLS) -> dict[str, dict]:
    """Per model: median ms of ``rounds`` interleaved rounds of ``calls`` batch-1 calls, and
    the spread of its rounds (interquartile range / median)."""
    x = torch.randn(1, 3, size, size)
    nets = {k: copy.deepcopy(m).float().eval() for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for m in nets.values():
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            for k, m in nets.items():
                t = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[k].append(1000 * (time.perf_counter() - t) / calls)

    def spread(v: list[float]) -> float:
        q = statistics.quantiles(v, n=4)
        return (q[2] - q[0]) / statistics.median(v)

    return {k: {"ms": round(statistics.median(v), 3), "spread": round(spread(v), 3),
                "min_ms": round(min(v), 3)} for k, v in times.items()}


def measure_latency(recipe: Recipe, runs: Path, out: Path) -> dict:
    """The latency phase: every saved final model of ``runs`` against the dense one."""
    rows = [json.loads(l) for l in runs.read_text().splitlines()] if runs.exists() else []
    models = {}
    for r in rows:
        for file in (r.get("dense_file"), r.get("model_file")):
            if file and Path(file).exists() and Path(file).stem not in models:
                models[Path(file).stem] = torch.load(file, weights_only=False)
    by_threads = {}
    for threads in sorted({1, os.cpu_count() or 1}):  # (Ultralytics' import pins OMP to cores - 1)
        torch.set_num_threads(threads)
        by_threads[str(threads)] = _latency(models, recipe.imgsz)
    result = {"environment": environment(), "rounds": ROUNDS, "calls": CALLS, "batch": 1,
              "imgsz": recipe.imgsz, "threads": by_threads}
    out.write_text(json.dumps(result, indent=1))
    return result


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


def _row(recipe: Recipe, method: str, target: float, seed: int, tag: str, before: Optional[dict],
         yolo, dense_net, seconds: float, extra: Optional[dict] = None) -> dict:
    data = _data(recipe)
    after = _metrics(yolo, recipe, data)
    final = WORK / "final" / recipe.name  # the modules the latency phase times
    final.mkdir(parents=True, exist_ok=True)
    dense_file = final / f"dense-{(extra or {}).get('model', 'yolov8n')}.pt"
    if not dense_file.exists():
        torch.save(copy.deepcopy(dense_net).float().eval(), dense_file)
    saved = dense_file if method.startswith("dense") else final / f"{tag}.pt"
    torch.save(copy.deepcopy(yolo.model).float().eval(), saved)
    return {"method": method, "target": target, "seed": seed, "tag": tag,
            "model_file": str(saved), "dense_file": str(dense_file),
            "flops_kept": _flops(yolo.model, recipe.imgsz) / _flops(dense_net, recipe.imgsz),
            "params_kept": sum(p.numel() for p in yolo.model.parameters())
            / sum(p.numel() for p in dense_net.parameters()),
            "map50_95_before": (before or {}).get("map50_95"),
            "map50_before": (before or {}).get("map50"),
            "map50_95": after["map50_95"], "map50": after["map50"],
            "seconds": round(seconds, 1), **(extra or {})}


def jobs(recipe: Recipe) -> list[tuple[str, float, int]]:
    out = [("dense", 1.0, 0)] + ([("dense yolov5nu", 1.0, 0)] if recipe.torch_pruning else [])
    for seed in recipe.seeds:
        for t in recipe.targets:
            out += [(f"ours/{c}", t, seed) for c in recipe.criteria] + [("scratch", t, seed)]
            if recipe.torch_pruning:
                out += [("tp/l2 yolov8n", t, seed), ("tp/l2 yolov5nu", t, seed)]
    for t in recipe.targets:  # no training: one seed
        out += [(f"recover/{r}", t, 0) for r in recipe.recovery]
    return out


def run_job(recipe: Recipe, method: str, target: float, seed: int = 0) -> dict:
    from ultralytics import YOLO

    from pruners.ultralytics import prune_yolo

    data = _data(recipe)
    start = time.perf_counter()
    dense_best = _dense(recipe, "yolov8n.yaml")
    dense = YOLO(str(dense_best))
    runs = WORK / "runs" / recipe.name
    tag = f"{method.replace('/', '-').replace(' ', '-')}-{target:g}" + (f"-s{seed}" if seed else "")
    if method == "dense":
        return _row(recipe, method, 1.0, 0, tag, None, dense, dense.model,
                    time.perf_counter() - start)
    if method == "dense yolov5nu":
        v5 = YOLO(str(_dense(recipe, "yolov5nu.yaml")))
        return _row(recipe, method, 1.0, 0, tag, None, v5, v5.model, time.perf_counter() - start,
                    {"model": "yolov5nu"})
    if method.startswith("ours/"):
        small, _ = prune_yolo(str(dense_best), target_flops=target, importance=method[5:],
                              data=data, imgsz=recipe.imgsz)
        before = _metrics(small, recipe, data)
        small.train(**_train_args(recipe, runs, tag, recipe.ft_epochs, recipe.ft_lr0, seed))
        return _row(recipe, method, target, seed, tag, before, small, dense.model,
                    time.perf_counter() - start)
    if method.startswith("recover/"):
        variant = method.split("/", 1)[1]
        methods = None if variant == "none" else tuple(variant.split("+"))
        small, result = prune_yolo(str(dense_best), target_flops=target, importance="l2",
                                   data=data, imgsz=recipe.imgsz, recover=methods)
        before = _metrics(small, recipe, data)
        steps = result.report.recovery.steps if result.report.recovery else []
        return {"method": method, "target": target, "seed": 0, "tag": tag,
                "flops_kept": result.report.flops_ratio, "params_kept": result.report.params_ratio,
                "map50_95_before": before["map50_95"], "map50_before": before["map50"],
                "map50_95": None, "map50": None, "recover_seconds": sum(s.seconds for s in steps),
                "output_error": [[s.method, s.error_before, s.error_after] for s in steps],
                "seconds": round(time.perf_counter() - start, 1)}
    if method == "scratch":
        cfg = _narrow_yaml(recipe, target, _flops(dense.model, recipe.imgsz))
        yolo = YOLO(str(cfg))
        yolo.train(**_train_args(recipe, runs, tag, recipe.dense_epochs + recipe.ft_epochs,
                                 recipe.lr0, seed))
        return _row(recipe, method, target, seed, tag, None, yolo, dense.model,
                    time.perf_counter() - start)
    if method.startswith("tp/"):
        return _torch_pruning(recipe, method, target, seed, runs, tag, data, start)
    raise KeyError(method)


def _torch_pruning(recipe, method, target, seed, runs, tag, data, start) -> dict:
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
    small.train(**_train_args(recipe, runs, tag, recipe.ft_epochs, recipe.ft_lr0, seed))
    return _row(recipe, method, target, seed, tag, before, small, dense.model,
                time.perf_counter() - start, {"model": Path(cfg).stem})


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
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fine-tuning / scratch seeds (default: the recipe's, 0)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only jobs whose method is one of these (e.g. ours/taylor scratch)")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="only jobs at these FLOPs targets")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency phase (take it later on a quiet machine)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only (re-)take the latency phase of the saved models")
    args = parser.parse_args(argv)
    import logging

    from ultralytics.utils import LOGGER

    LOGGER.setLevel(logging.WARNING)  # the trainer's per-run banner would drown the progress bar
    recipe = QUICK if args.quick else FULL
    if args.seeds:
        recipe = replace(recipe, seeds=tuple(args.seeds))
    stem = "detection" if recipe.name == "full" else "detection_quick"
    runs = RESULTS / f"{stem}_runs.jsonl"
    latency = RESULTS / f"{stem}_latency.json"
    if not args.latency_only:
        keep = lambda job: ((args.methods is None or job[0] in args.methods)
                            and (args.targets is None or job[1] in args.targets))
        _train_all(recipe, runs, stem, resume=args.resume, keep=keep)
    if not args.no_latency:
        print("latency phase (keep the machine quiet) ...")
        measure_latency(recipe, runs, latency)
    from .summary import write_summary

    print(write_summary(runs, latency, RESULTS / stem, recipe))


def _train_all(recipe: Recipe, runs: Path, stem: str, resume: bool, keep=lambda job: True
               ) -> None:
    done = set()
    if resume and runs.exists():
        done = {(r["method"], r["target"], r.get("seed", 0))
                for r in map(json.loads, runs.read_text().splitlines()) if "error" not in r}
    else:
        runs.unlink(missing_ok=True)
    data_dir = WORK / f"data_{recipe.name}"
    if not (data_dir / "data.yaml").exists():
        from .digits import make_dataset

        make_dataset(data_dir, n_train=recipe.n_train, n_val=recipe.n_val, imgsz=recipe.imgsz)
    record = RESULTS / f"{stem}_recipe.json"
    entry = {"recipe": asdict(recipe), "environment": environment()}
    if resume and record.exists():  # keep the first run's recipe; list what resumed it
        old = json.loads(record.read_text())
        old.setdefault("resumed", []).append(entry)
        entry = old
    record.write_text(json.dumps(entry, indent=1))
    from tqdm import tqdm

    todo = [j for j in jobs(recipe) if j not in done and keep(j)]
    with open(runs, "a") as out:
        for method, target, seed in tqdm(todo, desc="detection", unit="job"):
            try:
                row = run_job(recipe, method, target, seed)
            except Exception as exc:  # noqa: BLE001 - a failing tool is a result row
                row = {"method": method, "target": target, "seed": seed,
                       "error": f"{type(exc).__name__}: {exc}"[:300]}
            out.write(json.dumps(row) + "\n")
            out.flush()
