"""Engine time: capture and analysis, then a whole ``prune()``, per model, each in a fresh process.

    python -m benchmarks.engine_time [--models yolov8n resnet50 tvdet:maskrcnn_resnet50_fpn ...]

"cold" is the first capture in a fresh process (what a user's script pays, torch.export's
one-time set-up included); "warm" is a second capture of the same model. "prune" is
``prune(model, x, target_flops=0.5)`` with defaults after that, with its stages, and "peak
RSS" the child's peak resident memory over everything (model building included). Names with a
colon come from the coverage zoo (``benchmarks/zoo.py``). Results go to
``benchmarks/results/engine_time.csv`` and ``.md``; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

DEFAULT = ["yolov8n", "yolov8s", "yolov8x", "yolo11n", "resnet18", "resnet50", "resnet152",
           "mobilenet_v3_large", "densenet121", "tvdet:maskrcnn_resnet50_fpn", "yolo:rtdetr-l"]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def measure(name: str) -> dict:
    """Run in the child process: time capture and analysis, cold then warm."""
    import torch

    import resource

    from benchmarks.models import build
    from benchmarks.zoo import build as build_zoo
    from depgraph import analyze, capture
    from pruners import prune

    torch.set_num_threads(os.cpu_count() or 1)
    bench = build_zoo(name)[0] if ":" in name else build(name)
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
    t0 = time.perf_counter()
    result = prune(model, x, target_flops=0.5, outputs=outputs)
    row["prune_s"] = round(time.perf_counter() - t0, 2)
    row["flops_ratio"] = round(result.report.flops_ratio, 4)
    row["stages"] = {k: round(v, 2) for k, v in result.report.seconds.items()}
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--out", default=RESULTS)
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
        print(f"capture+analysis {row['total_cold_s']:.2f}s cold, {row['total_warm_s']:.2f}s "
              f"warm; prune() {row['prune_s']:.1f}s, peak RSS {row['peak_rss_mb']} MB")
    write(rows, args.out)


def write(rows: list[dict], out: str = RESULTS) -> None:
    os.makedirs(out, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k))
    with open(os.path.join(out, "engine_time.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    from benchmarks.summary import machine

    lines = [f"Engine time: capture + analysis, then prune(target_flops=0.5) with defaults. "
             f"{machine()}, {__import__('torch').get_num_threads()} threads.", "",
             "| model | params (M) | tracer | capture cold (s) | analysis cold (s) | "
             "total cold (s) | total warm (s) | prune() (s) | slowest stages | peak RSS (MB) "
             "| units | prunable conv channels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | failed: {r['error']} | | | | | | | | |")
            continue
        slow = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["stages"].items(),
                                                            key=lambda kv: -kv[1])[:3])
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['method']} | "
                     f"{r['capture_cold_s']:.2f} | {r['analyze_cold_s']:.2f} | "
                     f"{r['total_cold_s']:.2f} | {r['total_warm_s']:.2f} | {r['prune_s']:.1f} | "
                     f"{slow} | {r['peak_rss_mb']} | {r['units']} | "
                     f"{100 * r['prunable_conv_share']:.1f}% |")
    with open(os.path.join(out, "engine_time.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
