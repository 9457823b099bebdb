"""Least-squares reconstruction: refit the layers after the pruned channels to the dense model's outputs.

Removing an input channel of a layer changes its output by ``W[:, j] * x_j``. Reconstruction
(the channel-pruning refit of He et al., 2017 and ThiNet, sequential as in their follow-ups)
refits the layer's *remaining* weights so that, on calibration data, its output comes as close
as possible to the dense model's output of the same layer:

    W' = argmin ||Y_dense - X_pruned[:, kept] @ W'^T||^2 + ridge * mean(diag(G)) * ||W'||^2

``X_pruned`` is the layer's input in the *pruned* model (with the layers before it already
refit), ``Y_dense`` the dense layer's output on the same batch, so every layer also corrects the
error that the layers before it left. Layers are refit one after another in execution order,
each from its own pass of the pruned model over the calibration batches (the forwards stop at
the layer). The dense model's outputs do not depend on the refits, so they are captured for
several layers in one dense pass per batch (as many layers at a time as ``cache_bytes`` holds).
Convolutions are unfolded into patches (``torch.nn.functional.unfold``), so a layer's system has
``kept input channels x kernel taps`` unknowns per output channel (plus the bias, when it has one).

Only weights of kept channels change: pruned rows and columns stay zero, so the sparse model and
the slim model built from it compute the same thing, and nothing in the plan changes.

Example:
    >>> import copy, torch, torch.nn as nn
    >>> from prunekit.engine.plan import PruningPlan
    >>> from prunekit.engine.sparse import apply_plan
    >>> torch.manual_seed(0) and None
    >>> dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> plan = PruningPlan({"0.weight": {0: [1, 4]}, "0.bias": {0: [1, 4]}, "2.weight": {1: [1, 4]}},
    ...                    {"0.weight": [8, 6], "0.bias": [8], "2.weight": [3, 8]})
    >>> model = apply_plan(copy.deepcopy(dense), plan)
    >>> report = reconstruct(dense, model, plan, [torch.randn(64, 6)])
    >>> report.layers
    ['2.weight']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.engine.calibration import Consumer, calibration_inputs, find_consumers
from prunekit.engine.plan import PruningPlan
from prunekit.graph.trace import call_model
from prunekit.utils.devices import model_device, to_device

__all__ = ["reconstruct", "ReconstructReport"]


@dataclass
class ReconstructReport:
    """What :func:`reconstruct` refit.

    Attributes:
        layers: Weight names of the refit layers, in the order they were refit.
        skipped: ``{weight name: why}`` for layers with pruned inputs that were left as they were.
        samples: Rows of the least-squares systems per layer (tokens / output pixels x images).
        error_before, error_after: Relative output error ``||Y_pruned - Y_dense|| / ||Y_dense||``
            per refit layer, before and after its refit (on the calibration batches).
    """

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: how many layers were refit, how much their output error went down, what was left."""
        skipped = f"{len(self.skipped)} left as they were ({', '.join(sorted(self.skipped))})" if self.skipped else ""
        if not self.layers:
            return f"reconstruction: no layer refit{'; ' + skipped if skipped else ' (no layer has pruned inputs)'}"
        before = sum(self.error_before.values()) / len(self.layers)
        after = sum(self.error_after.values()) / len(self.layers)
        return (
            f"reconstruction: {len(self.layers)} layers refit by least squares to the outputs before pruning "
            f"(mean relative output error {before:.3f} -> {after:.3f}){'; ' + skipped if skipped else ''}"
        )


class _Stop(Exception):
    """Ends a forward once the layer of interest has run."""


