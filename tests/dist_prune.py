"""Run by tests/test_distributed.py under ``python -m torch.distributed.run --nproc-per-node 2``.

Every rank builds the same model, reads its own shard, prunes with a data-driven criterion
(the scores are all-reduced), writes its plan, and takes one DDP training step.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pruners import prune


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


def shard(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 3, 8, 8, generator=g) * (1 + 3 * rank),
             torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]


def loss_fn(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = prune(model(), torch.randn(1, 3, 8, 8), target_flops=0.5, importance="taylor",
                   data=shard(rank), loss_fn=loss_fn)
    ddp = nn.parallel.DistributedDataParallel(result.model.train())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = shard(rank)[0]
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()  # gradients are averaged across the ranks here
    opt.step()
    weights = [p.detach().flatten()[:4].tolist() for p in ddp.module.parameters()][:2]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"plan": result.plan.to_dict()["kept"], "weights": weights}, f)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: gloo's C++ threads occasionally abort there ("terminate called
    # without an active exception") after all work is done and written
    os._exit(0)
