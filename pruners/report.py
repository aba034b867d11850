"""What ``prune()`` did: costs before and after, per-group and per-layer widths, what was frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from depgraph.graph import FrozenChannels

from .flops import measure, measure_modules  # noqa: F401 - re-exported: the report's counts
from .verify import VerifyResult

if TYPE_CHECKING:
    from .recovery import RecoveryReport

__all__ = ["PruneReport", "GroupChange", "LayerChange", "StepRecord", "LatencyReport",
           "measure"]


@dataclass(frozen=True)
class BlockCost:
    """FLOPs and parameters of one stage or block (a submodule at the report's depth)."""

    name: str
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int


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


@dataclass(frozen=True)
class LatencyReport:
    """Dense and pruned latency measured together (``pruners.latency.measure_models``), the
    plan's predicted share, and the machine; ``noisy``: the spread never got under the limit,
    so the figures are noise, not a result."""

    backend: str
    device: str
    threads: int
    dense_ms: float
    pruned_ms: float
    spread_dense: float
    spread_pruned: float
    predicted: Optional[float]  # share of the dense latency the latency model predicted
    noisy: bool
    env: dict = field(default_factory=dict)
    attempts: int = 1  # plans measured to land on a latency target
    dtype: Optional[str] = None  # what both were timed cast to (None: as they are)

    @property
    def ratio(self) -> float:
        """Measured latency kept (pruned / dense)."""
        return self.pruned_ms / self.dense_ms if self.dense_ms else 1.0

    def __str__(self) -> str:
        predicted = "" if self.predicted is None else f", predicted {100 * self.predicted:.2f}%"
        return (f"latency {self.dense_ms:.2f} ms -> {self.pruned_ms:.2f} ms "
                f"({100 * self.ratio:.2f}% measured{predicted}; {self.backend} on {self.device}"
                f"{'' if self.dtype in (None, 'float32') else f' in {self.dtype}'}, "
                f"{self.threads} threads, spread {100 * self.spread_dense:.0f}%/"
                f"{100 * self.spread_pruned:.0f}%{', NOISY' if self.noisy else ''})")


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
    latency: Optional[LatencyReport] = None  # target_latency only: measured and predicted

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
        if self.latency is not None:
            lines.append(str(self.latency))
        if self.verify is not None:
            lines.append(f"check  {self.verify}")
        else:  # prune() checks every plan; None: its units change normalisation statistics
            lines.append("check  not compared with the masked original: the plan removes "
                         "inexact units (normalisation statistics change) and no reference "
                         "with them removed too ran; any exact groups it removes were compared "
                         "by one-unit probes, and the pruned model ran")
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
