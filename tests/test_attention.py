"""nn.MultiheadAttention prunes: its heads narrow and its embedding shrinks, in every calling
convention torch accepts; the pruned module's forward matches torch's."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from depgraph import analyze, capture
from pruners import prune, remove_units, sample_units, verify
from pruners.attention import PrunedMultiheadAttention, as_pruned


def _swapped(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    twin = copy.deepcopy(mha)
    for attr, value in as_pruned(twin).items():
        setattr(twin, attr, value)
    return twin


CALLS = {  # name -> (module kwargs, call kwargs builder (L, S, B) -> kwargs)
    "plain": ({}, lambda L, S, B: {}),
    "no_weights": ({}, lambda L, S, B: {"need_weights": False}),
    "per_head_weights": ({}, lambda L, S, B: {"average_attn_weights": False}),
    "bool_mask": ({}, lambda L, S, B: {"attn_mask": torch.rand(L, S) > 0.7,
                                       "need_weights": False}),
    "float_mask_3d": ({}, lambda L, S, B: {"attn_mask": torch.randn(B * 4, L, S)}),
    "padding": ({}, lambda L, S, B: {"key_padding_mask": torch.arange(S).expand(B, S) >= S - 2}),
    "causal": ({}, lambda L, S, B: {
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True,
        "need_weights": False}),
    "seq_first": ({"batch_first": False}, lambda L, S, B: {}),
    "bias_kv": ({"add_bias_kv": True}, lambda L, S, B: {"key_padding_mask": torch.zeros(B, S)
                                                        .bool()}),
    "zero_attn": ({"add_zero_attn": True}, lambda L, S, B: {"need_weights": False}),
    "no_bias": ({"bias": False}, lambda L, S, B: {}),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_pruned_forward_matches_torch_at_full_width(name):
    """Before any channel goes, the swapped class computes what torch's forward does."""
    torch.manual_seed(0)
    module_kwargs, call = CALLS[name]
    mha = nn.MultiheadAttention(16, 4, **{"batch_first": True, **module_kwargs}).eval()
    twin = _swapped(mha)
    assert isinstance(twin, PrunedMultiheadAttention) and not twin._qkv_same_embed_dim
    x = torch.randn(2, 6, 16) if mha.batch_first else torch.randn(6, 2, 16)
    kwargs = call(6, 6, 2)
    with torch.no_grad():
        ref, got = mha(x, x, x, **kwargs), twin(x, x, x, **kwargs)
    assert torch.allclose(ref[0], got[0], atol=1e-5)
    assert (ref[1] is None) == (got[1] is None)
    if ref[1] is not None:
        assert torch.allclose(ref[1], got[1], atol=1e-6)


def test_pruned_forward_matches_torch_unbatched_and_cross():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True).eval()
    twin = _swapped(mha)
    q, k, v = torch.randn(5, 16), torch.randn(7, 12), torch.randn(7, 10)
    with torch.no_grad():
        for args in ((q, k, v), (q[None], k[None], v[None])):
            ref, got = mha(*args), twin(*args)
            assert torch.allclose(ref[0], got[0], atol=1e-5)
            assert torch.allclose(ref[1], got[1], atol=1e-6)


