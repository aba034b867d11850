"""Engine time: capture and analysis per model, each model in a fresh process.

    python -m benchmarks.engine_time [--models yolov8n resnet50 ...]

"cold" is the first capture in a fresh process (what a user's script pays, torch.export's
one-time set-up included); "warm" is a second capture of the same model. Results go to
``benchmarks/results/engine_time.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT = ["yolov8n", "yolov8s", "yolov8x", "yolo11n", "resnet18", "resnet50", "resnet152",
           "mobilenet_v3_large", "densenet121"]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def measure(name: str) -> dict:
    """Run in the child process: time capture and analysis, cold then warm."""
    import torch

    from benchmarks.models import build
    from depgraph import analyze, capture

    torch.set_num_threads(os.cpu_count() or 1)
    bench = build(name)
    model, x, outputs = bench.model, bench.inputs, bench.outputs
    row: dict = {"model": name, "params_m": bench.params / 1e6}
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        cap = capture(model, x, outputs=outputs)
        t1 = time.perf_counter()
        graph = analyze(cap)
        t2 = time.perf_counter()
        row[f"capture_{run}_s"] = round(t1 - t0, 3)
        row[f"analyze_{run}_s"] = round(t2 - t1, 3)
        row[f"total_{run}_s"] = round(t2 - t0, 3)
    prunable, total = graph.prunable_share("conv")
    row.update(method=cap.method, units=len(graph.units), groups=len(graph.groups),
               prunable_conv_share=round(prunable / total, 4) if total else None)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for i, name in enumerate(args.models, 1):
        print(f"[{i}/{len(args.models)}] {name} ...", end=" ", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.engine_time", "--child", name],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"model": name, "error": err})
            print("FAILED:", err)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"capture+analysis {row['total_cold_s']:.2f}s cold, {row['total_warm_s']:.2f}s warm")
    write(rows)


def write(rows: list[dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k))
    with open(os.path.join(RESULTS, "engine_time.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [f"Engine time (capture + analysis), {machine}, torch "
             f"{__import__('torch').__version__}", "",
             "| model | params (M) | tracer | capture cold (s) | analysis cold (s) | "
             "total cold (s) | total warm (s) | units | prunable conv channels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['method']} | "
                     f"{r['capture_cold_s']:.2f} | {r['analyze_cold_s']:.2f} | "
                     f"{r['total_cold_s']:.2f} | {r['total_warm_s']:.2f} | {r['units']} | "
                     f"{100 * r['prunable_conv_share']:.1f}% |")
    with open(os.path.join(RESULTS, "engine_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
