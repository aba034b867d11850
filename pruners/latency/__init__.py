"""Hardware-aware pruning: measured latency tables, predicted plan latency, trusted timings.

- :mod:`.timing`: the timer, interleaved rounds with the spread checked, the environment.
- :mod:`.table`: single-layer times by shape, backend, device and threads, cached as JSON.
- :mod:`.model`: a plan's predicted latency (sum over layers, separable in their widths).
- :mod:`.staircase`: ``round_to="auto"`` from where a layer's time steps up, and from
  whole pruned models timed at each multiple.

``prune(..., target_latency=0.5)`` and ``round_to="auto"`` use them; see ``pruners.api``.
"""

from .model import (InContext, LatencyModel, LayerCall, latency_model, layer_calls,
                    time_in_context)
from .staircase import (MODEL_CANDIDATES, RoundTo, auto_round_to, pick_by_model, pick_round_to,
                        staircase)
from .table import LatencyTable, LayerShape, default_cache_path, shape_of
from .timing import (BACKENDS, Measurement, ModelCall, Runners, Timer, Timing, WallTimer,
                     dtype_name, environment, graph_runner, installed, interleave, machine_id,
                     measure_models, model_runner, onnx_runner, openvino_config,
                     openvino_request, ort_options, page_faults, require, steady, time_call)

__all__ = ["BACKENDS", "InContext", "LatencyModel", "LayerCall", "latency_model", "layer_calls",
           "RoundTo", "auto_round_to", "pick_round_to", "pick_by_model", "MODEL_CANDIDATES",
           "staircase", "LatencyTable", "LayerShape", "default_cache_path", "shape_of",
           "Measurement", "ModelCall", "Runners", "Timer", "Timing", "WallTimer", "dtype_name",
           "environment", "graph_runner", "installed", "interleave", "machine_id",
           "measure_models", "model_runner", "onnx_runner", "openvino_config", "openvino_request",
           "ort_options", "page_faults", "require", "steady", "time_call", "time_in_context"]
