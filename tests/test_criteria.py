"""Criteria, iterative pruning, sparsity training and distillation (issue "Train -> prune ->
fine-tune")."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depgraph import analyze, capture
from models import build, snapshot, unchanged
from pruners import (IMPORTANCE, GroupSparsity, Plan, apply_plan, distill_loss, prune,
                     prune_iteratively, run_model, score_units)
from pruners.criteria import ScoreData


def chain():
    """conv(3->8) -> BN -> ReLU -> conv(8->6) -> pool -> linear(6->4): units of 8 and of 6."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4)).eval()


def batches(seed, n=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def raw(name, model, graph, data=None):
    return IMPORTANCE[name](model, graph, ScoreData(data, ce if data else None))


@pytest.fixture(scope="module")
def analysed():
    model = chain()
    return model, analyze(capture(model, torch.randn(1, 3, 8, 8)))


def by_hand(model, graph, data, reduce):
    """Per unit: reduce over batches of sum over the unit's slices of (w * dL/dw)."""
    per_batch = []
    for batch in data:
        model.zero_grad()
        ce(model, batch).backward()
        sums = np.zeros(len(graph.units))
        for u in range(len(graph.units)):
            for s in graph.slices(u):
                t = model.get_parameter(s.param) if s.param not in graph.buffers else None
                if t is None:
                    continue
                idx = torch.tensor(s.indices)
                sums[u] += float((t.detach() * t.grad).index_select(s.dim, idx).sum())
        per_batch.append(sums)
    model.zero_grad(set_to_none=True)
    return reduce(np.array(per_batch))


def test_taylor_covers_every_slice_of_a_unit(analysed):
    model, graph = analysed
    data = batches(0)
    expected = by_hand(copy.deepcopy(model), graph, data, lambda a: np.abs(a.mean(0)))
    assert raw("taylor", model, graph, data) == pytest.approx(expected, rel=1e-6)
    # the consumer columns count: a unit read by the second conv has slices in three tensors
    params = {s.param for s in graph.slices(0)}
    assert {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight"} <= params


def test_hessian_is_the_fisher_diagonal_saliency(analysed):
    model, graph = analysed
    data = batches(1, n=3)

    def per_element(m):  # sum over batches of sum over slices of (w * g)^2, element by element
        out = np.zeros(len(graph.units))
        for batch in data:
            m.zero_grad()
            ce(m, batch).backward()
            for u in range(len(graph.units)):
                for s in graph.slices(u):
                    if s.param in graph.buffers:
                        continue
                    t = m.get_parameter(s.param)
                    idx = torch.tensor(s.indices)
                    out[u] += float(((t.detach() * t.grad) ** 2).index_select(s.dim, idx).sum())
        return out / len(data)

    assert raw("hessian", model, graph, data) == pytest.approx(per_element(copy.deepcopy(model)),
                                                               rel=1e-6)


@pytest.mark.parametrize("name", ["taylor", "hessian"])
def test_data_driven_rankings_follow_the_data(analysed, name):
    model, graph = analysed
    before = snapshot(model)
    a = score_units(model, graph, name, data=batches(2), loss_fn=ce)
    b = score_units(model, graph, name, data=batches(3), loss_fn=ce)
    assert not np.array_equal(np.argsort(a, kind="stable"), np.argsort(b, kind="stable"))
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_scoring_restores_batchnorm_statistics_and_mode():
    model = chain().train()
    graph = analyze(capture(copy.deepcopy(model).eval(), torch.randn(1, 3, 8, 8)))
    stats = model[1].running_mean.clone()
    score_units(model, graph, "taylor", data=batches(4), loss_fn=ce)  # train-mode forwards
    assert torch.equal(model[1].running_mean, stats) and model.training


@pytest.mark.parametrize("name", ["taylor", "hessian"])
def test_data_driven_criterion_without_data_fails_clearly(name):
    model = chain()
    with pytest.raises(ValueError, match=rf"importance='{name}'.*needs data and loss_fn"):
        prune(model, torch.randn(1, 3, 8, 8), target_flops=0.5, importance=name)
    with pytest.raises(ValueError, match="needs loss_fn"):
        prune(model, torch.randn(1, 3, 8, 8), target_flops=0.5, importance=name,
              data=batches(0))


def test_bn_scale_reads_the_coupled_norm_scales():
    model, x = build("resnet_basic")
    graph = analyze(capture(model, x))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.linspace(-1, 2, m.num_features))
    scores = raw("bn_scale", model, graph)
    bns = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for u in range(len(graph.units)):
        gammas = [(s.param, i) for s in graph.slices(u) if s.param in bns for i in s.indices]
        assert gammas, f"unit {u} has no norm scale"
        expected = sum(abs(float(model.get_parameter(p)[i])) for p, i in gammas)
        assert scores[u] == pytest.approx(expected)


def test_fpgm_scores_distance_to_the_other_filters(analysed):
    model, graph = analysed
    w = model[0].weight.detach().double().flatten(1)
    expected = torch.cdist(w, w).sum(1).numpy()
    first = [int(graph.unit_index[("0.weight", 0)][i]) for i in range(8)]
    assert raw("fpgm", model, graph)[first] == pytest.approx(expected)


def test_every_named_criterion_prunes_to_the_target():
    model, x = build("resnet_basic")
    data = [(torch.randn(4, *x.shape[1:]), torch.randint(0, 10, (4,)))]
    for name in sorted(IMPORTANCE):
        extra = dict(data=data, loss_fn=ce) if IMPORTANCE[name].needs_data else {}
        result = prune(model, x, target_flops=0.5, importance=name, **extra)
        assert 0.49 <= result.report.flops_ratio <= 0.5, name
        assert result.report.verify.ok, name


def finetune_steps(data):
    def finetune(model, step):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for batch in data:
            opt.zero_grad()
            ce(model, batch).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return float(ce(model, data[0]))
    return finetune


def test_iterative_plans_compose_and_reapply_to_a_fresh_model():
    data = batches(5, n=3)
    model = chain()
    before = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    result = prune_iteratively(model, x, target_flops=0.5, steps=3, importance="taylor",
                               data=data, loss_fn=ce, finetune=finetune_steps(data))
    assert unchanged(model, before)
    steps = result.report.steps
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.metric is not None for s in steps)
    assert steps[0].flops_ratio > steps[1].flops_ratio > steps[2].flops_ratio
    assert 0.49 <= result.report.flops_ratio <= 0.5
    # the composed plan rebuilds the final architecture; the fine-tuned weights load into it
    fresh = apply_plan(chain(), Plan.from_dict(result.plan.to_dict()))
    fresh.load_state_dict(result.model.state_dict())
    fresh.eval(), result.model.eval()
    assert torch.equal(run_model(fresh, x)[0], run_model(result.model, x)[0])


