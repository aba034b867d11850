"""Fuzz ``prune()`` over random architectures: ``python -m benchmarks.fuzz --n 1000``.

Each network is drawn from a seeded generator whose blocks are what users' models hold and
what breaks pruning engines: convs (dense, depthwise, grouped), convs normalised over their
channels (GroupNorm, or LayerNorm as ConvNeXt: inexact units), residuals, concat, chunk, SE
gates, pooling, upsampling, and kinds that hide widths or values from a tracer:
attention whose ``forward`` reshapes by a stored head count, attention with rotary tables as
wide as a head (only whole heads can go, and only where the heads are viewed back by ``-1``;
see ``depgraph.analyze``'s ``heads``), splits by stored sizes (``split((self.c, self.c))``,
C2f-style; by widths derived from a stored whole, CSP- and SHViT-style; by a stored list,
FocalNet-style), cascaded heads that share one stored value width (EfficientViT-style), a
tensor passed to a submodule by keyword, and a detection-style tail (top-k positions whose
features a box head reads).

Every network is pruned with defaults to a random FLOPs target, then checked independently of
``prune()``'s own check: the plan is applied to a fresh copy and compared with the original
whose removed channels' consumers are zeroed (at the engine's verification points when the
network has a data-dependent tail; where the plan also removes inexact units, those are
removed from that original too, and a plan of inexact units only is checked for its output
shapes). Outcomes: ``ok``, ``infeasible`` (the target cannot be
met; the error says what can), ``refused`` (a ``PruningError`` naming the cause), ``crash``
(any other exception: a bug) and ``silent-wrong`` (prune returned, the check fails: the worst
bug). Results: ``benchmarks/results/fuzz.{md,jsonl}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
import traceback
from collections import Counter
from typing import Any

import torch
from torch import nn

from .compare import RESULTS, Progress
from .summary import machine

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "none": nn.Identity}


def _conv(cin: int, cout: int, k: int = 1, groups: int = 1, bn: bool = True,
          act: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(ACTS[act]())
    return nn.Sequential(*layers)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, as ConvNeXt's: statistics over channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _normed(cin: int, cout: int, k: int, norm: str) -> nn.Sequential:
    """A conv whose output is normalised over its channels (GroupNorm, or a LayerNorm over
    channels): pruning them changes the statistics, so its units are inexact."""
    layer = nn.GroupNorm(2 if cout % 2 == 0 else 1, cout) if norm == "group" \
        else ChannelNorm(cout)
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2), layer, nn.SiLU())


class HeadAttention(nn.Module):
    """Self-attention over positions that reshapes by stored ``num_heads``/``head_dim``."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, c // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, 3 * self.head_dim, h * w).split(
            [self.head_dim] * 3, dim=2)
        attn = (q.transpose(-2, -1) @ k * self.scale).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).view(b, c, h, w)
        return x + self.proj(out)


