"""The detection benchmark's job list and summary (no training here: see test_ultralytics)."""

import json

import pytest

pytest.importorskip("ultralytics")
from benchmarks.detection import run  # noqa: E402
from benchmarks.detection.summary import write_summary  # noqa: E402


def test_jobs_cover_every_method_target_and_seed():
    recipe = run.Recipe("t", targets=(0.5, 0.3), criteria=("l2", "taylor"), seeds=(0, 1),
                        recovery=("none", "bn"))
    jobs = run.jobs(recipe)
    assert jobs[:2] == [("dense", 1.0, 0), ("dense yolov5nu", 1.0, 0)]
    assert ("ours/taylor", 0.3, 1) in jobs and ("scratch", 0.5, 1) in jobs
    assert ("tp/l2 yolov5nu", 0.3, 0) in jobs
    assert [j for j in jobs if j[0].startswith("recover/")] == [
        ("recover/none", 0.5, 0), ("recover/bn", 0.5, 0), ("recover/none", 0.3, 0),
        ("recover/bn", 0.3, 0)]
    assert len(jobs) == len(set(jobs))


def test_summary_aggregates_seeds_and_joins_the_latency_phase(tmp_path):
    runs, latency = tmp_path / "runs.jsonl", tmp_path / "latency.json"
    base = {"target": 0.5, "flops_kept": 0.5, "params_kept": 0.45, "map50_95_before": 0.1,
            "map50_before": 0.2, "model_file": "/x/ours-l2-0.5.pt", "dense_file": "/x/dense-yolov8n.pt"}
    rows = [{"method": "dense", "target": 1.0, "seed": 0, "flops_kept": 1.0, "params_kept": 1.0,
             "map50_95_before": None, "map50_before": None, "map50_95": 0.6, "map50": 0.8,
             "model_file": "/x/dense-yolov8n.pt", "dense_file": "/x/dense-yolov8n.pt"},
            dict(base, method="ours/l2", seed=0, map50_95=0.5, map50=0.7),
            dict(base, method="ours/l2", seed=1, map50_95=0.4, map50=0.6),
            dict(base, method="recover/bn", seed=0, map50_95=None, map50=None, model_file=None),
            {"method": "tp/l2 yolov8n", "target": 0.5, "seed": 0, "error": "RuntimeError: C2f"}]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    timed = {"dense-yolov8n": {"ms": 10.0, "spread": 0.1}, "ours-l2-0.5": {"ms": 5.0, "spread": 0.2}}
    latency.write_text(json.dumps({"rounds": 3, "calls": 2, "environment": {"torch": "t"},
                                   "threads": {"1": timed, "2": dict(timed, **{
                                       "ours-l2-0.5": {"ms": 8.0, "spread": 0.2}})}}))
    text = write_summary(runs, latency, tmp_path / "detection", run.FULL)
    line = next(l for l in text.splitlines() if "| ours/l2 |" in l)
    assert "| 2 |" in line and "45.0 ± 7.1" in line and "2.00x" in line and "1.25x" in line
    rec = next(l for l in text.splitlines() if "| recover/bn |" in l)
    assert "| 10.0 |" in rec  # mAP before fine-tuning; no latency, no after-FT mAP
    assert "tp/l2 yolov8n at 50%: RuntimeError: C2f" in text
    assert (tmp_path / "detection.png").exists() and (tmp_path / "detection.csv").exists()