def test_plan_then_equals_applying_both():
    x = torch.randn(1, 3, 8, 8)
    first = prune(chain(), x, channel_ratio=0.25)
    second = prune(first.model, x, channel_ratio=0.5)
    once = apply_plan(chain(), first.plan.then(second.plan))
    twice = apply_plan(apply_plan(chain(), first.plan), second.plan)
    assert [p.shape for p in once.parameters()] == [p.shape for p in twice.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(once.state_dict().values(),
                                                 twice.state_dict().values()))


def test_group_sparsity_gradient_lands_only_on_prunable_slices():
    model = chain()
    reg = GroupSparsity(model, torch.randn(1, 3, 8, 8), lam=1.0)
    model.zero_grad()
    reg.penalty().backward()
    linear = model[7]
    assert linear.bias.grad is None or torch.all(linear.bias.grad == 0)  # outputs: frozen
    assert torch.all(linear.weight.grad != 0)  # its input columns are units of conv 3
    assert torch.all(model[0].weight.grad != 0) and torch.all(model[1].weight.grad != 0)
    # the penalty is the sum of unit norms over every slice (BN beta and conv bias included)
    sq = np.zeros(len(reg.graph.units))
    for u in range(len(sq)):
        for s in reg.graph.slices(u):
            if s.param not in reg.graph.buffers:
                t = model.get_parameter(s.param).detach()
                sq[u] += float(t.index_select(s.dim, torch.tensor(s.indices)).square().sum())
    assert float(reg.penalty()) == pytest.approx(np.sqrt(sq).sum(), rel=1e-5)


def test_group_sparsity_drives_the_chosen_share_towards_zero():
    model = chain().train()
    reg = GroupSparsity(model, torch.randn(1, 3, 8, 8), lam=0.05, share=0.5)
    data = batches(6, n=4, size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = reg.unit_norms()
    for epoch in range(40):
        for batch in data:
            opt.zero_grad()
            (ce(model, batch) + reg.penalty()).backward()
            opt.step()
    norms = reg.unit_norms()
    for group in reg.graph.groups:
        members = np.asarray(group.units)
        low = np.sort(norms[members])[: len(members) // 2]
        high = np.sort(norms[members])[len(members) // 2:]
        assert low.max() < 0.1 * np.median(start[members])  # the penalised half shrank
        assert high.min() > 5 * low.max()  # and the rest did not follow


def test_distill_loss_is_the_soft_target_kl():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    T = 3.0
    p = F.softmax(t / T, -1)
    expected = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert float(distill_loss(s, t, T)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distill_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss(s, t[:, :5])
