"""Fake-tensor probes on and off: ``prune()`` time and real forwards, side by side.

    python -m benchmarks.screen_ab [--models timm:deepseek_vit_412m timm:gemma4_vit_167m@0.56 ...]

Each (model, arm) runs ``prune(model, x, target_flops=T)`` in a fresh process; the arms
alternate in order from model to model (off first, then on first, ...), so neither always
runs second. "off" makes ``pruners.screen.ShapeScreen.of`` return None (every probe real, as
before the screen). Real forwards are counted where ``pruners.verify`` runs a model (the
input check, real probes and their masked references, the final check), by caller. ``@T``
after a name sets its target (a model whose 0.5 is infeasible). Results go to
``benchmarks/results/screen_ab.{json,md}``; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

DEFAULT = ["timm:deepseek_vit_412m", "timm:gemma4_vit_167m@0.56", "tvdet:maskrcnn_resnet50_fpn",
           "yolo:yolov8s"]
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def child(name: str, target: float, arm: str) -> dict:
    """One ``prune()`` in this process; the row as a dict."""
    import resource
    import traceback

    import torch

    from benchmarks.zoo import build
    from pruners import prune
    from pruners.screen import ShapeScreen

    verify_module = sys.modules["pruners.verify"]
    torch.set_num_threads(os.cpu_count() or 1)
    if arm == "off":
        ShapeScreen.of = classmethod(lambda cls, *a, **k: None)  # type: ignore[method-assign]
    made: list = []
    if arm == "on":
        real_of = ShapeScreen.of.__func__
        ShapeScreen.of = classmethod(  # type: ignore[method-assign]
            lambda cls, *a, **k: made.append(real_of(cls, *a, **k)) or made[-1])
    forwards: dict[str, int] = {}
    for fn in ("run_model", "_run_at"):
        real = getattr(verify_module, fn)

        def counted(*a, _real=real, **k):
            caller = traceback.extract_stack(limit=2)[0].name
            forwards[caller] = forwards.get(caller, 0) + 1
            return _real(*a, **k)
        setattr(verify_module, fn, counted)
    bench, extra = build(name)
    start = time.perf_counter()
    result = prune(bench.model, bench.inputs, target_flops=target, outputs=bench.outputs, **extra)
    seconds = time.perf_counter() - start
    screen = next((s for s in made if s is not None), None)
    return {"model": name, "arm": arm, "target": target, "prune_s": round(seconds, 2),
            "flops_ratio": round(result.report.flops_ratio, 4),
            "stages": {k: round(v, 2) for k, v in result.report.seconds.items()},
            "real_forwards": sum(v for k, v in forwards.items() if k != "_run_at"),
            "by_caller": forwards,
            "screen": None if screen is None else {"fake_s": round(screen.seconds, 2),
                                                   "real_s": round(screen.real_s or 0, 2)},
            "plan_sha1": hashlib.sha1(json.dumps(result.plan.kept, sort_keys=True)
                                      .encode()).hexdigest()[:12],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "TARGET", "ARM"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, target, arm = args.child
        print(json.dumps(child(name, float(target), arm)))
        return
    from .summary import machine

    rows = []
    for i, spec in enumerate(args.models):
        name, _, target = spec.partition("@")
        for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.screen_ab", "--child", name,
                                   target or "0.5", arm], capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"model": name, "arm": arm, "error": proc.stderr.strip().splitlines()[-1:]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "screen_ab.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    lines = [f"Machine: {machine()}", "",
             "| model | arm | prune() s | real forwards | FLOPs ratio | plan | stages (s) |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['arm']} | error: {r['error']} | | | | |")
            continue
        top = sorted(r["stages"].items(), key=lambda kv: -kv[1])[:4]
        stages = ", ".join(f"{k} {v:g}" for k, v in top)
        lines.append(f"| {r['model']} | {r['arm']} | {r['prune_s']} | {r['real_forwards']} | "
                     f"{r['flops_ratio']} | {r['plan_sha1']} | {stages} |")
    with open(os.path.join(args.out, "screen_ab.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
