"""The accuracy benchmark's harness on a tiny recipe (issue "Train -> prune -> fine-tune")."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("torch_pruning")
from benchmarks.accuracy import run  # noqa: E402
from benchmarks.accuracy.shapes import CLASSES, make_shapes  # noqa: E402
from benchmarks.accuracy.summary import aggregate, write_summary  # noqa: E402


def test_nets_that_crash_onednns_backward_train_without_it():
    from torch import nn

    from benchmarks.accuracy.train import onednn_trains

    shortcut = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 24, 1, stride=2))
    assert not onednn_trains(shortcut)  # README, "Known limitations": heap corruption on AVX2
    assert onednn_trains(nn.Sequential(nn.Conv2d(8, 24, 1, stride=2), nn.Conv2d(2, 24, 1)))
    assert onednn_trains(nn.Conv2d(2, 24, 3, stride=2))


def test_shapes_are_deterministic_and_cover_every_class():
    x, y = make_shapes(200, seed=3)
    x2, y2 = make_shapes(200, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32
    assert set(y.tolist()) == set(range(len(CLASSES)))
    assert not torch.equal(make_shapes(200, seed=4)[0], x)


TINY = run.Recipe("tiny", ("resnet20",), (0.5,), (0, 1),
                  ("ours/taylor", "tp/l2", "ours/l2+kd", "ours/iterative-l2", "ours/sparse-l2",
                   "scratch", "recover/bias+bn", "ours/sensitivity-l2"),
                  n_train=64, n_test=32, batch=32, dense_epochs=(("resnet20", 1),), ft_epochs=2)


def test_every_kind_of_job_gives_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "MODELS_DIR", tmp_path / "models")
    run._DATA.clear()
    dense, rest = run.jobs_for(TINY)
    assert len(rest) == 8 * 2 and rest[0].method == "scratch"  # every method, every seed
    rows = [run.run_job(TINY, dense[0])]
    rows += [run.run_job(TINY, job) for job in rest if job.seed == 0]
    for row in rows:
        assert 0.0 <= row["acc_after"] <= 1.0, row
        if row["method"] not in ("dense", "scratch"):
            assert row["flops_kept"] <= 0.5 + 1e-9, row
    ours = [r for r in rows if r["method"] == "ours/taylor"][0]
    assert 0.49 <= ours["flops_kept"] and ours["acc_before"] is not None
    # the pruned model is cached per (tool, criterion, target), shared by the seeds
    assert (tmp_path / "models" / "tiny_resnet20_ours_taylor_0.5.pt").exists()
    recovered = [r for r in rows if r["method"] == "recover/bias+bn"][0]
    assert recovered["acc_before"] is not None and 0.0 <= recovered["acc_ep1"] <= 1.0
    assert (tmp_path / "models" / "tiny_resnet20_ours_l2_rec-bias+bn_0.5.pt").exists()
    sens = [r for r in rows if r["method"] == "ours/sensitivity-l2"][0]
    assert 0.49 <= sens["flops_kept"] <= 0.5 and sens["acc_before"] is not None
    assert (tmp_path / "models" / "tiny_resnet20_sensitivity_l2.json").exists()

    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows + [
        dict(rows[1], seed=1, acc_after=rows[1]["acc_after"] + 0.1)]))
    cells = aggregate([json.loads(l) for l in runs.read_text().splitlines()])
    scratch = [c for c in cells if c["method"] == "scratch"][0]
    assert scratch["n"] == 2 and scratch["acc_after_std"] > 0  # mean and std over seeds
    text = write_summary(runs, tmp_path / "accuracy", TINY)
    assert "best of ours" in text and "narrowed from scratch" in text
    assert "Recovery without training" in text and "after 1 ep." in text
    assert "| ours/sensitivity-l2 |" in text
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "accuracy.csv").exists()


def test_quick_recipe_is_a_reduced_full_one():
    assert set(run.QUICK.methods) <= set(run.FULL.methods)
    assert run.QUICK.n_train < run.FULL.n_train and len(run.FULL.seeds) >= 3
    assert dataclasses.replace(run.FULL).targets == (0.5, 0.3)
