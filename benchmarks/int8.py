"""Prune, then quantize: ``python -m benchmarks.int8 [--quick]``.

On the accuracy benchmark's ResNet-20 and shapes10 data (``benchmarks.accuracy``): the dense
model (trained as that benchmark trains it, or its saved weights), ours at 50% FLOPs (l2;
round_to 1 as in that benchmark, and round_to="auto" for onnxruntime) each fine-tuned for the
recipe's epochs, and each exported to ONNX as fp32 and as onnxruntime
static int8 (``export_onnx(quantize="int8")``, ranges from the recipe's 8 calibration
batches, no labels). For each file: test accuracy run by onnxruntime, size on disk, and
batch-1 / batch-64 latency, every session timed interleaved with the spread checked
(``pruners.latency.interleave``). Writes ``results/int8{_quick}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Optional

import torch

from .accuracy.run import (FULL, QUICK, RESULTS, Job, _data, _dense_path, _load_dense, _pruned,
                           run_job)


def _session(path: str, threads: int):
    import onnxruntime as ort

    from pruners.latency import ort_options

    session = ort.InferenceSession(path, ort_options(threads), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def _accuracy(session, name: str, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    right = 0
    for i in range(0, len(x), batch):
        logits = session.run(None, {name: x[i:i + batch].numpy()})[0]
        right += int((logits.argmax(1) == y[i:i + batch].numpy()).sum())
    return right / len(x)


def run(quick: bool, threads: int, rounds: int) -> dict:
    from pruners import export_onnx, measure, prune
    from pruners.latency import WallTimer, environment, steady
    from .accuracy.methods import X
    from .accuracy.train import accuracy, train

    torch.set_num_threads(threads)
    recipe = QUICK if quick else FULL
    model = "resnet20"
    data = _data(recipe)
    if not _dense_path(recipe, model).exists():
        print("[int8] training the dense model ...", flush=True)
        run_job(recipe, Job(model, "dense"))
    dense = _load_dense(recipe, model).to(memory_format=torch.contiguous_format)
    print("[int8] pruning and fine-tuning ...", flush=True)
    # "pruned": the accuracy benchmark's ours/l2 model (round_to 1); "pruned auto": the same
    # target with widths from onnxruntime's measured staircase (round_to="auto")
    auto = prune(dense, X, target_flops=0.5, importance="l2", round_to="auto",
                 backend="onnxruntime", threads=threads)
    chose = next((n for n in auto.report.notes if n.startswith("round_to='auto'")), "")
    print(f"[int8] {chose}", flush=True)
    nets = {"pruned": _pruned(recipe, Job(model, "ours/l2", 0.5), dense, "ours", "l2"),
            "pruned auto": auto.model}
    for label, net in nets.items():
        net = net.to(memory_format=torch.channels_last)
        torch.manual_seed(0)
        train(net, data, iterations=recipe.iterations(recipe.ft_epochs), lr=recipe.ft_lr, seed=0)
        nets[label] = net.eval().to(memory_format=torch.contiguous_format)
    calibration = [x for x, _ in data.calibration()]
    x1 = data.x_test[:1]
    rows, sessions, noisy = [], {}, {}
    flops = {name: measure(net, X)[0] for name, net in (("dense", dense), *nets.items())}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(name, kind, net, "int8" if kind == "int8" else None)
                    for name, net in (("dense", dense), *nets.items())
                    for kind in ("fp32", "int8")]
        for name, kind, net, quantize in variants:
            label = f"{name} {kind}"
            path = os.path.join(tmp, label.replace(" ", "_") + ".onnx")
            exported = export_onnx(net, x1, path, dynamic_batch=True, quantize=quantize,
                                   calibration=calibration if quantize else None)
            session, name = _session(path, threads)
            sessions[label] = (session, name)
            rows.append({"model": label, "flops_kept": round(flops[name] / flops["dense"], 4),
                         "torch_acc": None if quantize else accuracy(net, data),
                         "onnx_acc": _accuracy(session, name, data.x_test, data.y_test),
                         "size_kb": round(os.path.getsize(path) / 1024, 1),
                         "max_rel_diff": round(exported.max_rel_diff, 5)})
        for batch in (1, 64):
            feed = data.x_test[:batch].numpy()
            calls = {label: ((lambda s=s, n=n: s.run(None, {n: feed})), label)
                     for label, (s, n) in sessions.items()}
            times, _ = steady(calls, WallTimer(), rounds, repeat=20 if batch == 1 else 2)
            noisy[batch] = max(t.spread for t in times.values()) > 0.1
            for row in rows:
                t = times[row["model"]]
                row[f"ms_b{batch}"] = round(t.median_ms, 4)
                row[f"spread_b{batch}"] = round(t.spread, 3)
    base = {r["model"]: r for r in rows}["dense fp32"]
    for row in rows:
        for batch in (1, 64):
            row[f"speedup_b{batch}"] = round(base[f"ms_b{batch}"] / row[f"ms_b{batch}"], 3)
    return {"rows": rows, "recipe": recipe.name, "round_to_auto": chose, "noisy": noisy,
            "environment": environment("onnxruntime", "cpu", threads)}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Prune, then quantize (ResNet-20, shapes10)", "",
             f"{env['cpu']} ({env['cores']} cores; {env['flags']}), {env['threads']} threads, "
             f"onnxruntime {env['onnxruntime']}, torch {env['torch']}, {env['date']}; recipe "
             f"`{result['recipe']}`. Accuracy on the test set run by onnxruntime (PyTorch's for "
             "fp32 beside it); latency: onnxruntime CPU sessions timed interleaved (median ms "
             "± interquartile spread, retried up to twice while a spread exceeds 10%; speedup "
             f"over dense fp32). `pruned`: round_to 1; `pruned auto`: {result['round_to_auto']}.",
             "",
             "| model | FLOPs kept | test acc (onnxruntime) | PyTorch acc | file KB | batch 1 ms "
             "| batch 64 ms | max rel diff vs PyTorch fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        torch_acc = "-" if r["torch_acc"] is None else f"{100 * r['torch_acc']:.1f}%"
        lines.append(
            f"| {r['model']} | {r['flops_kept']:.3f} | {100 * r['onnx_acc']:.1f}% | "
            f"{torch_acc} | {r['size_kb']:.0f} | "
            f"{r['ms_b1']:.3f} ±{100 * r['spread_b1']:.0f}% ({r['speedup_b1']:.2f}x) | "
            f"{r['ms_b64']:.2f} ±{100 * r['spread_b64']:.0f}% ({r['speedup_b64']:.2f}x) | "
            f"{r['max_rel_diff']:.4f} |")
    noisy = [f"batch {b}" for b, flag in result["noisy"].items() if flag]
    if noisy:
        lines += ["", f"Noisy (a spread stayed over 10% after 3 attempts): {', '.join(noisy)}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    result = run(a.quick, a.threads, a.rounds)
    prefix = "int8_quick" if a.quick else "int8"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{prefix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(a.out, f"{prefix}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
