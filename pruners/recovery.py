"""Recovery without training: restore what removing channels invalidated, from a few unlabeled
calibration batches run through the dense model and the pruned one.

Three methods, applied in this order whatever order they are given in:

- ``"bias"``: a removed input channel ``c`` of a consumer conv/linear fed it, on average,
  ``W[:, c] * E[x_c]`` (for a conv, the kernel summed over space). That expectation is folded
  into the consumer's bias (exact in expectation away from padded borders). A consumer with
  no bias whose output goes straight into a BatchNorm gets it folded into the BatchNorm's
  running mean instead (no new parameter); any other gets a bias added, and the report says so.
- ``"reconstruct"``: each consumer's weight (and bias) is refitted by ridge-regularised least
  squares so that, on its inputs *in the pruned model*, its output matches the dense model's
  output (He et al. 2017; ThiNet). Layers go in execution order, each seeing the layers before
  it already refitted, so errors do not accumulate. Only the normal equations are kept
  (``D x D`` with ``D = C_in * k * k``, in float64; the rows themselves while there are fewer
  than ``D``), from at most ``max_positions`` sampled positions per batch.
- ``"bn"``: every BatchNorm's running statistics are re-estimated on the pruned model as a
  cumulative (momentum-free) average over the batches.

``recover`` changes the pruned model in place and never the dense one; on failure the pruned
model is put back as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from depgraph.capture import as_args
from depgraph.errors import PruningError

from .plan import Plan
from .verify import run_model

__all__ = ["recover", "refit", "reestimate_bn", "adopt_state", "RecoveryReport", "RecoveryStep", "METHODS",
           "check_methods"]

METHODS = ("bias", "reconstruct", "bn")


@dataclass
class RecoveryStep:
    """One method's effect: output error (relative MSE on the calibration batches) before and
    after it, what it changed and what it skipped with the reason."""

    method: str
    seconds: float
    samples: int
    error_before: float
    error_after: float
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"recover {self.method}: output error {self.error_before:.4g} -> "
                f"{self.error_after:.4g} ({len(self.changed)} layers changed, {self.samples} "
                f"samples, {self.seconds:.2f} s)")
        return text + "".join(f"\n    skipped {s}" for s in self.skipped[:8]) + (
            f"\n    ... {len(self.skipped) - 8} more skipped" if len(self.skipped) > 8 else "")


@dataclass
class RecoveryReport:
    steps: list[RecoveryStep]

    def to_dict(self) -> dict:
        return {"steps": [asdict(s) for s in self.steps]}

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.steps)


def check_methods(methods: Union[None, str, Sequence[str]]) -> tuple[str, ...]:
    """The methods in application order; ValueError for an unknown one."""
    if methods is None:
        return ()
    given = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in given if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown recovery method(s) {unknown}; choose from {list(METHODS)}")
    return tuple(m for m in METHODS if m in given)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _forward(model: nn.Module, batch: Any, kwargs: Optional[dict]) -> Any:
    with torch.no_grad():
        return model(*as_args(batch), **(kwargs or {}))


def _until(model: nn.Module, module: nn.Module, batch: Any, kwargs: Optional[dict],
           take: Callable[[tuple, torch.Tensor], Any]) -> Any:
    """``take(inputs, output)`` of ``module``'s first call in ``model(batch)``; the rest of the
    forward pass is skipped."""
    box: list = []

    def hook(_m, inputs, output):
        box.append(take(inputs, output))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        _forward(model, batch, kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise PruningError(f"recovery: module {_name_of(model, module)!r} did not run on a "
                           "calibration batch")
    return box[0]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?")


def _output_error(reference: list[list[torch.Tensor]], pruned: nn.Module, batches: list,
                  kwargs, outputs) -> float:
    """sum ||y_pruned - y_dense||^2 / sum ||y_dense||^2 over the contract outputs;
    ``reference`` holds the dense outputs of each batch (computed once: the dense model does
    not change)."""
    num = den = 0.0
    for dense_out, batch in zip(reference, batches):
        for a, b in zip(dense_out, run_model(pruned, batch, outputs, kwargs)):
            if a.shape != b.shape or not a.is_floating_point():
                continue
            num += float((b.double() - a.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    return num / den if den else 0.0


@dataclass
class _Consumer:
    name: str
    dense: nn.Module
    pruned: nn.Module
    kept_in: list[int]
    kept_out: Optional[list[int]]


def _trace_calls(model: nn.Module, batch: Any, kwargs) -> tuple[list[str], dict[str, int],
                                                                   dict[str, str]]:
    """Module names in order of first call, call counts, and for each BatchNorm the module
    whose output tensor it reads directly (if any)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    calls: dict[str, int] = {}
    made_by: dict[int, tuple[str, torch.Tensor]] = {}
    feeds: dict[str, str] = {}
    handles = []

    def pre(m, inputs):
        if isinstance(m, _BatchNorm) and inputs and isinstance(inputs[0], torch.Tensor):
            src = made_by.get(id(inputs[0]))
            if src is not None and src[1] is inputs[0]:
                feeds[names[m]] = src[0]

    def post(m, _inputs, output):
        n = names[m]
        if n not in calls:
            order.append(n)
        calls[n] = calls.get(n, 0) + 1
        if isinstance(output, torch.Tensor):
            made_by[id(output)] = (n, output)  # keeps the tensor alive: ids stay unique

    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        _forward(model, batch, kwargs)
    finally:
        for h in handles:
            h.remove()
    return order, calls, feeds


