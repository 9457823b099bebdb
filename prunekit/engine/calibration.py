"""One-shot calibration: layer-input statistics over a few batches, and bias compensation.

:func:`collect_input_stats` runs the model on calibration batches and records, for every
*consumer* (a linear layer, a non-grouped convolution, a Hugging Face ``Conv1D``), the mean,
mean absolute value and variance of each of its input channels. The ``activation`` and
``fluctuation`` criteria of :mod:`prunekit.engine.criteria` read them: a channel's input
statistics score the consumer's input dim of its group.

:func:`compensate` is FLAP's bias compensation: a removed input channel ``j`` of a consumer
contributes ``W[:, j] * x_j``; its mean ``W[:, j] * mean(x_j)`` is added to the consumer's bias
(a zero bias is created where the layer has none), so the pruned model keeps each layer's mean
output without any fine-tuning. The change is made on the model before it is masked, so the
sparse and the slim model both carry it; created biases are listed in the plan
(``meta["added_biases"]``), and :func:`add_biases` makes them again in a freshly built model
(:func:`prunekit.engine.sparse.load_sparse`, :func:`prunekit.engine.slim.apply_spec`).

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2, bias=False))
    >>> stats = collect_input_stats(model, [torch.randn(16, 4) for _ in range(2)])
    >>> stats["2.weight"].count, tuple(stats["2.weight"].mean.shape)
    (32, (6,))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine.plan import PruningPlan
from prunekit.graph.trace import call_model
from prunekit.utils.devices import model_device, to_device

__all__ = [
    "InputStats",
    "Consumer",
    "find_consumers",
    "collect_input_stats",
    "run_calibration",
    "compensate",
    "add_biases",
    "calibration_inputs",
]


@dataclass
class InputStats:
    """Running sums over the input channels of one consumer (float64).

    Attributes:
        in_dim: The consumer weight's dim of these channels.
        count: Samples seen (every token / pixel position counts as one).
        total, total_sq, total_abs: Per channel sums of ``x``, ``x**2`` and ``|x|``.
    """

    in_dim: int = 1
    count: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    total_abs: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate ``rows`` of shape ``(samples, channels)``."""
        rows = rows.detach().double()
        sums = (rows.sum(0), rows.pow(2).sum(0), rows.abs().sum(0))
        if self.total is None:
            self.total, self.total_sq, self.total_abs = (s.cpu() for s in sums)
        else:
            self.total += sums[0].cpu()
            self.total_sq += sums[1].cpu()
            self.total_abs += sums[2].cpu()
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.total_abs / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance of every channel over the samples (FLAP's fluctuation)."""
        n = max(self.count, 2)
        return ((self.total_sq - self.count * self.mean.pow(2)) / (n - 1)).clamp(min=0)


@dataclass(frozen=True)
class Consumer:
    """A layer whose input channels are columns of its weight.

    Attributes:
        module: The layer's module name.
        weight: Its weight tensor name.
        in_dim: The weight dim of the input channels.
        out_dim: The weight dim of the output channels (the bias follows it).
        act_dim: The dim of the layer's input activation that holds the channels.
    """

    module: str
    weight: str
    in_dim: int
    out_dim: int
    act_dim: int

    @property
    def bias(self) -> str:
        return f"{self.module}.bias" if self.module else "bias"

    def column_sq_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W[:, j]||^2`` per input channel ``j``."""
        w = weight.detach().double().movedim(self.in_dim, 0)
        return w.reshape(w.shape[0], -1).pow(2).sum(1)


def _consumer(name: str, mod: nn.Module) -> Consumer | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    weight = f"{name}.weight" if name else "weight"
    if isinstance(mod, nn.Linear) and w.ndim == 2:
        return Consumer(name, weight, 1, 0, -1)
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and mod.groups == 1:
        return Consumer(name, weight, 1, 0, 1)
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and w.ndim == 2:  # Hugging Face GPT-2: (in, out)
        return Consumer(name, weight, 0, 1, -1)
    return None


def find_consumers(model: nn.Module) -> dict[str, Consumer]:
    """``{weight name: Consumer}`` for every linear layer, non-grouped conv and ``Conv1D`` of ``model``."""
    out = {}
    for name, mod in model.named_modules():
        c = _consumer(name, mod)
        if c is not None:
            out.setdefault(c.weight, c)
    return out


def calibration_inputs(batch: Any) -> Any:
    """The model inputs of one calibration batch: ``batch[0]`` of an ``(inputs, target)`` pair, else ``batch``."""
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch


@contextlib.contextmanager
def _recording(model: nn.Module, consumers: dict[str, Consumer], stats: dict[str, InputStats]) -> Iterator[None]:
    handles = []
    for c in consumers.values():
        mod = model.get_submodule(c.module) if c.module else model

        def hook(m, args, kwargs, c=c):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1:
                x = x.movedim(c.act_dim, -1)
                stats.setdefault(c.weight, InputStats(c.in_dim)).add(x.reshape(-1, x.shape[-1]))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_calibration(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Run ``model`` in eval mode over at most ``max_batches`` calibration batches; returns how many ran.

    Batches are ``(inputs, target)`` pairs or bare inputs, moved to the model's device; the
    model's train/eval mode is restored. Hooks the caller registered see every forward.
    """
    dev = model_device(model)
    was = model.training
    model.eval()
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            call_model(model, to_device(calibration_inputs(batch), dev))
            seen += 1
    finally:
        model.train(was)
    return seen


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    consumers: dict[str, Consumer] | None = None,
) -> dict[str, InputStats]:
    """Input statistics of every consumer of ``model`` over calibration ``batches`` (eval mode, no grad).

    Args:
        model: The (dense) model.
        batches: An iterable of ``(inputs, target)`` pairs or of bare inputs (a tensor, a
            tuple of positional args, a dict of keyword args), moved to the model's device.
        max_batches: Use at most this many batches.
        consumers: Restrict to these (default: :func:`find_consumers`).

    Returns:
        ``{weight name: InputStats}`` for every consumer that ran.

    Raises:
        ValueError: ``batches`` yielded nothing.
    """
    consumers = find_consumers(model) if consumers is None else consumers
    stats: dict[str, InputStats] = {}
    with _recording(model, consumers, stats):
        seen = run_calibration(model, batches, max_batches)
    if not seen:
        raise ValueError(
            "the calibration batches are empty: pass a loader (or list) of at least one batch of "
            "model inputs, e.g. calibration=[example_inputs]"
        )
    return stats


