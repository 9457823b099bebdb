"""The ``prune`` verb: reach a MACs reduction or a tolerated metric loss, guided by ``ana``.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> model = torchvision.models.resnet18()  # doctest: +SKIP
    >>> res = prune(model, torch.randn(1, 3, 224, 224), removal_ratio=0.5)  # doctest: +SKIP
    >>> round(res.macs_reduction, 2)  # doctest: +SKIP
    0.5
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.allocate import MacsModel, equal_loss, global_ranking, greedy, perturbed_loss, uniform
from prunekit.engine.calibration import compensate as compensate_biases
from prunekit.engine.counting import count
from prunekit.engine.criteria import CRITERIA
from prunekit.engine.equivalence import checked_slim
from prunekit.engine.plan import PruningPlan
from prunekit.engine.pruner import Pruner
from prunekit.engine.reconstruct import reconstruct as reconstruct_layers
from prunekit.engine.slim import to_slim
from prunekit.utils import artifacts
from prunekit.workflow.ana import Sensitivity, evaluate_point
from prunekit.workflow.options import PruneConfig, with_config
from prunekit.workflow.progress import bar as progress_bar
from prunekit.workflow.structure import plan_structure
from prunekit.workflow.validation import group_label, validated_pruner
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["prune", "PruneResult", "Request", "Allocator", "Attempt", "Choice", "FALLBACKS", "matching_sensitivity"]

FALLBACKS = ("uniform", "global")
STRATEGIES = ("equal_loss", "greedy")


@dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        model: The sparse model (pruned in place) or, with ``mode='slim'``, the slim copy.
        plan: The pruning plan (also saved as ``plan.json`` in the workspace).
        ratios: ``{group_id: fraction of its channels the plan removes}`` (after rounding to whole
            channels and ``round_to``; the allocation's continuous ratios are in
            ``plan.meta["requested_ratios"]``).
        method: ``"sensitivity"``, ``"uniform"``, ``"global"`` or ``"spec"``.
        macs_before, macs_after, params_before, params_after: Measured counts.
        predicted_loss: Sum of the groups' predicted relative metric losses (sensitivity only).
    """

    model: nn.Module
    plan: PruningPlan
    ratios: dict[int, float]
    method: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    predicted_loss: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def _measure(model: nn.Module, plan: PruningPlan, inputs: Any) -> tuple[int, int]:
    slim = to_slim(model, plan)
    c = count(slim, inputs)
    return c.macs, c.params


def _max_ratios(pruner: Pruner, max_ratio: float | dict) -> dict[int, float]:
    if isinstance(max_ratio, dict):
        out = {g.id: 0.9 for g in pruner.prunable_groups}
        for k, v in max_ratio.items():
            ids = [k] if isinstance(k, int) else [g.id for g in pruner.groups if group_label(g) == k]
            if not ids or isinstance(k, int) and not 0 <= k < len(pruner.groups):
                raise ValueError(
                    f"max_ratio names {k!r}, which is not a group id or layer; "
                    f"use an id from pruner.prunable_groups or a layer name"
                )
            for i in ids:
                _check(v, "max_ratio")
                if i in out:  # a cap on a group that stays (e.g. frozen by validation) changes nothing
                    out[i] = float(v)
        return out
    v = _check(max_ratio, "max_ratio")
    return {g.id: v for g in pruner.prunable_groups}


def _check(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {v!r}")
    return float(v)


def _load_spec(spec: Any, pruner: Pruner) -> PruningPlan | dict[int, float]:
    if isinstance(spec, PruningPlan):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"spec file {path} does not exist; pass a plan.json saved by prune")
        return PruningPlan.load(path)
    if isinstance(spec, dict):
        out = {}
        for k, v in spec.items():
            ids = [k] if isinstance(k, int) else [g.id for g in pruner.groups if group_label(g) == k]
            if not ids or (isinstance(k, int) and not 0 <= k < len(pruner.groups)):
                raise ValueError(f"spec names {k!r}, which is neither a group id nor a group's first layer")
            for i in ids:
                out[i] = _check(v, f"spec[{k!r}]")
        return out
    raise TypeError(f"spec must be a PruningPlan, a plan.json path or {{group: ratio}}, got {type(spec).__name__}")


