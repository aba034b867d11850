"""Random DAG CNNs for property tests, drawn with hypothesis.

A network is a list of :class:`Op` over a growing list of values (value 0 is the input image);
each op reads earlier values and appends one. The blocks are the couplings users' models have:
residual adds, concat, chunk, depthwise/grouped convs, SE gates, pooling and upsampling,
modules applied twice, and a head that flattens into a Linear or stays a conv map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

from benchmarks.fuzz import randomize_norms

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "none": nn.Identity}


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[int, ...]
    args: dict = field(default_factory=dict)


@dataclass
class Value:
    channels: int
    size: int


class RandomNet(nn.Module):
    """Runs a program of :class:`Op`; ``describe()`` prints it for a failing example."""

    def __init__(self, ops: list[Op], head: Op, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.ops, self.head_op = ops, head
        self.layers = nn.ModuleDict(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for i, op in enumerate(self.ops):
            values.append(self._apply(f"op{i}", op, values))
        return self._apply("head", self.head_op, values)

    def _apply(self, name: str, op: Op, values: list[torch.Tensor]) -> torch.Tensor:
        xs = [values[i] for i in op.inputs]
        if op.kind in ("conv", "shared"):
            return self.layers[op.args.get("module", name)](xs[0])
        if op.kind == "residual":
            return xs[0] + self.layers[name](xs[0])
        if op.kind == "add":
            return xs[0] + xs[1]
        if op.kind == "mul":
            return xs[0] * xs[1]
        if op.kind == "cat":
            return torch.cat(xs, 1)
        if op.kind == "chunk":
            return xs[0].chunk(2, 1)[op.args["part"]]
        if op.kind == "shuffle":
            return nn.functional.channel_shuffle(xs[0], 2)
        if op.kind == "glu":
            return nn.functional.glu(xs[0], 1)
        if op.kind == "se":
            return xs[0] * self.layers[name](xs[0].mean((2, 3), keepdim=True))
        if op.kind == "pool":
            pool = nn.functional.max_pool2d if op.args["max"] else nn.functional.avg_pool2d
            return pool(xs[0], 2)
        if op.kind == "upsample":
            return nn.functional.interpolate(xs[0], scale_factor=2.0, mode="nearest")
        if op.kind == "linear_head":
            y = nn.functional.adaptive_avg_pool2d(xs[0], op.args["grid"]).flatten(1)
            return self.layers[name](y)
        if op.kind == "conv_head":
            return self.layers[name](xs[0])
        raise ValueError(op.kind)

    def describe(self) -> str:
        return "\n".join(f"op{i}: {op}" for i, op in enumerate(self.ops)) + f"\nhead: {self.head_op}"


def conv_block(cin: int, cout: int, k: int, stride: int, groups: int, bn: bool,
               act: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                                         bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(ACTS[act]())
    return nn.Sequential(*layers)


def add_op(draw, values: list[Value], ops: list[Op], modules: dict, shareable: list,
           pick, size: int) -> None:
    """Draw one op that fits the values so far and append it (and its value, module)."""
    name = f"op{len(ops)}"
    kinds = ["conv", "conv", "residual", "se", "cat", "pool", "upsample"]
    if any(v.channels % 2 == 0 and v.channels >= 4 for v in values[1:]):
        kinds += ["chunk", "shuffle", "glu"]
    if len(values) > 2:
        kinds += ["add", "mul"]
    if shareable:
        kinds.append("shared")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv" or len(values) == 1:
        kind = "conv"
        i = pick()
        cin = values[i].channels
        style = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
        if style == "depthwise" and i > 0:
            groups, cout = cin, cin * draw(st.sampled_from([1, 1, 2]))
        elif style == "grouped" and i > 0 and cin % 2 == 0:
            groups = draw(st.sampled_from([g for g in (2, 4) if cin % g == 0]))
            cout = groups * draw(st.integers(2, 6))
        else:
            groups, cout = 1, draw(st.integers(4, 24))
        k = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 1, 2])) if values[i].size >= 4 else 1
        modules[name] = conv_block(cin, cout, k, stride, groups, draw(st.booleans()),
                                   draw(st.sampled_from(sorted(ACTS))))
        if stride == 1 and groups == 1:
            shareable.append((name, cin, cout))
        ops.append(Op("conv", (i,)))
        values.append(Value(cout, (values[i].size + stride - 1) // stride))
    elif kind == "shared":
        module, cin, cout = draw(st.sampled_from(shareable))
        if not any(v.channels == cin for v in values):
            return
        i = pick(lambda v: v.channels == cin)
        ops.append(Op("shared", (i,), {"module": module}))
        values.append(Value(cout, values[i].size))
    elif kind == "residual":
        i = pick()
        c = values[i].channels
        modules[name] = conv_block(c, c, 3, 1, 1, draw(st.booleans()), "relu")
        ops.append(Op("residual", (i,)))
        values.append(Value(c, values[i].size))
    elif kind == "se":
        i = pick(lambda v: v.channels >= 4)
        c = values[i].channels
        hidden = max(2, c // 4)
        modules[name] = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(),
                                      nn.Conv2d(hidden, c, 1), nn.Sigmoid())
        ops.append(Op("se", (i,)))
        values.append(Value(c, values[i].size))
    elif kind in ("add", "mul", "cat"):
        i = pick(lambda v: v is not values[0])
        same = (lambda v: v.size == values[i].size and v is not values[0]) if kind == "cat" \
            else (lambda v: v == values[i] and v is not values[0])
        j = pick(same)
        inputs = (i, j)
        if kind == "cat" and draw(st.booleans()):
            inputs += (pick(same),)
        ops.append(Op(kind, inputs))
        c = sum(values[k].channels for k in inputs) if kind == "cat" else values[i].channels
        values.append(Value(c, values[i].size))
    elif kind == "chunk":
        i = pick(lambda v: v.channels % 2 == 0 and v.channels >= 4 and v is not values[0])
        ops.append(Op("chunk", (i,), {"part": draw(st.integers(0, 1))}))
        values.append(Value(values[i].channels // 2, values[i].size))
    elif kind in ("shuffle", "glu"):  # channel_shuffle(x, 2) keeps the width, glu halves it
        i = pick(lambda v: v.channels % 2 == 0 and v.channels >= 4 and v is not values[0])
        ops.append(Op(kind, (i,)))
        values.append(Value(values[i].channels // (2 if kind == "glu" else 1), values[i].size))
    elif kind == "pool":
        i = pick(lambda v: v.size >= 4 and v is not values[0])
        ops.append(Op("pool", (i,), {"max": draw(st.booleans())}))
        values.append(Value(values[i].channels, values[i].size // 2))
    elif kind == "upsample":
        i = pick(lambda v: v.size <= size and v is not values[0])
        ops.append(Op("upsample", (i,)))
        values.append(Value(values[i].channels, values[i].size * 2))


@st.composite
def networks(draw, max_ops: int = 8, size: int = 16) -> tuple[RandomNet, torch.Tensor]:
    """A random network and an input for it."""
    values = [Value(3, size)]
    ops: list[Op] = []
    modules: dict[str, nn.Module] = {}
    shareable: list[tuple[str, int, int]] = []  # (module name, in, out) of stride-1 convs

    class NoCandidate(Exception):
        pass

    def pick(pred=lambda v: True) -> int:
        options = [i for i, v in enumerate(values) if pred(v)]
        if not options:
            raise NoCandidate
        # favour recent values so the network is deep rather than wide
        return options[draw(st.integers(max(0, len(options) - 4), len(options) - 1))]

    for _ in range(draw(st.integers(1, max_ops))):
        try:
            add_op(draw, values, ops, modules, shareable, pick, size)
        except NoCandidate:
            continue
    last = len(values) - 1
    c = values[last].channels
    if draw(st.booleans()):
        grid = draw(st.sampled_from([1, 2]))
        modules["head"] = nn.Linear(c * grid * grid, 5)
        head = Op("linear_head", (last,), {"grid": grid})
    else:
        modules["head"] = nn.Conv2d(c, 5, 1)
        head = Op("conv_head", (last,))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = randomize_norms(RandomNet(ops, head, modules))
    return net.eval(), torch.randn(2, 3, size, size)