def _consumers(dense: nn.Module, pruned: nn.Module, plan: Plan, order: list[str],
               calls: dict[str, int]) -> tuple[list[_Consumer], list[str]]:
    """Convs/linears whose input channels the plan changed, in execution order; and the
    skipped ones with a reason."""
    dense_mods, pruned_mods = dict(dense.named_modules()), dict(pruned.named_modules())
    found, skipped = [], []
    rank = {n: i for i, n in enumerate(order)}
    for key, dims in plan.kept.items():
        if not key.endswith(".weight") and key != "weight":
            continue
        name = key[: -len(".weight")] if key != "weight" else ""
        if 1 not in dims or name not in dense_mods:
            continue
        d, p = dense_mods[name], pruned_mods.get(name)
        if p is None:
            raise PruningError(f"recovery: the pruned model has no module {name!r}; pass the "
                               "dense model and the model pruned from it")
        why = None
        if not isinstance(d, (nn.Conv2d, nn.Linear)):
            why = f"{type(d).__name__} is not a Conv2d or Linear"
        elif isinstance(d, nn.Conv2d) and d.groups != 1:
            why = f"grouped conv (groups={d.groups}) is not refitted"
        elif isinstance(d, nn.Conv2d) and d.padding_mode != "zeros":
            why = f"padding_mode {d.padding_mode!r}"
        elif parametrize.is_parametrized(p) or hasattr(p, "weight_orig"):
            why = "its weight is parametrized or masked (computed on every call)"
        elif name not in calls:
            why = "not called on the calibration batches"
        elif calls[name] > 1:
            why = f"called {calls[name]} times per forward (a shared module)"
        if why:
            skipped.append(f"{name or '<model>'}: {why}")
            continue
        found.append(_Consumer(name, d, p, list(dims[1]), dims.get(0)))
    found.sort(key=lambda c: rank[c.name])
    return found, skipped