class RotaryAttention(nn.Module):
    """Attention over positions with rotary tables as wide as a head (stored ``num_heads`` and
    ``head_dim``): the head width cannot change, whole heads can where the heads are viewed
    back by ``-1``; with ``keep_width`` they are viewed back into the input's width, which
    no plan of this block's heads can keep (repair must freeze them)."""

    def __init__(self, c: int, heads: int, side: int, keep_width: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.keep_width = heads, c // heads, keep_width
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        angle = torch.arange(side * side)[:, None] / 10 ** (torch.arange(self.head_dim)
                                                            / self.head_dim)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).reshape(
            b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        half = self.head_dim // 2
        q, k = (t * self.cos + torch.cat((-t[..., half:], t[..., :half]), -1) * self.sin
                for t in (q, k))
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(2, 3)
        return x + self.proj(out.reshape(b, c if self.keep_width else -1, h, w))


class HeldSplit(nn.Module):
    """C2f-style: split by a stored half width, transform one half, concatenate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c // 2
        self.cv1 = _conv(c, 2 * self.c)
        self.m = _conv(self.c, self.c, 3)
        self.cv2 = _conv(3 * self.c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


class WholeSplit(nn.Module):
    """Splits by widths derived from a stored whole: CSP's ``x.split(self.expand // 2)``, or
    SHViT's ``split([self.p, self.expand - self.p])`` (``rest``)."""

    def __init__(self, c: int, rest: bool) -> None:
        super().__init__()
        self.expand, self.p, self.rest = c, c // 4, rest
        part = c - self.p if rest else c // 2
        self.cv1, self.m, self.cv2 = _conv(c, c), _conv(part, part, 3), _conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        a, b = y.split([self.p, self.expand - self.p] if self.rest else self.expand // 2, 1)
        return self.cv2(torch.cat([a, self.m(b)], 1))


class ListSplit(nn.Module):
    """FocalNet's modulation: ``torch.split(x, self.input_split, 1)`` into q, a context and
    gates, with ``input_split = [c, c, 2]`` (q and the context are different channels)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.input_split = [c, c, 2]
        self.f, self.h, self.proj = nn.Conv2d(c, 2 * c + 2, 1), nn.Conv2d(c, c, 1), \
            nn.Conv2d(c, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, ctx, gates = torch.split(self.f(x), self.input_split, 1)
        ctx = self.dw(ctx) * gates[:, :1] + ctx.mean((2, 3), keepdim=True) * gates[:, 1:]
        return self.proj(q * self.h(ctx))


class Cascade(nn.Module):
    """EfficientViT's cascaded heads: each splits by ``[self.key_dim, self.key_dim,
    self.val_dim]``; every head but the last hands its values to the next head's input."""

    def __init__(self, c: int, heads: int, key_dim: int) -> None:
        super().__init__()
        self.key_dim, self.val_dim = key_dim, c // heads
        self.qkvs = nn.ModuleList(nn.Conv2d(self.val_dim, 2 * key_dim + self.val_dim, 1)
                                  for _ in range(heads))
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        chunks, outs = x.chunk(len(self.qkvs), 1), []
        feat = chunks[0]
        for i, qkv in enumerate(self.qkvs):
            feat = feat + chunks[i] if i else feat
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], 1)
            attn = (q.flatten(2).transpose(1, 2) @ k.flatten(2)).softmax(-1)
            feat = (v.flatten(2) @ attn.transpose(1, 2)).view(b, self.val_dim, h, w)
            outs.append(feat)
        return x + self.proj(torch.cat(outs, 1))


