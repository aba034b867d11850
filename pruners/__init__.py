"""pruners: remove coupled channels found by ``depgraph`` and check the result.

>>> import torch
>>> from depgraph import analyze, capture
>>> from pruners import remove_units, verify
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
...                             torch.nn.Conv2d(8, 4, 3)).eval()
>>> x = torch.randn(1, 3, 16, 16)
>>> graph = analyze(capture(model, x))
>>> verify(model, graph, [0, 5], x).ok
True
"""

from .allocate import InfeasibleTargetError, Target, allocate
from .api import PlannedPruning, PruneOptions, PruneResult, plan_pruning, prune
from .distill import distill_loss
from .export import OnnxExport, export_onnx
from .importance import IMPORTANCE, score_units
from .plan import Plan, apply_plan
from .recovery import RecoveryReport, recover, reestimate_bn
from .repair import find_unprunable_groups, repair_graph
from .report import PruneReport, StepRecord, measure
from .schedule import prune_iteratively
from .sensitivity import GroupCurve, Sensitivity, sensitivity
from .sparsity import GroupSparsity
from .surgery import MODULE_FIXERS, apply_kept, remove_units
from .verify import (VerifyResult, mask_consumers, masked_in_place, run_model, sample_units,
                     verify)

__all__ = ["prune", "PruneResult", "plan_pruning", "PlannedPruning", "PruneOptions",
           "prune_iteratively", "sensitivity", "Sensitivity", "GroupCurve", "recover", "RecoveryReport", "reestimate_bn", "StepRecord", "GroupSparsity", "distill_loss", "IMPORTANCE", "export_onnx", "OnnxExport", "PruneReport", "Plan", "apply_plan", "Target", "allocate",
           "InfeasibleTargetError", "score_units", "measure", "remove_units", "apply_kept",
           "MODULE_FIXERS", "verify", "VerifyResult", "mask_consumers", "masked_in_place",
           "run_model", "sample_units", "find_unprunable_groups", "repair_graph"]