def _why_not(mod: nn.Module, c: Consumer) -> str | None:
    """Why a consumer cannot be refit here (None: it can)."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            return f"{type(mod).__name__} with padding={mod.padding!r}, padding_mode={mod.padding_mode!r}"
        return None
    if isinstance(mod, nn.Linear) or c.in_dim == 0:  # Linear, Hugging Face Conv1D
        return None
    return f"{type(mod).__name__} is not supported (Linear, Conv1d, Conv2d and Conv1D are)"


def _rows(mod: nn.Module, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The layer input's kept channels as least-squares rows: ``(samples, kept x taps [+ 1])``."""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        x = x.index_select(1, kept)
        if isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(2)  # (N, C, 1, L): a 1 x k two-dimensional kernel
            k, d, p, s = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
        else:
            k, d, p, s = mod.kernel_size, mod.dilation, mod.padding, mod.stride
        cols = F.unfold(x, k, d, p, s)  # (N, kept * taps, L), channel-major like the weight
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1]).index_select(1, kept)
    if getattr(mod, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def _channels_first(mod: nn.Module) -> bool:
    """Whether ``mod``'s output holds its channels in dimension 1 (convolutions), not the last."""
    return isinstance(mod, (nn.Conv1d, nn.Conv2d))


def _outputs(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer output as ``(samples, out channels)``, rows in the order of :func:`_rows`."""
    if _channels_first(mod):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _module(model: nn.Module, c: Consumer) -> nn.Module:
    """The module of consumer ``c`` in ``model``."""
    return model.get_submodule(c.module) if c.module else model


def _execution_order(
    model: nn.Module, consumers: dict[str, Consumer], inputs: Any
) -> tuple[list[str], set[str], dict[str, int]]:
    """Consumers in the order of their first call on ``inputs``, those called more than once, and
    the rows (samples) of each one's first output as :func:`_outputs` lays it out."""
    calls: list[str] = []
    rows: dict[str, int] = {}
    handles = []
    for name, c in consumers.items():
        mod = _module(model, c)
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: calls.append(name)))
        handles.append(mod.register_forward_hook(lambda m, a, out, name=name: _count_rows(rows, name, m, out)))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(calls))
    return order, {n for n in order if calls.count(n) > 1}, rows


def _count_rows(rows: dict[str, int], name: str, mod: nn.Module, out: Any) -> None:
    """Record the rows of ``mod``'s first output, as :func:`_outputs` lays it out (a forward hook: returns None)."""
    if isinstance(out, torch.Tensor) and out.dim() > 0 and name not in rows:
        channels = out.shape[1] if _channels_first(mod) else out.shape[-1]
        rows[name] = out.numel() // max(channels, 1)


