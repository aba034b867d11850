"""Channel analysis: the units, groups and frozen channels of small models whose answer we can
derive by hand, and partition properties over the whole hand-written zoo."""

import numpy as np
import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from models import MODELS, build


def _analyse(model, x, **kw):
    return analyze(capture(model.eval(), x, **kw))


def _units_of(graph, param, dim=0):
    return graph.unit_index[(param, dim)]


def test_chain_hidden_channels_are_units_and_ends_are_frozen():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    g = _analyse(model, torch.randn(1, 3, 8, 8))
    assert len(g.units) == 8 and len(g.groups) == 1
    # One unit = conv0 row, bn weight/bias/mean/var entries and the conv3 input column.
    sl = {(s.param, s.dim) for s in g.slices(0)}
    assert sl == {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0),
                  ("1.running_mean", 0), ("1.running_var", 0), ("3.weight", 1)}
    reasons = {f.reason.split(" at ")[0] if "output" not in f.reason else "output": f.count
               for f in g.frozen}
    assert reasons == {"conv2d.default": 3, "output": 4 + 4}  # 3 input columns; 4 rows + 4 bias


def test_residual_add_couples_both_branches():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.c(y + self.b(torch.relu(y)))

    g = _analyse(Res(), torch.randn(1, 3, 8, 8))
    # a.out == b.out (the add) == c.in: 8 units; b.in (after relu of a) is the same 8 units.
    assert np.array_equal(_units_of(g, "a.weight"), _units_of(g, "b.weight"))
    assert np.array_equal(_units_of(g, "a.weight"), _units_of(g, "c.weight", 1))
    assert np.array_equal(_units_of(g, "a.weight"), _units_of(g, "b.weight", 1))
    assert len(g.units) == 8


def test_chunk_couples_same_relative_index():
    model, x = build("c2f_sppf")
    g = _analyse(model, x)
    ids = _units_of(g, "c2f.cv1.0.weight")  # 32 channels chunked into 2 x 16
    assert np.array_equal(ids[:16], ids[16:])
    assert len(set(ids.tolist())) == 16


def test_depthwise_couples_input_and_output_channel():
    model, x = build("mobilenet_v2")
    g = _analyse(model, x)
    expand = _units_of(g, "body.0.block.0.0.weight")  # 1x1 expand, 32 outputs
    depthwise = _units_of(g, "body.0.block.1.0.weight")  # depthwise 32 -> 32
    assert np.array_equal(expand, depthwise)


def test_depthwise_multiplier_prunes_whole_groups():
    model, x = build("depthwise_multiplier")
    g = _analyse(model, x)
    dw = _units_of(g, "dw.0.weight")  # 16 groups x 2 outputs
    assert np.array_equal(dw[0::2], dw[1::2])
    assert np.array_equal(dw[0::2], _units_of(g, "stem.0.weight"))


def test_grouped_conv_keeps_groups_equal():
    model, x = build("depthwise_multiplier")
    g = _analyse(model, x)
    out = _units_of(g, "gpw.0.weight")  # 32 outputs in 4 groups of 8
    rows = out.reshape(4, 8)
    assert all(np.array_equal(rows[0], rows[k]) for k in range(4))
    inputs = _units_of(g, "dw.0.weight").reshape(4, 8)  # what gpw reads, 4 groups of 8
    assert all(np.array_equal(inputs[0], inputs[k]) for k in range(4))


def test_channel_shuffle_couples_across_the_shuffled_groups():
    model, x = build("shufflenet")
    g = _analyse(model, x)
    # Unit 1: chunk ties x[j] to x[j+8]; the shuffle view(2, 8) ties cat[j] to cat[8+j] and
    # interleaves, so its output is [u0, u0, u1, u1, ..., u7, u7]: 8 units.
    # Unit 2: chunk ties out[j] to out[j+8], i.e. u_k to u_(k+4): 4 units, and its shuffle
    # output is each unit over 4 consecutive channels.
    ids = _units_of(g, "body.2.0.weight", 1)  # the conv reading unit 2's 16 shuffled channels
    assert len(set(ids.tolist())) == 4
    assert np.array_equal(ids, np.repeat(ids[::4], 4))


