"""What ``prune()`` did: costs before and after, per-group and per-layer widths, what was frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from depgraph.capture import as_args
from depgraph.graph import FrozenChannels

from .verify import VerifyResult

if TYPE_CHECKING:
    from .recovery import RecoveryReport

__all__ = ["PruneReport", "GroupChange", "LayerChange", "StepRecord", "measure"]


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _recurrent(input_shape, hx_shapes, param_shapes, *args, out_shape=None, **kwargs) -> int:
    # every weight matrix (w_ih, w_hh, w_hr of each layer and direction) is applied once per
    # time step and batch element: 2 * steps * rows * cols, as depgraph.cost counts them
    steps = 1
    for s in input_shape[:-1]:
        steps *= s
    return sum(2 * steps * s[0] * s[1] for s in param_shapes if len(s) == 2)


def _mkldnn_rnn_layer(input_shape, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    # one layer and direction of an LSTM on CPU: both weights once per step and batch element
    steps = 1
    for s in input_shape[:-1]:
        steps *= s
    return 2 * steps * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


# Kernels the installed torch's FlopCounterMode may not count: the CPU flash-attention kernel
# nn.MultiheadAttention uses (torch 2.14 counts the flash/efficient/cudnn variants), and the
# fused recurrent layers (nothing is counted for them; GRU/RNN on CPU decompose into mm).
_EXTRA_FORMULAS = {getattr(torch.ops.aten, name): formula for name, formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa), ("lstm", _recurrent),
    ("gru", _recurrent), ("rnn_tanh", _recurrent), ("rnn_relu", _recurrent),
    ("mkldnn_rnn_layer", _mkldnn_rnn_layer))
    if hasattr(torch.ops.aten, name)}


def _count(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict] = None
           ) -> FlopCounterMode:
    """Count FLOPs of one forward: with fake tensors (shapes only, several times faster on a
    large model) when the model runs on them, else for real (a detector whose box count
    depends on values cannot run on fake tensors)."""
    args = as_args(example_inputs)
    # nn.MultiheadAttention's fused inference path is one op the counter does not know
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    extra = {op: f for op, f in _EXTRA_FORMULAS.items()
             if op not in torch.utils.flop_counter.flop_registry}
    # torch's module tracker (inside FlopCounterMode) hooks every input that requires grad
    # and asserts on a parameter passed to a submodule under no_grad (timm's PiT, CaiT)
    grads = [p for p in model.parameters() if p.is_leaf and p.requires_grad]
    try:
        for p in grads:
            p.requires_grad_(False)
        try:
            return _count_fake(model, args, example_kwargs or {}, extra)
        except Exception:  # noqa: BLE001 - data-dependent code: count on the real inputs
            pass
        with FlopCounterMode(display=False, custom_mapping=extra) as counter, torch.no_grad():
            model(*args, **(example_kwargs or {}))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p in grads:
            p.requires_grad_(True)
    return counter


def _count_fake(model: nn.Module, args: tuple, kwargs: dict, extra: dict) -> FlopCounterMode:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from depgraph.capture import attributes_restored

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with attributes_restored(model), mode:  # a forward that caches tensors on self
        fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor,
                                                      (args, kwargs))
        with FlopCounterMode(display=False, custom_mapping=extra) as counter, torch.no_grad():
            model(*fake_args, **fake_kwargs)
    return counter


def measure(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict] = None
            ) -> tuple[int, int]:
    """(FLOPs, parameters), FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = _count(model, example_inputs, example_kwargs)
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class BlockCost:
    """FLOPs and parameters of one stage or block (a submodule at the report's depth)."""

    name: str
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int


def measure_modules(model: nn.Module, example_inputs: Any,
                    example_kwargs: Optional[dict] = None) -> tuple[int, int, dict[str, int]]:
    """:func:`measure` plus the FLOPs of every submodule by name, from the same pass."""
    counter = _count(model, example_inputs, example_kwargs)
    per_module = {key.partition(".")[2]: sum(ops.values())  # the counter prefixes the root's
                  for key, ops in counter.get_flop_counts().items() if key != "Global"}  # class
    return (counter.get_total_flops(), sum(p.numel() for p in model.parameters()), per_module)


def block_costs(before: nn.Module, after: nn.Module, flops_before: dict[str, int],
                flops_after: dict[str, int]) -> list[BlockCost]:
    """Costs per block before and after (``flops_*`` from :func:`measure_modules`), at the
    shallowest depth with at least 3 blocks (``layer1``..``layer4`` of a ResNet;
    ``model.0``..``model.22`` of a YOLO)."""
    names = [n for n, _ in before.named_modules() if n]
    depth = 1
    while depth < 6 and len([n for n in names if n.count(".") == depth - 1]) < 3:
        depth += 1
    blocks = [n for n in names if n.count(".") == depth - 1]

    def params(model: nn.Module, prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + "."))

    return [BlockCost(b, flops_before.get(b, 0), flops_after.get(b, 0), params(before, b),
                      params(after, b))
            for b in blocks if flops_before.get(b, 0) or params(before, b)]


