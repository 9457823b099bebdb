"""Validation before long work: every verb that analyses or trains first proves the slim model will run.

:func:`validated_pruner` builds the :class:`~prunekit.engine.pruner.Pruner` and runs
:meth:`~prunekit.engine.pruner.Pruner.validate` (a structural pass on the meta device, then a
numeric pass on real tensors): groups whose slim model would fail or differ, e.g. because
``forward`` holds a width in a Python int (``x.reshape(n, self.hidden, -1)``), are frozen before
ana measures them or prune cuts them. It reports what it found: the ops without a channel rule
(their channels stay; with the module) and every frozen group with its reason.

:func:`check_sparse_model` is the same promise for a model that is already sparse (``finetune``):
its slim model must run and match before any epoch is spent on it.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> pruner = validated_pruner(model, torch.randn(1, 3, 8, 8), log=print)
    validation: 3 channel groups, 1 prunable; the slim model runs and matches
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.equivalence import EquivalenceError, checked_slim
from prunekit.engine.pruner import Pruner
from prunekit.graph.groups import ChannelGroup
from prunekit.utils.devices import model_device, to_device

__all__ = [
    "validated_pruner",
    "validate",
    "check_sparse_model",
    "first_inputs",
    "Validation",
    "group_label",
    "ValidationError",
]


class ValidationError(ValueError):
    """The pruned model would not give a working slim model; the message says what to do."""


def group_label(group: ChannelGroup) -> str:
    """A readable name of a group: its first member's module (or tensor)."""
    m = group.members[0]
    return m.module or m.name


@dataclass
class Validation:
    """What validation found.

    Attributes:
        groups: Number of channel groups.
        prunable: Number of prunable groups after validation.
        warnings: Ops without a channel rule (their channels stay), with the module.
        frozen: ``(group id, label, channels, reason)`` of every group validation froze.
    """

    groups: int
    prunable: int
    warnings: list[str] = field(default_factory=list)
    frozen: list[tuple[int, str, int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report: a summary line, then one line per warning and per frozen group."""
        plural = "" if self.groups == 1 else "s"
        verdict = (
            f"froze {len(self.frozen)} group{'s' if len(self.frozen) != 1 else ''} whose slim model would "
            "fail or differ"
            if self.frozen
            else "the slim model runs and matches"
        )
        out = [f"validation: {self.groups} channel group{plural}, {self.prunable} prunable; {verdict}"]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"validation froze group {gid} ({label}, {n} channels): {why}" for gid, label, n, why in self.frozen]
        if not self.prunable:
            out.append("warning: no channel group can be pruned (see 'prunekit groups' for why each is kept)")
        return out


def validated_pruner(
    model: nn.Module,
    example_inputs: Any,
    *,
    excludes: Iterable[str] = (),
    criterion: str = "l2",
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> Pruner:
    """A :class:`Pruner` of ``model`` whose groups all give a slim model that runs and matches.

    Args:
        model, example_inputs, excludes, criterion, kwargs: As for :class:`Pruner`.
        log: Gets the :meth:`Validation.lines` (``None``: silent).
    """
    pruner = Pruner(model, example_inputs, excludes=list(excludes), criterion=criterion, **kwargs)
    validate(pruner, log)
    return pruner


def validate(pruner: Pruner, log: Callable[[str], None] | None = print) -> Validation:
    """Run ``pruner.validate()`` (structural, then numeric), report it to ``log`` and return what it found."""
    with torch.random.fork_rng(devices=[]):  # a random criterion must not shift the caller's random stream
        frozen = pruner.validate()
    found = Validation(
        len(pruner.groups),
        len(pruner.prunable_groups),
        list(pruner.warnings),
        [(g.id, group_label(g), g.n_units, g.reasons[0].removeprefix("validation: ")) for g in frozen],
    )
    if log is not None:
        for line in found.lines():
            log(line)
    return found


def check_sparse_model(model: nn.Module, example_inputs: Any, where: str = "the sparse model") -> float:
    """Raise :class:`ValidationError` unless the slim model of the sparse ``model`` runs and matches it.

    Returns the relative error (0.0 for a model that is not sparse, or without inputs: nothing to check).
    """
    if example_inputs is None or not sparse.is_sparse(model) or not sparse.get_plan(model).pruned:
        return 0.0
    try:
        return checked_slim(model, example_inputs)[1]
    except EquivalenceError as exc:
        raise ValidationError(
            f"{where} would not give a working slim model ({exc}); prune it again: "
            "prune validates the channel groups first and keeps the ones that break"
        ) from exc


def first_inputs(loader: Iterable | None, model: nn.Module) -> Any:
    """The inputs of the first ``(inputs, target)`` batch of ``loader``, on ``model``'s device (or ``None``)."""
    if loader is None or not sparse.is_sparse(model):
        return None
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return to_device(batch[0], model_device(model))
        return None
    return None
