"""Pruning beyond channels for :func:`prunekit.workflow.prune.prune`: whole blocks and experts.

:func:`block_scores` rates every removable block (see :mod:`prunekit.engine.depth`) either by a
calibration score, ShortGPT's block influence (``1 - cos(input, output)``, ``"influence"``),
or ana-style by the metric with the block removed (``"metric"``: one evaluation per block).
:func:`plan_structure` picks the blocks and experts to remove and returns them as one plan
that the width allocation completes: the groups that live entirely inside removed blocks are
left out of it, and the MACs the removals save count towards the MACs target.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> model = torchvision.models.resnet18().eval()  # doctest: +SKIP
    >>> x = torch.randn(1, 3, 64, 64)  # doctest: +SKIP
    >>> s = plan_structure(model, x, prunekit.Pruner(model, x), remove_blocks=2)  # doctest: +SKIP
    >>> s.blocks  # doctest: +SKIP
    ['layer1.1', 'layer2.1']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from prunekit.engine import depth, experts
from prunekit.engine.counting import count
from prunekit.engine.plan import PruningPlan
from prunekit.engine.pruner import Pruner
from prunekit.engine.slim import to_slim

__all__ = ["BLOCK_CRITERIA", "block_scores", "plan_structure", "StructurePlan"]

#: how blocks are rated: ShortGPT's block influence on calibration data, or the metric without the block
BLOCK_CRITERIA = ("influence", "metric")


@dataclass
class StructurePlan:
    """Blocks and experts to remove, as one plan the width allocation completes.

    Attributes:
        plan: The removals (``meta["blocks"]``, ``meta["routers"]``, the experts' slices).
        blocks: Removed block names, least important first.
        scores: ``{block: score}`` of every candidate block (higher: more important).
        inside: Channel groups whose tensors all lie inside removed blocks.
        macs_saved: MACs the removals alone save on the example inputs.
        notes: What was done, for the log.
    """

    plan: PruningPlan
    blocks: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    inside: set[int] = field(default_factory=set)
    macs_saved: int = 0
    notes: list[str] = field(default_factory=list)

    def combine(self, width: PruningPlan) -> PruningPlan:
        """``width`` with the removals added (``width``'s meta wins, the structure keys are unions)."""
        return width.merge(self.plan) if self.plan.pruned or self.plan.meta else width


def block_scores(
    model: nn.Module,
    blocks: Sequence[depth.Block],
    how: str = "influence",
    calibration: Iterable[Any] | None = None,
    eval_fn: Callable[..., float] | None = None,
    eval_args: Sequence = (),
    lower_is_better: bool = False,
) -> dict[str, float]:
    """Importance of each block (higher: keep it).

    Args:
        model: The model.
        blocks: From :func:`prunekit.engine.depth.find_blocks`.
        how: ``"influence"`` (needs ``calibration``) or ``"metric"`` (needs ``eval_fn``: the
            metric with the block bypassed; the score is the metric, negated when
            ``lower_is_better``).
        calibration: Batches for ``"influence"``.
        eval_fn, eval_args: ``eval_fn(model, *eval_args) -> number`` for ``"metric"``.
        lower_is_better: The metric is a loss.
    """
    if how not in BLOCK_CRITERIA:
        raise ValueError(f"block_criterion must be one of {BLOCK_CRITERIA}, got {how!r}")
    if how == "influence":
        if calibration is None:
            raise ValueError("block_criterion='influence' needs calibration batches (calibration=<loader>)")
        return depth.block_influence(model, blocks, calibration)
    if not callable(eval_fn):
        raise ValueError(
            "block_criterion='metric' evaluates the model without each block: it needs "
            f"eval_fn(model) -> metric, got eval_fn={eval_fn!r}"
        )
    sign = -1.0 if lower_is_better else 1.0
    out = {}
    for b in blocks:
        with depth.bypassed(model, [b.name]):
            out[b.name] = sign * float(eval_fn(model, *eval_args))
    return out


def _inside(pruner: Pruner, blocks: list[str]) -> set[int]:
    pre = tuple(b + "." for b in blocks)
    return {g.id for g in pruner.prunable_groups if all(m.name.startswith(pre) for m in g.members)}


def _choose_blocks(model, example_inputs, n, how, calibration, eval_fn, eval_args, lower_is_better):
    found = depth.find_blocks(model, example_inputs)
    if n > len(found):
        raise ValueError(
            f"remove_blocks={n}, but the model has {len(found)} removable blocks "
            f"({', '.join(b.name for b in found) or 'none'}); give at most {len(found)}"
        )
    scores = block_scores(model, found, how, calibration, eval_fn, eval_args, lower_is_better)
    order = sorted(found, key=lambda b: (scores[b.name], b.name))
    return [b.name for b in order[:n]], scores


def plan_structure(
    model: nn.Module,
    example_inputs: Any,
    pruner: Pruner,
    *,
    remove_blocks: int = 0,
    block_criterion: str = "influence",
    remove_experts: int = 0,
    calibration: Iterable[Any] | None = None,
    eval_fn: Callable[..., float] | None = None,
    eval_args: Sequence = (),
    lower_is_better: bool = False,
) -> StructurePlan:
    """Choose ``remove_blocks`` blocks and ``remove_experts`` experts per MoE layer to remove.

    Blocks go by :func:`block_scores`; experts by their routing weight over ``calibration``
    (:func:`prunekit.engine.experts.expert_usage`; the example inputs when no calibration is given).

    Raises:
        ValueError: more blocks or experts than the model has, or a missing ``eval_fn`` / ``calibration``.
    """
    for name, v in (("remove_blocks", remove_blocks), ("remove_experts", remove_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a number of blocks/experts >= 0, got {v!r}")
    out = StructurePlan(PruningPlan({}, {}, {}))
    if remove_blocks:
        out.blocks, out.scores = _choose_blocks(
            model, example_inputs, remove_blocks, block_criterion, calibration, eval_fn, eval_args, lower_is_better
        )
        out.plan.meta["blocks"] = list(out.blocks)
        out.inside = _inside(pruner, out.blocks)
        out.notes.append(f"depth: removing {len(out.blocks)} blocks by {block_criterion} ({', '.join(out.blocks)})")
    if remove_experts:
        layers = experts.find_moe_layers(model)
        if not layers:
            raise ValueError(
                f"remove_experts={remove_experts}, but the model has no mixture-of-experts layer "
                "(a router 'gate' with one weight row per expert next to stacked 'experts')"
            )
        usage = experts.expert_usage(model, layers, calibration if calibration is not None else [example_inputs])
        out.plan = out.plan.merge(experts.expert_plan(model, layers, remove_experts, usage))
        out.notes.append(
            f"experts: removing {remove_experts} of each of {len(layers)} layers' experts by routing weight"
        )
    if out.plan.pruned or out.plan.meta:
        before = count(model, example_inputs).macs
        out.macs_saved = max(0, before - count(to_slim(model, out.plan), example_inputs).macs)
    return out
