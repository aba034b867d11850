"""ONNX export of a (pruned) model: export, simplify with onnxsim, check with onnxruntime."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from depgraph.capture import as_args
from depgraph.errors import PruningError

__all__ = ["export_onnx", "OnnxExport"]


@dataclass(frozen=True)
class OnnxExport:
    path: str
    max_abs_diff: float
    max_rel_diff: float
    simplified: bool


def export_onnx(model: nn.Module, example_inputs: Any, path: str, *, simplify: bool = True,
                opset: int = 17, outputs: Optional[Callable] = None,
                rtol: float = 1e-4, dynamic_batch: bool = False) -> OnnxExport:
    """Export ``model`` to ``path``, simplify it, and check onnxruntime against PyTorch.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra package.
    ``outputs`` picks the tensors to export and compare (e.g. a detector's predictions).
    ``dynamic_batch`` makes dim 0 of every input and output symbolic, so one file serves
    any batch size.

    Raises:
        ImportError: the ``onnx`` extra is not installed (``pip install -e ".[onnx]"``).
        PruningError: onnxruntime's outputs differ from PyTorch's by more than ``rtol``.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    class _Selected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(*args)
            out = outputs(out) if outputs is not None else out
            return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    args = as_args(example_inputs)
    wrapped = _Selected().eval()
    with torch.no_grad():
        expected = [t.numpy() for t in wrapped(*args)]
    flat_inputs = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    axes = None
    if dynamic_batch:
        names_in = [f"input_{i}" for i in range(len(flat_inputs))]
        names_out = [f"output_{i}" for i in range(len(expected))]
        axes = {n: {0: "batch"} for n in names_in + names_out}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, args, buffer, dynamo=False, opset_version=opset,
                          input_names=names_in if axes else None,
                          output_names=names_out if axes else None, dynamic_axes=axes)
    proto = onnx.load_from_string(buffer.getvalue())
    simplified = False
    if simplify:
        import onnxsim

        candidate, ok = onnxsim.simplify(proto)
        if ok:
            proto, simplified = candidate, True
    onnx.save(proto, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), flat_inputs)}
    got = session.run(None, feeds)
    max_abs = max_rel = 0.0
    for a, b in zip(expected, got):
        diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.abs(a).max()) if a.size else 0.0, 1e-12))
    if max_rel > rtol:
        raise PruningError(f"onnxruntime differs from PyTorch on {path}: max relative "
                           f"difference {max_rel:.3g} > {rtol:g}")
    return OnnxExport(path, max_abs, max_rel, simplified)