def test_flatten_into_linear_repeats_channel_over_spatial():
    model, x = build("vgg")
    g = _analyse(model, x)
    conv = _units_of(g, "features.4.0.weight")  # 32 channels, 4 x 4 spatial after pooling
    fc_in = _units_of(g, "classifier.0.weight", 1)  # 32 * 4 * 4 = 512 columns
    assert len(fc_in) == 512
    assert np.array_equal(np.repeat(conv, 16), fc_in)


def test_shared_module_uses_one_set_of_atoms():
    model, x = build("shared_conv")
    g = _analyse(model, x)
    # Both calls of `shared` write into one add: a and b outputs couple through shared's input.
    assert np.array_equal(_units_of(g, "a.0.weight"), _units_of(g, "b.0.weight"))
    assert np.array_equal(_units_of(g, "a.0.weight"), _units_of(g, "shared.0.weight", 1))


def test_squeeze_excite_gate_couples_with_the_gated_tensor():
    model, x = build("squeeze_excite")
    g = _analyse(model, x)
    assert np.array_equal(_units_of(g, "body.0.fc2.weight"), _units_of(g, "body.0.conv.0.weight"))


def test_output_selector_decides_what_is_frozen():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3)
            self.aux = nn.Conv2d(8, 8, 1)
            self.pred = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.relu(self.body(x))
            return self.pred(y), self.aux(y)

    x = torch.randn(1, 3, 8, 8)
    everything = _analyse(TwoHeads(), x)
    only_pred = _analyse(TwoHeads(), x, outputs=lambda out: out[0])
    assert ("aux.weight", 0) not in {(p, d) for f in everything.frozen for p, d, _ in f.dims} or \
        (everything.unit_index[("aux.weight", 0)] < 0).all()
    assert (only_pred.unit_index[("aux.weight", 0)] >= 0).all()


def test_unknown_op_freezes_what_it_touches_and_names_the_op():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x), dim=1).real)

    g = _analyse(Odd(), torch.randn(1, 3, 4, 4))
    assert (_units_of(g, "a.weight") < 0).all()
    assert any("unsupported op" in f.reason and "fft" in f.reason for f in g.frozen)


def test_channel_softmax_freezes_and_layer_norm_is_inexact():
    model, x = build("norms")
    g = _analyse(model, x)
    inexact_notes = {u.note.split(" at ")[0] for u in g.units if not u.exact}
    assert inexact_notes == {"group_norm.default", "layer_norm.default"}
    per_channel_gn = _units_of(g, "inorm.weight")
    assert all(g.units[u].exact for u in per_channel_gn.tolist())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_units_partition_parameter_indices(name):
    """Every (param, dim, index) belongs to at most one unit, each unit to one group, and the
    groups' units are exactly the graph's units (sets of frozensets, as networkx tests them)."""
    model, x = build(name)
    g = _analyse(model, x)
    seen: dict = {}
    for u in g.units:
        for sl in g.slices(u.id):
            for i in sl.indices:
                key = (sl.param, sl.dim, i)
                assert key not in seen, f"{key} in units {seen.get(key)} and {u.id}"
                seen[key] = u.id
    groups = {frozenset(gr.units) for gr in g.groups}
    assert frozenset().union(*groups) == frozenset(u.id for u in g.units)
    assert sum(len(s) for s in groups) == len(g.units)
    assert all(g.units[u].group == gr.id for gr in g.groups for u in gr.units)