def _spatial_sum(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(2).sum(2) if weight.dim() > 2 else weight


def _channel_mean(x: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    """Per-channel sum and count of an input (channels last for a linear, dim 1 for a conv)."""
    flat = x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).reshape(x.shape[1], -1).T
    return flat.double().sum(0), flat.shape[0]


def _bias(dense, pruned, consumers, batches, kwargs, feeds, added) -> list[str]:
    changed = []
    pruned_mods = dict(pruned.named_modules())
    by_producer = {src: bn for bn, src in feeds.items()}
    sums: dict[str, list] = {c.name: [0.0, 0] for c in consumers}
    handles = []
    for c in consumers:  # every consumer's input means in one dense pass per batch
        def hook(m, inputs, _out, c=c):
            s, n = _channel_mean(inputs[0], isinstance(m, nn.Linear))
            sums[c.name][0] = sums[c.name][0] + s
            sums[c.name][1] += n
        handles.append(c.dense.register_forward_hook(hook))
    try:
        for batch in batches:
            _forward(dense, batch, kwargs)
    finally:
        for h in handles:
            h.remove()
    for c in consumers:
        total, count = sums[c.name]
        mean = total / count
        removed = sorted(set(range(c.dense.weight.shape[1])) - set(c.kept_in))
        if not removed:
            continue
        w = _spatial_sum(c.dense.weight.detach().double())
        rows = torch.as_tensor(c.kept_out) if c.kept_out is not None else slice(None)
        delta = (w[:, removed] @ mean[removed])[rows]
        target = c.pruned
        if target.bias is not None:
            target.bias.data += delta.to(target.bias.dtype)
            changed.append(c.name)
        elif c.name in by_producer and pruned_mods.get(by_producer[c.name]) is not None \
                and pruned_mods[by_producer[c.name]].running_mean is not None:
            bn = pruned_mods[by_producer[c.name]]
            bn.running_mean -= delta.to(bn.running_mean.dtype)
            changed.append(f"{c.name} (into {by_producer[c.name]}.running_mean)")
        else:
            target.bias = nn.Parameter(delta.to(target.weight.dtype))
            added.append(target)
            changed.append(f"{c.name} (bias added)")
    return changed


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the least-squares design matrix: one per output position."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(module: nn.Module, y: torch.Tensor, kept_out) -> torch.Tensor:
    if kept_out is not None:
        y = y[..., kept_out] if isinstance(module, nn.Linear) else y[:, kept_out]
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the mean diagonal of X^T X


class _LeastSquares:
    """One split's least-squares data: while it has no more rows than columns, the rows
    themselves (solved in the dual, an ``n x n`` system: deep layers on small images have
    few positions and thousands of columns); beyond that, ``X^T X`` and ``X^T Y`` in float64."""

    def __init__(self, dim: int) -> None:
        self.dim, self.n = dim, 0
        self.rows: list[torch.Tensor] = []
        self.goals: list[torch.Tensor] = []
        self.a: Optional[torch.Tensor] = None
        self.b: Optional[torch.Tensor] = None
        self._eig = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.n += x.shape[0]
        if self.a is None and self.n <= self.dim:
            self.rows.append(x)
            self.goals.append(y)
            return
        pending = list(zip(self.rows, self.goals)) + [(x, y)]
        self.rows, self.goals = [], []
        for r, g in pending:
            gram, cross = (r.T @ r).double(), (r.T @ g).double()  # float32 products, float64 sums
            self.a = gram if self.a is None else self.a + gram
            self.b = cross if self.b is None else self.b + cross

    def merged(self, other: "_LeastSquares") -> "_LeastSquares":
        out = _LeastSquares(self.dim)
        parts = (self, other)
        if all(part.a is None for part in parts):
            for part in parts:
                for r, g in zip(part.rows, part.goals):
                    out.add(r, g)
            return out
        out.n = self.n + other.n
        for part in parts:
            pieces = [(part.a, part.b)] if part.a is not None else []
            pieces += [((r.T @ r).double(), (r.T @ g).double()) for r, g in zip(part.rows, part.goals)]
            for a, b in pieces:
                out.a = a if out.a is None else out.a + a
                out.b = b if out.b is None else out.b + b
        return out

    def _x(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.rows).double(), torch.cat(self.goals).double()

    def mean_diag(self) -> float:
        if self.a is not None:
            return float(self.a.diagonal().mean()) or 1.0
        return float(self._x()[0].pow(2).sum()) / self.dim or 1.0

    def solve(self, lam: float, w0: torch.Tensor) -> torch.Tensor:
        """argmin |XW - Y|^2 + lam |W - w0|^2."""
        if self.a is not None:
            eye = torch.eye(self.dim, dtype=self.a.dtype)  # positive definite: Cholesky
            return torch.cholesky_solve(self.b + lam * w0, torch.linalg.cholesky(self.a + lam * eye))
        x, y = self._x()
        if self._eig is None:
            self._eig = torch.linalg.eigh(x @ x.T)
        vals, vecs = self._eig
        alpha = vecs @ ((vecs.T @ (y - x @ w0)) / (vals + lam)[:, None])
        return w0 + x.T @ alpha

    def loss(self, w: torch.Tensor) -> float:
        """|XW - Y|^2 up to a constant that does not depend on ``w``."""
        if self.a is not None:
            return float((w * (self.a @ w)).sum() - 2 * (w * self.b).sum())
        x, y = self._x()
        return float((x @ w - y).pow(2).sum() - y.pow(2).sum())


def refit(module: nn.Module, inputs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor],
          *, ridge: Optional[float] = None, max_positions: int = 4096, seed: int = 0
          ) -> tuple[int, Optional[float]]:
    """Refit ``module``'s (Conv2d or Linear) weight and bias in place so that
    ``module(input) ~= target`` for each pair; (positions used, ridge chosen).

    Ridge least squares pulled toward the current weights, ``min |XW - Y|^2 + r |W - W0|^2``:
    directions the calibration positions do not determine keep their value. With
    ``ridge=None`` a quarter of the positions is held out to choose ``r`` from ``RIDGES``
    (or to keep ``W0`` when no refit beats it there), then all positions are used."""
    gen = torch.Generator().manual_seed(seed)
    fit_bias = module.bias is not None
    dim = module.weight[0].numel() + int(fit_bias)
    fit, check = _LeastSquares(dim), _LeastSquares(dim)
    for x, y in zip(inputs, targets):
        rows, goal = _patches(module, x).float(), y.float()
        if rows.shape[0] > max_positions:
            pick = torch.randperm(rows.shape[0], generator=gen)[:max_positions]
            rows, goal = rows[pick], goal[pick]
        if fit_bias:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        held = torch.rand(rows.shape[0], generator=gen) < 0.25
        fit.add(rows[~held], goal[~held])
        check.add(rows[held], goal[held])
    if fit.n == 0:
        return 0, None
    w0 = module.weight.detach().double().reshape(module.weight.shape[0], -1).T
    if fit_bias:
        w0 = torch.cat([w0, module.bias.detach().double()[None]], 0)
    if ridge is None:
        if check.n == 0:
            ridge = RIDGES[len(RIDGES) // 2]
        else:
            scale = fit.mean_diag()
            trials = {r: check.loss(fit.solve(r * scale, w0)) for r in RIDGES}
            ridge = min(trials, key=trials.get)
            if check.loss(w0) <= trials[ridge]:
                return fit.n + check.n, None  # no refit generalises better than the weights
    every = fit.merged(check)
    solution = every.solve(ridge * every.mean_diag(), w0)
    w = solution[:-1] if fit_bias else solution
    module.weight.data.copy_(w.T.reshape(module.weight.shape).to(module.weight.dtype))
    if fit_bias:
        module.bias.data.copy_(solution[-1].to(module.bias.dtype))
    return every.n, ridge


def _reconstruct(dense, pruned, consumers, batches, kwargs, ridge, max_positions
                 ) -> tuple[list[str], list[str], int]:
    changed, kept, used = [], [], 0
    for i, c in enumerate(consumers):
        xs = [_until(pruned, c.pruned, b, kwargs, lambda inputs, _o: inputs[0]) for b in batches]
        ys = [_targets(c.dense, _until(dense, c.dense, b, kwargs, lambda _i, out: out), c.kept_out)
              for b in batches]
        n, chosen = refit(c.pruned, xs, ys, ridge=ridge, max_positions=max_positions, seed=i)
        used += n
        if chosen is None:
            kept.append(f"{c.name}: no refit beat its weights on held-out positions")
        else:
            changed.append(f"{c.name} (ridge {chosen:g})")
    return changed, kept, used


def reestimate_bn(model: nn.Module, batches: Sequence[Any], kwargs: Optional[dict] = None
                  ) -> list[str]:
    """Recompute every BatchNorm's running statistics as the average over ``batches``
    (momentum-free); the names of the BatchNorms changed. Other modules stay in eval mode."""
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, _BatchNorm) and m.track_running_stats]
    state = [(m, m.momentum, m.training) for _, m in bns]
    was_training = model.training
    try:
        model.eval()
        for _, m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            _forward(model, batch, kwargs)
    finally:
        for m, momentum, training in state:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return [n for n, _ in bns]


