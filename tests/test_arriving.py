"""Models as they arrive (issue "Models as they arrive"): TorchScript parts, pruning masks,
parametrizations, recurrent layers, embeddings, pixel shuffle and dead channels.

The MODELS entries among them (scripted_child, pixel_shuffle, embedding_lm, recurrent,
dead_slice) also run through every MODELS test: zero-equivalence on random and single units,
the cost model against FlopCounterMode, and 50% FLOPs within 1 point.
"""

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as unstructured
from torch import nn
from torch.nn.utils import parametrize

from depgraph import analyze, capture
from models import REPARAM, build, shares_memory, snapshot, unchanged
from pruners import Plan, apply_plan, prune, run_model


def _build(name, seed=0):
    torch.manual_seed(seed)
    model, x = REPARAM[name]()
    return model.eval(), x


@pytest.mark.parametrize("name", ["pruning_masks", "weight_norms"])
def test_reparametrized_models_prune_exactly_to_half(name):
    model, x = _build(name)
    before = snapshot(model)
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    assert result.report.verify is not None and result.report.verify.ok  # zero-equivalence
    assert unchanged(model, before)
    assert not shares_memory(result.model, model)
    assert [t.shape for t in run_model(result.model, x)] == [t.shape for t in run_model(model, x)]


def test_masks_keep_the_unstructured_sparsity_of_the_kept_channels():
    model, x = _build("pruning_masks")
    result = prune(model, x, target_flops=0.5)
    small = result.model
    for i in (1, 3):
        kept = result.plan.kept[f"{i}.weight"]
        expect_mask, expect_orig = model[i].weight_mask, model[i].weight_orig
        for dim, idx in sorted(kept.items()):
            expect_mask = expect_mask.index_select(dim, torch.tensor(idx))
            expect_orig = expect_orig.index_select(dim, torch.tensor(idx))
        assert torch.equal(small[i].weight_mask, expect_mask)
        assert torch.equal(small[i].weight_orig.detach(), expect_orig.detach())
        assert unstructured.is_pruned(small[i])
    assert any("pruning mask on '3.weight': 50.0% zeros before" in n for n in result.report.notes)
    unstructured.remove(small[3], "weight")  # the tutorial's last step still works
    assert not unstructured.is_pruned(small[3]) and isinstance(small[3].weight, torch.nn.Parameter)


def test_parametrizations_come_back_on_the_pruned_weights():
    model, x = _build("weight_norms")
    small = prune(model, x, target_flops=0.5).model
    assert parametrize.is_parametrized(small[1], "weight")
    g, v = small[1].parametrizations.weight.original0, small[1].parametrizations.weight.original1
    assert g.shape[0] == v.shape[0] == small[1].out_channels
    assert small[3].weight_g.shape[0] == small[3].weight_v.shape[0] == small[3].out_channels


def test_spectral_norm_units_are_inexact_and_recomputed():
    model, x = _build("spectral_norm")
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    notes = {u.note for u in result.graph.units if not u.exact}
    assert any("spectral norm of '3.weight'" in (n or "") for n in notes)
    assert any("spectral norm of '1.weight'" in (n or "") for n in notes)
    layer, old = result.model[3], result.model[1]
    assert parametrize.is_parametrized(layer, "weight")
    assert layer.parametrizations.weight.original.shape == layer.weight.shape
    # old-style: weight_orig is the sliced original, u has its pruned length
    assert old.weight_orig.shape[0] == old.weight_u.shape[0] == old.out_channels < 48
    assert old.weight_v.shape[0] == old.weight_orig[0].numel()
    result.model(x)  # eval mode: the stored u, v give sigma, with no power iteration
    for w, rel in ((layer.weight, 0.1), (old.weight, 0.03)):  # old: u, v re-converged
        sigma = torch.linalg.matrix_norm(w.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, rel=rel)  # still spectrally normalised


@pytest.mark.parametrize("name", ["pruning_masks", "weight_norms", "spectral_norm"])
def test_plans_reapply_to_fresh_reparametrized_models(name):
    model, x = _build(name)
    result = prune(model, x, target_flops=0.5)
    fresh = apply_plan(_build(name)[0], Plan.from_dict(result.plan.to_dict()))
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in result.model.parameters()]
    fresh.load_state_dict(result.model.state_dict())
    assert torch.allclose(run_model(fresh, x)[0], run_model(result.model, x)[0], atol=1e-6)


def test_unknown_parametrization_is_refused_by_name():
    from depgraph import PruningError

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model, x = build("vgg")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    parametrize.register_parametrization(conv, "weight", Scale())
    before = snapshot(model)
    with pytest.raises(PruningError, match="parametrization Scale.*remove_parametrizations"):
        prune(model, x, target_flops=0.5)
    assert unchanged(model, before)


def test_a_scripted_child_freezes_only_what_touches_it():
    model, x = build("scripted_child")
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    inner = dict(result.model.mid.named_parameters())["0.weight"]
    assert inner.shape == dict(model.mid.named_parameters())["0.weight"].shape  # compiled: kept
    assert result.model.c.out_channels < 64  # the eager layers after it are pruned
    assert any("'mid' is TorchScript" in f.reason for f in result.report.frozen)


def test_pixel_shuffle_prunes_its_producer_in_blocks_of_r_squared():
    model, x = build("pixel_shuffle")
    graph = analyze(capture(model, x))
    rows = graph.unit_index[("a.weight", 0)]
    assert (rows >= 0).all() and len(np.unique(rows)) == 64 // 4
    assert all(len(set(rows[i:i + 4])) == 1 for i in range(0, 64, 4))  # r*r = 4 per channel
    result = prune(model, x, target_flops=0.5)
    assert result.model.a.out_channels % 4 == 0 and result.model.b.in_channels * 4 == \
        result.model.a.out_channels