class Block(nn.Module):
    """A pre-norm transformer block around one nn.MultiheadAttention call."""

    def __init__(self, call: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        module_kwargs, self.make = CALLS[call]
        self.batch_first = module_kwargs.get("batch_first", True)
        self.embed = nn.Linear(8, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, **{"batch_first": True, **module_kwargs})
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.embed(x)
        if not self.batch_first:
            t = t.transpose(0, 1)
        h = self.norm(t)
        L, B = (h.shape[1], h.shape[0]) if self.batch_first else (h.shape[0], h.shape[1])
        torch.manual_seed(0)  # the masks: the same in every copy the check runs
        t = t + self.attn(h, h, h, **self.make(L, L, B))[0]
        return self.head(t)


def _attention_units(graph, prefix: str) -> list[int]:
    """Units that remove rows of the attention's input projection (its heads' channels)."""
    return sorted({int(u) for (param, dim), ids in graph.unit_index.items()
                   if param.startswith(prefix) and param.endswith("proj_weight") and dim == 0
                   for u in ids.tolist() if u >= 0})


# add_zero_attn appends zeros whose shape torch's forward bakes from embed_dim: analysis
# freezes those heads (test below), so that call is not among these
@pytest.mark.parametrize("name", sorted(set(CALLS) - {"zero_attn"}))
def test_attention_heads_prune_zero_equivalently(name):
    """Heads' channels are prunable units, and removing any set of units equals zeroing it."""
    torch.manual_seed(0)
    model, x = Block(name).eval(), torch.randn(2, 6, 8)
    graph = analyze(capture(model, x))
    heads = _attention_units(graph, "attn.")
    assert heads, f"{name}: the attention's projections have no prunable channels"
    assert all(graph.units[u].exact for u in heads), "the kept scale makes heads exact"
    assert verify(model, graph, heads[::2], x, rtol=1e-4).ok
    assert not any("MultiheadAttention" in f.reason for f in graph.frozen)
    for seed in range(3):
        units = sample_units(graph, 0.5, np.random.default_rng(seed))
        result = verify(model, graph, units, x, rtol=1e-4)
        assert result.ok, f"{name} seed {seed}: {result}"
    pruned = remove_units(copy.deepcopy(model), graph, heads[: len(heads) // 2])
    assert isinstance(pruned.attn, PrunedMultiheadAttention)
    assert pruned.attn.head_dim < model.attn.head_dim
    assert pruned.attn.scale == model.attn.head_dim ** -0.5


def test_transformer_encoder_prunes_past_its_fused_path():
    """nn.TransformerEncoder runs a fused kernel in eval under no_grad; the pruned layers,
    whose heads no longer match ``embed_dim``, must not take it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(layer, 2,
                                                                  enable_nested_tensor=False))
    model.eval()
    x = torch.randn(2, 6, 8)
    result = prune(model, x, target_flops=0.5)
    attn = result.model[1].layers[0].self_attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert attn.in_proj_weight.shape[0] < 3 * 32
    with torch.no_grad():
        out = result.model(x)
    assert out.shape == (2, 6, 32) and torch.isfinite(out).all()
    assert result.report.flops_ratio <= 0.51


def test_cross_attention_costs_what_its_pruned_heads_cost():
    """nn.Transformer's decoder attends from 7 target tokens to 10 memory tokens: torch splits
    the packed in_proj_weight into q and k/v rows, so those linears name no parameter. Their
    cost had stayed at full width in the cost model, and 0.5 landed at 0.39."""
    from depgraph.cost import cost_model
    from pruners import plan_pruning

    torch.manual_seed(0)
    model = nn.Transformer(64, 4, 2, 2, 128, batch_first=True).eval()
    x = (torch.randn(2, 10, 64), torch.randn(2, 7, 64))
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    cross = result.model.decoder.layers[0].multihead_attn
    assert cross.in_proj_weight.shape[0] < 3 * 64
    planned = plan_pruning(model, x, target_flops=0.5)
    costs = cost_model(planned.graph)
    predicted = costs.evaluate(costs.kept_after(planned.graph, set(planned.removed)))[0]
    assert predicted / costs.full()[0] == pytest.approx(result.report.flops_ratio, abs=0.005)


def test_zero_attention_heads_freeze_with_a_reason_and_the_rest_prunes():
    torch.manual_seed(0)
    model, x = Block("zero_attn").eval(), torch.randn(2, 6, 8)
    graph = analyze(capture(model, x))
    assert not _attention_units(graph, "attn.")
    assert any("cat" in f.reason for f in graph.frozen)
    result = prune(model, x, target_flops=0.6)
    assert result.report.flops_ratio <= 0.61
    assert result.model.attn.embed_dim < 32


def test_pruned_attention_reprunes_and_keeps_the_first_scale():
    """A pruned model pruned again (an iterative schedule) keeps the unpruned scale, and its
    re-captured forward is analysed and pruned like torch's."""
    torch.manual_seed(0)
    model, x = Block("no_weights").eval(), torch.randn(2, 6, 8)
    graph = analyze(capture(model, x))
    first = remove_units(copy.deepcopy(model), graph, _attention_units(graph, "attn.")[:2])
    again = analyze(capture(first, x))
    heads = _attention_units(again, "attn.")
    assert len(heads) == first.attn.head_dim
    for seed in range(3):
        units = sample_units(again, 0.5, np.random.default_rng(seed))
        assert verify(first, again, units, x, rtol=1e-4).ok
    second = remove_units(copy.deepcopy(first), again, heads[:2])
    assert second.attn.head_dim == first.attn.head_dim - 2 == model.attn.head_dim - 4
    assert second.attn.scale == model.attn.head_dim ** -0.5


def test_heads_prune_at_batch_one_beside_a_class_token():
    """At batch 1 the heads' view splits the channels beside a size-1 dim that a class token's
    broadcast gave atoms; the channels, not that dim, carry the heads."""
    from models import build
    model, x = build("class_token_vit")
    graph = analyze(capture(model, x))
    for i in range(2):
        heads = _attention_units(graph, f"attn.{i}.")
        assert len(heads) == model.attn[i].head_dim
        assert all(graph.units[u].exact for u in heads)
        assert verify(model, graph, heads[1::2], x, rtol=1e-4).ok
