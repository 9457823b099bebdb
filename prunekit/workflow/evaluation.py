"""Evaluation functions for :func:`prunekit.workflow.ana`: a metric over (a bounded part of) a loader.

``make_eval_fn(loader, ...)`` returns ``eval_fn(model) -> float``. It evaluates in eval mode
under ``torch.no_grad()`` and restores the model's mode afterwards. ``max_batches`` or
``fraction`` bound the cost of each call: sensitivity analysis calls it once per group and
ratio, so a few batches usually suffice.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Linear(4, 3)
    >>> loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    >>> eval_fn = make_eval_fn(loader, "accuracy", max_batches=2)
    >>> 0.0 <= eval_fn(model) <= 1.0
    True
    >>> eval_fn.lower_is_better
    False
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from prunekit.engine.calibration import calibration_inputs
from prunekit.graph.trace import call_model

__all__ = ["make_eval_fn", "make_bn_calibration", "accuracy", "METRICS", "EvalSpec", "batch_size"]

Metric = Callable[[Any, Any], Any]


def _accuracy(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = _logits(output, "accuracy")
    if logits.dim() < 2:
        raise ValueError(
            f"metric 'accuracy' needs class scores of shape (N, classes, ...), got output shape "
            f"{tuple(logits.shape)}; pass a callable metric for other outputs"
        )
    return (logits.argmax(1) == target).double().mean()


def _loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(output, "loss").double(), target)


def _logits(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]  # e.g. (logits, aux)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"metric {name!r} needs the model to return class scores (a tensor), got "
            f"{type(output).__name__}; pass a callable metric(output, target) instead"
        )
    return output


#: Built-in metrics: ``name -> (metric(output, target) -> batch mean, lower_is_better)``.
METRICS: dict[str, tuple[Metric, bool]] = {"accuracy": (_accuracy, False), "loss": (_loss, True)}


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def batch_size(target: Any) -> int:
    """The number of samples in a batch: the first dim of its first tensor (1 without one)."""
    ts = [t for t in tree_flatten(target)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(ts[0].shape[0]) if ts else 1


def _n_batches(loader: Iterable, max_batches: int | None, fraction: float | None) -> int | None:
    if max_batches is not None and fraction is not None:
        raise ValueError("give max_batches (a number of batches) or fraction (a share of the loader), not both")
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1:
            raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
        return int(max_batches)
    if fraction is not None:
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or math.isnan(fraction)
            or not 0 < fraction <= 1
        ):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"fraction needs a loader with a length (len()), got {type(loader).__name__}; use max_batches instead"
            ) from None
        return max(1, math.ceil(fraction * total))
    return None


def _per_sample_accuracy(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = _logits(output, "accuracy")
    return (logits.argmax(1) == target).double().reshape(target.shape[0], -1).mean(1)


def _per_sample_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(_logits(output, "loss").double(), target, reduction="none")
    return ce.reshape(target.shape[0], -1).mean(1)


_PER_SAMPLE = {"accuracy": _per_sample_accuracy, "loss": _per_sample_loss}


@dataclass
class EvalSpec:
    """What an evaluator built by :func:`make_eval_fn` evaluates, so that ana can run the forward itself.

    Attributes:
        loader: The re-iterable of ``(inputs, target)`` batches.
        metric: ``metric(output, target) -> batch mean``.
        name: The metric's name (``'accuracy'``, ``'loss'`` or the callable's name).
        lower_is_better: The built-in metric's direction (``None`` for a callable).
        limit: At most this many batches are evaluated (``None``: all).
        device: Where the batches go (``None``: the model's device).

    Example:
        >>> spec = make_eval_fn([(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))], "accuracy").evaluation
        >>> [tuple(x.shape) for x, _ in spec.batches(None)], spec.binary
        ([(4, 3)], True)
    """

    loader: Iterable
    metric: Metric
    name: str
    lower_is_better: bool | None
    limit: int | None
    device: torch.device | None

    @property
    def binary(self) -> bool:
        """Per-sample values are 0 or 1 (top-1 accuracy): a Wilson bound applies."""
        return self.name == "accuracy" and self.metric is _accuracy

    @property
    def samplewise(self) -> bool:
        """A built-in metric: the batch value is the mean of per-sample values, so batches may be re-split."""
        return self.name in _PER_SAMPLE and self.metric is METRICS[self.name][0]

    def batches(self, model_device: torch.device | None) -> Iterator[tuple[Any, Any]]:
        """The evaluated ``(inputs, target)`` pairs, moved to the device."""
        dev = self.device if self.device is not None else model_device
        for i, batch in enumerate(self.loader):
            if self.limit is not None and i >= self.limit:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
                raise ValueError(f"each batch must be a pair (inputs, target), got {what}")
            yield _to(batch[0], dev), _to(batch[1], dev)

    def batch_value(self, output: Any, target: Any) -> float:
        """The metric's batch mean, checked to be a number."""
        value = self.metric(output, target)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {self.name!r} must return a number, got {type(value).__name__}")
        return float(value)

    def per_sample(self, output: Any, target: Any) -> torch.Tensor | None:
        """One value per sample (float64, on the CPU) for the built-in metrics, else ``None``."""
        if not self.samplewise or not isinstance(target, torch.Tensor):
            return None
        return _PER_SAMPLE[self.name](output, target).cpu()


