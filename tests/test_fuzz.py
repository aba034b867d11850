"""The CI slice of ``python -m benchmarks.fuzz``: random networks prune correctly or say why."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.fuzz import check_one, random_net, summary

SEEDS = range(16)


def test_the_generator_draws_every_block_kind_and_head():
    specs = [random_net(seed)[2] for seed in range(60)]
    kinds = Counter(k for s in specs for k in s["ops"])
    assert set(kinds) >= {"conv", "norm", "residual", "se", "attention", "rotary", "held_split", "gated",
                          "cat", "add", "chunk", "pool", "upsample", "whole_split", "list_split",
                          "cascade"}
    assert {s["head"] for s in specs} == {"linear", "conv", "detect"}


def test_rotary_blocks_prune_whole_heads_where_their_heads_are_viewed_back_by_minus_one():
    from benchmarks.fuzz import RotaryAttention
    from depgraph import analyze, capture

    seen = 0
    for seed in range(100):  # (seeds 21 and 89 qualify)
        net, x, _ = random_net(seed)
        # (a head count equal to the head width keeps the width rule: see test_heads.py)
        rotary = [name for name, b in net.blocks.items() if isinstance(b, RotaryAttention)
                  and b.head_dim != b.num_heads > 1 and not b.keep_width]
        if rotary:
            notes = " ".join(analyze(capture(net, x)).notes)
            assert all(f"'blocks.{name}'" in notes for name in rotary), (seed, notes)
            seen += 1
    assert seen >= 2


@pytest.fixture(scope="module")
def rows():
    return [check_one(seed) for seed in SEEDS]


def test_no_network_crashes_or_is_silently_wrong(rows):
    bad = [r for r in rows if r["outcome"] not in ("ok", "infeasible", "refused")]
    assert not bad, bad
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert len(ok) >= len(rows) // 3, Counter(r["outcome"] for r in rows)
    assert all(r["max_rel_diff"] <= 1e-4 for r in ok if r["compared"])
    assert all(r["flops_ratio"] <= r["target"] + 0.01 for r in ok), ok


def test_the_summary_counts_every_outcome(rows):
    text = summary(rows)
    counts = Counter(r["outcome"] for r in rows)
    assert f"| ok | {counts['ok']} |" in text
    assert f"| silent-wrong | {counts.get('silent-wrong', 0)} |" in text