def matching_sensitivity(
    ws: Workspace | None, sensitivity: Sensitivity | None, pruner: Pruner, analysed: nn.Module
) -> Sensitivity | None:
    """The given curves, else the workspace's ``sensitivity.json``; refused when made for another model."""
    where = "the sensitivity results"
    config = None
    if sensitivity is None and ws is not None and ws.exists(artifacts.SENSITIVITY):
        data = ws.read_json(artifacts.SENSITIVITY)
        sensitivity, config, where = (
            Sensitivity.from_dict(data),
            data.get("config"),
            str(ws.path(artifacts.SENSITIVITY)),
        )
    if sensitivity is None:
        return None
    fix = "run ana for this model (prunekit ana, same workspace), or use another workspace"
    mine = {g.id: (group_label(g), g.n_units) for g in pruner.groups}  # excluded here but analysed: still a group
    for g, label in sensitivity.labels.items():
        theirs = (label, sensitivity.sizes.get(g, mine.get(g, (None, None))[1]))
        if mine.get(g) != theirs:
            ours = mine.get(g, ("(no such group)", 0))
            raise ValueError(
                f"{where} were measured on another model: its channel group {g} is {label!r} with "
                f"{theirs[1]} channels, this model's is {ours[0]!r} with {ours[1]}; {fix}"
            )
    if config and config.get("model") != model_fingerprint(analysed):
        raise ValueError(
            f"{where} were measured on other weights of this architecture (another checkpoint); "
            f"{fix}. To prune a fine-tuned model further, pass baseline= the model ana analysed "
            "(prunekit prune --start-from does)"
        )
    return sensitivity


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    removal_ratio: float | None = None,
    threshold: float | None = None,
    spec: Any = None,
    workspace: str | Workspace | None = None,
    sensitivity: Sensitivity | None = None,
    excludes: Iterable[str] = (),
    max_ratio: float | dict = 0.9,
    round_to: int = 1,
    mode: str = "sparse",
    criterion: str = "l2",
    fallback: str = "uniform",
    strategy: str = "equal_loss",
    search: int = 0,
    eval_fn: Callable[..., float] | None = None,
    eval_args: Sequence = (),
    calibrate: Callable[[nn.Module], Any] | None = None,
    seed: int = 0,
    tolerance: float = 0.01,
    keep_pruned: PruningPlan | None = None,
    baseline: nn.Module | None = None,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable | None = None,
    compensate: bool = False,
    reconstruct: bool = False,
    remove_blocks: int = 0,
    block_criterion: str = "influence",
    remove_experts: int = 0,
    log: Callable[[str], None] = print,
    config: PruneConfig | None = None,
) -> PruneResult:
    """Prune ``model`` to a MACs reduction (``removal_ratio``) or a tolerated loss (``threshold``).

    Args:
        model: The model; pruned in place in ``'sparse'`` mode.
        example_inputs: Inputs for tracing and MACs counting.
        removal_ratio: Fraction of MACs to remove, in [0, 1). Achieved within ``tolerance``.
        threshold: Largest predicted relative metric loss to accept (needs ana results).
        spec: A pruning plan to apply as given: a :class:`PruningPlan`, a ``plan.json`` path,
            or ``{group_id or layer name: ratio}``.
        workspace: Reads ``sensitivity.json`` from ana; writes ``plan.json``.
        sensitivity: Sensitivity curves (instead of reading them from the workspace).
        excludes: Module names whose channels stay.
        max_ratio: Largest fraction of any group's channels to remove (or ``{group: ratio}``).
        round_to: Keep channel counts multiples of this. Where the rounded plan falls short of
            ``removal_ratio``, one more step of the cheapest group is taken at a time (see
            :meth:`Allocator.round_up`).
        mode: ``'sparse'`` (for fine-tuning) or ``'slim'``.
        criterion: Which channels go first within a group.
        fallback: Without sensitivity results: ``'uniform'`` (one ratio for all groups) or
            ``'global'`` (one criterion threshold across groups).
        tolerance: Allowed gap between achieved and requested MACs reduction.
        strategy: With sensitivity results and a MACs target: ``'equal_loss'`` (every group
            pruned up to one common predicted loss) or ``'greedy'`` (least summed predicted
            loss per MAC, treating groups as independent).
        search: With sensitivity results and a MACs target, also try this many variants of
            the allocation (each group's curve trusted up to a random factor, plus ``greedy``),
            all at the same MACs, evaluate each with ``eval_fn`` (after ``calibrate``) and
            keep the best: the reference optimizer's one-step search, seeded by ``ana``.
            Costs ``search + 1`` evaluations. ``0`` (default) takes the allocation as computed.
        eval_fn: ``eval_fn(model, *eval_args) -> number`` for ``search`` (the direction is the
            sensitivity results' ``lower_is_better``).
        eval_args: Extra positional arguments for ``eval_fn``.
        calibrate: ``calibrate(model)`` run on each candidate before it is evaluated and on
            the result, e.g. :func:`prunekit.workflow.evaluation.make_bn_calibration` to re-estimate
            BatchNorm statistics.
        seed: Seeds the search's variants.
        keep_pruned: An earlier plan of this model (a fine-tuned step): its pruned channels stay pruned;
            every candidate allocation is measured with them, so ``removal_ratio`` is met by the merged
            plan, and the counts and ``ratios`` are those of the merged plan.
        baseline: The model ana analysed when ``model`` carries other weights (a fine-tuned step);
            the workspace's ``sensitivity.json`` must describe it (default: ``model``).
        calibration: Calibration batches (``(inputs, target)`` pairs or bare model inputs, a few
            hundred samples) for one-shot pruning: the ``activation`` / ``fluctuation``
            criteria, ``compensate``, the ``influence`` of blocks and the routing weight of
            experts are measured on them; the ``taylor`` criterion sums the gradients of
            ``loss_fn`` over them (``(inputs, target)`` pairs).
        loss_fn: ``loss_fn(model_output, target) -> scalar``, the loss of the ``taylor``
            criterion's gradients (default cross-entropy).
        compensate: Fold each removed input channel's mean contribution into its consumer's
            bias (FLAP's bias compensation, see :mod:`prunekit.engine.calibration`), in the
            sparse model as in the slim one; needs ``calibration``.
        reconstruct: Refit the kept weights of every layer whose inputs lose channels, by
            least squares, to the unpruned model's outputs of that layer on ``calibration``
            (sequential, layer after layer in execution order; see
            :mod:`prunekit.engine.reconstruct`). Runs on the chosen plan before ``calibrate``;
            ``search`` ranks its candidates without it. Needs ``calibration``; replaces
            ``compensate`` (the refit includes the biases), so not both.
        remove_blocks: Remove this many whole residual blocks / transformer layers (see
            :mod:`prunekit.engine.depth`); with ``removal_ratio`` the width pruning makes up the
            rest of the MACs target, alone it is depth pruning only.
        block_criterion: Which blocks go: ``'influence'`` (ShortGPT's ``1 - cos(input,
            output)`` on ``calibration``) or ``'metric'`` (``eval_fn`` with each block removed).
        remove_experts: Remove this many experts of every mixture-of-experts layer (least
            routing weight on ``calibration``, else on the example inputs).
        config: A :class:`~prunekit.workflow.options.PruneConfig` giving the options it has
            (``removal_ratio``, ``threshold``, ``max_ratio``, ``round_to``, ...) instead of
            the keywords; a keyword given as well with another value is refused.

    Raises:
        ValueError: The workspace's sensitivity results were measured on another model.
        EquivalenceError: The slim model of the result would fail or differ (never returned).
    """
    if config is not None:
        passed = {k: v for k, v in locals().items() if k not in ("model", "example_inputs", "config")}
        return prune(model, example_inputs, **with_config(prune, config, passed))
    req = Request(removal_ratio, threshold, spec, max_ratio, round_to, mode, criterion, fallback, strategy, search,
                  eval_fn, eval_args, calibrate, seed, tolerance, keep_pruned, compensate, reconstruct)  # fmt: skip
    req.check(remove_blocks or remove_experts)
    if sparse.is_sparse(model):
        raise ValueError(
            "the model is already sparse; prune the original model, or transform this one "
            "first (prunekit.to_slim) and prune the slim model"
        )
    ws = workspace if isinstance(workspace, Workspace) or workspace is None else Workspace(workspace)
    pruner = validated_pruner(model, example_inputs, excludes=excludes, criterion=criterion, log=log)
    before = count(model, example_inputs)
    _read_calibration(pruner, criterion, calibration, compensate, reconstruct, loss_fn)
    structure = plan_structure(
        model,
        example_inputs,
        pruner,
        remove_blocks=remove_blocks,
        block_criterion=block_criterion,
        remove_experts=remove_experts,
        calibration=calibration,
        eval_fn=eval_fn,
        eval_args=eval_args,
        lower_is_better=bool(getattr(eval_fn, "lower_is_better", False)),
    )
    sensitivity = matching_sensitivity(ws, sensitivity, pruner, baseline if baseline is not None else model)
    if req.spec is not None:
        chosen = _from_spec(req.spec, pruner, round_to)
    else:
        allocator = Allocator(model, example_inputs, pruner, structure, sensitivity, before, req)
        chosen = _search(model, allocator, req) if search else allocator.choose()
    chosen.notes[:0] = structure.notes
    plan = _finish_plan(model, example_inputs, pruner, structure, chosen, req)
    dense = copy.deepcopy(model) if reconstruct else None
    sparse.apply_plan(model, plan)
    if dense is not None:
        _reconstruct(dense, model, plan, calibration, chosen.notes)
        del dense
    if calibrate is not None:
        calibrate(model)
    slim, _ = checked_slim(model, example_inputs)  # never a slim model that does not run or match
    after = _record_counts(plan, before, count(slim, example_inputs), req, chosen)
    if ws is not None:
        plan.save(ws.path(artifacts.PLAN))
    for n in chosen.notes:
        log(n)
    return PruneResult(
        slim if mode == "slim" else model,
        plan,
        chosen.ratios,
        chosen.method,
        before.macs,
        after.macs,
        before.params,
        after.params,
        chosen.predicted,
        chosen.notes,
    )


