"""The rule table: registration checks, one zero-equivalence sample per op, and coverage.

Every registered op must be exercised by a sample here or by a hand-written model, or be listed
in ``tests/expect/uncovered_ops.txt`` (sorted). Adding a rule without a sample fails
``test_every_registered_op_is_covered_or_listed``; so does adding a sample for a listed op
without removing it from the list.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depgraph import analyze, capture
from depgraph.rules import register, registered_ops
from models import MODELS, build
from pruners import sample_units, verify

aten = torch.ops.aten
EXPECT = os.path.join(os.path.dirname(__file__), "expect", "uncovered_ops.txt")


class Probe(nn.Module):
    """conv(3 -> 8) -> fn -> conv(C' -> 4): fn's channel rule decides what may be pruned."""

    def __init__(self, fn, width: int = 8):
        super().__init__()
        self.fn = fn
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.s = nn.Parameter(torch.rand(width) + 0.5)
        with torch.no_grad():
            channels = fn(self, self.a(torch.randn(2, 3, 6, 6))).shape[1]
        self.b = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        return self.b(self.fn(self, self.a(x)))


# op name -> fn(probe, y) for y of shape (2, 8, 6, 6); each must keep channels prunable.
SAMPLES = {
    "aten.abs": lambda m, y: torch.abs(y),
    "aten.add_": lambda m, y: y.clone().add_(1.0),
    "aten.addcmul": lambda m, y: torch.addcmul(y, y, y),
    "aten.alias": lambda m, y: aten.alias(y),
    "aten.avg_pool2d": lambda m, y: F.avg_pool2d(y, 2),
    "aten.clamp": lambda m, y: y.clamp(-1, 1),
    "aten.clamp_min": lambda m, y: y.clamp_min(0.1),
    "aten.clone": lambda m, y: y.clone(),
    "aten.pad": lambda m, y: F.pad(y, (1, 1, 2, 0)) + F.pad(y, (1, 1, 2, 0), mode="reflect"),
    "aten.contiguous": lambda m, y: y.transpose(2, 3).contiguous(),
    "aten.cos": lambda m, y: torch.cos(y),
    "aten.detach": lambda m, y: y.detach(),
    "aten.div": lambda m, y: y / m.s.view(-1, 1, 1),
    "aten.elu": lambda m, y: F.elu(y),
    "aten.erf": lambda m, y: torch.erf(y),
    "aten.exp": lambda m, y: torch.exp(-y.abs()),
    "aten.expand": lambda m, y: m.s.view(1, -1, 1, 1).expand(2, -1, 6, 6) * y,
    "aten.flatten": lambda m, y: y.flatten(2).view(2, -1, 6, 6),
    "aten.gelu": lambda m, y: F.gelu(y),
    "aten.hardsigmoid": lambda m, y: F.hardsigmoid(y),
    "aten.hardswish": lambda m, y: F.hardswish(y),
    "aten.hardtanh": lambda m, y: F.hardtanh(y, -2.0, 2.0),
    "aten.relu6": lambda m, y: F.relu6(y),
    "aten.leaky_relu": lambda m, y: F.leaky_relu(y, 0.1),
    "aten.maximum": lambda m, y: torch.maximum(y, -y),
    "aten.max_pool2d": lambda m, y: F.max_pool2d(y, 2),
    "aten.adaptive_avg_pool2d": lambda m, y: F.adaptive_avg_pool2d(y, 3),
    "aten.adaptive_max_pool2d": lambda m, y: F.adaptive_max_pool2d(y, 3),
    "aten.mish": lambda m, y: F.mish(y),
    "aten.mul": lambda m, y: y * m.s[:, None, None],
    "aten.neg": lambda m, y: -y,
    "aten.permute": lambda m, y: y.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
    "aten.pow": lambda m, y: y.pow(2),
    "aten.relu": lambda m, y: F.relu(y),
    "aten.reshape": lambda m, y: y.reshape(2, -1, 36).reshape(y.shape),
    "aten.selu": lambda m, y: F.selu(y),
    "aten.sigmoid": lambda m, y: torch.sigmoid(y),
    "aten.silu": lambda m, y: F.silu(y),
    "aten.sin": lambda m, y: torch.sin(y),
    "aten.softplus": lambda m, y: F.softplus(y),
    "aten.split": lambda m, y: torch.cat(y.split(y.shape[1] // 2, dim=1)[::-1], 1),
    # cat then split back by the parts' own widths: unequal parts, sizes recomputed at run time
    "aten.split_with_sizes": lambda m, y: torch.cat(
        torch.cat((y, torch.cat((y, y), 1)), 1).split([y.shape[1], 2 * y.shape[1]], 1)[::-1], 1),
    "aten.sqrt": lambda m, y: torch.sqrt(y.abs() + 1),
    "aten.square": lambda m, y: torch.square(y),
    "aten.squeeze": lambda m, y: y.unsqueeze(2).squeeze(2),
    "aten.stack": lambda m, y: torch.stack([y, y * 2], 2).sum(2),
    "aten.sub": lambda m, y: y - m.s.view(-1, 1, 1),
    "aten.sum": lambda m, y: y.sum(dim=(2,), keepdim=True).expand(-1, -1, 6, -1),
    "aten.tanh": lambda m, y: torch.tanh(y),
    "aten.tile": lambda m, y: y.tile(1, 1, 2, 1),
    "aten.transpose": lambda m, y: y.transpose(2, 3),
    "aten.unflatten": lambda m, y: y.flatten(2).unflatten(2, (6, 6)),
    "aten.unsqueeze": lambda m, y: y.unsqueeze(0)[0],
    "aten.upsample_bilinear2d": lambda m, y: F.interpolate(y, scale_factor=2, mode="bilinear"),
    "aten.upsample_nearest2d": lambda m, y: F.interpolate(y, scale_factor=2),
    "aten.upsample_bicubic2d": lambda m, y: F.interpolate(y, scale_factor=2, mode="bicubic"),
    "aten.var": lambda m, y: y - y.var(dim=(2, 3), keepdim=True),
    "aten.where": lambda m, y: torch.where(y > 0, y, y * 0.1),
    "aten.zeros_like": lambda m, y: y + torch.zeros_like(y),
    "aten.amax": lambda m, y: y - y.amax(dim=(2, 3), keepdim=True),
    "aten.mean": lambda m, y: y - y.mean(dim=(2, 3), keepdim=True),
    "aten.cat": lambda m, y: torch.cat([y, y * 2], 1),
    "aten.chunk": lambda m, y: y.chunk(2, 1)[0] * y.chunk(2, 1)[1],
    "aten.slice": lambda m, y: y[:, :, 1:5],
    "aten.select": lambda m, y: y[:, :, 0].unsqueeze(2),
    "aten.index_select": lambda m, y: y.index_select(2, torch.tensor([0, 2, 3])),
    "aten.index": lambda m, y: y[:, :, torch.tensor([0, 2, 3])],
    "aten.linalg_vector_norm": lambda m, y: y / torch.linalg.vector_norm(y, 2, dim=(2, 3),
                                                                         keepdim=True),
    "aten.softmax": lambda m, y: torch.softmax(y, dim=-1),
    "aten.log_softmax": lambda m, y: torch.log_softmax(y, dim=2),
    "aten.to": lambda m, y: y.to(torch.float64).to(torch.float32),
    "aten.type_as": lambda m, y: y.type_as(m.s),
    "aten.dropout": lambda m, y: F.dropout(y, 0.5, training=False),
    "aten.matmul": lambda m, y: torch.matmul(y, torch.ones(6, 6)),
    "aten.prelu": lambda m, y: F.prelu(y, m.s),
    "aten.batch_norm": lambda m, y: F.batch_norm(y, None, None, m.s, None, training=True),
    "aten.instance_norm": lambda m, y: F.instance_norm(y, weight=m.s),
    "aten.new_zeros": lambda m, y: y + y.new_zeros(1),
    "aten.glu": lambda m, y: F.glu(y, dim=1),
    "aten.channel_shuffle": lambda m, y: F.channel_shuffle(y, 2),
    "aten.feature_dropout_": lambda m, y: F.dropout2d(y.clone(), 0.2, training=False, inplace=True),
    "aten.index_put": lambda m, y: torch.zeros(2, y.shape[1], 6, 6).index_put(
        (torch.tensor([1, 0]),), y),
    "torchvision.roi_align": lambda m, y: __import__("torchvision").ops.roi_align(
        y, [torch.tensor([[0.0, 0.0, 4.0, 5.0], [1.0, 1.0, 5.0, 5.0]]),
            torch.tensor([[0.5, 0.0, 3.0, 3.0]])], 3),
    "aten.unfold": lambda m, y: y.unfold(2, 3, 1).mean(-1),
    "aten.im2col": lambda m, y: F.unfold(y, 3, padding=1).view(2, -1, 6, 6),
    "aten.col2im": lambda m, y: F.fold(F.unfold(y, 2, stride=2), (6, 6), 2, stride=2),
    "aten.grid_sampler": lambda m, y: F.grid_sample(
        y, torch.stack(torch.meshgrid(torch.linspace(-0.7, 0.8, 5), torch.linspace(-0.9, 0.6, 4),
                                      indexing="ij"), -1).expand(2, 5, 4, 2), align_corners=False),
    "aten.max_unpool2d": lambda m, y: F.max_unpool2d(*F.max_pool2d(y, 2, return_indices=True), 2),
}


def _packet_name(target) -> str:
    return str(getattr(target, "overloadpacket", target))


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_sample_is_captured_as_the_op_and_prunes_exactly(op):
    torch.manual_seed(0)
    model = Probe(SAMPLES[op]).eval()
    x = torch.randn(2, 3, 6, 6)
    cap = capture(model, x)
    seen = {_packet_name(n.target) for n in cap.graph.nodes if n.op == "call_function"}
    assert op in seen, f"the sample for {op} traced as {sorted(seen)}"
    graph = analyze(cap)
    assert graph.units, f"{op}: no channel survives the op"
    for seed in range(3):
        units = sample_units(graph, 0.5, np.random.default_rng(seed))
        result = verify(model, graph, units, x)
        assert result.ok, f"{op} seed {seed}: {result}"


@pytest.fixture(scope="module")
def covered_ops():
    seen = set()
    for name in MODELS:
        model, x = build(name)
        seen |= {_packet_name(n.target) for n in capture(model, x).graph.nodes
                 if n.op == "call_function"}
    return seen | set(SAMPLES)


def test_every_registered_op_is_covered_or_listed(covered_ops):
    uncovered = sorted(op for op in registered_ops() if op not in covered_ops)
    with open(EXPECT) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert listed == sorted(listed), "keep tests/expect/uncovered_ops.txt sorted"
    assert uncovered == listed, (
        "registered ops without a sample changed; newly uncovered: "
        f"{sorted(set(uncovered) - set(listed))}, newly covered (remove from the list): "
        f"{sorted(set(listed) - set(uncovered))}")


def test_an_empty_part_of_a_cat_constrains_nothing():
    """segmentation_models_pytorch's MiT encoder hands a 0-channel placeholder feature to a
    decoder that concatenates it: the real part's channels had frozen."""
    model = Probe(lambda m, y: torch.cat([y, y.new_empty(y.shape[0], 0, *y.shape[2:])], 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    graph = analyze(capture(model, x))
    assert len(graph.units) == 8 and not [f for f in graph.frozen if "concatenates" in f.reason]
    units = sample_units(graph, 0.5, np.random.default_rng(0))
    assert verify(model, graph, units, x).ok


class ClassToken(nn.Module):
    """A ViT's token concatenation: a class-token parameter beside the patch tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 10, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 9 tokens, 8 channels)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.fc(t[:, 0])


def test_a_constant_part_of_a_cat_freezes_its_own_channels_only():
    """RAFT's motion features ++ its 2 flow channels (built from a coordinate grid): before,
    every part froze. Concatenated along tokens beside a class token, the patch tokens (which
    hold channels in another dim) add no frozen "channels" of their own."""
    model = Probe(lambda m, y: torch.cat([y, torch.ones(y.shape[0], 2, *y.shape[2:])], 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    graph = analyze(capture(model, x))
    (fixed,) = [f for f in graph.frozen if "concatenates" in f.reason]
    assert len(graph.units) == 8 and [n for _, _, n in fixed.dims] == [2]
    assert verify(model, graph, sample_units(graph, 0.5, np.random.default_rng(0)), x).ok
    vit = ClassToken().eval()
    graph = analyze(capture(vit, x))
    assert len(graph.units) == 8
    assert not [f for f in graph.frozen if "from a fixed-size tensor" in f.reason]
    assert verify(vit, graph, sample_units(graph, 0.5, np.random.default_rng(0)), x).ok


def test_register_rejects_overloads_and_duplicates():
    with pytest.raises(TypeError, match="overload packet"):
        register(aten.add.Tensor)(lambda ctx, node, inputs: (None,))
    with pytest.raises(ValueError, match="already has the rule"):
        register(aten.relu)(lambda ctx, node, inputs: (None,))


class _Table(nn.Module):
    """conv -> * a table read by advanced indexing (``table[index]``, as relative position
    biases are) -> the table's other dims carry the conv's channels -> conv."""

    def __init__(self, pick):
        super().__init__()
        self.pick = pick
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(10, 8))
        self.register_buffer("index", torch.tensor([[1, 3, 5, 7, 9, 0], [2, 4, 6, 8, 0, 1]]))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.pick(self, self.a(x)))


@pytest.mark.parametrize("pick", [
    # (8, 6, 6)-table by a 2-D index, channels last -> (6, 2, 6, 8) broadcast over the batch
    lambda m, y: y * m.table[m.index[:, :, None].expand(2, 6, 6)].permute(0, 3, 1, 2),
    # index dims apart (0 and 2): NumPy puts the indexed dims in front
    lambda m, y: y[torch.tensor([1, 0]), :, torch.tensor([2, 3])].transpose(0, 1)
    .unsqueeze(0).expand(2, -1, -1, 6),
    # index dims adjacent, after a full slice: they stay where they were
    lambda m, y: y[:, :, torch.tensor([[0, 1], [2, 3]]), torch.tensor([4, 5])],
])
def test_advanced_indexing_keeps_the_other_dims_channels(pick):
    torch.manual_seed(0)
    model = _Table(pick).eval()
    x = torch.randn(2, 3, 6, 6)
    graph = analyze(capture(model, x))
    assert len(graph.units) == 8, [f.reason for f in graph.frozen]
    for seed in range(3):
        chosen = sample_units(graph, 0.5, np.random.default_rng(seed))
        assert verify(model, graph, chosen, x).ok


class _BiasedAttention(nn.Module):
    """Attention whose scores get a relative-position bias read from a (positions, heads)
    table by index, as Swin's do: the table's head dim meets the scores' head count."""

    def __init__(self, heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(16, 3 * heads * head_dim)
        self.table = nn.Parameter(torch.randn(5, heads))
        self.register_buffer("index", torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3]))
        self.proj = nn.Linear(heads * head_dim, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(n, n, self.heads).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.out(self.proj(y))


def test_a_dim_combined_with_a_fixed_size_one_carries_no_channels_on():
    """The bias table's head dim is frozen where it meets the scores' head count (a fixed
    size); it must not flow on as channels, or the heads' merge back (heads x head width)
    would see two channel dims and pin the head width."""
    torch.manual_seed(0)
    model = _BiasedAttention().eval()
    x = torch.randn(2, 3, 16)
    graph = analyze(capture(model, x))
    rows = graph.unit_index[("qkv.weight", 0)]
    assert (rows >= 0).sum() == 48, [f.reason for f in graph.frozen]
    # the head count stays: the table's head dim is no unit (pinned, no channel of its own)
    assert (graph.unit_index.get(("table", 1), np.full(1, -1)) < 0).all()
    for seed in range(3):
        assert verify(model, graph, sample_units(graph, 0.5, np.random.default_rng(seed)), x).ok


def test_indexing_along_channels_freezes_them():
    model = Probe(lambda m, y: y[:, torch.tensor([0, 2, 3, 5])]).eval()
    graph = analyze(capture(model, torch.randn(2, 3, 6, 6)))
    assert not graph.units
    assert any("picks channels by index" in f.reason for f in graph.frozen)


def test_index_select_along_channels_freezes_them_and_a_tables_rows_are_no_channels():
    model = Probe(lambda m, y: y.index_select(1, torch.tensor([0, 2, 3, 5]))).eval()
    graph = analyze(capture(model, torch.randn(2, 3, 6, 6)))
    assert not graph.units
    assert any("picks channels by index" in f.reason for f in graph.frozen)

    class Rows(torch.nn.Module):  # rows of a table picked by fixed indices, then added
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 1)
            self.table = torch.nn.Parameter(torch.randn(10, 8))

        def forward(self, x):
            rows = self.table.index_select(0, torch.tensor([1, 4]))  # (2, 8)
            return self.conv(x).mean((2, 3)) + rows

    graph = analyze(capture(Rows().eval(), torch.randn(2, 3, 6, 6)))
    assert ("table", 0) not in graph.unit_index  # the 10 rows are no channels
    assert not any(("table", 0, 10) in f.dims for f in graph.frozen)


@pytest.mark.parametrize("conv", [
    lambda y: F.conv2d(y, torch.ones(4, 8, 1, 1)),
    lambda y: F.conv_transpose2d(y, torch.ones(8, 2, 1, 1), groups=2),
    lambda y: F.conv1d(y.flatten(2), torch.ones(8, 1, 1), groups=8).view(y.shape),
    lambda y: F.linear(y.transpose(1, 3), torch.ones(3, 8)).transpose(1, 3),
])
def test_constant_weights_freeze_the_channels_they_read(conv):
    model = Probe(lambda m, y: conv(y)).eval()
    graph = analyze(capture(model, torch.randn(2, 3, 6, 6)))
    assert not graph.units
    assert any("constant weight of fixed size" in f.reason for f in graph.frozen)


class _ThirdZeroed(nn.Module):
    """Swin V2's qkv bias: the k third zeroed by bounds the code computes from the width
    (``hard=False``) or writes as numbers (``hard=True``)."""

    def __init__(self, hard: bool = False):
        super().__init__()
        self.hard = hard
        self.qkv = nn.Linear(16, 3 * 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        bias = self.qkv.bias.clone()
        length = 8 if self.hard else bias.numel() // 3
        bias[length:2 * length].zero_()
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
        return self.out(q * k.sigmoid() + v)


def test_a_slice_of_one_equal_part_prunes_with_the_parts():
    """``bias[L:2L]`` of a ``3L`` dim is one of three equal parts, as for chunk: the parts
    keep one width and prune; bounds the code writes as numbers fail the check instead, and
    ``prune()`` freezes that width (the model still runs, unchanged outside what it keeps)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = _ThirdZeroed().eval()
    graph = analyze(capture(model, x))
    assert (graph.unit_index[("qkv.weight", 0)] >= 0).sum() == 24
    for seed in range(3):
        assert verify(model, graph, sample_units(graph, 0.5, np.random.default_rng(seed)), x).ok
    from pruners import InfeasibleTargetError, prune

    result = prune(model, x, target_flops=0.6)
    assert result.model.qkv.out_features < 24 and result.model.qkv.out_features % 3 == 0
    hard = _ThirdZeroed(hard=True).eval()  # its only group: nothing is left to prune
    hard.load_state_dict(model.state_dict())
    with pytest.raises(InfeasibleTargetError, match="outputs differ from the masked original"):
        prune(hard, x, target_flops=0.6)
    assert hard.qkv.out_features == 24
