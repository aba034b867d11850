"""Sensitivity scans and sensitivity-based allocation (issue "Look before you cut")."""

import pytest
import torch
from torch import nn

from pruners import Sensitivity, prune, sensitivity


class TwoBranches(nn.Module):
    """Two equal branches; the metric below reads only branch ``a``'s output."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a2(torch.relu(self.a1(x))), self.b2(torch.relu(self.b1(x)))], 1)


def _setup():
    torch.manual_seed(0)
    model = TwoBranches().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)[:, :4].clone()
    calls = []

    def evaluate(m):
        calls.append(1)
        with torch.no_grad():
            return -float((m(x)[:, :4] - reference).pow(2).mean())

    return model, x, evaluate, calls


def test_scan_is_one_evaluate_per_group_and_ratio_and_leaves_the_model_alone():
    model, x, evaluate, calls = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = sensitivity(model, x, evaluate=evaluate, ratios=(0.25, 0.5, 0.75), progress=False)
    assert len(table.curves) == 2 and len(calls) == 2 * 3 + 1  # + the unpruned model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    a = next(c for c in table.curves if c.layers[0] == "a1")
    b = next(c for c in table.curves if c.layers[0] == "b1")
    assert table.baseline == 0.0 and all(m == 0.0 for m in b.metric)  # b is irrelevant
    assert a.metric[0] < 0 and a.metric[-1] < a.metric[0]  # a hurts, more when cut deeper
    assert a.removed == [4, 8, 12] and 0 < a.flops_removed[0] < a.flops_removed[-1] < 0.5


def test_sensitivity_allocation_spares_the_group_the_metric_needs(tmp_path):
    model, x, evaluate, _ = _setup()
    table = sensitivity(model, x, evaluate=evaluate, progress=False)
    path = tmp_path / "sens.json"
    table.save(str(path))
    loaded = Sensitivity.load(str(path))
    assert loaded.to_dict() == table.to_dict()
    result = prune(model, x, target_flops=0.6, strategy="sensitivity", sensitivity=loaded)
    assert 0.59 <= result.report.flops_ratio <= 0.6
    widths = {l.module: l.out_after for l in result.report.layers}
    assert widths["a1"] > widths["b1"]  # a keeps more of its channels than irrelevant b
    assert any("sensitivity allocation predicts metric" in n for n in result.report.notes)
    # one channel of a branch is 3.1% of the FLOPs here: a target that pairs of them reach
    rounded = prune(model, x, target_flops=0.57, strategy="sensitivity", sensitivity=loaded,
                    round_to=2, max_ratio=0.75)
    assert 0.56 <= rounded.report.flops_ratio <= 0.57
    assert all(l.out_after % 2 == 0 and l.out_after >= l.out_before // 4
               for l in rounded.report.layers if l.module in ("a1", "b1"))
    plain = prune(model, x, target_flops=0.6)
    plain_widths = {l.module: l.out_after for l in plain.report.layers}
    assert plain_widths["a1"] - plain_widths["b1"] < widths["a1"] - widths["b1"]


def test_groups_limit_the_scan_and_bad_arguments_say_what_to_pass():
    model, x, evaluate, calls = _setup()
    table = sensitivity(model, x, evaluate=evaluate, ratios=(0.5,), groups=["b*"],
                        progress=False)
    assert [c.layers[0] for c in table.curves] == ["b1"] and len(calls) == 2
    with pytest.raises(ValueError, match="needs sensitivity="):
        prune(model, x, target_flops=0.5, strategy="sensitivity")
    with pytest.raises(ValueError, match="ratios must be in"):
        sensitivity(model, x, evaluate=evaluate, ratios=(0.0, 1.0), progress=False)
    with pytest.raises(Exception, match="not a sensitivity table"):
        Sensitivity.from_dict({"type": "other"})


def test_the_table_as_a_dataframe():
    pytest.importorskip("pandas")
    model, x, evaluate, _ = _setup()
    df = sensitivity(model, x, evaluate=evaluate, ratios=(0.5, 0.75), progress=False).to_dataframe()
    assert len(df) == 4 and set(df["layer"]) == {"a1", "b1"}
    assert list(df.columns) == ["group", "layer", "units", "ratio", "removed", "metric",
                                "flops_removed"]


def test_inexact_units_are_evaluated_on_the_pruned_model():
    """LayerNorm statistics change when its channels go: zeroing is not pruning there, so the
    scan evaluates the real pruned copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    widths = []

    def evaluate(m):
        widths.append(m[0].out_features)
        with torch.no_grad():
            return -float(m(x).pow(2).mean())

    table = sensitivity(model, x, evaluate=evaluate, ratios=(0.25, 0.5), progress=False)
    assert widths == [16, 12, 8] and model[0].out_features == 16
    assert table.curves[0].removed == [4, 8]
