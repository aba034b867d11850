"""``python -m benchmarks.accuracy``: train -> prune -> fine-tune, ours against Torch-Pruning.

Protocol (``FULL``; ``--quick`` is a reduced copy):

1. Train each dense network once (seed 0) on shapes10 (see ``shapes.py``).
2. For every method and FLOPs target, prune the *same* dense weights, record the test
   accuracy before fine-tuning, fine-tune for the same number of iterations with the same
   schedule and seed, and record it after. Methods: each tool with each criterion; each
   tool's l2 and taylor with distillation from the dense model; ours iteratively in 5 steps
   (the fine-tuning budget split across the steps); ours after group-sparsity training (half
   the budget sparsity training on the dense weights, half fine-tuning after pruning).
3. Baseline: the same architecture narrowed uniformly to the target and trained from scratch
   for dense + fine-tuning epochs.
4. Sensitivity allocation (``ours/sensitivity-l2``): a scan of every group at 10-90% with
   accuracy on 500 validation images (a third draw, not the test set), then
   ``strategy="sensitivity"``; fine-tuned like the others.
5. Recovery without training (``recover/<methods>``): ours with l2, then ``recover=`` on the 8
   calibration batches (no labels); accuracy before fine-tuning and along the same
   fine-tuning run after 1 and 3 epochs and at its end (``recover/none`` is the reference).

Every job runs in its own worker process on one thread; rows are appended to
``results/accuracy[_quick]_runs.jsonl`` as they finish (``--resume`` skips those), and the
summary (``accuracy.md``/``.csv`` and a plot) is rebuilt from all rows at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODELS_DIR = RESULTS / ".models" / "accuracy"

CRITERIA = ("l1", "l2", "fpgm", "bn_scale", "taylor", "hessian")


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    n_train: int = 3000
    n_test: int = 1000
    batch: int = 128
    dense_epochs: tuple[tuple[str, int], ...] = (("resnet20", 20), ("mobilenetv2", 30))
    ft_epochs: int = 4
    lr: float = 0.1
    ft_lr: float = 0.02
    sparsity_lam: float = 5e-4

    def dense(self, model: str) -> int:
        """Dense training epochs of ``model`` (MobileNetV2 learns slower: more epochs)."""
        return dict(self.dense_epochs)[model]

    def iterations(self, epochs: float) -> int:
        return max(1, int(round(epochs * self.n_train / self.batch)))


RECOVERY = ("none", "bn", "bias", "reconstruct", "bias+bn", "reconstruct+bn")
CURVE_EPOCHS = (1, 3)  # accuracy along fine-tuning for the recovery rows (and at its end)


def _methods(criteria, kd=("l2", "taylor"), recovery=RECOVERY) -> tuple[str, ...]:
    one_shot = [f"{tool}/{c}" for tool in ("ours", "tp") for c in criteria]
    distilled = [f"{tool}/{c}+kd" for tool in ("ours", "tp") for c in kd]
    return tuple(one_shot + distilled + ["ours/iterative-l2", "ours/sparse-l2", "scratch"]
                 + [f"recover/{r}" for r in recovery] + ["ours/sensitivity-l2"])


FULL = Recipe("full", ("resnet20", "mobilenetv2"), (0.5, 0.3), (0, 1, 2), _methods(CRITERIA))
QUICK = Recipe("quick", ("resnet20",), (0.5,), (0,),
               _methods(("l2", "taylor"), kd=("l2",), recovery=("none", "bias+bn")),
               n_train=2000, n_test=500, dense_epochs=(("resnet20", 8), ("mobilenetv2", 12)),
               ft_epochs=2)


# ---- jobs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    model: str
    method: str  # "dense", "scratch", "ours/l2", "tp/taylor+kd", ...
    target: float = 1.0
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.model}|{self.method}|{self.target:g}|{self.seed}"


_DATA = {}


def _data(recipe: Recipe):
    from .train import load_data

    if recipe.name not in _DATA:
        _DATA[recipe.name] = load_data(recipe.n_train, recipe.n_test)
    return _DATA[recipe.name]


def _dense_path(recipe: Recipe, model: str) -> Path:
    return MODELS_DIR / f"{recipe.name}_{model}_dense.pt"


def _load_dense(recipe: Recipe, model: str):
    from .nets import NETS

    net = NETS[model]()
    net.load_state_dict(torch.load(_dense_path(recipe, model), weights_only=True))
    return net.eval().to(memory_format=torch.channels_last)


def _pruned(recipe: Recipe, job: Job, dense, tool: str, criterion: str, recover=None):
    """The pruned model before fine-tuning, cached on disk (it does not depend on the seed)."""
    from .methods import prune_ours, prune_tp

    tag = f"{tool}_{criterion}" + (f"_rec-{'+'.join(recover)}" if recover else "")
    path = MODELS_DIR / f"{recipe.name}_{job.model}_{tag}_{job.target:g}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    data = _data(recipe)
    if tool == "ours":
        model = prune_ours(dense, job.target, criterion, data.calibration(), recover=recover)
    else:
        model = prune_tp(dense, job.target, criterion, data.calibration())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model, tmp)
    os.replace(tmp, path)
    return model


def run_job(recipe: Recipe, job: Job) -> dict:
    """One row: accuracy before and after fine-tuning, FLOPs and params kept, seconds."""
    from pruners import GroupSparsity, measure, prune, prune_iteratively

    from .methods import X, narrowed
    from .nets import NETS
    from .train import accuracy, train

    start = time.perf_counter()
    data = _data(recipe)
    ft = recipe.iterations(recipe.ft_epochs)
    row: dict = {"model": job.model, "method": job.method, "target": job.target,
                 "seed": job.seed, "acc_before": None}
    if job.method == "dense":
        torch.manual_seed(0)
        net = NETS[job.model]().to(memory_format=torch.channels_last)
        train(net, data, iterations=recipe.iterations(recipe.dense(job.model)), lr=recipe.lr,
              seed=0)
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        for stale in MODELS_DIR.glob(f"{recipe.name}_{job.model}_*.pt"):  # pruned from old weights
            stale.unlink()
        torch.save(net.state_dict(), _dense_path(recipe, job.model))
        model = net
    elif job.method == "scratch":
        torch.manual_seed(job.seed)
        model = narrowed(NETS[job.model], job.target).to(memory_format=torch.channels_last)
        train(model, data, iterations=recipe.iterations(recipe.dense(job.model) + recipe.ft_epochs),
              lr=recipe.lr, seed=job.seed)
    else:
        dense = _load_dense(recipe, job.model)
        tool, _, variant = job.method.partition("/")
        torch.manual_seed(job.seed)
        if variant.startswith("iterative-"):
            steps = 5

            def finetune(m, step):
                train(m, data, iterations=ft // steps, lr=recipe.ft_lr, seed=job.seed * 100 + step)
                return accuracy(m, data)

            model = prune_iteratively(dense, X, target_flops=job.target, steps=steps,
                                      importance=variant.split("-", 1)[1],
                                      finetune=finetune).model
        elif variant.startswith("sensitivity-"):
            from .methods import prune_sensitivity

            criterion = variant.split("-", 1)[1]
            path = MODELS_DIR / f"{recipe.name}_{job.model}_sens_{criterion}_{job.target:g}.pt"
            if path.exists():
                model = torch.load(path, weights_only=False)
            else:
                model = prune_sensitivity(
                    dense, job.target, criterion, data.calibration(), data.validation(),
                    MODELS_DIR / f"{recipe.name}_{job.model}_sensitivity_{criterion}.json")
                torch.save(model, path)
            model = model.to(memory_format=torch.channels_last)
            row["acc_before"] = accuracy(model, data)
            train(model, data, iterations=ft, lr=recipe.ft_lr, seed=job.seed)
        elif tool == "recover":
            methods = None if variant == "none" else tuple(variant.split("+"))
            start_prune = time.perf_counter()
            model = _pruned(recipe, job, dense, "ours", "l2", methods).to(
                memory_format=torch.channels_last)
            row["prune_seconds"] = round(time.perf_counter() - start_prune, 1)
            row["acc_before"] = accuracy(model, data)
            marks = {recipe.iterations(e): e for e in CURVE_EPOCHS if e < recipe.ft_epochs}

            def along(step):
                if step in marks:
                    row[f"acc_ep{marks[step]}"] = accuracy(model, data)

            train(model, data, iterations=ft, lr=recipe.ft_lr, seed=job.seed, after=along)
        elif variant.startswith("sparse-"):
            sparse = copy.deepcopy(dense)
            reg = GroupSparsity(sparse, X, lam=recipe.sparsity_lam)
            train(sparse, data, iterations=ft // 2, lr=recipe.ft_lr, seed=job.seed,
                  penalty=reg.penalty)
            model = prune(sparse, X, target_flops=job.target,
                          importance=variant.split("-", 1)[1]).model
            row["acc_before"] = accuracy(model, data)
            train(model, data, iterations=ft - ft // 2, lr=recipe.ft_lr, seed=job.seed + 1000)
        else:
            criterion, kd = variant.removesuffix("+kd"), variant.endswith("+kd")
            model = _pruned(recipe, job, dense, tool, criterion).to(
                memory_format=torch.channels_last)
            row["acc_before"] = accuracy(model, data)
            train(model, data, iterations=ft, lr=recipe.ft_lr, seed=job.seed,
                  teacher=dense if kd else None)
    full_flops, full_params = measure(NETS[job.model]().eval(), X)
    flops, params = measure(model.eval(), X)
    row.update(acc_after=accuracy(model, data), flops_kept=flops / full_flops,
               params_kept=params / full_params, seconds=round(time.perf_counter() - start, 1))
    return row


def _worker(args) -> dict:
    recipe, job = args
    torch.set_num_threads(1)
    try:
        return run_job(recipe, job)
    except Exception as exc:  # noqa: BLE001 - a failed method is a row, not a crashed run
        return {"model": job.model, "method": job.method, "target": job.target,
                "seed": job.seed, "error": f"{type(exc).__name__}: {exc}"[:300]}


def jobs_for(recipe: Recipe) -> tuple[list[Job], list[Job]]:
    dense = [Job(m, "dense") for m in recipe.models]
    rest = [Job(m, meth, t, s) for s in recipe.seeds for m in recipe.models
            for t in recipe.targets for meth in recipe.methods]
    # scratch runs are the longest: start them first so the pool ends evenly
    rest.sort(key=lambda j: (j.method != "scratch", j.seed))
    return dense, rest


def environment() -> dict:
    import torch_pruning

    return {"torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads_per_job": 1}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced recipe (minutes)")
    parser.add_argument("--workers", type=int, default=2, help="parallel jobs (one thread each)")
    parser.add_argument("--resume", action="store_true", help="skip jobs already in the runs file")
    parser.add_argument("--summary-only", action="store_true", help="rebuild tables and plot")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL.models),
                        help="only these networks (default: the recipe's)")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else FULL
    if args.models:
        recipe = replace(recipe, models=tuple(args.models))
    stem = "accuracy" if recipe is FULL else "accuracy_quick"
    runs = RESULTS / f"{stem}_runs.jsonl"
    done: set[str] = set()
    if args.resume and runs.exists():
        for line in runs.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                done.add(Job(r["model"], r["method"], r["target"], r["seed"]).key)
    elif not args.summary_only:
        runs.unlink(missing_ok=True)
    if not args.summary_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{stem}_recipe.json").write_text(json.dumps(
            {"recipe": asdict(recipe), "environment": environment()}, indent=1))
        _run(recipe, [j for j in jobs_for(recipe)[0] if j.key not in done],
             [j for j in jobs_for(recipe)[1] if j.key not in done], runs, args.workers)
    from .summary import write_summary

    print(write_summary(runs, RESULTS / stem, recipe))


def _run(recipe: Recipe, dense: list[Job], rest: list[Job], runs: Path, workers: int) -> None:
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=20) as pool, open(runs, "a") as out:
        for phase in (dense, rest):
            bar = tqdm(total=len(phase), desc="dense" if phase is dense else "methods",
                       unit="job")
            for row in pool.imap_unordered(_worker, [(recipe, j) for j in phase]):
                out.write(json.dumps(row) + "\n")
                out.flush()
                bar.set_postfix_str(f"{row['model']} {row['method']} {row['target']:g} "
                                    f"{row.get('acc_after', row.get('error', ''))}")
                bar.update()
            bar.close()