def test_networkx_view_links_coupled_layers():
    nx = pytest.importorskip("networkx")
    model, x = build("resnet_basic")
    graph = _analyse(model, x).to_networkx()
    assert isinstance(graph, nx.Graph)
    # The residual stream of the second stage couples block 1's conv2, its downsample and the
    # next block's conv2.
    assert graph.has_edge("body.1.conv2", "body.1.down.0")
    assert graph.has_edge("body.1.conv2", "body.2.conv2")
    # body.0.conv1 reads stage 1's stream, body.2.conv1 stage 2's: nothing shared.
    assert graph.has_edge("body.0.conv1.0", "body.1.conv1.0")  # both read stage 1's stream
    assert not graph.has_edge("body.0.conv1.0", "body.2.conv1.0")


def test_summary_lists_groups_and_frozen_reasons():
    model, x = build("resnet_basic")
    text = _analyse(model, x).summary()
    assert "prunable conv output channels" in text
    assert "reaches the model output" in text
    assert "graph input" in text


def test_standardised_weights_prune_with_their_gain_and_their_fan_in_is_inexact():
    """NF-ResNet/NFNet (issue 19: dm_nfnet_f0, nfnet_l0, nf_regnet_b0 had nothing prunable):
    ``batch_norm(w.reshape(1, O, -1), weight=gain.view(-1), training=True)``. The gain's dim 0
    follows the filter's, the input channels prune in whole kernel-sized runs of the flattened
    weight, and the statistics over that fan-in make them inexact."""
    model, x = build("weight_standardized")
    g = _analyse(model, x)
    for conv in ("stem", "a", "b"):
        assert np.array_equal(_units_of(g, f"{conv}.gain"), _units_of(g, f"{conv}.weight"))
        assert (_units_of(g, f"{conv}.weight") >= 0).all()
    a_in = _units_of(g, "a.weight", 1)  # a reads the stem's channels
    assert np.array_equal(a_in, _units_of(g, "stem.weight"))
    assert not any(g.units[u].exact for u in a_in)
    assert "statistics over channels" in g.units[int(a_in[0])].note
    c_in = _units_of(g, "c.weight", 1)  # read by a plain conv, after the residual add
    assert np.array_equal(c_in, _units_of(g, "b.weight"))
    # the kernel dims flattened under the input channels are not channels: not reported
    assert not any(p.endswith(("weight", "gain")) and d >= 2
                   for f in g.frozen for p, d, _ in f.dims), g.frozen


def test_pruned_standardised_convs_keep_gain_weight_and_width_attributes_aligned():
    from pruners import prune

    model, x = build("weight_standardized")
    result = prune(model, x, target_flops=0.5)
    assert abs(result.report.flops_ratio - 0.5) <= 0.01
    for conv in ("stem", "a", "b"):
        m = result.model.get_submodule(conv)
        assert m.gain.shape[0] == m.weight.shape[0] == m.out_channels
    assert result.model.a.out_channels < 48
    assert result.model(x).shape == (1, 10, 16, 16)


def test_a_flatten_and_its_inverse_give_back_the_same_channels():
    """reshape (O, I, k, k) -> (1, O, I*k*k) -> (O, I, k, k): the inner dim comes back whole (the
    outer one carries the atoms) instead of all its channels being unified into one."""
    from depgraph.atoms import AtomTable
    from depgraph.rules.registry import RuleContext
    from depgraph.rules.shape import reshape_map

    node = torch.fx.Graph().create_node("call_function", torch.ops.aten.reshape.default)
    ctx = RuleContext(AtomTable(), {}, node=node)
    w = tuple(np.arange(n) + 100 * i for i, n in enumerate((4, 6, 3, 3)))  # 4 * 6 * 3 * 3
    flat = reshape_map(ctx, w, (4, 6, 3, 3), (1, 4, 54))
    assert flat[0] is None and np.array_equal(flat[1], w[0])
    assert np.array_equal(flat[2], np.repeat(w[1], 9))  # each input channel over its 3 x 3
    back = reshape_map(ctx, flat, (1, 4, 54), (4, 6, 3, 3))
    assert np.array_equal(back[0], w[0]) and np.array_equal(back[1], w[1])
    assert back[2] is None and back[3] is None
    assert not ctx.unions and not ctx.frozen and len(ctx.pinned) == 2  # kh, kw: pinned