@dataclass(frozen=True)
class GroupChange:
    group: int
    layers: tuple[str, ...]
    units_before: int
    units_after: int


@dataclass(frozen=True)
class LayerChange:
    module: str
    kind: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int


@dataclass(frozen=True)
class StepRecord:
    """One step of iterative pruning: what it aimed at, reached, and the fine-tune's metric."""

    step: int
    target: float  # nominal share of the original kept after this step (the schedule's line)
    flops_ratio: float  # measured, relative to the original model
    params_ratio: float
    metric: Optional[float] = None  # what ``finetune`` returned, if a number

    def __str__(self) -> str:
        metric = "" if self.metric is None else f", metric {self.metric:.4g}"
        return (f"step {self.step}: target {self.target:.4f}, FLOPs {100 * self.flops_ratio:.2f}%"
                f", params {100 * self.params_ratio:.2f}%{metric}")


@dataclass
class PruneReport:
    """Printable with ``print(report)``; ``to_dict()`` for data."""

    target: str
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    groups: list[GroupChange]
    layers: list[LayerChange]
    frozen: list[FrozenChannels]
    verify: Optional[VerifyResult]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)  # iterative pruning only
    recovery: Optional["RecoveryReport"] = None  # prune(recover=...) only
    blocks: list[BlockCost] = field(default_factory=list)  # costs per stage or block

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def save_html(self, path: str, sensitivity: Any = None, title: Optional[str] = None) -> None:
        """One self-contained HTML file (inline SVG, no network): widths, costs per block,
        frozen channels, the check, engine time, recovery and, if given, sensitivity curves."""
        from .report_html import render_html

        with open(path, "w", encoding="utf-8") as f:
            f.write(render_html(self, sensitivity=sensitivity, title=title))

    def figure(self):
        """A matplotlib figure of every changed layer's output width before and after."""
        from .report_html import width_figure

        return width_figure(self)

    def save_png(self, path: str, dpi: int = 110) -> None:
        """The width chart of :meth:`figure` as a PNG (for a README)."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio,
                    verify=str(self.verify) if self.verify else None)
        return data

    def __str__(self) -> str:
        lines = [f"target {self.target}",
                 f"FLOPs  {self.flops_before / 1e9:10.3f} G -> {self.flops_after / 1e9:10.3f} G "
                 f"({100 * self.flops_ratio:.2f}%)",
                 f"params {self.params_before / 1e6:10.3f} M -> {self.params_after / 1e6:10.3f} M "
                 f"({100 * self.params_ratio:.2f}%)"]
        if self.verify is not None:
            lines.append(f"check  {self.verify}")
        lines.extend(f"  {s}" for s in self.steps)
        if self.recovery is not None:
            lines.extend(str(self.recovery).splitlines())
        lines.append(f"engine {sum(self.seconds.values()):.2f} s ("
                     + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()) + ")")
        pruned = [l for l in self.layers if (l.out_before, l.in_before) != (l.out_after, l.in_after)]
        lines.append(f"{len(pruned)} of {len(self.layers)} layers changed:")
        lines.append(f"  {'layer':<44}{'kind':<15}{'out':>13}{'in':>13}")
        for l in pruned:
            lines.append(f"  {l.module:<44}{l.kind:<15}{l.out_before:>6}->{l.out_after:<6}"
                         f"{l.in_before:>6}->{l.in_after:<6}")
        lines.append("frozen:")
        for f in self.frozen:
            lines.append(f"  {f.count:>7}  {f.reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def layer_changes(before: nn.Module, after: nn.Module) -> list[LayerChange]:
    """Width of every conv/linear before and after, by module name."""
    shapes = {name: (type(m).__name__, m.weight.shape) for name, m in before.named_modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    out = []
    for name, m in after.named_modules():
        if name not in shapes:
            continue
        kind, old = shapes[name]
        new = m.weight.shape
        transposed = getattr(m, "transposed", False)
        o, i = (1, 0) if transposed else (0, 1)
        out.append(LayerChange(name, kind, old[o], new[o], old[i], new[i]))
    return out


def python_width_rewrites(before: nn.Module, after: nn.Module) -> list[str]:
    """The int attributes surgery rewrote outside the known layer types (``name.attr: old ->
    new``): widths the model's Python holds, such as a container's ``splits``."""
    from .surgery import _public_widths, fixer_for

    old = {name: _public_widths(m) for name, m in before.named_modules()
           if fixer_for(m) is None}
    out = []
    for name, m in after.named_modules():
        if name not in old:
            continue
        for attr, items in _public_widths(m).items():
            if attr in old[name] and old[name][attr] != items:
                value = getattr(m, attr)
                was = old[name][attr] if isinstance(value, (list, tuple)) else old[name][attr][0]
                out.append(f"{name or type(after).__name__}.{attr}: {was} -> {value}")
    return out