def make_eval_fn(
    loader: Iterable,
    metric: str | Metric = "accuracy",
    max_batches: int | None = None,
    fraction: float | None = None,
    device: str | torch.device | None = None,
    seq_len: int | None = None,
) -> Callable[[nn.Module], float]:
    """An ``eval_fn(model) -> float`` for :func:`prunekit.workflow.ana` over (part of) ``loader``.

    Args:
        loader: A re-iterable of ``(inputs, target)`` batches (a ``DataLoader``, a list);
            ``inputs`` is a tensor, a tuple of positional args or a dict of keyword args.
        metric: ``'accuracy'`` (top-1, higher is better), ``'loss'`` (cross-entropy, lower
            is better), ``'perplexity'`` (causal language models over token batches, lower is
            better; see :mod:`prunekit.workflow.perplexity`) or ``metric(output, target) ->
            number``, the mean over the batch. Batch values are averaged weighted by batch size.
        max_batches: Evaluate on at most this many batches (the first ones).
        fraction: Evaluate on the first ``ceil(fraction * len(loader))`` batches, in (0, 1].
        device: Move the batches there; default: the device of the model's parameters.
        seq_len: ``'perplexity'`` only: tokens per window (longer sequences are split); default:
            the first batch's length. Stated by ``eval_fn.seq_len`` and ``eval_fn.describe()``.

    Returns:
        ``eval_fn(model) -> float``, with ``eval_fn.lower_is_better`` set for the built-in
        metrics (pass the same ``lower_is_better`` to :func:`prunekit.workflow.ana`) and
        ``eval_fn.evaluation``, an :class:`EvalSpec`: with it ana runs the forward itself
        (the fast analysis, see :mod:`prunekit.workflow.fast_ana`).
    """
    if metric == "perplexity":
        from prunekit.workflow.perplexity import make_perplexity_fn

        return make_perplexity_fn(loader, seq_len, _n_batches(loader, max_batches, fraction), device)
    if seq_len is not None:
        raise ValueError(f"seq_len is an option of metric 'perplexity', not of {metric!r}")
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"unknown metric {metric!r}; choose one of {sorted([*METRICS, 'perplexity'])} or pass "
                "a callable metric(output, target) -> number"
            )
        fn, lower = METRICS[metric]
        name = metric
    elif callable(metric):
        fn, lower, name = metric, None, getattr(metric, "__name__", "metric")
    else:
        raise TypeError(f"metric must be a name in {sorted(METRICS)} or a callable, got {type(metric).__name__}")
    if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of (inputs, target) batches, got {type(loader).__name__}")
    spec = EvalSpec(
        loader,
        fn,
        name,
        lower,
        _n_batches(loader, max_batches, fraction),
        torch.device(device) if device is not None else None,
    )

    def eval_fn(model: nn.Module) -> float:
        was = model.training
        model.eval()
        total, n, seen = 0.0, 0, 0
        try:
            with torch.no_grad():
                for inputs, target in spec.batches(_model_device(model)):
                    k = batch_size(target)
                    total += spec.batch_value(call_model(model, inputs), target) * k
                    n += k
                    seen += 1
        finally:
            model.train(was)
        if seen == 0:
            raise ValueError("the loader yielded no batches; nothing to evaluate")
        return total / max(n, 1)

    eval_fn.lower_is_better = lower  # type: ignore[attr-defined]
    eval_fn.metric = name  # type: ignore[attr-defined]
    eval_fn.evaluation = spec  # type: ignore[attr-defined]
    return eval_fn


def accuracy(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    fraction: float | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy of ``model`` over (part of) ``loader``, in eval mode without gradients."""
    return make_eval_fn(loader, "accuracy", max_batches=max_batches, fraction=fraction, device=device)(model)


def make_bn_calibration(
    loader: Iterable, max_batches: int | None = None, device: str | torch.device | None = None
) -> Callable[[nn.Module], None]:
    """A ``calibrate(model)`` that re-estimates BatchNorm running statistics on ``loader``.

    Pruning shifts every activation's statistics; re-estimating them (a cumulative average
    over the batches, no gradient step, nothing else changes) makes a pruned model's accuracy
    a far better guide to what fine-tuning will recover (adaptive BatchNorm, as in EagleEye
    and the reference optimizer's one-step search). For :func:`prunekit.workflow.prune`'s ``calibrate``.

    Args:
        loader: A re-iterable of ``(inputs, target)`` batches or of bare inputs.
        max_batches: Use at most this many batches.
        device: Move the batches there; default: the device of the model's parameters.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> make_bn_calibration([torch.randn(8, 1, 6, 6)])(net)
        >>> net.training, float(net[1].running_var.mean()) != 1.0
        (False, True)
    """
    if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of batches, got {type(loader).__name__}")

    @torch.no_grad()
    def calibrate(model: nn.Module) -> None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        was = model.training
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        dev = device if device is not None else _model_device(model)
        model.train()
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                call_model(model, _to(calibration_inputs(batch), dev))
        finally:
            for m, mom in zip(norms, saved):
                m.momentum = mom
            model.train(was)

    return calibrate
