"""Data-driven pruning inside a torch.distributed job: every rank derives the same plan from
its own shard, and the pruned model trains under DDP (issue "Models as they arrive", item 9)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dist_prune
from pruners import prune

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ranks_with_different_shards_get_one_plan_and_train_under_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--standalone", os.path.join(HERE, "dist_prune.py"), str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["plan"] == ranks[1]["plan"]  # one plan from two shards
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas in step
    # and the shards matter: rank 0's data alone ranks the channels differently
    alone = prune(dist_prune.model(), torch.randn(1, 3, 8, 8), target_flops=0.5,
                  importance="taylor", data=dist_prune.shard(0), loss_fn=dist_prune.loss_fn)
    assert alone.plan.to_dict()["kept"] != ranks[0]["plan"]
