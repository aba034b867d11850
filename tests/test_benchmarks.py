"""The comparison harness on a tiny model: rows, failing tools, files. Not the numbers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import textwrap

import pytest

pytest.importorskip("torch_pruning")

from benchmarks import compare  # noqa: E402
from benchmarks.limits import run_job  # noqa: E402

BAD_TOOLS = textwrap.dedent("""
    import os, signal, time

    def boom(bench, target, round_to):
        raise RuntimeError("boom in " + type(bench.model).__name__)

    def segv(bench, target, round_to):
        os.kill(os.getpid(), signal.SIGSEGV)

    def hang(bench, target, round_to):
        time.sleep(600)

    def hog(bench, target, round_to):
        blocks = []
        while True:
            blocks.append(bytearray(64 * 2**20))
            blocks[-1][::4096] = b"x" * len(blocks[-1][::4096])

    def widen(bench, target, round_to):
        import torch
        bench.model.fc = torch.nn.Linear(16, 11)
        return bench.model, {}
""")


@pytest.fixture
def bad_tools(tmp_path, monkeypatch):
    (tmp_path / "bad_tools.py").write_text(BAD_TOOLS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return "bad_tools"


def _rows(path):
    with open(path) as f:
        return {r["tool"]: r for r in csv.DictReader(f)}


def test_harness_compares_tools_and_survives_a_crashing_one(tmp_path, bad_tools):
    out = tmp_path / "results"
    compare.main(["--models", "tiny", "--targets", "0.5", "--round-to", "1", "--batches", "1",
                  "--tools", "ours", "torch_pruning", f"{bad_tools}:boom",
                  "--latency-budget", "0.2", "--max-spread", "100", "--out", str(out),
                  "--prefix", "t"])
    rows = _rows(out / "t.csv")
    assert set(rows) == {"ours", "torch_pruning", f"{bad_tools}:boom"}
    for tool in ("ours", "torch_pruning"):
        row = rows[tool]
        assert row["status"] == "ok", row
        assert 0.4 < float(row["flops_ratio"]) <= 0.52
        assert float(row["flops_after"]) < float(row["flops_before"])
        assert float(row["engine_s"]) > 0 and float(row["peak_rss_mb"]) > 0
        assert row["outputs"] == "unchanged"
        assert float(row["eager_b1_ms"]) > 0 and float(row["speedup_eager_b1"]) > 0
        assert float(row["ort_b1_ms"]) > 0
    crashed = rows[f"{bad_tools}:boom"]
    assert crashed["status"] == "error"
    assert "RuntimeError: boom in TinyNet" in crashed["error"]
    summary = (out / "t.md").read_text()
    for tool in rows:
        assert tool in summary
    assert "RuntimeError: boom" in summary
    brief = (out / "t_brief.md").read_text()
    assert "error (RuntimeError)" in brief and brief.count("x | ") >= 2
    assert (out / "t_latency_vs_flops.png").stat().st_size > 0
    assert not list((out / ".models").iterdir()), "pruned models are deleted after timing"


def test_resume_skips_finished_jobs(tmp_path, bad_tools):
    args = ["--models", "tiny", "--targets", "0.5", "--round-to", "1", "--tools",
            f"{bad_tools}:boom", "--out", str(tmp_path), "--prefix", "r"]
    compare.main(args)
    runs = (tmp_path / "r_runs.jsonl").read_text().splitlines()
    compare.main(args + ["--resume"])
    assert (tmp_path / "r_runs.jsonl").read_text().splitlines() == runs


def test_resume_redoes_a_timed_model_that_lost_a_prune_row(tmp_path):
    """Dropping one variant's row after the timing must not leave the new variant untimed."""
    args = ["--models", "tiny", "--targets", "0.7", "0.5", "--round-to", "1", "--batches", "1",
            "--tools", "ours", "--latency-budget", "0.1", "--out", str(tmp_path), "--prefix", "d"]
    compare.main(args)
    runs = tmp_path / "d_runs.jsonl"
    kept = [ln for ln in runs.read_text().splitlines()
            if json.loads(ln)["job"].get("target") != 0.5]
    runs.write_text("\n".join(kept) + "\n")
    compare.main(args + ["--resume"])
    redone = [json.loads(ln)["job"] for ln in runs.read_text().splitlines()[len(kept):]]
    assert [j["kind"] for j in redone] == ["prune", "prune", "latency"]
    with open(tmp_path / "d.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["target"]) for r in rows) == [0.5, 0.7]
    # the redone latency job timed the dense model and both variants, the new one included
    timed = json.loads(runs.read_text().splitlines()[-1])["result"]["eager"]["1"]
    assert len(timed) == 3 and all(ms > 0 for ms in timed.values()), timed
    # each row carries its figure, or says the machine was too noisy to give one (a tiny
    # model's spread on a shared CI machine often stays over 10%: no figure is then right)
    for r in rows:
        assert (r.get("eager_b1_ms") and float(r["eager_b1_ms"]) > 0) or \
            r.get("noisy_eager_b1") == "True", r


@pytest.mark.parametrize("tool, status, message", [
    ("segv", "error", "SIGSEGV"),
    ("hang", "timeout", "timed out"),
    ("hog", "oom", "resident memory"),
    ("widen", "error", "output contract changed"),
])
def test_limits_turn_failures_into_results(bad_tools, tool, status, message):
    job = {"kind": "prune", "model": "tiny", "tool": f"{bad_tools}:{tool}", "target": 0.5,
           "round_to": 1}
    outcome = run_job(job, timeout_s=25, mem_mb=1500)
    assert outcome.status == status, outcome
    assert message in outcome.error
    if status == "oom":
        assert outcome.peak_rss_mb > 1500


def test_plan_covers_every_case_once(tmp_path):
    cfg = compare.parse(["--out", str(tmp_path)])
    jobs = compare.plan_jobs(cfg, str(tmp_path))
    keys = [compare.job_key(j) for j in jobs]
    assert len(keys) == len(set(keys))
    prunes = [j for j in jobs if j["kind"] == "prune" and j["model"] in cfg.models]
    assert len(prunes) == len(cfg.models) * len(cfg.tools) * 3 * 2
    latency = {j["model"] for j in jobs if j["kind"] == "latency"}
    assert latency == set(cfg.models)
    assert json.dumps(jobs)  # jobs cross the process boundary as JSON


def test_coverage_rows_give_status_and_reasons(tmp_path):
    pytest.importorskip("torchvision")
    from benchmarks import coverage

    coverage.main(["--models", "tv:squeezenet1_1", "tv:no_such_model", "--out", str(tmp_path),
                   "--timeout", "300"])
    with open(tmp_path / "coverage.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    ok = rows["tv:squeezenet1_1"]
    assert ok["status"] == "ok", ok
    assert 0.49 <= float(ok["flops_ratio"]) <= 0.50
    # The classifier conv's 1000 outputs are the contract; every other conv channel prunes.
    assert int(ok["conv_total"]) - int(ok["conv_prunable"]) == 1000
    bad = rows["tv:no_such_model"]
    assert bad["status"] == "error" and "no_such_model" in bad["why"]
    table = (tmp_path / "coverage.md").read_text()
    assert "tv:squeezenet1_1" in table and "1 ok" in table
    listing = coverage.failures(coverage.load(str(tmp_path / "coverage_runs.jsonl")))
    assert listing.startswith("1 x error") and "    tv:no_such_model" in listing
    assert "squeezenet" not in listing


def test_failures_group_one_construct_across_models():
    from benchmarks.coverage import failures

    rows = [{"model": f"timm:m{i}", "status": "limited",
             "why": f"{64 * i} channels: view at node 'view_{i}' in module 'blocks.{i}' fails"}
            for i in range(1, 4)] + [{"model": "tv:ok", "status": "ok", "why": ""}]
    text = failures(rows)
    assert text.splitlines()[0].startswith("3 x limited: N channels: view at node '…'")
    assert "tv:ok" not in text


def test_timm_family_rule():
    from benchmarks.zoo import timm_family

    cases = {"convnextv2_atto": "convnextv2", "convnext_atto": "convnext",
             "resnet50d": "resnet", "resnetv2_50": "resnetv2", "vit_tiny_patch16_224": "vit",
             "tf_efficientnetv2_b0": "tf_efficientnetv2", "efficientnet_b0": "efficientnet",
             "regnetv_040": "regnetv", "cs3darknet_s": "cs"}
    assert {name: timm_family(name) for name in cases} == cases


def test_wide_zoos_list_what_the_packages_ship():
    tvm = pytest.importorskip("torchvision.models")
    pytest.importorskip("ultralytics")
    import glob

    from benchmarks.zoo import _ultralytics_models, names

    tv = names("tv-all")
    assert sorted(n.split(":", 1)[1] for n in tv) == sorted(tvm.list_models())
    assert "tvvideo:r3d_18" in tv and "tvdet:maskrcnn_resnet50_fpn_v2" in tv
    ultra = names("ultra-all")
    shipped = glob.glob(os.path.join(_ultralytics_models(), "**", "*.yaml"), recursive=True)
    assert len(ultra) == len(shipped) and "yaml:v8/yolov8-p2.yaml" in ultra


def test_yaml_with_pretrained_torchvision_layer_builds_offline():
    pytest.importorskip("ultralytics")
    from benchmarks.zoo import build

    bench, _ = build("yaml:11/yolo11-cls-resnet18.yaml")  # its YAML asks for resnet18 weights
    assert bench.outputs is None and bench.params > 1e6


def _fake_runs(path, rows):
    with open(path, "w") as f:
        for model, status, ratio, seconds in rows:
            result = {"status": status, "target": 0.5, "engine_s": seconds, "why": "w"}
            if ratio is not None:
                result["flops_ratio"] = ratio
            f.write(json.dumps({"job": {"model": model}, "status": status, "error": "",
                                "seconds": seconds, "peak_rss_mb": 900.0,
                                "result": result}) + "\n")


def test_wide_zoo_figures_and_readme_section(tmp_path):
    from benchmarks import coverage

    _fake_runs(tmp_path / "coverage_timm_all_runs.jsonl", [
        ("timm:vit_tiny_patch16_224", "ok", 0.4995, 12.0),
        ("timm:deit_tiny_patch16_224", "off-target", 0.41, 40.0),
        ("timm:nf_resnet26", "limited", 0.8, 5.0)])
    _fake_runs(tmp_path / "coverage_ultra_all_runs.jsonl", [("yaml:v8/yolov8.yaml", "ok", 0.5, 3.0)])
    with open(tmp_path / "coverage_timm_all_runs.jsonl", "a") as f:  # a child that died
        f.write(json.dumps({"job": {"model": "timm:boom"}, "status": "error", "seconds": 1.0,
                            "error": "AssertionError: x", "peak_rss_mb": 1.0,
                            "result": None}) + "\n")
    rows = coverage.load(str(tmp_path / "coverage_timm_all_runs.jsonl"))
    st = coverage.stats(rows)
    assert st["raw_exceptions"] == ["timm:boom"]
    rows = [r for r in rows if r["model"] != "timm:boom"]
    st = coverage.stats(rows)
    assert (st["ok"], st["refused"], st["failed"]) == (1, 1, 1)
    assert st["under_target"] == ["timm:deit_tiny_patch16_224"]
    assert st["over_30s"] == ["timm:deit_tiny_patch16_224"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{coverage.BEGIN}\nold\n{coverage.END}\noutro\n")
    coverage.write_readme(str(tmp_path), str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| timm-all | 4 | 1 (25%) | 1 | 2 | 1 | 1 | 1 |" in text
    assert "| tv-all | not run |" in text and "deit_tiny_patch16_224 | failed" in text
    assert "vit_tiny" not in text  # only what is not ok is listed by name
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="coverage:begin"):
        coverage.write_readme(str(tmp_path), str(readme))


def test_summary_keeps_only_checked_quiet_latency_figures(tmp_path):
    """A latency job without the machine record (the old harness) or whose spread stayed
    wide gives no speedup; a checked, quiet one does."""
    from benchmarks.summary import brief, load_rows, markdown

    def prune_rec(model):
        return {"job": {"kind": "prune", "model": model, "tool": "ours", "target": 0.5,
                        "round_to": 8, "label": "ours|0.5|8"}, "status": "ok", "error": None,
                "seconds": 1.0, "peak_rss_mb": 100, "result": {"flops_ratio": 0.5}}

    def latency_rec(model, env, noisy):
        result = {"eager": {"1": {"dense": 10.0, "ours|0.5|8": 6.0}}, "ort": {}}
        if env:
            result.update(env={"cpu": "x"}, noisy={"eager": {"1": noisy}, "ort": {}},
                          spread={"eager": {"1": {"dense": 0.02, "ours|0.5|8": 0.03}},
                                  "ort": {}})
        return {"job": {"kind": "latency", "model": model}, "status": "ok", "error": None,
                "seconds": 1.0, "peak_rss_mb": 100, "result": result}

    runs = tmp_path / "runs.jsonl"
    records = [prune_rec("quiet"), latency_rec("quiet", True, False),
               prune_rec("noisy"), latency_rec("noisy", True, True),
               prune_rec("old"), latency_rec("old", False, False)]
    runs.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = {r["model"]: r for r in load_rows(str(runs))[0]}
    assert rows["quiet"]["speedup_eager_b1"] == pytest.approx(10 / 6, rel=1e-3)
    assert rows["quiet"]["spread_eager_b1"] == 0.03
    assert "speedup_eager_b1" not in rows["noisy"] and rows["noisy"]["noisy_eager_b1"]
    assert "speedup_eager_b1" not in rows["old"]
    text = brief(list(rows.values()))
    assert "1.67x" in text and "noisy" in text and "not timed" in text
    lines: dict = {}  # the first table: one row per model and round_to
    for ln in markdown(list(rows.values()), load_rows(str(runs))[1]).splitlines():
        if ln.startswith("| "):
            lines.setdefault(ln.split(" | ")[0].lstrip("| "), ln)
    assert "| 1.67 |" in lines["quiet"] and "| noisy |" in lines["noisy"]
    assert lines["old"].endswith("| - |")  # taken before the checked harness: no figure


def test_hardware_benchmark_rows(tmp_path, monkeypatch):
    """The hardware harness on the tiny model: every variant asked for gets a row with FLOPs
    kept and every backend's figures (OpenVINO's too, installed for the tests); a latency
    target reports prediction and measurement."""
    from benchmarks import hardware

    from pruners.latency import LatencyTable
    from test_latency import FakeClock

    # the tiny model's time is mostly per-call overhead: a mild latency target is reachable;
    # its plan comes from a fake clock (its real time is all noise), its rows from the real one
    monkeypatch.setitem(hardware.VARIANTS, "ours latency 0.9",
                        ("ours", dict(target_latency=0.9, round_to=8)))
    table = LatencyTable(str(tmp_path / "lat.json"), timer=FakeClock())
    rows = hardware.run(["tiny"], threads=1, rounds=3, out=str(tmp_path), prefix="hw",
                        variants=["ours r8", "ours latency 0.9", "ours auto cl"],
                        latency_table=table)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "ours r8", "ours latency 0.9", "ours auto cl"}
    assert 0 < by["ours r8"]["flops_kept"] <= 0.51  # TinyNet is coarse at round_to 8
    for row in rows:
        assert row["eager_ms"] > 0 and row["ort_ms"] > 0 and row["eager_cl_ms"] > 0
        assert row["ov_ms"] > 0 or importlib.util.find_spec("openvino") is None
    assert 0 < by["ours latency 0.9"]["predicted"] <= 0.95
    assert by["ours latency 0.9"]["attempts"] >= 1
    md = (tmp_path / "hw.md").read_text()
    assert "ours latency 0.9" in md and "threads" in md and "| eager cl |" in md
    from pruners.latency.staircase import CANDIDATES
    assert by["ours auto cl"]["round_to"] in (1, *CANDIDATES)  # what auto chose is reported
    assert ("| openvino |" in md) == (importlib.util.find_spec("openvino") is not None)
    assert (tmp_path / "lat.json").exists()


def test_gpu_benchmark_rows_run_on_the_cpu(tmp_path):
    """The GPU harness's logic without a GPU (device="cpu", float32): every model and
    variant gets a row with FLOPs kept and a timing per batch, in the CSV, JSON and table."""
    import torch

    from benchmarks import gpu

    rows = gpu.run(["tiny"], [1, 2], rounds=3, out=str(tmp_path), prefix="g",
                   variants=["ours r8"], device="cpu", dtype=torch.float32,
                   budget_s=float("inf"), command="--models tiny")
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "ours r8"}
    assert 0 < by["ours r8"]["flops_kept"] <= 0.51
    for row in rows:
        assert row["b1_ms"] > 0 and row["b2_ms"] > 0
    assert by["ours r8"]["b2_speedup"] > 0 and "b1_speedup" not in by["dense"]
    md = (tmp_path / "g.md").read_text()
    assert "eager b2" in md and "CUDA graph" not in md and "--models tiny" in md
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["environment"]["dtype"] == "float32" and len(saved["rows"]) == 2


def test_eager_floor_rows_and_the_ceiling_they_imply(tmp_path):
    """The fixed part of an eager forward (the model at an eighth of its side) and the
    efficiency ceiling it leaves, in both layouts; a detector is resized by its transform on
    a copy, its own transform untouched."""
    import pytest
    import torch

    from benchmarks import eager_floor
    from benchmarks.hardware import bench_for

    pytest.importorskip("onnxruntime")
    rows = eager_floor.run(["tiny"], threads=1, rounds=3, out=str(tmp_path), prefix="ef",
                           round_to=8, layouts=eager_floor.LAYOUTS)
    assert [r["layout"] for r in rows] == ["contiguous", "channels_last", "onnxruntime"]
    for r in rows:
        assert 0 < r["flops_kept"] <= 0.51 and r["dense_ms"] > 0 and r["dense_small_ms"] > 0
        t, f, fixed = r["dense_ms"], r["flops_kept"], r["fixed_ms"]
        assert 0 <= fixed <= r["dense_small_ms"]
        assert r["eff_ceiling"] == pytest.approx(f * t / (fixed + (t - fixed) * f), rel=0.02)
    assert "ceiling" in (tmp_path / "ef.md").read_text()
    bench = bench_for("retinanet_resnet50_fpn")
    model, images = eager_floor.small_inputs(bench)
    assert model.transform.min_size == (32,) and images[0].shape == (3, 32, 32)
    assert bench.model.transform.min_size == (320,)  # the copy's own transform was resized
    yolo = eager_floor.small_inputs(type(bench)("y", bench.model, torch.randn(1, 3, 640, 640)))[1]
    assert yolo.shape == (1, 3, 64, 64)


def test_alignment_times_one_plan_aligned_and_one_channel_either_side(tmp_path):
    """"One under" and "one over" are the aligned plan with every group at a multiple of the
    step one channel narrower or wider (widths 16k - 1 and 16k + 1, nothing else moves), and
    each row's ratios are their times over the aligned one's."""
    import pytest
    import torch

    from benchmarks import alignment
    from benchmarks.hardware import bench_for
    from pruners import apply_plan, plan_pruning

    bench = bench_for("tiny")
    planned = plan_pruning(bench.model, bench.inputs, target_flops=0.5, round_to=8)

    def widths(plan):
        return [m.out_channels for m in apply_plan(bench_for("tiny").model, plan).modules()
                if isinstance(m, torch.nn.Conv2d)]

    aligned = widths(planned.plan)
    assert all(w % 8 == 0 for w in aligned)
    for by in (-1, 1):
        plan, groups = alignment.nudged(planned, 8, by)
        moved = [v - w for w, v in zip(aligned, widths(plan))]
        assert groups >= 1 and set(moved) <= {0, by} and moved.count(by) >= groups

    rows = alignment.run(["tiny"], threads=1, rounds=3, out=str(tmp_path), prefix="al",
                         multiple=8, runtimes=["eager", "eager cl"])
    assert [r["runtime"] for r in rows] == ["eager", "eager cl"]
    for r in rows:
        assert r["groups_one_under"] >= 1 and r["groups_one_over"] >= 1
        assert r["flops_kept_one_under"] < r["flops_kept_aligned"] < r["flops_kept_one_over"]
        for key in ("one_under", "one_over"):
            assert r[f"{key}_over_aligned"] == pytest.approx(r[f"{key}_ms"] / r["aligned_ms"],
                                                             rel=0.01)
        assert r["auto_round_to"] == 1  # no layer of 48 outputs or more: nothing to time
    assert "one over ms (/ aligned)" in (tmp_path / "al.md").read_text()


def test_benchmarks_pin_malloc_so_large_blocks_are_not_mapped_again_each_call():
    """Freeing and taking again a 64 MiB block costs ~16,000 page faults a call with glibc's
    defaults (above its largest mmap threshold); pinned, the heap keeps it."""
    pytest.importorskip("resource")
    import torch

    import benchmarks
    from pruners.latency import page_faults

    if not benchmarks.MALLOC_PINNED:
        pytest.skip("not glibc, or PRUNERS_BENCH_MALLOC=default")
    pages = (64 << 20) // 4096
    # glibc's defaults map all of them every call; pinned, at most a stray call of the six
    # grows the heap (when something else took its top meanwhile)
    assert page_faults(lambda: torch.empty(16 << 20).fill_(1.0), calls=6, warmup=3) < pages / 2


def test_processes_summarizes_each_variant_over_fresh_processes(tmp_path):
    """Per variant and runtime: the median efficiency and its range over the processes (the
    dense model's ms instead), noisy runs counted, a variant that failed everywhere an error
    row; and the harness really runs ``benchmarks.hardware`` once per process and model."""
    from benchmarks import processes

    def run(dense_ms, eff, noisy=False):
        return [{"model": "m", "variant": "dense", "flops_kept": 1.0, "eager_ms": dense_ms},
                {"model": "m", "variant": "ours", "flops_kept": 0.5, "eager_eff": eff,
                 "eager_noisy": noisy},
                {"model": "m", "variant": "tp", "error": "IndexError: index 768"}]

    rows = processes.summarize([run(55.0, 0.95), run(67.0, 0.80, noisy=True),
                                run(60.0, 0.90)], ["eager"])
    dense, ours, tp = rows
    assert dense["eager_ms_min"] == 55.0 and dense["eager_ms_max"] == 67.0
    assert ours["eager_eff_median"] == 0.9 and ours["eager_effs"] == "0.95 0.8 0.9"
    assert (ours["eager_eff_min"], ours["eager_eff_max"], ours["eager_noisy"]) == (0.8, 0.95, 1)
    assert tp["error"].startswith("IndexError") and "eager_eff_median" not in tp
    table = processes.markdown(rows, {}, ["eager"], 3)
    assert "| m | ours | 0.500 | 0.900 [0.800-0.950] (1 noisy) |" in table
    assert "55.0-67.0 ms" in table and "| m | tp | error: IndexError" in table

    got = processes.run(["tiny"], 2, ["ours r8"], ["eager"], threads=1, rounds=3,
                        out=str(tmp_path))
    assert [r["runs"] for r in got] == [2, 2]
    assert sorted(p.name for p in (tmp_path / "processes").glob("*.json")) == \
        ["tiny_1.json", "tiny_2.json"]
    assert len(got[1]["eager_effs"].split()) == 2 and (tmp_path / "processes.md").exists()


def test_processes_reads_the_acceptance_off_the_medians():
    """Each goal's verdict comes from the medians over processes (efficiency) or from the
    worst landing anywhere (inside prune() and in the table, every process); a goal whose
    variant did not run reads "not run", not met or failed."""
    from benchmarks import processes

    def run(auto_eff, lat_speedup, in_prune):
        return [{"model": "m", "variant": "dense", "flops_kept": 1.0, "eager_ms": 60.0},
                {"model": "m", "variant": "ours auto", "flops_kept": 0.5, "eager_eff": auto_eff},
                {"model": "m", "variant": "ours latency eager", "flops_kept": 0.42,
                 "eager_eff": 0.42 * lat_speedup, "eager_speedup": lat_speedup,
                 "measured_in_prune": in_prune}]

    rows = processes.summarize([run(0.95, 2.0, 0.49), run(0.85, 1.95, 0.51),
                                run(0.92, 2.05, 0.50)], ["eager"])
    got = {(v["goal"], v["runtime"]): v for v in processes.acceptance(rows)}
    auto = got[("auto efficiency", "eager")]
    assert auto["value"] == 0.92 and auto["passed"] and auto["range"] == (0.85, 0.95)
    latency = got[("latency efficiency", "eager")]
    assert latency["value"] == round(0.42 * 2.0, 3) and latency["passed"] is False
    landing = got[("landing", "eager")]
    assert landing["passed"] and landing["value"] == round(1 / 1.95, 3)
    assert got[("auto efficiency", "onnxruntime")]["passed"] is None  # not run
    table = processes.markdown(rows, {}, ["eager"], 3)
    assert "| m | eager | 0.920 [0.850-0.950] met | 0.840 [" in table
    assert "**not met**" in table and "| m | onnxruntime | - | - | - |" in table

    # one process's table landing at 0.54 (8% over) fails the landing, though the median holds
    rows = processes.summarize([run(0.95, 2.0, 0.49), run(0.95, 1 / 0.54, 0.50),
                                run(0.95, 2.0, 0.50)], ["eager"])
    landing = next(v for v in processes.acceptance(rows) if v["goal"] == "landing"
                   and v["runtime"] == "eager")
    assert landing["value"] == 0.54 and landing["passed"] is False


def test_onnx_passes_times_each_model_as_traced_and_rewritten(tmp_path, monkeypatch):
    """Dense and pruned, each exported as traced and rewritten, timed in onnxruntime: the
    rewrite is reported and every efficiency is speedup x FLOPs kept on its own graph."""
    import pytest
    import torch
    from torch import nn

    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_passes
    from benchmarks.models import Bench

    class Dfl(nn.Module):  # a conv trunk, then YOLOv8's softmax over 16 bins (dim 1 of 4-D)
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(96, 64, 3, padding=1))
            self.bins = nn.Conv2d(16, 1, 1, bias=False)

        def forward(self, x):
            y = self.trunk(x).flatten(2)
            return self.bins(y.view(1, 4, 16, -1).transpose(2, 1).softmax(1))

    torch.manual_seed(0)
    monkeypatch.setattr(onnx_passes, "bench_for",
                        lambda name: Bench(name, Dfl().eval(), torch.randn(1, 3, 16, 16)))
    rows = onnx_passes.run(["dfl"], ["onnxruntime"], threads=1, rounds=3, out=str(tmp_path),
                           prefix="op")
    (row,) = rows
    assert row["rewrites"] == "decompose_softmax=1" and 0 < row["flops_kept"] < 1
    for graph in ("as_traced", "rewritten"):
        d, p = row[f"{graph}_dense_ms"], row[f"{graph}_pruned_ms"]
        assert d > 0 and p > 0
        assert row[f"{graph}_eff"] == pytest.approx(row["flops_kept"] * d / p, rel=0.02)
    assert "decompose_softmax=1" in (tmp_path / "op.md").read_text()