@dataclass
class Request:
    """What :func:`prune` was asked for (its arguments other than the model and the data)."""

    removal_ratio: float | None
    threshold: float | None
    spec: Any
    max_ratio: float | dict
    round_to: int
    mode: str
    criterion: str
    fallback: str
    strategy: str
    search: int
    eval_fn: Callable[..., float] | None
    eval_args: Sequence
    calibrate: Callable[[nn.Module], Any] | None
    seed: int
    tolerance: float
    keep_pruned: PruningPlan | None
    compensate: bool
    reconstruct: bool = False

    def check(self, structure_only: bool) -> None:
        """Refuse contradictory or out-of-range arguments; blocks/experts alone get an empty spec."""
        search = self.search
        if isinstance(search, bool) or not isinstance(search, int) or search < 0:
            raise ValueError(f"search must be a number of candidate allocations >= 0, got {search!r}")
        if search and not callable(self.eval_fn):
            raise ValueError(
                "search needs eval_fn(model, *eval_args) -> metric to compare the candidate "
                f"allocations, got eval_fn={self.eval_fn!r}"
            )
        if self.calibrate is not None and not callable(self.calibrate):
            raise TypeError(f"calibrate must be callable (calibrate(model)), got {type(self.calibrate).__name__}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self._check_goal(structure_only)
        if self.mode not in ("sparse", "slim"):
            raise ValueError(f"mode must be 'sparse' or 'slim', got {self.mode!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")

    def _check_goal(self, structure_only: bool) -> None:
        given = [x is not None for x in (self.removal_ratio, self.threshold, self.spec)]
        if not any(given) and structure_only:
            self.spec = {}  # blocks / experts only: no channel is pruned
        elif sum(given) != 1:
            raise ValueError(
                "give exactly one of removal_ratio (fraction of MACs to remove), threshold "
                "(tolerated relative metric loss) or spec (a pruning plan)"
            )
        if self.removal_ratio is not None:
            _check(self.removal_ratio, "removal_ratio")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
            raise ValueError(f"threshold must be a non-negative number (relative metric loss), got {t!r}")


@dataclass
class Attempt:
    """One allocation tried against the MACs goal.

    Attributes:
        gap: ``|achieved - goal|`` (0 without a MACs goal).
        ratios: ``{group_id: fraction of its channels removed}``.
        plan: The channels those ratios remove.
        achieved: The measured MACs reduction.
    """

    gap: float
    ratios: dict[int, float]
    plan: PruningPlan
    achieved: float


@dataclass
class Choice:
    """The allocation :func:`prune` goes with, how it was chosen and what it noted.

    ``ratios`` are the fractions the plan removes; ``requested`` the allocation's continuous ratios
    it was rounded from (``None``: the same).
    """

    ratios: dict[int, float]
    plan: PruningPlan
    method: str
    predicted: float | None = None
    notes: list[str] = field(default_factory=list)
    requested: dict[int, float] | None = None


def _plan_ratios(plan: PruningPlan, pruner: Pruner) -> dict[int, float]:
    """``{group_id: fraction of its channels the plan removes}`` (from the plan's ``groups``)."""
    return {int(k): len(v) / max(1, pruner.groups[int(k)].n_units) for k, v in plan.meta.get("groups", {}).items()}


def _with_kept(plan: PruningPlan, keep: PruningPlan | None) -> PruningPlan:
    """``plan`` with an earlier step's pruned channels (``keep``) removed too; its ``groups`` the union.

    >>> a = PruningPlan({"w": {0: [0]}}, {"w": [4]}, {"groups": {0: [0]}})
    >>> _with_kept(a, PruningPlan({"w": {0: [2]}}, {"w": [4]}, {"groups": {"0": [2]}})).meta["groups"]
    {0: [0, 2]}
    """
    if keep is None or plan.contains(keep):
        return plan
    groups = {int(g): set(u) for g, u in plan.meta.get("groups", {}).items()}
    for g, u in keep.meta.get("groups", {}).items():
        groups.setdefault(int(g), set()).update(u)
    meta = {**plan.meta, "groups": {g: sorted(u) for g, u in sorted(groups.items())}}
    return PruningPlan(plan.merge(keep).pruned, {**keep.shapes, **plan.shapes}, meta)


def _from_spec(spec: Any, pruner: Pruner, round_to: int) -> Choice:
    """The plan a spec describes, as given."""
    loaded = _load_spec(spec, pruner)
    plan = loaded if isinstance(loaded, PruningPlan) else pruner.plan(loaded, round_to=round_to)
    return Choice(_plan_ratios(plan, pruner), plan, "spec")


class Allocator:
    """Per-group ratios for a MACs goal or a loss threshold, checked against measured MACs.

    The allocation (by the sensitivity curves, else the fallback) predicts MACs from a linear
    model of each group's cost; every attempt is measured on the slim model and the target
    corrected by the prediction's error, up to six times. Measurements are cached per plan.
    """

    def __init__(self, model, inputs, pruner: Pruner, structure, sensitivity, before, req: Request) -> None:
        if req.threshold is not None and sensitivity is None:
            raise ValueError("threshold mode needs sensitivity results: run ana first (same workspace)")
        self.model, self.inputs, self.pruner, self.structure = model, inputs, pruner, structure
        self.sensitivity, self.before, self.caps = sensitivity, before, _max_ratios(pruner, req.max_ratio)
        self.goal, self.threshold, self.round_to, self.tolerance = (
            req.removal_ratio, req.threshold, req.round_to, req.tolerance
        )  # fmt: skip
        self.keep = req.keep_pruned  # an earlier step's channels: every plan is measured with them
        self.mm = MacsModel.from_counts(before, pruner.groups)
        self.cands = [g.id for g in pruner.prunable_groups if g.id not in structure.inside]
        self.method = "sensitivity" if sensitivity is not None else req.fallback
        self.notes: list[str] = []
        if sensitivity is None:
            self.notes.append(
                f"no sensitivity results: using the '{req.fallback}' allocation by the {req.criterion} criterion"
            )
        self.scores = {g.id: pruner.scores(g) for g in pruner.prunable_groups} if self.method == "global" else {}
        greedy_too = self.method == "sensitivity" and req.strategy != "greedy"
        self.hows = [req.strategy] + (["greedy"] if greedy_too else [])
        self._measured: dict[tuple, int] = {}
        if self.threshold is not None:  # what the threshold leaves after keep_pruned's channels (once)
            self.left_curve, self.left_threshold = self._threshold_budget()

    def ratios(self, target: float | None, how: str, loss: Callable[[int, float], float] | None = None) -> dict:
        """The allocation for ``target`` MACs (``how``: ``'equal_loss'`` or ``'greedy'``)."""
        mm, cands, caps = self.mm, self.cands, self.caps
        if loss is not None:
            return equal_loss(mm, cands, loss, caps, target)
        if self.method == "sensitivity":
            if self.threshold is not None:
                return greedy(mm, cands, self.left_curve, caps, threshold=self.left_threshold)
            if how == "greedy":
                return greedy(mm, cands, self.sensitivity.loss, caps, target_macs=target)
            return equal_loss(mm, cands, self.sensitivity.loss, caps, target)
        if self.method == "uniform":
            return uniform(mm, cands, caps, target)
        return global_ranking(mm, cands, self.scores, caps, target)

    def _threshold_budget(self) -> tuple[Callable[[int, float], float], float]:
        """The loss curves and threshold left after ``keep_pruned``'s channels (their loss is spent:
        a group's steps up to its earlier ratio cost nothing more)."""
        loss = self.sensitivity.loss
        kept = _plan_ratios(self.keep, self.pruner) if self.keep is not None else {}
        kept = {g: r for g, r in kept.items() if g in self.sensitivity.curves}
        if not kept:
            return loss, self.threshold
        spent = sum(loss(g, r) for g, r in kept.items())
        if spent > self.threshold:
            self.notes.append(
                f"the earlier pruned channels alone have a predicted loss of {spent:.4g}, more than the "
                f"threshold {self.threshold:g}: nothing more is pruned"
            )
        return (lambda g, r: loss(g, max(r, kept.get(g, 0.0)))), max(0.0, self.threshold - spent)

    def macs(self, plan: PruningPlan) -> int:
        """The measured MACs of ``plan`` (with the removed blocks and experts, and ``keep_pruned``'s
        channels); cached per plan."""
        plan = _with_kept(plan, self.keep)
        if not plan.pruned and not self.structure.macs_saved:
            return self.before.macs
        key = plan.key()
        if key not in self._measured:
            self._measured[key] = _measure(self.model, self.structure.combine(plan), self.inputs)[0]
        return self._measured[key]

    def reach(self, how: str, loss: Callable[[int, float], float] | None = None) -> Attempt:
        """The attempt whose measured MACs come closest to the goal (not merely the last one)."""
        best = None
        goal, before = self.goal, self.before.macs
        # the removed blocks and experts save MACs the width allocation does not predict
        target = before * (1 - goal) + self.structure.macs_saved if goal is not None else None
        for _ in range(6):
            ratios = self.ratios(target, how, loss)
            plan = self.pruner.plan(ratios, round_to=self.round_to) if ratios else self.pruner.plan(0.0)
            achieved = 1 - self.macs(plan) / before
            gap = abs(achieved - goal) if goal is not None else 0.0
            if best is None or gap < best.gap:
                best = Attempt(gap, ratios, plan, achieved)
            if goal is None or gap <= self.tolerance:
                break
            target -= (goal - achieved) * before  # correct the prediction's error
        if goal is not None and best.gap > self.tolerance and best.achieved < goal and self.round_to > 1:
            best = self.round_up(best, loss)
        if self.threshold is not None:
            best = self.round_within(best)
        return best

    def round_within(self, start: Attempt) -> Attempt:
        """Threshold mode: from the rounded plan, one rounding step more at a time.

        The curves' allocation is computed in continuous ratios, and the plan rounds each group's count
        of removed channels down (1.6 of 16 removes 1), with ``round_to`` to a multiple of it (2 of 16
        channels keep 16), so part of the threshold, or all of it, was left unused. From the rounded
        plan, this removes one more step of units (one unit, or ``round_to``'s) from the group whose step costs
        the least predicted loss per MAC saved, as long as the summed predicted loss stays within the
        threshold. The ratios returned are those the plan removes.
        """
        loss = self.sensitivity.loss
        current, stuck = start.plan, set()
        while True:
            counted = _with_kept(current, self.keep)
            removed = {int(g): len(u) for g, u in counted.meta.get("groups", {}).items()}
            now = _plan_ratios(counted, self.pruner)
            spent = sum(loss(g, r) for g, r in now.items())
            fits = [
                m
                for m in self._round_moves(removed, loss)
                if m[1] not in stuck and spent - loss(m[1], now.get(m[1], 0.0)) + loss(m[1], m[2]) <= self.threshold
            ]
            if not fits:
                break
            _, g, ratio = min(fits)
            plan = self.pruner.plan(now | {g: ratio}, round_to=self.round_to)
            if plan.key() == current.key():  # the same plan again: this group can give no more
                stuck.add(g)
            else:
                current = plan
        now = _plan_ratios(_with_kept(current, self.keep), self.pruner)
        return Attempt(0.0, now, current, 1 - self.macs(current) / self.before.macs)

    def round_up(self, start: Attempt, loss: Callable[[int, float], float] | None = None) -> Attempt:
        """Where ``round_to`` left the plan short of the MACs goal: one rounding step more at a time.

        Each group keeps a multiple of ``round_to`` channels, its count rounded up, so an allocation
        computed in continuous ratios falls far short of the goal when the steps are coarse (16 of a
        64-channel group). From the rounded plan, this removes one more step of units from the group
        whose step costs the least predicted loss per MAC saved (the sensitivity curves; without
        them, the group pruned least so far), until the measured MACs reach the goal or no group
        can give more; a step that goes past the goal is set aside for the other groups' steps, and
        the attempt closest to the goal is kept.
        """
        loss = loss or (self.sensitivity.loss if self.method == "sensitivity" else (lambda g, r: r))
        best = current = start
        before, goal = self.before.macs, self.goal
        overshot: set[int] = set()  # groups whose next step went past the goal: try the others first
        stuck: set[int] = set()  # groups whose next step removes nothing more (a member must keep a channel)
        while current.achieved < goal - self.tolerance:
            counted = _with_kept(current.plan, self.keep)
            removed = {int(g): len(u) for g, u in counted.meta.get("groups", {}).items()}
            moves = [m for m in self._round_moves(removed, loss) if m[1] not in overshot | stuck]
            if not moves:
                break
            _, g, ratio = min(moves)
            ratios = {k: n / self.pruner.groups[k].n_units for k, n in removed.items()} | {g: ratio}
            plan = self.pruner.plan(ratios, round_to=self.round_to)
            if plan.key() == current.plan.key():  # the same plan again: this group can give no more
                stuck.add(g)
                continue
            achieved = 1 - self.macs(plan) / before
            attempt = Attempt(abs(achieved - goal), ratios, plan, achieved)
            if attempt.gap < best.gap:
                best = attempt
            if achieved > goal + self.tolerance:
                overshot.add(g)
            else:
                current = attempt
        return best

    def _round_moves(self, removed: dict[int, int], loss: Callable[[int, float], float]) -> list:
        """``(predicted loss per MAC saved, group, ratio)`` of every group's next rounding step."""
        groups = self.pruner.groups
        now = torch.zeros(self.mm.n, dtype=torch.float64)
        for g, n in removed.items():
            now[g] = n / groups[g].n_units
        macs_now = self.mm.predict(now)
        moves = []
        for g in self.cands:
            group = groups[g]
            step, units = group.keep_step(self.round_to), group.n_units
            more = removed.get(g, 0) + step
            ratio = more / units
            if more > group.n_prunable or units - more < step or ratio > self.caps.get(g, 0.9) + 1e-9:
                continue
            after = now.clone()
            after[g] = ratio
            saved = macs_now - self.mm.predict(after)
            dl = loss(g, ratio) - loss(g, float(now[g]))
            if saved > 0 and math.isfinite(dl):
                moves.append((max(dl, 0.0) / saved, g, ratio))
        return moves

    def best(self) -> Attempt:
        """The strategy's attempt; ``greedy`` finishes the job where ``equal_loss`` misses the tolerance.

        ``equal_loss`` moves several groups at once on flat curves; on small models it may not
        land within the tolerance, and greedy (2% steps of one group) then does.
        """
        best = None
        for how in self.hows:
            got = self.reach(how)
            if best is None or got.gap < best.gap:
                best = got
            if best.gap <= self.tolerance:
                break
        return best

    def choice(self, attempt: Attempt) -> Choice:
        """``attempt`` as the result: its predicted loss and a note when it missed the MACs goal."""
        notes = list(self.notes)
        if self.goal is not None and attempt.gap > self.tolerance:
            note = f"reached a MACs reduction of {attempt.achieved:.3f} for a requested {self.goal:.3f}"
            if self.round_to > 1:
                note += f" (round_to={self.round_to}: channel counts in multiples of it; a smaller one gets closer)"
            notes.append(note)
        predicted = None
        removed = _plan_ratios(_with_kept(attempt.plan, self.keep), self.pruner)
        if self.method == "sensitivity":  # of the channels the plan removes (rounding may remove fewer)
            predicted = sum(self.sensitivity.loss(g, r) for g, r in removed.items() if g in self.sensitivity.curves)
        ratios = {g: removed.get(g, 0.0) for g in attempt.ratios} | removed
        return Choice(ratios, attempt.plan, self.method, predicted, notes, dict(attempt.ratios))

    def choose(self) -> Choice:
        """The allocation as computed."""
        return self.choice(self.best())


def _finish_plan(model, inputs, pruner: Pruner, structure, chosen: Choice, req: Request) -> PruningPlan:
    """The chosen plan with the earlier pruned channels, its metadata, the structure and compensation."""
    plan, keep_pruned = chosen.plan, req.keep_pruned
    if keep_pruned is not None and not plan.contains(keep_pruned):  # earlier pruned channels stay pruned
        plan = _with_kept(plan, keep_pruned)
        chosen.notes.append("merged the earlier plan: the new one did not contain every earlier pruned channel")
    plan.meta.update(
        {
            "method": chosen.method,
            "ratios": {str(k): v for k, v in chosen.ratios.items()},
            "requested_ratios": {str(k): v for k, v in (chosen.requested or chosen.ratios).items()},
            "removal_ratio": req.removal_ratio,
            "threshold": req.threshold,
            "round_to": req.round_to,
            "predicted_loss": chosen.predicted,
            "labels": {str(g): group_label(pruner.groups[g]) for g in chosen.ratios},
        }
    )
    if isinstance(inputs, torch.Tensor):  # for 'prunekit transform' (the shape of the example input)
        plan.meta["input_shape"] = list(inputs.shape)
    plan = structure.combine(plan)
    if req.compensate:
        plan = compensate_biases(model, plan, pruner.activations)
        chosen.notes.append(f"bias compensation: {len(plan.meta['compensated'])} layers")
    return plan


def _record_counts(plan: PruningPlan, before, after, req: Request, chosen: Choice):
    """Write the measured counts into the plan; note a merged plan that overshoots the request."""
    plan.meta.update(
        {
            "macs_before": before.macs,
            "macs_after": after.macs,
            "params_before": before.params,
            "params_after": after.params,
        }
    )
    merged = 1 - after.macs / before.macs if before.macs else 0.0
    asked = req.removal_ratio
    if req.keep_pruned is not None and asked is not None and merged > asked + req.tolerance:
        chosen.notes.append(
            f"with the earlier pruned channels the MACs reduction is {merged:.3f} (requested "
            f"{asked:.3f}): the counts are those of the merged plan"
        )
    return after


def _read_calibration(
    pruner: Pruner,
    criterion: str,
    calibration: Iterable[Any] | None,
    compensate: bool,
    reconstruct: bool = False,
    loss_fn: Callable | None = None,
) -> None:
    """What the criterion (input statistics, or ``taylor``'s gradients of ``loss_fn``) or the
    compensation reads from ``calibration``; refuses ``reconstruct`` without ``calibration`` or
    with ``compensate``."""
    for name, value in (("compensate", compensate), ("reconstruct", reconstruct)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if compensate and reconstruct:
        raise ValueError(
            "compensate=True and reconstruct=True: the least-squares refit already sets the biases; choose one"
        )
    if reconstruct and calibration is None:
        raise ValueError(
            "reconstruct=True needs calibration batches: pass calibration=<a loader or list of model inputs> "
            "(a few hundred samples; e.g. calibration=[example_inputs] for a try)"
        )
    crit = CRITERIA[criterion]
    needs = [
        w
        for w, on in (
            (f"criterion {criterion!r}", crit.reads_data),
            ("compensate=True", compensate),
        )
        if on
    ]
    if not needs:
        return
    if calibration is None:
        what = (
            "(inputs, target) batches, e.g. a training loader"
            if crit.needs_grads
            else "a loader or list of model inputs"
        )
        raise ValueError(
            f"{' and '.join(needs)} need calibration batches: pass calibration=<{what}> (a few hundred samples)"
        )
    pruner.read_calibration(calibration, loss_fn)
    if compensate and not crit.needs_activations:
        pruner.collect_activations(calibration)


def _reconstruct(dense: nn.Module, model: nn.Module, plan: PruningPlan, calibration, notes: list[str]) -> None:
    """Refit the layers after the pruned channels (least squares); the plan records which."""
    report = reconstruct_layers(dense, model, plan, calibration)
    plan.meta["reconstructed"] = list(report.layers)
    notes.append(report.summary())


def _search(model: nn.Module, allocator: Allocator, req: Request) -> Choice:
    """Evaluate the computed allocation and ``n`` variants at the same MACs; keep the best.

    The reference optimizer's one-step search, seeded by ``ana``: the variants trust each
    group's curve up to a random factor (plus ``greedy``); ``search + 1`` evaluations.
    """
    sensitivity, tolerance = allocator.sensitivity, allocator.tolerance
    if allocator.method != "sensitivity" or allocator.goal is None:
        raise ValueError(
            "search compares allocations at one MACs target: it needs removal_ratio and "
            "sensitivity results (run ana first, same workspace)"
        )
    gen = torch.Generator().manual_seed(req.seed)
    sign = -1.0 if sensitivity.lower_is_better else 1.0
    best = allocator.best()
    found = [(best, "computed")]
    if "greedy" not in allocator.hows:
        found.append((allocator.reach("greedy"), "greedy"))
    while len(found) < req.search + 1:
        found.append((allocator.reach("equal_loss", perturbed_loss(sensitivity.loss, allocator.cands, gen)), "variant"))
    scored = []
    was = model.training
    model.eval()
    bar = progress_bar(len(found), "search", "candidate", leave=False)
    try:
        for cand, kind in found:
            if bar is not None:
                bar.update(1)
            if cand.gap > tolerance and cand is not best:
                continue  # off the MACs target: not comparable
            score = evaluate_point(
                model, _with_kept(cand.plan, allocator.keep), None, req.eval_fn, req.eval_args, req.calibrate
            )
            scored.append((sign * score, kind, cand))
    finally:
        model.train(was)
        if bar is not None:
            bar.close()
    top = max(scored, key=lambda t: t[0])  # first of equals: the computed allocation wins ties
    first = scored[0][0]
    out = allocator.choice(top[2])
    out.notes.append(
        f"search: {len(scored)} allocations at the target evaluated; kept the {top[1]} one "
        f"(metric {sign * top[0]:.4g}, computed allocation {sign * first:.4g})"
    )
    return out