def test_embedding_dim_prunes_with_its_tied_head_and_position_table():
    model, x = build("embedding_lm")
    result = prune(model, x, target_flops=0.5)
    small = result.model
    assert small.head.weight is small.tokens.weight  # still tied
    assert small.tokens.embedding_dim == small.position.shape[-1] < 64
    assert small.tokens.num_embeddings == 50  # the vocabulary is never pruned


def test_recurrent_layers_keep_one_hidden_size_and_prune_exactly():
    model, x = build("recurrent")
    result = prune(model, x, target_flops=0.5)
    small = result.model
    assert result.report.verify.ok
    lstm = small.lstm
    assert lstm.hidden_size < 48 and lstm.weight_ih_l1.shape[1] == 2 * lstm.hidden_size
    assert lstm.weight_hh_l0_reverse.shape == lstm.weight_hh_l0.shape  # both directions
    assert small.proj.hidden_size > small.proj.proj_size  # torch needs proj_size < hidden_size
    graph = result.graph
    assert (graph.unit_index[("proj.weight_hr_l0", 0)] >= 0).all()  # projected units prunable
    assert small.gru.hidden_size == small.h0.shape[-1]  # the learned initial state is sliced
    out = run_model(small, torch.randn(3, 9, 8))[0]  # other batch and sequence lengths
    assert out.shape == (3, 5)


def test_dead_channels_go_for_free_even_at_full_flops():
    model, x = build("dead_slice")
    result = prune(model, x, target_flops=1.0)
    assert result.model.a.out_channels == 24  # the 16 channels past x[:, :24] are gone
    assert result.report.flops_ratio < 1.0
    assert result.report.verify.ok and result.report.verify.max_abs_diff == 0
    assert any("removed 16 dead channels" in n for n in result.report.notes)


def test_a_group_statistic_expanded_back_prunes_its_channels_inexactly():
    """EvoNorm (timm's regnetz_*_evos, resnetv2_*_evos): the group std, expanded back over the
    channels it was taken over, divides them; those channels had frozen as 'combined with a
    tensor of fixed size'."""
    from models import evonorm_cnn

    torch.manual_seed(0)
    model, x = evonorm_cnn()
    model.eval()
    graph = analyze(capture(model, x))
    assert not graph.frozen or all("fixed size" not in f.reason for f in graph.frozen)
    widths = {key: ids for key, ids in graph.unit_index.items() if key[1] == 0}
    assert (widths[("0.weight", 0)] >= 0).all() and (widths[("2.weight", 0)] >= 0).all()
    assert not any(u.exact for u in graph.units)  # a statistic over the pruned channels
    result = prune(model, x, target_flops=0.5)
    assert 0.49 <= result.report.flops_ratio <= 0.5
    small = result.model
    assert small[0].out_channels % 4 == 0 and small[2].out_channels % 4 == 0  # groups equal
    assert small[1].v.shape[0] == small[0].out_channels
    assert small(x).shape == model(x).shape


@pytest.mark.parametrize("style", ["parametrize", "old"])
def test_a_spectral_norm_layer_the_plan_leaves_whole_keeps_its_weight(style):
    """Re-applied, its norm keeps the stored singular vectors, so the layer computes what it
    did (and the working copy's weight, which its pruned copy starts on, is not written)."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    last = nn.Conv2d(16, 4, 1)
    last = spectral_norm(last) if style == "parametrize" else torch.nn.utils.spectral_norm(last)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          last).eval()
    x = torch.randn(1, 3, 16, 16)
    result = prune(model, x, channel_ratio=0.5, protect=["4"])
    assert result.model[0].out_channels == 8 and result.model[4].in_channels == 16
    assert result.report.verify is not None and result.report.verify.ok  # exact group compared
    with torch.no_grad():
        model(x), result.model(x)  # old style computes its weight in a forward pre-hook
    torch.testing.assert_close(result.model[4].weight, model[4].weight, rtol=0, atol=0)


def _channels_last(t):
    from pruners.surgery import CHANNELS_LAST

    return t.to(memory_format=CHANNELS_LAST[t.dim()]) if t.dim() in CHANNELS_LAST else t


def _volume_net():
    return nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
                         nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 4, 1)), \
        torch.randn(1, 2, 6, 6, 6)


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenet_v2", "volume"])
def test_a_channels_last_model_stays_channels_last(name):
    """Eager CPU convs run fastest on channels-last weights and activations; a pruned weight
    that came back contiguous would make every pruned conv convert layouts again."""
    from pruners.surgery import memory_format

    torch.manual_seed(0)
    model, x = _volume_net() if name == "volume" else build(name)
    model.eval()
    inputs = x if isinstance(x, tuple) else (x,)
    for p in model.parameters():
        p.data = _channels_last(p.data)
    inputs = tuple(_channels_last(t) for t in inputs)
    formats = {n: memory_format(p) for n, p in model.named_parameters()}
    wide = [n for n, f in formats.items() if f != torch.contiguous_format]
    assert wide
    torch.manual_seed(0)
    plain, _ = _volume_net() if name == "volume" else build(name)
    plain.eval()
    contiguous = tuple(t.contiguous() for t in inputs)
    results = {}
    for recover in (None, "reconstruct"):
        result = results[recover] = prune(model, inputs, target_flops=0.5, recover=recover,
                                          calibration=[inputs] if recover else None)
        assert result.report.verify is not None and result.report.verify.ok
        pruned = dict(result.model.named_parameters())
        assert [n for n in wide if memory_format(pruned[n]) != formats[n]] == []
    # the plan computes the same on the model in either format
    result = results[None]
    small = apply_plan(plain, result.plan)
    for a, b in zip(run_model(result.model, inputs), run_model(small, contiguous)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
