"""ONNX export of a (pruned) model: export, simplify with onnxsim, check with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from depgraph.capture import as_args, plain_outputs
from depgraph.errors import PruningError

from .copying import is_compiled

__all__ = ["export_onnx", "OnnxExport"]


@dataclass(frozen=True)
class OnnxExport:
    """``max_*_diff``: onnxruntime against PyTorch (for int8, the quantized file's)."""

    path: str
    max_abs_diff: float
    max_rel_diff: float
    simplified: bool
    quantized: Optional[str] = None  # "int8" when the file holds the quantized model
    float_max_rel_diff: Optional[float] = None  # the float export's, before quantizing
    # pruners.onnx_passes' rewrites made (pass name -> count), e.g. {"decompose_softmax": 1}
    optimized: dict = field(default_factory=dict)


def export_onnx(model: nn.Module, example_inputs: Any, path: str, *, simplify: bool = True,
                opset: int = 17, outputs: Optional[Callable] = None,
                rtol: float = 1e-4, dynamic_batch: bool = False,
                quantize: Optional[str] = None, calibration: Optional[Iterable[Any]] = None,
                int8_rtol: float = 0.1, optimize: bool = True) -> OnnxExport:
    """Export ``model`` to ``path``, simplify it, and check onnxruntime against PyTorch.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra package.
    ``outputs`` picks the tensors to export and compare (e.g. a detector's predictions).
    ``dynamic_batch`` makes dim 0 of every input and output symbolic, so one file serves
    any batch size. ``optimize`` applies :mod:`pruners.onnx_passes` (equivalent subgraphs
    for ops a runtime runs slowly, e.g. a softmax over a non-last axis, which YOLOv8's head
    takes) before the check; ``result.optimized`` says which rewrites were made.

    ``quantize="int8"`` then writes, at ``path``, onnxruntime's static int8 quantization of
    the checked float model (QDQ, int8 weights per channel, uint8 activations), with ranges
    taken from ``calibration`` (batches passed as ``example_inputs`` is, e.g. 8-32 real
    images), and checks it against PyTorch within ``int8_rtol`` of the largest output value
    on the example inputs. Pruning and int8 compose: prune, fine-tune, then quantize.

    Raises:
        ImportError: the ``onnx`` extra is not installed (``pip install -e ".[onnx]"``).
        ValueError: ``quantize`` is not "int8", or it is and ``calibration`` is missing.
        PruningError: onnxruntime's outputs differ from PyTorch's by more than ``rtol``
            (``int8_rtol`` for the quantized model).
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and calibration is None:
        raise ValueError("quantize='int8' needs calibration= batches (inputs like "
                         "example_inputs) to choose the activation ranges")
    with _without_compile(model) as plain:
        return _export(plain, example_inputs, path, simplify=simplify, opset=opset,
                       outputs=outputs, rtol=rtol, dynamic_batch=dynamic_batch,
                       quantize=quantize, calibration=calibration, int8_rtol=int8_rtol,
                       optimize=optimize)


@contextlib.contextmanager
def _without_compile(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each ``torch.compile`` wrapper in it swapped for the module it wraps,
    put back afterwards: TorchScript's tracer refuses dynamo-optimized code."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if is_compiled(child):
                swapped.append((parent, name, child))
                parent._modules[name] = child._orig_mod
    try:
        yield model._orig_mod if is_compiled(model) else model
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def _export(model: nn.Module, example_inputs: Any, path: str, *, simplify: bool, opset: int,
            outputs: Optional[Callable], rtol: float, dynamic_batch: bool,
            quantize: Optional[str], calibration: Optional[Iterable[Any]],
            int8_rtol: float, optimize: bool) -> OnnxExport:
    """:func:`export_onnx` on a model with no ``torch.compile`` wrapper inside."""
    import onnx
    import onnxruntime  # noqa: F401  (the check needs it: fail before exporting)

    class _Selected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(*args)
            out = outputs(out) if outputs is not None else out
            return tuple(t for t in pytree.tree_leaves(plain_outputs(out))
                         if isinstance(t, torch.Tensor))

    # each use takes fresh copies of the inputs (a forward may normalise them in place)
    flat_inputs = [t for t in pytree.tree_leaves(as_args(example_inputs))
                   if isinstance(t, torch.Tensor)]
    wrapped = _Selected().eval()
    with torch.no_grad():
        expected = [t.numpy() for t in wrapped(*as_args(example_inputs))]
    axes = None
    if dynamic_batch:
        names_in = [f"input_{i}" for i in range(len(flat_inputs))]
        names_out = [f"output_{i}" for i in range(len(expected))]
        axes = {n: {0: "batch"} for n in names_in + names_out}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, as_args(example_inputs), buffer, dynamo=False,
                          opset_version=opset,
                          input_names=names_in if axes else None,
                          output_names=names_out if axes else None, dynamic_axes=axes)
    proto = onnx.load_from_string(buffer.getvalue())
    simplified = False
    if simplify:
        import onnxsim

        candidate, ok = onnxsim.simplify(proto)
        if ok:
            proto, simplified = candidate, True
    optimized = {}
    if optimize:
        from .onnx_passes import optimize as run_passes

        optimized = run_passes(proto)
    onnx.save(proto, path)
    max_abs, max_rel = _compare(path, flat_inputs, expected)
    if max_rel > rtol:
        rewritten = (f" (after the rewrites {optimized}; optimize=False keeps the traced "
                     "graph)" if optimized else "")
        raise PruningError(f"onnxruntime differs from PyTorch on {path}: max relative "
                           f"difference {max_rel:.3g} > {rtol:g}{rewritten}")
    if quantize is None:
        return OnnxExport(path, max_abs, max_rel, simplified, optimized=optimized)
    _quantize_int8(path, calibration)
    q_abs, q_rel = _compare(path, flat_inputs, expected)
    if q_rel > int8_rtol:
        raise PruningError(f"the int8 model at {path} differs from PyTorch by {q_rel:.3g} of the "
                           f"largest output (> int8_rtol={int8_rtol:g}); calibrate on more "
                           f"representative batches or keep float")
    return OnnxExport(path, q_abs, q_rel, simplified, "int8", max_rel, optimized)


def _compare(path: str, flat_inputs: list, expected: list) -> tuple[float, float]:
    """onnxruntime's outputs for ``flat_inputs`` against ``expected``: max abs, max rel."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), flat_inputs)}
    got = session.run(None, feeds)
    max_abs = max_rel = 0.0
    for a, b in zip(expected, got):
        diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.abs(a).max()) if a.size else 0.0, 1e-12))
    return max_abs, max_rel


def _quantize_int8(path: str, calibration: Iterable[Any]) -> None:
    """Replace the float model at ``path`` by its static int8 quantization."""
    import os
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    names = [i.name for i in ort.InferenceSession(
        path, providers=["CPUExecutionProvider"]).get_inputs()]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calibration)

        def get_next(self) -> Optional[dict]:
            batch = next(self._it, None)
            if batch is None:
                return None
            flat = [t for t in pytree.tree_leaves(as_args(batch)) if isinstance(t, torch.Tensor)]
            return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        float_path, prepared = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "prep.onnx")
        os.replace(path, float_path)
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # onnxruntime logs advice through the root logger
        try:
            try:  # the shape inference and fusions onnxruntime recommends before quantizing
                quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
            except Exception:  # noqa: BLE001 - optional: quantize the float model as it is
                prepared = float_path
            quantize_static(prepared, path, Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8)
        except Exception:
            os.replace(float_path, path)  # leave the checked float model, not half a file
            raise
        finally:
            quiet.setLevel(level)