@dataclass
class _Fold:
    """The bias change of one consumer: ``delta`` added at its output channels."""

    consumer: Consumer
    delta: torch.Tensor
    created: bool = False
    out_size: int = 0


def _fold(model: nn.Module, c: Consumer, removed: list[int], stats: InputStats) -> _Fold:
    """``sum_j W[:, j] * mean(x_j)`` over the removed input channels ``j``, per output channel."""
    mod = model.get_submodule(c.module) if c.module else model
    w = mod.weight.detach().double()
    idx = torch.as_tensor(removed, dtype=torch.long, device=w.device)
    mean = stats.mean.to(w.device)[idx]
    cols = w.index_select(c.in_dim, idx).movedim(c.in_dim, -1)  # (..., removed)
    delta = (cols * mean).sum(-1)  # out dim and kernel dims
    if c.out_dim != 0:  # Conv1D (in, out): the remaining dim is the output
        delta = delta.reshape(-1)
    else:
        delta = delta.reshape(delta.shape[0], -1).sum(1)  # conv: every kernel tap sees the mean
    return _Fold(c, delta, getattr(mod, "bias", None) is None, w.shape[c.out_dim])


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: dict[str, InputStats]) -> PruningPlan:
    """Fold every removed input channel's mean contribution into its consumer's bias, in place.

    Call it on the dense model, before :func:`prunekit.engine.sparse.apply_plan` zeroes the
    removed columns. A consumer without a bias gets a zero one (listed in the returned plan's
    ``meta["added_biases"]``; where the consumer's output channels are pruned too, the new
    bias is pruned with them, so the slim model computes what the sparse model does).

    Args:
        model: The dense model the plan was made for.
        plan: The pruning plan.
        stats: From :func:`collect_input_stats` on the same model.

    Returns:
        ``plan`` with the created biases added (a new plan; ``plan`` itself is unchanged).

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> s = collect_input_stats(m, [torch.randn(64, 3)])
        >>> p = PruningPlan({"0.weight": {0: [1]}, "0.bias": {0: [1]}, "2.weight": {1: [1]}},
        ...                 {"0.weight": [4, 3], "0.bias": [4], "2.weight": [2, 4]})
        >>> compensate(m, p, s).meta["added_biases"]
        {'2.bias': [2]}
    """
    consumers = find_consumers(model)
    gone = tuple(b + "." for b in plan.meta.get("blocks", []))  # layers of removed blocks need nothing
    folds = [
        _fold(model, consumers[name], dims[consumers[name].in_dim], stats[name])
        for name, dims in plan.pruned.items()
        if name in consumers
        and name in stats
        and consumers[name].in_dim in dims
        and not (gone and name.startswith(gone))
    ]
    pruned = {k: {d: list(v) for d, v in dims.items()} for k, dims in plan.pruned.items()}
    shapes = {k: list(v) for k, v in plan.shapes.items()}
    added = dict(plan.meta.get("added_biases", {}))
    for f in folds:
        c = f.consumer
        mod = model.get_submodule(c.module) if c.module else model
        if f.created:
            w = mod.weight
            mod.bias = nn.Parameter(
                torch.zeros(f.out_size, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad
            )
            added[c.bias] = [f.out_size]
            gone = plan.pruned[c.weight].get(c.out_dim)
            if gone:  # the bias goes where the weight's output rows go
                pruned[c.bias] = {0: list(gone)}
                shapes[c.bias] = [f.out_size]
        mod.bias.add_(f.delta.to(mod.bias.dtype))
    meta = dict(plan.meta)
    if added:
        meta["added_biases"] = added
    meta["compensated"] = sorted(f.consumer.weight for f in folds)
    return PruningPlan(pruned, shapes, meta)


def add_biases(model: nn.Module, added: dict[str, list[int]]) -> None:
    """Create the zero biases that :func:`compensate` added (``{bias name: shape}``) in a fresh model.

    Biases that exist already are left alone (the model was compensated before).
    """
    for name, shape in added.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if getattr(mod, leaf, None) is not None:
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(
                f"cannot create bias {name!r}: module {mod_name!r} has no weight; was the plan or "
                "spec made for another model?"
            )
        setattr(mod, leaf, nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device)))
