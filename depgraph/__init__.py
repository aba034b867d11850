"""depgraph: capture a PyTorch model and find the channels that must be pruned together.

>>> import torch
>>> from depgraph import capture, analyze
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
...                             torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
>>> graph = analyze(capture(model, torch.randn(1, 3, 32, 32)))
>>> len(graph.units), len(graph.groups)
(16, 1)
"""

from .analyze import analyze
from .capture import Capture, ValueReads, capture
from .errors import AnalysisError, CaptureError, PruningError, SurgeryError, VerificationError
from .graph import ChannelGraph, FrozenChannels, Group, Slice, Unit

__all__ = [
    "analyze", "capture", "Capture", "ChannelGraph", "FrozenChannels", "Group", "Slice", "Unit",
    "ValueReads",
    "PruningError", "CaptureError", "AnalysisError", "SurgeryError", "VerificationError",
]