def test_ort_threads_times_dense_and_pruned_per_way_of_running_the_threads(tmp_path, monkeypatch,
                                                                          capsys):
    """One row per way of running onnxruntime's threads, each set up as named, with
    efficiency = speedup x FLOPs kept; the library's own way is ``ort_options``."""
    import pytest
    import torch
    from torch import nn

    pytest.importorskip("onnxruntime")
    from benchmarks import ort_threads
    from benchmarks.models import Bench

    entry = "session.intra_op.allow_spinning"
    assert ort_threads.options("no spinning", 2).get_session_config_entry(entry) == "0"
    assert ort_threads.options("spin always", 2).get_session_config_entry(
        "session.force_spinning_stop") == "0"
    assert ort_threads.options("1 thread", 2).intra_op_num_threads == 1
    ours = ort_threads.options("spin within a run", 2)
    assert ours.get_session_config_entry(entry) == "1" and ours.intra_op_num_threads == 2
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 3, padding=1))
    monkeypatch.setattr(ort_threads, "bench_for",
                        lambda name: Bench(name, net.eval(), torch.randn(1, 3, 16, 16)))
    rows = ort_threads.run(["net"], list(ort_threads.MODES), threads=2, rounds=3,
                           out=str(tmp_path), prefix="ot")
    assert [r["mode"] for r in rows] == list(ort_threads.MODES)
    for r in rows:
        assert 0 < r["flops_kept"] < 1 and r["dense_ms"] > 0 and r["pruned_ms"] > 0
        assert r["eff"] == pytest.approx(r["flops_kept"] * r["dense_ms"] / r["pruned_ms"],
                                         rel=0.02)
    assert "| net | 1 thread |" in (tmp_path / "ot.md").read_text()
    # the command line writes the same table and prints it, machine line and all
    ort_threads.main(["--models", "net", "--modes", "1 thread", "--threads", "1", "--rounds",
                      "3", "--out", str(tmp_path), "--prefix", "cli"])
    printed = capsys.readouterr().out
    assert "| net | 1 thread |" in printed and "threads; torch" in printed
    assert printed.endswith((tmp_path / "cli.md").read_text())  # after the progress lines