@contextlib.contextmanager
def _capture(mod: nn.Module, where: str, box: dict) -> Iterator[None]:
    """Record ``mod``'s input (``'input'``) or output (``'output'``) into ``box`` and stop the forward."""

    def pre(m, args, kwargs):
        box["x"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        raise _Stop

    def post(m, args, out):
        box["y"] = out
        raise _Stop

    if where == "input":
        h = mod.register_forward_pre_hook(pre, with_kwargs=True)  # a layer called with keywords too
    else:
        h = mod.register_forward_hook(post)
    try:
        yield
    finally:
        h.remove()


def _run_to(model: nn.Module, mod: nn.Module, where: str, inputs: Any) -> torch.Tensor:
    box: dict = {}
    with _capture(mod, where, box), contextlib.suppress(_Stop):
        call_model(model, inputs)
    return box["x" if where == "input" else "y"].detach()


def _dtype(mod: nn.Module) -> torch.dtype:
    """The precision of a layer's least-squares sums (half precision: float32)."""
    return torch.float64 if mod.weight.dtype == torch.float64 else torch.float32


def _target(dense: nn.Module, name: str, c: Consumer, plan: PruningPlan, out: torch.Tensor) -> torch.Tensor:
    """The dense layer's output ``out`` as least-squares targets: ``(samples, kept out channels)``."""
    mod = _module(dense, c)
    rows_out = plan.keep_index(name, c.out_dim).to(out.device)
    return _outputs(mod, out.detach().to(_dtype(mod))).index_select(1, rows_out)


def _chunks(
    model, names: list[str], consumers, plan, rows: dict[str, int], batches: list, budget: int
) -> list[tuple[list[str], bool]]:
    """``names`` (in execution order) cut into runs whose dense targets on ``batches`` fit in ``budget`` bytes.

    ``rows``: each layer's output rows per batch (:func:`_execution_order`; the sparse model's
    outputs have the dense model's shapes), so sizing the targets needs no dense pass.

    Returns:
        ``(run, cached)`` pairs. A layer whose targets alone exceed the budget is a run of its
        own with ``cached`` False: its targets are recomputed batch by batch.
    """
    runs: list[tuple[list[str], bool]] = []
    used = 0
    for n in names:
        c = consumers[n]
        item = torch.finfo(_dtype(_module(model, c))).bits // 8
        need = rows.get(n, 0) * len(plan.keep_index(n, c.out_dim)) * item * len(batches)
        if runs and runs[-1][1] and used + need <= budget:
            runs[-1][0].append(n)
            used += need
        else:
            runs.append(([n], need <= budget))
            used = need
    return runs


def _dense_targets(dense, names: list[str], consumers, plan: PruningPlan, batches: list) -> dict[str, list]:
    """The dense targets of every layer of ``names`` on every batch, one dense pass per batch."""
    targets: dict[str, list] = {n: [] for n in names}
    last = names[-1]

    def hook(m, a, out, n):
        targets[n].append(_target(dense, n, consumers[n], plan, out))
        if n == last:
            raise _Stop

    hooks = [
        _module(dense, consumers[n]).register_forward_hook(lambda m, a, out, n=n: hook(m, a, out, n)) for n in names
    ]
    try:
        for inputs in batches:
            with torch.no_grad(), contextlib.suppress(_Stop):
                call_model(dense, inputs)
    finally:
        for h in hooks:
            h.remove()
    return targets


@torch.no_grad()
def _refit(
    dense, model, name: str, c: Consumer, plan: PruningPlan, batches: list, ridge: float, report, targets=None
) -> None:
    """Solve one layer's least-squares system over ``batches`` and write its kept weights.

    ``targets``: the dense layer's targets per batch (:func:`_dense_targets`); None: computed here.
    """
    mod_d, mod_p = _module(dense, c), _module(model, c)
    dev = model_device(model)
    kept, rows_out = plan.keep_index(name, c.in_dim).to(dev), plan.keep_index(name, c.out_dim).to(dev)
    gram = cross = None
    err_before = y_sq = 0.0
    samples = 0
    dt = _dtype(mod_p)
    w_kept = _kept_matrix(mod_p, c, kept).index_select(0, rows_out).to(dt)
    for i, inputs in enumerate(batches):
        x = _rows(mod_p, _run_to(model, mod_p, "input", inputs).to(dt), kept)
        y = (
            targets[i]
            if targets is not None
            else _target(dense, name, c, plan, _run_to(dense, mod_d, "output", inputs))
        )
        g, cr = (x.t() @ x).double(), (x.t() @ y).double()
        gram, cross = (g, cr) if gram is None else (gram + g, cross + cr)
        err_before += float((x @ w_kept.t() - y).pow(2).sum())
        y_sq += float(y.double().pow(2).sum())
        samples += x.shape[0]
    reg = ridge * gram.diagonal().mean().clamp(min=1e-12)
    solved = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross)
    # ||Y - X S||^2 = Y'Y - 2 <S, X'Y> + <S, X'X S>: the refit error without another pass
    err_after = max(0.0, y_sq - 2 * float((solved * cross).sum()) + float((solved * (gram @ solved)).sum()))
    new = solved.t().to(mod_p.weight.dtype)  # (kept rows, kept x taps [+ 1])
    if getattr(mod_p, "bias", None) is not None:
        mod_p.bias.data[rows_out] = new[:, -1]
        new = new[:, :-1]
    _write_kept(mod_p, c, kept, rows_out, new)
    report.layers.append(name)
    report.samples[name] = samples
    report.error_before[name] = (err_before / y_sq) ** 0.5 if y_sq else 0.0
    report.error_after[name] = (err_after / y_sq) ** 0.5 if y_sq else 0.0


def _kept_matrix(mod: nn.Module, c: Consumer, kept: torch.Tensor) -> torch.Tensor:
    """The current weights of the kept inputs as ``(out, kept x taps [+ 1])`` (the bias last)."""
    w = mod.weight.detach()
    if c.in_dim == 0:
        w = w.t()
    m = w.index_select(1, kept).reshape(w.shape[0], -1)
    if getattr(mod, "bias", None) is not None:
        m = torch.cat([m, mod.bias.detach()[:, None]], 1)
    return m


