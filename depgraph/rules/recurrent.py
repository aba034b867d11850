"""Rules for the recurrent layers: LSTM, GRU and Elman RNN (``aten.lstm/gru/rnn_*.input``).

One call runs every layer and direction. Its flat parameter list holds, per layer ``l`` and
direction ``d``: ``w_ih[G*H, I_l]``, ``w_hh[G*H, H or P]``, optionally ``b_ih[G*H]``,
``b_hh[G*H]``, and with ``proj_size`` ``w_hr[P, H]`` (G = 4 gates for LSTM, 3 for GRU, 1 for
RNN). The channel identities:

- hidden unit ``j`` is the rows ``g*H + j`` of ``w_ih``, ``w_hh`` and the biases for every
  gate ``g``, and the column ``j`` of ``w_hh`` (or of ``w_hr``), in every layer and both
  directions: the module has one ``hidden_size`` for all of them, so unit ``j`` is the same
  index everywhere (``h_n``/``c_n`` stack them on one dim, and initial states passed in are
  sliced with them);
- with ``proj_size`` the projected unit ``p`` is row ``p`` of ``w_hr`` and column ``p`` of
  ``w_hh``, in every layer and direction, and is what each layer outputs;
- a layer's output features are ``[forward units, backward units]``: the next layer's
  ``w_ih`` columns, and for the last layer the output's last dim.

Every unit is exact: a hidden unit whose readers (recurrent columns, next layer, output
consumers) are zeroed changes nothing else.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from .layers import _record
from .registry import RuleContext, register

aten = torch.ops.aten

_GATES = {aten.lstm: 4, aten.gru: 3, aten.rnn_tanh: 1, aten.rnn_relu: 1}


def _read(node) -> tuple[int, bool, int, bool]:
    """(layers, biases, directions, is_lstm) from the call's arguments; time and batch dims
    carry no channels, so ``batch_first`` does not matter."""
    a = node.args
    return int(a[4]), bool(a[3]), 2 if a[7] else 1, node.target.overloadpacket is aten.lstm


def _used(node, index: int) -> bool:
    return any(u.args[1] == index and len(u.users) > 0 for u in node.users
               if u.op == "call_function" and len(u.args) > 1)


@register(aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
def recurrent_rule(ctx: RuleContext, node, inputs: list) -> tuple:
    x, hx, params = inputs[0], inputs[1], inputs[2]
    layers, biases, dirs, lstm = _read(node)
    hx = (hx or []) if lstm else [hx]  # LSTM takes [h0, c0], GRU and RNN h0 alone
    gates = _GATES[node.target.overloadpacket]
    stride = len(params) // (layers * dirs)
    proj = stride == 2 + 2 * biases + 1
    x_shape = ctx.shape(node.args[0])
    steps = math.prod(x_shape[:-1])  # time x batch positions
    feed = x[-1] if x is not None else None
    outs_all: list[np.ndarray] = []
    hidden_all: list[np.ndarray] = []
    for layer in range(layers):
        outs: list[np.ndarray] = []
        for d in range(dirs):
            k = (layer * dirs + d) * stride
            names = node.args[2][k:k + stride]
            w_ih, w_hh = params[k], params[k + 1]
            hidden = _gate_rows(ctx, gates, w_ih[0], w_hh[0],
                                [params[k + 2][0], params[k + 3][0]] if biases else [])
            if feed is None:
                ctx.freeze(w_ih[1], f"{ctx.where()} reads a tensor whose channels are fixed")
            else:
                ctx.unify(feed, w_ih[1])
            ctx.consumer(names[0], 1)
            if proj:
                w_hr = params[k + stride - 1]
                ctx.unify(w_hr[1], hidden)
                ctx.consumer(names[-1], 1)
                out = w_hr[0]
            else:
                out = hidden
            ctx.unify(w_hh[1], out)  # the recurrent input is the layer's own output
            ctx.consumer(names[1], 1)
            for name in names:
                shape = ctx.shape(name)
                if len(shape) == 2:
                    _record(ctx, "linear", name, 1, 0, steps * shape[0] * shape[1])
            outs.append(out)
            ctx.internal += [hidden, out]
            hidden_all.append(hidden)
            outs_all.append(out)
        feed = np.concatenate(outs)
    h_used, c_used = _used(node, 1), lstm and _used(node, 2)
    h0 = [hx[0][-1]] if len(hx) > 0 and hx[0] is not None else []
    c0 = [hx[1][-1]] if len(hx) > 1 and hx[1] is not None else []
    for other in outs_all[1:] + h0:  # one hidden_size (proj_size) for every layer
        ctx.unify(outs_all[0], other)
    for other in hidden_all[1:] + c0:
        ctx.unify(hidden_all[0], other)
    rank = len(x_shape)
    output = (None,) * (rank - 1) + (feed,)
    state = (None,) * (rank - 1) + (outs_all[0] if h_used else None,)
    result = [output, state if h_used else None]
    if lstm:
        result.append((None,) * (rank - 1) + (hidden_all[0],) if c_used else None)
    return tuple(result)


def _gate_rows(ctx: RuleContext, gates: int, ih_rows: np.ndarray, hh_rows: np.ndarray,
               bias_rows: list[np.ndarray]) -> np.ndarray:
    """Unify the rows ``g*H + j`` of every gate and tensor; return the hidden atoms (H)."""
    blocks = [r.reshape(gates, -1) for r in [ih_rows, hh_rows, *bias_rows]]
    hidden = blocks[0][0]
    for block in blocks:
        for g in range(gates):
            ctx.unify(hidden, block[g])
    return hidden.copy()