def recover(original: nn.Module, pruned: nn.Module, plan: Plan, calibration: Iterable[Any],
            methods: Union[str, Sequence[str]] = ("bias", "bn"), *,
            example_kwargs: Optional[dict] = None, outputs: Optional[Callable] = None,
            ridge: Optional[float] = None, max_positions: int = 4096,
            progress: Optional[Callable[[str], None]] = None) -> RecoveryReport:
    """Restore ``pruned`` (pruned from ``original`` by ``plan``) on calibration batches.

    Args:
        original: the dense model; only run, never changed.
        pruned: the pruned model; changed in place (and put back as it was on failure).
        plan: the plan that made ``pruned`` from ``original``.
        calibration: batches passed to ``forward`` as ``example_inputs`` is (no labels).
        methods: any of "bias", "reconstruct", "bn" (applied in that order).
        outputs: picks the contract outputs for the reported error (as in :func:`prune`).
        ridge: regularisation of the least-squares refit, relative to the mean diagonal;
            None chooses it per layer on held-out positions (see :func:`refit`).
        max_positions: positions sampled per batch and layer for the refit.

    Returns:
        A :class:`RecoveryReport`, one step per method.

    Example:
        >>> import torch, torchvision
        >>> from pruners import prune
        >>> dense = torchvision.models.resnet18()
        >>> batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
        >>> result = prune(dense, batches[0], target_flops=0.5)
        >>> report = recover(dense, result.model, result.plan, batches, ("bias", "bn"))
        >>> [s.method for s in report.steps]
        ['bias', 'bn']
    """
    todo = check_methods(methods)
    batches = list(calibration)
    if not todo:
        return RecoveryReport([])
    if not batches:
        raise ValueError("recover() needs at least one calibration batch")
    modes = (original.training, pruned.training)
    snapshot = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    added: list[nn.Module] = []
    try:
        original.eval()
        pruned.eval()
        order, calls, feeds = _trace_calls(original, batches[0], example_kwargs)
        consumers, skipped = _consumers(original, pruned, plan, order, calls)
        steps: list[RecoveryStep] = []
        reference = [run_model(original, b, outputs, example_kwargs) for b in batches]
        error = _output_error(reference, pruned, batches, example_kwargs, outputs)
        for method in todo:
            start = time.perf_counter()
            samples = sum(_batch_size(b) for b in batches)
            notes = list(skipped)
            if method == "bias":
                changed = _bias(original, pruned, consumers, batches, example_kwargs, feeds,
                                added)
            elif method == "reconstruct":
                changed, more, samples = _reconstruct(original, pruned, consumers, batches,
                                                      example_kwargs, ridge, max_positions)
                notes += more
            else:
                changed = reestimate_bn(pruned, batches, example_kwargs)
                notes = [] if changed else ["the model has no BatchNorm with running statistics"]
            if not changed and method != "bn":
                notes.append("no conv/linear lost input channels: nothing to fix")
            after = _output_error(reference, pruned, batches, example_kwargs, outputs)
            steps.append(RecoveryStep(method, round(time.perf_counter() - start, 3), samples,
                                      error, after, changed, notes))
            error = after
            if progress is not None:
                progress(f"recover {method}")
    except BaseException:
        for m in added:
            m.bias = None
        pruned.load_state_dict(snapshot)
        raise
    finally:
        original.train(modes[0])
        pruned.train(modes[1])
    return RecoveryReport(steps)


def adopt_state(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` (same architecture and widths) ``source``'s weights and buffers,
    including the biases recovery added."""
    mods = dict(target.named_modules())
    for name, m in source.named_modules():
        t = mods.get(name)
        if t is not None and isinstance(getattr(m, "bias", None), nn.Parameter) \
                and getattr(t, "bias", 0) is None:
            t.bias = nn.Parameter(torch.zeros_like(m.bias))
    target.load_state_dict(source.state_dict())


def _batch_size(batch: Any) -> int:
    args = batch if isinstance(batch, tuple) else (batch,)  # as_args, without its copies
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
