"""Prune, then quantize: ``python -m benchmarks.int8 [--quick]``.

On the accuracy benchmark's ResNet-20 and shapes10 data (``benchmarks.accuracy``): the dense
model (trained as that benchmark trains it, or its saved weights), ours at 50% FLOPs (l2;
round_to 1 as in that benchmark, and round_to="auto" for onnxruntime) each fine-tuned for the
recipe's epochs, and each exported to ONNX as fp32 and as onnxruntime
static int8 (``export_onnx(quantize="int8")``, ranges from the recipe's 8 calibration
batches, no labels). For each file: test accuracy run by onnxruntime, size on disk, and
batch-1 / batch-64 latency, every session timed interleaved with the spread checked
(``pruners.latency.interleave``); the same files run by OpenVINO's CPU runtime too, when it is
installed (accuracy and latency; float32 where a model is not quantized). Writes
``results/int8{_quick}.{md,json}``.
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


def _openvino(path: str, threads: int, shape: Optional[tuple] = None):
    """An OpenVINO CPU infer request of the ONNX file (``shape``: fixed, else its dynamic
    batch), or None when OpenVINO is not installed."""
    from pruners.latency import installed, openvino_request

    return openvino_request(path, threads, shape) if installed("openvino") else None


def _accuracy(run, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    """Test accuracy of ``run(array) -> logits``."""
    right = 0
    for i in range(0, len(x), batch):
        logits = run(x[i:i + batch].numpy())
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
    rows, runners, noisy = [], {}, {}
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
            session, input_name = _session(path, threads)
            row = {"model": label, "flops_kept": round(flops[name] / flops["dense"], 4),
                   "torch_acc": None if quantize else accuracy(net, data),
                   "onnx_acc": _accuracy(lambda a: session.run(None, {input_name: a})[0],
                                         data.x_test, data.y_test),
                   "size_kb": round(os.path.getsize(path) / 1024, 1),
                   "max_rel_diff": round(exported.max_rel_diff, 5)}
            for batch in (1, 64):
                feed = data.x_test[:batch].numpy()
                runners.setdefault(("", batch), {})[label] = (
                    lambda s=session, n=input_name, f=feed: s.run(None, {n: f}))
            ov = _openvino(path, threads)
            if ov is not None:
                row["ov_acc"] = _accuracy(lambda a: ov.infer([a])[0], data.x_test, data.y_test)
                for batch in (1, 64):
                    feed = data.x_test[:batch].numpy()
                    request = _openvino(path, threads, (batch, *feed.shape[1:]))
                    runners.setdefault(("ov_", batch), {})[label] = (  # shared, not copied
                        lambda r=request, f=feed: r.infer([f], share_inputs=True,
                                                          share_outputs=True))
            rows.append(row)
        for (runtime, batch), fns in runners.items():  # one runtime and batch at a time
            calls = {label: (fn, label) for label, fn in fns.items()}
            times, _ = steady(calls, WallTimer(), rounds, repeat=20 if batch == 1 else 2)
            noisy[f"{'OpenVINO' if runtime else 'onnxruntime'} batch {batch}"] = \
                max(t.spread for t in times.values()) > 0.1
            for row in rows:
                t = times[row["model"]]
                row[f"{runtime}ms_b{batch}"] = round(t.median_ms, 4)
                row[f"{runtime}spread_b{batch}"] = round(t.spread, 3)
    base = {r["model"]: r for r in rows}["dense fp32"]
    for row in rows:
        for runtime, batch in runners:
            row[f"{runtime}speedup_b{batch}"] = round(
                base[f"{runtime}ms_b{batch}"] / row[f"{runtime}ms_b{batch}"], 3)
    return {"rows": rows, "recipe": recipe.name, "round_to_auto": chose, "noisy": noisy,
            "environment": environment("onnxruntime", "cpu", threads)}


def markdown(result: dict) -> str:
    env = result["environment"]
    ov = all("ov_ms_b1" in r for r in result["rows"])
    lines = ["# Prune, then quantize (ResNet-20, shapes10)", "",
             f"{env['cpu']} ({env['cores']} cores; {env['flags']}), {env['threads']} threads, "
             f"onnxruntime {env['onnxruntime']}, torch {env['torch']}, {env['date']}; recipe "
             f"`{result['recipe']}`. Accuracy on the test set run by onnxruntime (PyTorch's for "
             "fp32 beside it); latency: onnxruntime CPU sessions timed interleaved (median ms "
             "± interquartile spread, retried up to twice while a spread exceeds 10%; speedup "
             f"over dense fp32). `pruned`: round_to 1; `pruned auto`: {result['round_to_auto']}."
             + (f" OpenVINO {env.get('openvino', '?')} CPU: the same files, float32 where not "
                "quantized, one stream, timed interleaved among themselves." if ov else ""),
             "",
             "| model | FLOPs kept | test acc (onnxruntime) | PyTorch acc | file KB | batch 1 ms "
             "| batch 64 ms | max rel diff vs PyTorch fp32 |"
             + (" OpenVINO acc | OpenVINO batch 1 ms | OpenVINO batch 64 ms |" if ov else ""),
             "|---" * (11 if ov else 8) + "|"]

    def cell(r: dict, key: str, digits: int) -> str:
        return (f"{r[key.format('ms')]:.{digits}f} ±{100 * r[key.format('spread')]:.0f}% "
                f"({r[key.format('speedup')]:.2f}x)")

    for r in result["rows"]:
        torch_acc = "-" if r["torch_acc"] is None else f"{100 * r['torch_acc']:.1f}%"
        lines.append(
            f"| {r['model']} | {r['flops_kept']:.3f} | {100 * r['onnx_acc']:.1f}% | "
            f"{torch_acc} | {r['size_kb']:.0f} | {cell(r, '{}_b1', 3)} | "
            f"{cell(r, '{}_b64', 2)} | {r['max_rel_diff']:.4f} |"
            + (f" {100 * r['ov_acc']:.1f}% | {cell(r, 'ov_{}_b1', 3)} | "
               f"{cell(r, 'ov_{}_b64', 2)} |" if ov else ""))
    noisy = [k for k, flag in result["noisy"].items() if flag]
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