class Gated(nn.Module):
    """Takes its gate as a keyword argument: ``self.gated(x, gate=g)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = _conv(c, c, 3)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.sigmoid(gate)


class FuzzNet(nn.Module):
    """A chain of blocks over a growing list of values; ``spec`` describes it."""

    def __init__(self, ops: list[tuple], blocks: dict[str, nn.Module], head: str, classes: int,
                 last: int, c_last: int) -> None:
        super().__init__()
        self.ops, self.head_kind, self.last = ops, head, last
        self.blocks = nn.ModuleDict(blocks)
        if head == "linear":
            self.head = nn.Linear(c_last, classes)
        elif head == "conv":
            self.head = nn.Conv2d(c_last, classes, 1)
        else:  # detection-style: per-position scores, top-k, a box head on the picked features
            self.head = nn.Conv2d(c_last, 1, 1)
            self.box_head = nn.Sequential(nn.Linear(c_last, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> Any:
        values = [x]
        for name, kind, inputs in self.ops:
            xs = [values[i] for i in inputs]
            if kind in ("conv", "norm", "attention", "rotary", "held_split", "whole_split",
                        "list_split", "cascade"):
                y = self.blocks[name](xs[0])
            elif kind == "residual":
                y = xs[0] + self.blocks[name](xs[0])
            elif kind == "gated":
                y = self.blocks[name](xs[0], gate=xs[1])
            elif kind == "se":
                y = xs[0] * self.blocks[name](xs[0].mean((2, 3), keepdim=True))
            elif kind == "cat":
                y = torch.cat(xs, 1)
            elif kind == "add":
                y = xs[0] + xs[1]
            elif kind == "chunk":
                y = xs[0].chunk(2, 1)[1]
            elif kind == "pool":
                y = nn.functional.max_pool2d(xs[0], 2)
            else:  # upsample
                y = nn.functional.interpolate(xs[0], scale_factor=2.0, mode="nearest")
            values.append(y)
        f = values[self.last]
        if self.head_kind == "linear":
            return self.head(f.mean((2, 3)))
        if self.head_kind == "conv":
            return self.head(f)
        scores = self.head(f).flatten(1)
        keep = scores[0].topk(4).indices
        picked = f.flatten(2).transpose(1, 2).index_select(1, keep)
        return self.box_head(picked), scores


def randomize_norms(net: nn.Module) -> nn.Module:
    """Batch norms with non-trivial statistics and affine terms (fresh ones are identities,
    which would hide a norm sliced out of step with its conv)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def random_net(seed: int) -> tuple[FuzzNet, torch.Tensor, dict]:
    """A random network (seeded), an input for it, and a description."""
    rng = random.Random(seed)
    size = rng.choice([8, 16])
    values = [(3, size)]  # (channels, side) of each value
    ops: list[tuple] = []
    blocks: dict[str, nn.Module] = {}
    for step in range(rng.randint(2, 9)):
        name = f"b{step}"
        i = rng.randint(max(0, len(values) - 3), len(values) - 1)
        c, s = values[i]
        kinds = ["conv", "conv", "norm", "residual", "se", "attention", "rotary", "held_split",
                 "gated", "cat", "add", "chunk", "pool", "upsample", "whole_split", "list_split",
                 "cascade"]
        kind = rng.choice(kinds) if i > 0 else "conv"
        same = [j for j, v in enumerate(values) if j > 0 and v == values[i] and j != i]
        if kind in ("add", "gated") and not same:
            kind = "conv"
        if kind == "cat" and not [j for j, v in enumerate(values) if j > 0 and v[1] == s]:
            kind = "conv"
        if kind in ("attention", "rotary", "held_split", "se", "whole_split", "cascade") and \
                (c < 4 or c % 2):
            kind = "conv"
        if kind == "chunk" and (c % 2 or c < 4):
            kind = "conv"
        if kind == "pool" and s < 4:
            kind = "conv"
        if kind == "upsample" and s > 16:
            kind = "conv"
        if kind == "conv":
            style = rng.choice(["dense", "dense", "depthwise", "grouped"]) if i > 0 else "dense"
            if style == "depthwise":
                groups, cout = c, c * rng.choice([1, 2])
            elif style == "grouped" and c % 2 == 0:
                groups, cout = 2, 2 * rng.randint(2, 8)
            else:
                groups, cout = 1, rng.choice([4, 6, 8, 12, 16, 24])
            blocks[name] = _conv(c, cout, rng.choice([1, 3]), groups, rng.random() < 0.6,
                                 rng.choice(sorted(ACTS)))
            ops.append((name, "conv", (i,)))
            values.append((cout, s))
        elif kind == "norm":
            cout = rng.choice([4, 6, 8, 12, 16])
            blocks[name] = _normed(c, cout, rng.choice([1, 3]), rng.choice(["group", "layer"]))
            ops.append((name, kind, (i,)))
            values.append((cout, s))
        elif kind == "residual":
            blocks[name] = _conv(c, c, 3)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "se":
            blocks[name] = nn.Sequential(nn.Conv2d(c, max(2, c // 4), 1), nn.ReLU(),
                                         nn.Conv2d(max(2, c // 4), c, 1), nn.Sigmoid())
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "attention":
            heads = rng.choice([h for h in (1, 2, 4) if c % h == 0 and c // h >= 2] or [1])
            blocks[name] = HeadAttention(c, heads)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "rotary":  # heads of an even width (rotate_half halves it)
            heads = rng.choice([h for h in (1, 2, 4) if c % (2 * h) == 0])
            blocks[name] = RotaryAttention(c, heads, s, keep_width=rng.random() < 0.3)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "held_split":
            blocks[name] = HeldSplit(c)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "whole_split":
            blocks[name] = WholeSplit(c, rest=rng.random() < 0.5)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "list_split":
            blocks[name] = ListSplit(c)
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "cascade":
            blocks[name] = Cascade(c, rng.choice([h for h in (2, 4) if c % h == 0]),
                                   rng.choice([2, 4]))
            ops.append((name, kind, (i,)))
            values.append((c, s))
        elif kind == "gated":
            blocks[name] = Gated(c)
            ops.append((name, kind, (i, rng.choice(same))))
            values.append((c, s))
        elif kind == "cat":
            j = rng.choice([j for j, v in enumerate(values) if j > 0 and v[1] == s])
            ops.append((name, kind, (i, j)))
            values.append((c + values[j][0], s))
        elif kind == "add":
            ops.append((name, kind, (i, rng.choice(same))))
            values.append((c, s))
        elif kind == "chunk":
            ops.append((name, kind, (i,)))
            values.append((c // 2, s))
        elif kind == "pool":
            ops.append((name, kind, (i,)))
            values.append((c, s // 2))
        else:
            ops.append((name, kind, (i,)))
            values.append((c, s * 2))
    last = len(values) - 1
    head = rng.choice(["linear", "conv", "detect"])
    torch.manual_seed(seed)
    net = randomize_norms(FuzzNet(ops, blocks, head, 5, last, values[last][0]).eval())
    spec = {"ops": [k for _, k, _ in ops], "head": head, "size": size}
    return net, torch.randn(1, 3, size, size), spec


def check_one(seed: int) -> dict:
    """Prune network ``seed`` with defaults and check the result independently."""
    from depgraph import capture
    from depgraph.boundary import verification_points
    from depgraph.errors import PruningError
    from pruners import apply_plan, prune, run_model, verify
    from pruners.allocate import InfeasibleTargetError
    from pruners.verify import DenseRun

    net, x, spec = random_net(seed)
    target = random.Random(seed + 10**6).choice([0.3, 0.5, 0.7])
    row: dict[str, Any] = {"seed": seed, "target": target, **spec}
    start = time.perf_counter()
    try:
        result = prune(net, x, target_flops=target)
    except InfeasibleTargetError as exc:
        row.update(outcome="infeasible", reachable=exc.reachable)
        return row
    except PruningError as exc:
        row.update(outcome="refused", why=f"{type(exc).__name__}: {str(exc)[:300]}")
        return row
    except Exception as exc:  # noqa: BLE001 - a crash is what the fuzzer looks for
        row.update(outcome="crash", why=f"{type(exc).__name__}: {exc}"[:300],
                   trace=traceback.format_exc()[-1500:])
        return row
    row["prune_s"] = round(time.perf_counter() - start, 3)
    row["flops_ratio"] = round(result.report.flops_ratio, 4)
    row["said_off_target"] = any(n.startswith(("achieved", "measured"))
                                 for n in result.report.notes)
    try:
        fresh = apply_plan(copy.deepcopy(net), result.plan)
        boundary = verification_points(capture(net, x))
        at = list(boundary.modules) if boundary is not None else None
        removed = _removed(result)
        exact = all(result.graph.units[u].exact for u in removed)
        shapes = [t.shape for t in run_model(net, x)] if at is None else None
        if shapes is not None and [t.shape for t in run_model(fresh, x)] != shapes:
            row.update(outcome="silent-wrong", why="output shapes changed")
            return row
        # with the dense run, a plan that also holds inexact units (a norm block's) is
        # compared against the masked original with those removed too
        dense = DenseRun.of(net, x) if at is None else None
        check = verify(net, result.graph, removed, x, pruned=fresh, at=at, dense=dense)
        compared = exact or check.inexact > 0
        if compared and not check.ok:
            row.update(outcome="silent-wrong", why=str(check))
            return row
        row.update(outcome="ok", exact=exact, compared=compared, at=at is not None,
                   max_rel_diff=check.max_rel_diff if compared else None)
    except Exception as exc:  # noqa: BLE001
        row.update(outcome="silent-wrong", why=f"independent check raised {type(exc).__name__}: "
                                               f"{exc}"[:300])
    return row


def _removed(result) -> list[int]:
    """The unit ids the plan removed, recovered from the plan's kept indices."""
    graph, kept = result.graph, result.plan.kept
    out = set()
    for (param, dim), ids in graph.unit_index.items():
        if param in kept and dim in kept[param]:
            keep = set(kept[param][dim])
            out.update(int(u) for i, u in enumerate(ids.tolist()) if u >= 0 and i not in keep)
    return sorted(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz",
                                description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--prefix", default="fuzz")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    progress = Progress(a.n)
    runs = os.path.join(a.out, f"{a.prefix}.jsonl")
    with open(runs, "w") as f:
        for seed in range(a.start, a.start + a.n):
            row = check_one(seed)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            progress.step(f"seed {seed}: {row['outcome']}")
    path = os.path.join(a.out, f"{a.prefix}.md")
    with open(path, "w") as f:
        f.write(summary(rows, a.start))
    print(summary(rows, a.start))
    print("wrote", path, "and", runs)


def summary(rows: list[dict], start: int = 0) -> str:
    counts = Counter(r["outcome"] for r in rows)
    kinds = Counter(k for r in rows for k in set(r["ops"]))
    ok_kinds = Counter(k for r in rows if r["outcome"] == "ok" for k in set(r["ops"]))
    lines = [f"Fuzz: {len(rows)} random networks (seeds {start}..{start + len(rows) - 1}), "
             f"pruned with defaults to a random FLOPs target (0.3/0.5/0.7). {machine()}.", "",
             "| outcome | networks |", "|---|---|"]
    lines += [f"| {k} | {counts.get(k, 0)} |" for k in
              ("ok", "infeasible", "refused", "crash", "silent-wrong")]
    lines += ["", "| block | networks with it | ok |", "|---|---|---|"]
    lines += [f"| {k} | {n} | {ok_kinds.get(k, 0)} |" for k, n in sorted(kinds.items())]
    heads = Counter(r["head"] for r in rows)
    lines += ["", "Heads: " + ", ".join(f"{k} {v}" for k, v in sorted(heads.items())) + "."]
    bad = [r for r in rows if r["outcome"] in ("crash", "silent-wrong")]
    if bad:
        lines += ["", "Failures (seed: what):"]
        lines += [f"- {r['seed']}: {r['outcome']}: {r.get('why', '')}" for r in bad[:20]]
    ok = [r for r in rows if r["outcome"] == "ok"]
    if ok:
        mixed = sum(1 for r in ok if r.get("compared") and not r.get("exact"))
        only = sum(1 for r in ok if not r.get("compared", True) and not r.get("at"))
        at = sum(1 for r in ok if not r.get("compared", True) and r.get("at"))
        lines += ["", f"Of the {len(ok)} ok, {mixed} plans also removed inexact units (a norm "
                      "block's) and were compared with them removed from the reference too; "
                      f"{only} removed inexact units only (output shapes checked); {at} hold "
                      "inexact units and are checked at verification points (a top-k tail), "
                      "where no reference without them is built (not compared)."]
        off = [r for r in ok if abs(r["flops_ratio"] - r["target"]) > 0.01]
        said = sum(1 for r in off if r.get("said_off_target"))
        lines += ["", f"Of the {len(ok)} ok: {len(off)} landed more than 1 point under the "
                      f"target ({said} of them say so in the report's notes: in a net of 4-24 "
                      "channels one unit is several points of the FLOPs), "
                      f"{sum(1 for r in off if r['flops_ratio'] > r['target'])} over it."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