def _write_kept(mod: nn.Module, c: Consumer, kept: torch.Tensor, rows_out: torch.Tensor, new: torch.Tensor) -> None:
    """Write ``new`` (``(kept rows, kept x taps)``) into the weight's kept rows and columns."""
    w = mod.weight
    if c.in_dim == 0:  # Conv1D: (in, out)
        w.data[kept.unsqueeze(1), rows_out.unsqueeze(0)] = new.t()
        return
    shape = (len(rows_out), len(kept), *w.shape[2:])
    sub = new.reshape(shape)
    full = w.data.index_select(0, rows_out)
    full[:, kept] = sub
    w.data[rows_out] = full


def _to_refit(
    model: nn.Module, consumers: dict[str, Consumer], plan: PruningPlan, inputs, report
) -> tuple[list[str], dict[str, int]]:
    """The consumers with pruned inputs to refit, in execution order (the others with a reason in
    ``report``), and every consumer's output rows on ``inputs`` (:func:`_execution_order`)."""
    gone_blocks = tuple(b + "." for b in plan.meta.get("blocks", []))  # removed blocks: nothing to refit

    def pruned_inputs(name: str) -> bool:
        inside_gone = bool(gone_blocks) and name.startswith(gone_blocks)
        return consumers[name].in_dim in plan.pruned.get(name, {}) and not inside_gone

    order, repeated, rows = _execution_order(model, consumers, inputs)
    for name in sorted(consumers.keys() - set(order)):
        if pruned_inputs(name):
            report.skipped[name] = "not called in the forward of the calibration batches"
    out = []
    for name in filter(pruned_inputs, order):
        c = consumers[name]
        mod = _module(model, c)
        if not plan.kept(name, c.out_dim):
            continue  # every output channel goes: nothing to refit
        why = _why_not(mod, c) or ("called more than once per forward" if name in repeated else None)
        if why:
            report.skipped[name] = why
        else:
            out.append(name)
    return out, rows


def reconstruct(
    dense: nn.Module,
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[Any],
    max_batches: int | None = None,
    ridge: float = 1e-2,
    cache_bytes: int = 512 * 2**20,
) -> ReconstructReport:
    """Refit, in place, the layers of the sparse ``model`` whose inputs ``plan`` prunes.

    Args:
        dense: The model before pruning (same architecture and tensor names; not changed).
        model: ``dense`` made sparse by ``plan`` (:func:`prunekit.engine.sparse.apply_plan`).
        plan: The pruning plan.
        batches: Calibration batches: ``(inputs, target)`` pairs or bare model inputs (a few
            hundred samples; every layer's system needs more rows than unknowns).
        max_batches: Use at most this many batches.
        ridge: Tikhonov regularisation, relative to the mean diagonal of each system's Gram matrix.
        cache_bytes: Memory for the dense model's layer outputs: the more layers' targets fit,
            the fewer dense passes (0: one dense pass per layer and batch).

    Returns:
        A :class:`ReconstructReport` (refit layers, skipped ones and why, output errors).

    Raises:
        ValueError: No calibration batch, or a negative ``ridge`` or ``cache_bytes``.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be an int >= 0 (bytes), got {cache_bytes!r}")
    dev = model_device(model)
    chosen = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        chosen.append(to_device(calibration_inputs(batch), dev))
    if not chosen:
        raise ValueError(
            "reconstruction needs calibration batches: pass a loader (or list) of model inputs, "
            "a few hundred samples (e.g. calibration=[example_inputs] for a try)"
        )
    consumers = find_consumers(model)
    report = ReconstructReport()
    was_d, was_p = dense.training, model.training
    dense.eval()
    model.eval()
    try:
        names, rows = _to_refit(model, consumers, plan, chosen[0], report)
        for run, cached in _chunks(model, names, consumers, plan, rows, chosen, cache_bytes):
            targets = _dense_targets(dense, run, consumers, plan, chosen) if cached else {}
            for name in run:
                _refit(dense, model, name, consumers[name], plan, chosen, ridge, report, targets.get(name))
                targets.pop(name, None)  # free each layer's targets once refit
    finally:
        dense.train(was_d)
        model.train(was_p)
    return report
