"""Rewrites of an exported ONNX graph that make runtimes faster without changing its results.

A pruned model turns removed FLOPs into time only where the rest of its forward does not
stay as slow as before: a cost no channel removal shrinks sets a ceiling on the speedup. Each
pass here removes one such cost that a runtime's kernel adds, replacing an op by an equivalent
subgraph; :func:`optimize` runs them all. ``export_onnx`` applies them before it checks the
file against PyTorch, and the latency timings of onnxruntime and OpenVINO run the same graph.

A pass is ``(proto) -> number of rewrites``: it edits the top-level graph in place and leaves
subgraphs (``If``/``Loop`` bodies) alone.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["PASSES", "decompose_softmax", "optimize"]

#: softmax rewritten at this rank and above (below, onnxruntime's own kernel is as fast)
SOFTMAX_MIN_RANK = 4


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ranks(proto: Any) -> dict[str, int]:
    """The rank of every value shape inference can tell (none when it fails)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - a graph inference cannot follow is left as it is
        return {}
    graph = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.tensor_type.HasField("shape")}


def decompose_softmax(proto: Any) -> int:
    """``Softmax``/``LogSoftmax`` over an axis other than the last of a tensor of rank 4 or
    more, as ``ReduceMax``, ``Sub``, ``Exp``, ``ReduceSum`` and ``Div`` (``Log``, ``Sub``).

    onnxruntime's CPU kernel computes over the last axis only and moves any other one there
    and back with its general transpose. YOLOv8's distribution focal loss head takes a softmax
    over dim 1 of a ``(1, 16, 4, 8400)`` tensor: 4.4 ms of the dense YOLOv8s's 148 ms in
    onnxruntime 1.32 (2 threads), the same in the pruned model (5% of its time); decomposed,
    dense YOLOv8s ran in 149.0 ms against 153.9 and YOLOv8n in 50.4 against 54.4, their pruned
    models as many ms faster (``python -m benchmarks.onnx_passes``). Measured alone, 4.6 ->
    1.2 ms at batch 1 and 19.5 -> 1.5 ms at batch 4; a ``(1, 21, 128, 128)`` segmentation softmax 3.1 -> 1.2 ms. OpenVINO
    runs both forms alike (0.83 against 0.87 ms; the transposes done explicitly took 1.8).
    Rank 3 is left alone: there onnxruntime's kernel was as fast or faster (``(1, 1000, 49)``
    0.05 against 0.13 ms). Opset 13 and later (earlier ``axis`` flattens the tensor).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    opset = _opset(proto)
    graph = proto.graph

    def target(node: Any) -> bool:
        return node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx")

    if opset < 13 or not any(target(n) for n in graph.node):
        return 0
    ranks = _ranks(proto)
    nodes, count = [], 0
    for node in graph.node:
        rank = ranks.get(node.input[0]) if target(node) else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if rank is None or rank < SOFTMAX_MIN_RANK or axis % rank == rank - 1:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        name = f"{node.name or y}/decomposed"
        axes = f"{name}/axes"
        graph.initializer.append(numpy_helper.from_array(np.array([axis % rank], np.int64),
                                                         axes))
        shifted, exp, total = f"{name}/shifted", f"{name}/exp", f"{name}/sum"
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
            peak = helper.make_node("ReduceMax", [x, axes], [f"{name}/max"], keepdims=1,
                                    name=f"{name}/ReduceMax")
        else:
            peak = helper.make_node("ReduceMax", [x], [f"{name}/max"], axes=[axis % rank],
                                    keepdims=1, name=f"{name}/ReduceMax")
        nodes += [peak,
                  helper.make_node("Sub", [x, f"{name}/max"], [shifted], name=f"{name}/Sub"),
                  helper.make_node("Exp", [shifted], [exp], name=f"{name}/Exp"),
                  helper.make_node("ReduceSum", [exp, axes], [total], keepdims=1,
                                   name=f"{name}/ReduceSum")]
        if node.op_type == "Softmax":
            nodes.append(helper.make_node("Div", [exp, total], [y], name=f"{name}/Div"))
        else:
            nodes += [helper.make_node("Log", [total], [f"{name}/log"], name=f"{name}/Log"),
                      helper.make_node("Sub", [shifted, f"{name}/log"], [y],
                                       name=f"{name}/LogSub")]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


#: name -> pass, run in this order by :func:`optimize`
PASSES: dict[str, Callable[[Any], int]] = {"decompose_softmax": decompose_softmax}


def optimize(proto: Any) -> dict[str, int]:
    """Run every pass of :data:`PASSES` on ``proto`` (in place): how many rewrites each made,
    for those that made any."""
    done = {name: rewrite(proto) for name, rewrite in PASSES.items()}
    return {name: n for name, n in done.items() if n}
