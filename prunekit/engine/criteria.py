"""Importance criteria: how much a channel unit matters, aggregated over its group.

Each criterion scores the indices of one tensor dimension; :func:`group_scores` sums the
(mean-normalised) scores of every coupled tensor into one score per unit. Lower scores are
pruned first. Register your own with :func:`register_criterion`.

Example:
    >>> sorted(CRITERIA)
    ['activation', 'bn_scale', 'fluctuation', 'fpgm', 'l1', 'l2', 'random', 'taylor']

``activation`` and ``fluctuation`` read the input statistics of calibration batches
(:func:`prunekit.engine.calibration.collect_input_stats`, run by
:meth:`prunekit.Pruner.collect_activations`): they score a group by the input channels of its
consumers (linear layers, convolutions) and, where no member of a group has statistics
(a head of ``nn.MultiheadAttention``, whose projections run without their modules), by ``l2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunekit.graph.groups import ChannelGroup

__all__ = ["CRITERIA", "Criterion", "register_criterion", "group_scores"]


@dataclass(frozen=True)
class Criterion:
    """A named scoring rule.

    Attributes:
        name: Registry key.
        description: One line for ``--help`` and error messages.
        score: ``score(tensor, dim, name, grads) -> Tensor[size]`` or ``None`` to skip
            a tensor (it then does not vote).
        needs_grads: Whether :meth:`prunekit.Pruner.accumulate_gradients` must run first.
        needs_activations: Whether :meth:`prunekit.Pruner.collect_activations` must run first;
            the fourth argument of ``score`` is then ``{weight name: InputStats}`` instead of
            the gradients.
    """

    name: str
    description: str
    score: Callable[..., torch.Tensor | None]
    needs_grads: bool = False
    needs_activations: bool = False

    @property
    def reads_data(self) -> bool:
        """Whether it scores from calibration batches (:meth:`prunekit.Pruner.read_calibration`)."""
        return self.needs_activations or self.needs_grads


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, description: str, needs_grads: bool = False, needs_activations: bool = False):
    """Decorator registering ``fn(tensor, dim, name, data)`` as a criterion (``data``: the
    gradients, or with ``needs_activations`` the calibration input statistics)."""

    def deco(fn):
        CRITERIA[name] = Criterion(name, description, fn, needs_grads, needs_activations)
        return fn

    return deco


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)


@register_criterion("l1", "sum of absolute weights of every coupled slice")
def _l1(t, dim, name, grads):
    return _rows(t, dim).abs().sum(1)


@register_criterion("l2", "L2 norm of every coupled weight slice (default)")
def _l2(t, dim, name, grads):
    return _rows(t, dim).pow(2).sum(1).sqrt()


@register_criterion("bn_scale", "|gamma| of the normalisation layers in the group (network slimming)")
def _bn(t, dim, name, grads):
    if t.ndim == 1 and name.endswith("weight") and "running" not in name:
        return t.detach().float().abs()
    return None


@register_criterion("taylor", "first-order Taylor |w * dL/dw| from accumulated gradients", True)
def _taylor(t, dim, name, grads):
    g = grads.get(name)
    if g is None:
        return None
    return _rows(t * g, dim).abs().sum(1)


@register_criterion("fpgm", "distance to the geometric median of the producer filters (FPGM)")
def _fpgm(t, dim, name, grads):
    if dim != 0 or t.ndim < 2 or not name.endswith("weight"):
        return None
    rows = _rows(t, 0)
    return torch.cdist(rows, rows).sum(1)


def _consumer_stats(dim: int, name: str, stats: dict):
    """The input statistics of ``name`` when ``dim`` is its consumer's input dim, else None."""
    st = stats.get(name)
    return st if st is not None and st.in_dim == dim else None


@register_criterion(
    "activation",
    "mean |input activation| of every consumer channel over calibration batches (needs calibration data)",
    needs_activations=True,
)
def _activation(t, dim, name, stats):
    st = _consumer_stats(dim, name, stats)
    return None if st is None else st.mean_abs.float()


@register_criterion(
    "fluctuation",
    "FLAP: variance of every input channel over calibration samples times the "
    "squared norm of its weight column (needs calibration data)",
    needs_activations=True,
)
def _fluctuation(t, dim, name, stats):
    st = _consumer_stats(dim, name, stats)
    if st is None:
        return None
    return (st.var * _rows(t, dim).double().pow(2).sum(1)).float()


@register_criterion("random", "uniformly random (a baseline)")
def _random(t, dim, name, grads):
    return torch.rand(t.shape[dim])


def group_scores(
    group: ChannelGroup,
    tensors: dict[str, torch.Tensor],
    criterion: str = "l2",
    grads: dict[str, torch.Tensor] | None = None,
    activations: dict | None = None,
) -> torch.Tensor:
    """One score per unit of ``group``; each member's scores are divided by their mean.

    ``activations``: ``{weight name: InputStats}`` for the criteria that need them.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    crit = CRITERIA[criterion]
    if crit.needs_grads and not grads:
        raise ValueError(
            f"criterion {criterion!r} needs gradients: pass calibration=<(inputs, target) batches> to "
            "prune/ana, or call Pruner.read_calibration(batches) first"
        )
    if crit.needs_activations and not activations:
        raise ValueError(
            f"criterion {criterion!r} needs calibration data: call Pruner.collect_activations(batches) "
            "first, or pass calibration=<loader> to prune/ana"
        )
    data = activations if crit.needs_activations else (grads or {})
    total = torch.zeros(group.n_units, dtype=torch.float64)
    votes = 0
    for m in group.members:
        t = tensors.get(m.name)
        if t is None:
            continue
        s = crit.score(t, m.dim, m.name, data)
        if s is None:
            continue
        s = s.double()
        s = s / (s.mean() + 1e-12)
        per_unit = torch.zeros(group.n_units, dtype=torch.float64).index_add_(0, m.unit, s)
        count = torch.zeros(group.n_units, dtype=torch.float64).index_add_(0, m.unit, torch.ones_like(s))
        total += per_unit / count.clamp(min=1)
        votes += 1
    if votes == 0 and criterion != "l2":
        return group_scores(group, tensors, "l2")
    return total
