"""Recovery without training (``pruners.recover``): cases whose answer is known."""

import copy

import pytest
import torch
from torch import nn

from pruners import Plan, apply_plan, prune, recover, reestimate_bn
from pruners.recovery import refit


def _constant_channels_model() -> nn.Sequential:
    """conv0's channels 0-3 are constant (zero weight, a bias): the consumer conv1 sees them
    as constants, so their contribution is exactly a bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[0].bias[:4] = torch.tensor([0.5, 1.0, 2.0, 3.0])
    return model.eval()


def _drop_first_four(model: nn.Module, conv0: str = "0", conv1: str = "2") -> tuple[nn.Module, Plan]:
    keep = [4, 5, 6, 7]
    kept = {f"{conv0}.weight": {0: keep}, f"{conv0}.bias": {0: keep}, f"{conv1}.weight": {1: keep}}
    plan = Plan(kept, {k: tuple(dict(model.named_parameters())[k].shape) for k in kept})
    return apply_plan(copy.deepcopy(model), plan), plan


def _batches(n=3, shape=(4, 3, 6, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_bias_compensation_makes_constant_channels_exact():
    dense = _constant_channels_model()
    pruned, plan = _drop_first_four(dense)
    x = _batches()
    assert not torch.allclose(pruned(x[0]), dense(x[0]), atol=1e-3)
    report = recover(dense, pruned, plan, x, "bias")
    for b in x + _batches(seed=7):  # held-out batches too: the shift is exact, not fitted
        torch.testing.assert_close(pruned(b), dense(b), rtol=1e-5, atol=1e-5)
    assert report.steps[0].error_after < 1e-10 < report.steps[0].error_before


def test_bias_goes_into_the_following_batchnorm_or_is_added():
    torch.manual_seed(0)
    with_bn = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1, bias=False),
                            nn.BatchNorm2d(5)).eval()
    no_bn = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1, bias=False)).eval()
    for model in (with_bn, no_bn):
        with torch.no_grad():
            model[0].weight[:4] = 0
            model[0].bias[:4] = 1.5
        pruned, plan = _drop_first_four(model)
        report = recover(model, pruned, plan, _batches(), "bias")
        b = _batches(seed=9)[0]
        torch.testing.assert_close(pruned(b), model(b), rtol=1e-5, atol=1e-5)
        changed = report.steps[0].changed[0]
        if model is with_bn:
            assert "running_mean" in changed and pruned[2].bias is None
        else:
            assert "bias added" in changed and pruned[2].bias is not None


def test_reconstruction_with_all_channels_kept_returns_the_original_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1)).eval()
    plan = Plan({"2.weight": {1: list(range(6))}}, {"2.weight": (4, 6, 3, 3)})
    for ridge in (1e-6, None):
        pruned = copy.deepcopy(model)
        recover(model, pruned, plan, _batches(shape=(4, 3, 8, 8)), "reconstruct", ridge=ridge)
        torch.testing.assert_close(pruned[2].weight, model[2].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pruned[2].bias, model[2].bias, rtol=1e-4, atol=1e-5)


def test_reconstruction_of_a_linear_chain_is_the_least_squares_solution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    keep = [0, 2, 3, 5, 8, 9, 11]
    kept = {"0.weight": {0: keep}, "0.bias": {0: keep}, "2.weight": {1: keep}}
    plan = Plan(kept, {k: tuple(dict(model.named_parameters())[k].shape) for k in kept})
    pruned = apply_plan(copy.deepcopy(model), plan)
    x = _batches(n=4, shape=(64, 6))
    report = recover(model, pruned, plan, x, "reconstruct", ridge=1e-9)
    # the same fit by hand: hidden activations of the kept units against the dense output
    h = torch.cat([torch.relu(model[0](b))[:, keep] for b in x]).double()
    y = torch.cat([model(b) for b in x]).double()
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(pruned[2].weight.double(), solution[:-1].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned[2].bias.double(), solution[-1], rtol=1e-4, atol=1e-5)
    assert report.steps[0].error_after < report.steps[0].error_before


def test_refit_keeps_the_weights_when_nothing_generalises():
    """Pure-noise targets: no ridge beats the current weights on held-out positions."""
    layer = nn.Linear(8, 3)
    before = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 8, generator=g) for _ in range(4)]
    ys = [layer(x).detach() + 100 * torch.randn(32, 3, generator=g) for x in xs]
    _, chosen = refit(layer, xs, ys)
    assert chosen is None and torch.equal(layer.weight, before)


def test_bn_reestimation_matches_the_statistics_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    x = _batches(n=3, shape=(5, 3, 7, 7))
    names = reestimate_bn(model, x)
    outs = [model[0](b).detach() for b in x]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs]).mean(0)
    assert names == ["1"]
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert not model.training and not model[1].training and model[1].momentum == 0.1


def test_prune_with_recovery_leaves_the_users_model_unchanged_and_helps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    x = _batches(n=6, shape=(8, 3, 12, 12))
    reestimate_bn(model, x)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = prune(model, x[0], target_flops=0.5)
    result = prune(model, x[0], target_flops=0.5, recover=("bn", "reconstruct", "bias"),
                   calibration=x)
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    steps = result.report.recovery.steps
    assert [s.method for s in steps] == ["bias", "reconstruct", "bn"]  # the fixed order
    assert steps[-1].error_after < steps[0].error_before
    assert "recover bias" in str(result.report) and result.report.to_dict()["recovery"]
    assert plain.report.recovery is None
    assert result.report.flops_ratio == pytest.approx(plain.report.flops_ratio)


def test_nothing_to_fix_is_said_not_failed():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    plan = Plan({}, {})
    report = recover(model, copy.deepcopy(model), plan, _batches(shape=(3, 4)),
                     ("bias", "reconstruct", "bn"))
    notes = {s.method: s.skipped for s in report.steps}
    assert any("nothing to fix" in n for n in notes["bias"] + notes["reconstruct"])
    assert notes["bn"] == ["the model has no BatchNorm with running statistics"]


def test_bad_arguments_and_failure_leave_the_pruned_model_as_it_was():
    dense = _constant_channels_model()
    pruned, plan = _drop_first_four(dense)
    with pytest.raises(ValueError, match="needs calibration"):
        prune(dense, _batches()[0], target_flops=0.5, recover="bn")
    with pytest.raises(ValueError, match="unknown recovery method"):
        recover(dense, pruned, plan, _batches(), "magic")
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    bad = _batches(n=2) + [torch.randn(2, 7, 6, 6)]  # the last batch does not fit the model
    with pytest.raises(RuntimeError):
        recover(dense, pruned, plan, bad, ("bias", "reconstruct"))
    after = pruned.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_shared_layer_is_skipped_with_a_reason():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.dw(self.a(x))
            return self.head(self.b(self.b(x)))

    model = Shared().eval()
    x = _batches(shape=(2, 3, 8, 8))
    result = prune(model, x[0], target_flops=0.6, recover="reconstruct", calibration=x)
    step = result.report.recovery.steps[0]
    assert step.skipped == ["b: called 2 times per forward (a shared module)"]
    assert step.changed and step.error_after < step.error_before


def test_the_dual_solve_equals_the_primal_one():
    """Fewer positions than columns (deep layers on small images) solve an n x n system; the
    answer must be the same ridge solution as the D x D normal equations give."""
    from pruners.recovery import _LeastSquares

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 50, generator=g), torch.randn(30, 4, generator=g)
    w0 = torch.randn(50, 4, generator=g).double()
    dual, primal = _LeastSquares(50), _LeastSquares(50)
    dual.add(x, y)
    primal.add(torch.empty(0, 50), torch.empty(0, 4))
    primal.a, primal.b = x.double().T @ x.double(), x.double().T @ y.double()
    primal.n = 30
    assert dual.a is None and primal.a is not None
    torch.testing.assert_close(dual.solve(0.5, w0), primal.solve(0.5, w0), rtol=1e-6, atol=1e-8)
    w = torch.randn(50, 4, generator=g).double()
    assert dual.loss(w) - dual.loss(w0) == pytest.approx(primal.loss(w) - primal.loss(w0))
    both = dual.merged(primal)
    assert both.a is not None and both.n == 60


def test_inplace_pruning_keeps_the_recovered_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[0].bias[:4] = 1.5
    x = _batches()
    copy_result = prune(copy.deepcopy(model), x[0], channel_ratio=0.5, recover="bias",
                        calibration=x)
    result = prune(model, x[0], channel_ratio=0.5, recover="bias", calibration=x, inplace=True)
    assert result.model is model and model[2].bias is not None  # the bias recovery added
    torch.testing.assert_close(model(x[0]), copy_result.model(x[0]))
