"""Sensitivity analysis (``ana``): how much the metric drops when one group loses channels.

For every prunable channel group and every ratio, the group alone is pruned in sparse form
(only the affected tensors are saved and restored, never the whole model), the user's
``eval_fn(model, *args)`` is called, and the model is restored. The group is the unit:
coupled layers (both sides of a residual) are always measured together.

When ``eval_fn`` was built by :func:`prunekit.workflow.evaluation.make_eval_fn`, ana runs the
forward itself and, by default, analyses fast (:mod:`prunekit.workflow.fast_ana`): the
unpruned activations before each group are reused, points stop early once their loss is known
well enough, and only the ratios where a curve bends are evaluated (the others interpolated).
The result says how every point was obtained (:attr:`Sensitivity.details`, ``cost``).
``fast=False`` evaluates every point in full; an opaque ``eval_fn`` always is. ``workers``
forks processes that share the groups on this machine's cores.

Every evaluated point is written to the workspace at once (atomically); a second call
reuses the results unless ``forced=True``, and an interrupted run resumes where it stopped.
The results are invalidated, with a message, when the model, the excludes, the ratios or
the criterion change. ``rank``/``world_size`` split the work over processes; their results
merge in the same workspace. Under ``torchrun`` (see :mod:`prunekit.workflow.distributed`) they default
to the process group's: each rank evaluates its share of the groups and writes
``ana.rank<r>.json``, then rank 0 merges everything into ``ana.json`` and every rank gets the
whole result. A rank that dies loses only its unfinished points: a rerun, on any number of
processes, reuses every point any rank saved.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> score = lambda m: -float((m(x) - model(x)).abs().mean().detach())
    >>> sens = ana(model, x, score, workspace=tempfile.mkdtemp(), ratios=(0.5,), progress=False, log=print)
    validation: 3 channel groups, 1 prunable; the slim model runs and matches
    ana: group 0 (0, 8 ch) 1/1: 50% -> -0
    >>> list(sens.curves) == [g.id for g in sens.groups_info]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.pruner import Pruner
from prunekit.utils import artifacts
from prunekit.workflow import distributed as pdist
from prunekit.workflow import fast_ana
from prunekit.workflow.evaluation import EvalSpec
from prunekit.workflow.options import AnaConfig, FastAnaConfig, with_config
from prunekit.workflow.progress import bar as progress_bar
from prunekit.workflow.validation import group_label, validated_pruner
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["ana", "Sensitivity", "DEFAULT_RATIOS", "FITS", "isotonic"]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FORMAT = "prunekit-ana"
FITS = ("isotonic", "running_max")


def isotonic(ys: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``ys`` in least squares (pool adjacent violators).

    A measured curve is noisy: one point whose loss came out too high makes the next look like
    a gain. Pooling each violating run into its mean treats every point as an equally noisy
    measurement; a running maximum would instead carry that one loss forward over every ratio
    after it. Hand-written rather than a SciPy dependency: ana's curves have ten
    points.

    Example:
        >>> isotonic([0.0, 0.3, 0.1, 0.4])
        [0.0, 0.2, 0.2, 0.4]
    """
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [round(m, 12) for m, n in blocks for _ in range(int(n))]


@dataclass
class Sensitivity:
    """Sensitivity curves: the metric after pruning each group alone at each ratio.

    Attributes:
        baseline: The metric of the unpruned model.
        lower_is_better: True for losses (then a *rise* is a drop in quality).
        ratios: The analysed ratios.
        curves: ``{group_id: {ratio: metric}}``.
        labels: ``{group_id: readable name}`` (the group's first layer).
        sizes: ``{group_id: number of channels}``.
        details: ``{group_id: {ratio: info}}``: how each point was obtained. ``info["how"]`` is
            ``full`` (measured on every batch), ``early_stop`` (measured until a stop rule held:
            ``info["stop"]`` is ``precise`` or ``collapsed``; the value is the baseline minus
            the paired drop), ``interpolated`` (between measured ratios) or ``collapsed`` (the
            curve's collapsed value); ``images`` and ``batches`` count what the point used.
            Empty for results written before these were recorded.
        fit: How :meth:`loss` reads a curve: ``"isotonic"`` (default; the least-squares
            non-decreasing fit of the measured losses, see :func:`isotonic`) or
            ``"running_max"`` (each point raised to the largest loss before it).
        cost: What the analysis did: ``method`` (``fast``/``full``), ``points``,
            ``evaluated``, ``early_stop``, ``interpolated``, ``collapsed``, and for the fast
            analysis ``images`` (every image put through the model: baseline, cache captures,
            checks and points), ``image_equivalents`` (the same counted by the share of the
            model's MACs that ran), ``prefix_groups``, ``batched_groups`` and ``fallbacks``.
    """

    baseline: float
    lower_is_better: bool
    ratios: list[float]
    curves: dict[int, dict[float, float]]
    labels: dict[int, str] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    details: dict[int, dict[float, dict]] = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    fit: str = "isotonic"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"Sensitivity fit={self.fit!r} is not one of {', '.join(FITS)}: use one of them")

    def estimated(self) -> dict[int, dict[float, str]]:
        """``{group_id: {ratio: how}}`` of the points that were not measured on every batch."""
        out: dict[int, dict[float, str]] = {}
        for g, pts in self.details.items():
            for r, info in pts.items():
                if info.get("how", "full") != "full":
                    out.setdefault(g, {})[r] = info["how"]
        return out

    def summary(self) -> str:
        """What was evaluated and estimated, and at what cost (from :attr:`cost`), in a few lines.

        Example:
            >>> cost = {"method": "full", "points": 1, "evaluated": 1}
            >>> Sensitivity(1.0, False, [0.5], {0: {0.5: 0.9}}, cost=cost).summary()
            'full analysis: 1 of 1 points evaluated on every batch'
        """
        c = self.cost
        if not c:
            return "no cost recorded (results written before prunekit recorded it)"
        n, ev = c.get("points", 0), c.get("evaluated", 0)
        if c.get("method") != "fast":
            line = f"full analysis: {ev} of {n} points evaluated on every batch"
            return line + (f", {c['collapsed']} collapsed (not evaluated)" if c.get("collapsed") else "")
        lines = [
            f"fast analysis: {ev} of {n} points evaluated ({c.get('full', 0)} on every batch, {c.get('early_stop', 0)} "
            f"stopped early: {c.get('stopped_precise', 0)} known well enough, {c.get('stopped_collapsed', 0)} past "
            f"collapse), {c.get('interpolated', 0)} interpolated, {c.get('collapsed', 0)} collapsed (not evaluated)"
        ]
        if "images" in c:
            lines.append(
                f"  {c['images']:,} images through the model ({c.get('image_equivalents', 0):,.0f} counted by "
                f"the share of MACs that ran): points {c.get('point_images', 0):,}, "
                f"baseline {c.get('baseline_images', 0):,}, "
                f"cache captures {c.get('capture_images', 0):,}, checks {c.get('verify_images', 0):,}; "
                f"cached activations for {c.get('prefix_groups', 0)} groups, batched variants for "
                f"{c.get('batched_groups', 0)}"
            )
        st = c.get("settings", {})
        if st.get("early_stop"):
            lines.append(
                f"  early stop: the baseline minus the drop paired on the images used, once the "
                f"{st.get('confidence', 0):.0%} bound's half-width is at most {st.get('tolerance')} relative loss or "
                f"{st.get('rel_tolerance')} of the loss (after at least {st.get('min_images')} images)"
            )
        if st.get("adaptive"):
            lines.append(
                f"  interpolated: one ratio in {st.get('stride')} evaluated first, then bisection where "
                f"interpolating could be off by more than {st.get('interp_tolerance')} relative loss"
            )
        for g, why in sorted(c.get("fallbacks", {}).items(), key=lambda t: int(t[0]) if t[0].isdigit() else 0):
            lines.append(f"  group {g}: {why}")
        return "\n".join(lines)

    def loss(self, gid: int, ratio: float) -> float:
        """Relative metric loss of pruning group ``gid`` alone at ``ratio``.

        The measured losses are fitted non-decreasing (:attr:`fit`) and interpolated linearly
        between ratios; 0 at ratio 0; at the last analysed ratio its value; past it ``inf``,
        as for a group that was not analysed (excluded, unprunable).

        Example:
            >>> s = Sensitivity(1.0, False, [0.2, 0.4, 0.6], {0: {0.2: 0.7, 0.4: 0.9, 0.6: 0.6}})
            >>> round(s.loss(0, 0.4), 6), round(s.loss(0, 0.3), 6)  # 0.1 and 0.3 pooled to their mean
            (0.2, 0.2)
        """
        if ratio <= 0:
            return 0.0
        curve = self.curves.get(gid)
        if not curve:
            return math.inf
        xs = [0.0] + sorted(curve)
        ys = [0.0] + self._fitted([self._rel(curve[r]) for r in sorted(curve)])
        if ratio >= xs[-1]:
            return ys[-1] if ratio <= xs[-1] + 1e-9 else math.inf
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= ratio <= x1:
                return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
        return ys[-1]

    def _fitted(self, losses: list[float]) -> list[float]:
        if self.fit == "running_max":
            return list(itertools.accumulate(losses, max))
        return isotonic(losses)

    def _rel(self, score: float) -> float:
        scale = abs(self.baseline) if self.baseline != 0 else 1.0
        drop = (score - self.baseline) if self.lower_is_better else (self.baseline - score)
        return max(0.0, drop / scale)

    def order(self) -> list[int]:
        """Group ids, most sensitive first (largest mean loss)."""

        def mean_loss(g):
            vals = [self._rel(v) for v in self.curves[g].values()]
            return sum(vals) / max(1, len(vals))

        return sorted(self.curves, key=mean_loss, reverse=True)

    def table(self, limit: int | None = None) -> str:
        """A text table of the curves, most sensitive groups first."""
        ratios = self.ratios
        head = f"{'group':>5}  {'layer':<40} {'ch':>5}  " + " ".join(f"{r:>6.0%}" for r in ratios)
        est = self.estimated()
        note = (
            "" if not est else ("; ~: interpolated, *: estimated on part of the batches, ^: collapsed (not evaluated)")
        )
        lines = [
            f"baseline metric {self.baseline:.4g} ({'lower' if self.lower_is_better else 'higher'} is better);"
            f" cells: metric after pruning that group alone{note}",
            head,
            "-" * len(head),
        ]
        marks = {"interpolated": "~", "early_stop": "*", "collapsed": "^"}
        for gid in self.order()[:limit]:
            cells = []
            for r in ratios:
                v = self.curves[gid].get(r)
                mark = marks.get(est.get(gid, {}).get(r, ""), "")
                cells.append(f"{mark + format(v, '.3g'):>6}" if v is not None else f"{'-':>6}")
            label = self.labels.get(gid, "")[:40]
            lines.append(f"{gid:>5}  {label:<40} {self.sizes.get(gid, 0):>5}  " + " ".join(cells))
        return "\n".join(lines)

    def plot(self, path: str, limit: int = 12) -> str | None:
        """Write a PNG of the curves (needs matplotlib); returns the path or None."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(8, 5))
        for gid in self.order()[:limit]:
            xs = sorted(self.curves[gid])
            ax.plot(
                [0] + xs,
                [self.baseline] + [self.curves[gid][x] for x in xs],
                marker="o",
                label=f"{gid}: {self.labels.get(gid, '')[:30]}",
            )
        ax.set_xlabel("fraction of the group's channels removed")
        ax.set_ylabel("metric")
        ax.set_title(f"Sensitivity ({min(limit, len(self.curves))} most sensitive groups)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "lower_is_better": self.lower_is_better,
            "ratios": self.ratios,
            "curves": {str(g): {str(r): v for r, v in c.items()} for g, c in self.curves.items()},
            "labels": {str(g): v for g, v in self.labels.items()},
            "sizes": {str(g): v for g, v in self.sizes.items()},
            "details": {str(g): {str(r): v for r, v in c.items()} for g, c in self.details.items()},
            "cost": self.cost,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls(
            d["baseline"],
            d["lower_is_better"],
            list(d["ratios"]),
            {int(g): {float(r): v for r, v in c.items()} for g, c in d["curves"].items()},
            {int(g): v for g, v in d.get("labels", {}).items()},
            {int(g): v for g, v in d.get("sizes", {}).items()},
            {int(g): {float(r): v for r, v in c.items()} for g, c in d.get("details", {}).items()},
            dict(d.get("cost", {})),
            d.get("fit", "isotonic"),
        )


def _score(eval_fn: Callable, model: nn.Module, args: Sequence) -> float:
    with pdist.local():  # every rank evaluates its own points: no collectives inside eval_fn
        value = eval_fn(model, *args)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eval_fn must return a number (the metric), got {type(value).__name__}: {value!r:.80}")
    value = float(value)
    if math.isnan(value):
        raise ValueError("eval_fn returned NaN; check the evaluation function")
    return value


def _group_line(group, ratios: Sequence[float], points: dict, mine: list) -> str:
    """``ana: group 3 (layer1.0.conv1, 64 ch) 2/9: 30% -> 0.91, 60% -> 0.84``."""
    done = 1 + next(i for i, g in enumerate(mine) if g.id == group.id)
    cells = ", ".join(f"{r:.0%} -> {points[f'{group.id}/{r}']:.4g}" for r in ratios if f"{group.id}/{r}" in points)
    return f"ana: group {group.id} ({group_label(group)}, {group.n_units} ch) {done}/{len(mine)}: {cells}"


def _config(pruner: Pruner, excludes, ratios, criterion, lower_is_better, collapse, method: Any = "full") -> dict:
    return {
        "model": model_fingerprint(pruner.model),
        "excludes": sorted(excludes),
        "ratios": list(ratios),
        "criterion": criterion,
        "lower_is_better": lower_is_better,
        "collapse": collapse,
        "groups": [[m.name for m in g.members][:4] + [g.n_units] for g in pruner.prunable_groups],
        "method": method,
    }


def _explain(old: dict, new: dict) -> str:
    keys = ("model", "excludes", "ratios", "criterion", "lower_is_better", "collapse", "groups", "method")
    what = [k for k in keys if old.get(k) != new.get(k)]
    names = {
        "model": "the model's weights or architecture",
        "excludes": "the excludes",
        "ratios": "the ratios",
        "criterion": "the criterion",
        "lower_is_better": "the metric direction",
        "collapse": "collapse",
        "groups": "the channel groups",
        "method": "the analysis method (fast or full, or its settings)",
    }
    return ", ".join(names[w] for w in what) or "the configuration"


def ana(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: Callable[..., float],
    args: Sequence = (),
    *,
    workspace: str | Workspace,
    excludes: Iterable[str] = (),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    criterion: str = "l2",
    forced: bool = False,
    lower_is_better: bool = False,
    collapse: float | None = 0.5,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    pruner: Pruner | None = None,
    log: Callable[[str], None] = print,
    fast: bool | FastAnaConfig = True,
    workers: int = 1,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable | None = None,
    config: AnaConfig | None = None,
) -> Sensitivity:
    """Measure each prunable group's sensitivity; resumable, cached in ``workspace``.

    Args:
        model: The model to analyse (dense or already sparse).
        example_inputs: Inputs for tracing (a tensor, a tuple of args or a dict of kwargs).
        eval_fn: ``eval_fn(model, *args) -> number``; higher is better unless
            ``lower_is_better``. Bound its cost yourself (a few batches), or build it with
            :func:`prunekit.workflow.evaluation.make_eval_fn` (``max_batches`` / ``fraction``).
        args: Extra positional arguments for ``eval_fn``.
        workspace: Directory (or :class:`Workspace`) for ``ana.json``.
        excludes: Module names whose channels are never pruned.
        ratios: Fractions of each group's channels to remove, each in (0, 1).
        criterion: Which channels go first within a group.
        forced: Recompute everything even if cached results match.
        lower_is_better: The metric is a loss.
        collapse: Stop a group's curve once its relative loss exceeds this (remaining
            ratios are recorded with the collapsed value). ``None`` never stops early.
        rank, world_size: Evaluate only this rank's share of the groups; results merge.
            Default: the ``torchrun`` process group's (then the ranks wait for each other and
            rank 0 merges), else 0 and 1.
        progress: Show a progress bar with ETA (tqdm).
        pruner: Reuse an existing :class:`Pruner` for ``model``.
        log: Where messages go.
        fast: The fast analysis (:mod:`prunekit.workflow.fast_ana`: cached activations before
            each group, several variants per forward, early-stopped points, adaptive ratios),
            used where ``eval_fn`` was built by :func:`~prunekit.workflow.evaluation.make_eval_fn`:
            ``True`` (its defaults), a :class:`~prunekit.workflow.options.FastAnaConfig`, or
            ``False`` to evaluate every point in full. Changing it recomputes the cached points.
        workers: Processes (forked, on this machine's cores) that share the groups; each
            writes ``ana.rank<i>.json`` and this process merges them.
        calibration: Calibration batches for the criteria that read data
            (:meth:`prunekit.Pruner.read_calibration`): model inputs or ``(inputs, target)``
            pairs for ``activation`` / ``fluctuation``, pairs for ``taylor``.
        loss_fn: ``loss_fn(model_output, target) -> scalar`` of the ``taylor`` criterion's
            gradients (default cross-entropy).
        config: An :class:`~prunekit.workflow.options.AnaConfig` giving ``ratios``,
            ``collapse``, ``forced``, ``fast`` and ``workers`` instead of the keywords; a keyword
            given as well with another value is refused.

    Returns:
        The :class:`Sensitivity` over all groups evaluated so far (all ranks), with what was
        estimated and how (:attr:`Sensitivity.details`, :attr:`Sensitivity.cost`).
    """
    if config is not None:
        passed = {
            k: v for k, v in locals().items() if k not in ("model", "example_inputs", "eval_fn", "args", "config")
        }
        return ana(model, example_inputs, eval_fn, args, **with_config(ana, config, passed))
    ratios = _checked_ratios(ratios, eval_fn)
    together, rank, world_size = _ranks(rank, world_size)
    if together and rank != 0:
        log, progress = (lambda m: None), False  # rank 0 reports
    _warn_direction(eval_fn, lower_is_better, log)
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    excludes = list(excludes)
    pruner = pruner or validated_pruner(model, example_inputs, excludes=excludes, criterion=criterion, log=log)
    if calibration is not None and not (pruner.activations or pruner.grads):
        pruner.read_calibration(calibration, loss_fn, criterion)  # input statistics or taylor's gradients
    prior = sparse.get_plan(model) if sparse.is_sparse(model) else None
    share = _Share(
        model,
        eval_fn,
        tuple(args),
        pruner,
        ratios,
        collapse,
        prior,
        lower_is_better,
        log,
        _fast_config(fast),
        example_inputs,
    )
    config = _config(pruner, excludes, ratios, criterion, lower_is_better, collapse, share.method())
    fname = artifacts.ANA if world_size == 1 else f"ana.rank{rank}.json"
    state = _initial_state(ws, config, share, fname, forced, together, rank, log)
    groups = pruner.prunable_groups
    mine = [g for i, g in enumerate(groups) if i % world_size == rank]
    todo = [(g, r) for g in mine for r in ratios if f"{g.id}/{r}" not in state["points"]]
    source = f"rank{rank}of{world_size}" if world_size > 1 else "main"
    if workers > 1 and world_size == 1 and todo:
        t0 = time.perf_counter()
        _in_workers(share, ws, config, state, workers, progress)
        state = _load(ws, config, False, lambda m: None)
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
    else:
        _points(share, ws, fname, config, state, mine, source, progress)
    if together:  # every rank's points are in its file: rank 0 merges, the others get the result
        pdist.barrier()
        merged = pdist.broadcast_object(_merge(ws, config, state) if rank == 0 else None)
    else:
        merged = _merge(ws, config, state)
    sens = _sensitivity(merged, groups, ratios, lower_is_better, config["method"])
    if not together or rank == 0:
        _write_sensitivity(ws, sens, config)
    if together:
        pdist.barrier()  # the workspace is complete when any rank returns
    return sens


def _checked_ratios(ratios: Sequence[float], eval_fn) -> list[float]:
    """The ratios ascending (a collapsed curve stays collapsed); refuses bad ratios and evaluators."""
    ratios = sorted({float(r) for r in ratios})
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ValueError(f"ratios must be fractions in (0, 1), got {ratios}")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    return ratios


def _ranks(rank: int | None, world_size: int | None) -> tuple[bool, int, int]:
    """``(together, rank, world_size)``: together when this is a torchrun process group's collective ana."""
    pdist.init_if_needed()
    together = pdist.collective() and world_size in (None, pdist.world_size()) and rank in (None, pdist.rank())
    world_size = (pdist.world_size() if together else 1) if world_size is None else world_size
    rank = (pdist.rank() if together else 0) if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return together, rank, world_size


def _warn_direction(eval_fn, lower_is_better: bool, log: Callable[[str], None]) -> None:
    declared = getattr(eval_fn, "lower_is_better", None)
    if declared is not None and bool(declared) != bool(lower_is_better):
        log(
            f"warning: eval_fn says lower_is_better={declared} but ana got lower_is_better={lower_is_better}; "
            "a metric in the wrong direction makes every loss look like zero"
        )


def _initial_state(ws: Workspace, config: dict, share, fname: str, forced: bool, together: bool, rank: int, log):
    """The cached points that still hold, with the baseline; under torchrun rank 0 reads and tells the others."""
    if together:  # rank 0 reads (and cleans) the workspace, measures the baseline, tells the others
        state = None
        if rank == 0:
            if forced:
                for p in ws.glob("ana.rank*.json"):
                    p.unlink()
            state = _load(ws, config, forced, log)
            if "baseline" not in state:
                state["baseline"] = share.baseline()
                _save(ws, fname, config, state)
        state = pdist.broadcast_object(state)
    else:
        state = _load(ws, config, forced, log)
    if "baseline" not in state:
        state["baseline"] = share.baseline()
        _save(ws, fname, config, state)
    return state


def _write_sensitivity(ws: Workspace, sens: Sensitivity, config: dict) -> None:
    """``sensitivity.json`` (with the config: which model it describes) and its plot."""
    ws.write_json(artifacts.SENSITIVITY, {**sens.to_dict(), "config": config})  # which model it describes
    if sens.curves:
        tmp = ws.path(".sensitivity.tmp.png")
        if sens.plot(str(tmp)):
            tmp.replace(ws.path(artifacts.SENSITIVITY_PLOT))


def _sensitivity(merged: dict, groups: list, ratios: list[float], lower_is_better: bool, method: Any) -> Sensitivity:
    """The :class:`Sensitivity` of the merged points, with how each was obtained and the cost."""
    sens = Sensitivity(merged["baseline"], lower_is_better, ratios, {}, {}, {})
    for g in groups:
        pts = {r: merged["points"][f"{g.id}/{r}"] for r in ratios if f"{g.id}/{r}" in merged["points"]}
        if pts:
            sens.curves[g.id] = pts
            sens.labels[g.id] = group_label(g)
            sens.sizes[g.id] = g.n_units
            sens.details[g.id] = {r: merged.get("info", {}).get(f"{g.id}/{r}", {"how": "full"}) for r in pts}
    sens.cost = _cost(merged, method, [f"{g}/{r}" for g, c in sens.curves.items() for r in c])
    return sens


def _full_points(sh: _Share, state: dict, mine: list, todo: list, save: Callable[[], None], bar) -> None:
    """Every point in full: ``eval_fn`` on the pruned model (after a curve collapses, its value)."""
    model, eval_fn, args, pruner, ratios, collapse, log = (
        sh.model,
        sh.eval_fn,
        sh.args,
        sh.pruner,
        sh.ratios,
        sh.collapse,
        sh.log,
    )
    lower_is_better, prior = sh.lower_is_better, sh.prior
    rel = Sensitivity(state["baseline"], lower_is_better, ratios, {})._rel
    collapsed: dict[int, float] = {}  # group -> metric at which its curve collapsed (also when resuming)
    for g in mine if collapse is not None else ():
        for r in ratios:
            v = state["points"].get(f"{g.id}/{r}")
            if v is None:
                break
            if rel(v) > collapse:
                collapsed[g.id] = v
                break
    try:
        for g, r in todo:
            key = f"{g.id}/{r}"
            if g.id in collapsed:
                state["points"][key] = collapsed[g.id]
                state.setdefault("collapsed", []).append(key)
                state.setdefault("info", {})[key] = {"how": "collapsed"}
            else:
                plan = pruner.plan({g.id: r})
                state["points"][key] = evaluate_point(model, plan, prior, eval_fn, args)
                state.setdefault("info", {})[key] = {"how": "full"}
                if collapse is not None and rel(state["points"][key]) > collapse:
                    collapsed[g.id] = state["points"][key]
            save()
            if bar is not None:
                bar.update(1)
            elif r == ratios[-1]:  # no bar (--no-progress, no terminal): one line per group
                log(_group_line(g, ratios, state["points"], mine))
    finally:
        if bar is not None:
            bar.close()


@dataclass
class _Share:
    """What evaluating a share of the points needs (here, in a forked worker or on a torchrun rank)."""

    model: nn.Module
    eval_fn: Callable
    args: tuple
    pruner: Pruner
    ratios: list[float]
    collapse: float | None
    prior: Any
    lower_is_better: bool
    log: Callable[[str], None]
    fast: FastAnaConfig
    example_inputs: Any
    analysis: Any = None  # the FastAnalysis, or why not (a str), once asked for

    def method(self) -> Any:
        """``"full"``, or the fast settings that change the results (part of the cache's config)."""
        if not self.fast.enabled or not isinstance(getattr(self.eval_fn, "evaluation", None), EvalSpec) or self.args:
            return "full"
        keep = (
            "early_stop",
            "confidence",
            "tolerance",
            "rel_tolerance",
            "min_images",
            "chunk",
            "adaptive",
            "stride",
            "interp_tolerance",
        )
        return {"fast": {k: getattr(self.fast, k) for k in keep}}

    def fast_analysis(self) -> fast_ana.FastAnalysis | None:
        """The fast analysis (built once: it measures the baseline), or ``None`` where it does not apply."""
        if self.analysis is None:
            self.analysis = _INHERITED.get((id(self.model), id(self.eval_fn))) or fast_ana.FastAnalysis.create(
                self.model,
                self.example_inputs,
                self.eval_fn,
                self.args,
                self.pruner,
                self.fast,
                self.lower_is_better,
                self.collapse,
                self.prior,
                self.log,
            )
            if isinstance(self.analysis, str) and self.method() != "full":
                self.log(f"fast ana does not apply: {self.analysis}")
        return self.analysis if isinstance(self.analysis, fast_ana.FastAnalysis) else None

    def baseline(self) -> float:
        fa = self.fast_analysis()
        return fa.baseline if fa is not None else _score(self.eval_fn, self.model, self.args)


#: a forked worker's fast analysis: the parent's batches and baseline, ``{(id(model), id(eval_fn)): analysis}``
_INHERITED: dict[tuple[int, int], Any] = {}


def _fast_config(fast: bool | FastAnaConfig) -> FastAnaConfig:
    if isinstance(fast, FastAnaConfig):
        return fast
    if isinstance(fast, bool):
        return FastAnaConfig(enabled=fast)
    raise TypeError(f"fast must be True, False or a FastAnaConfig, got {type(fast).__name__}: {fast!r:.60}")


def _points(
    sh: _Share, ws: Workspace, fname: str, config: dict, state: dict, mine: list, source: str, progress: bool
) -> None:
    """Evaluate the missing points of the groups ``mine``, saving ``state`` to ``fname`` after each."""
    todo = [(g, r) for g in mine for r in sh.ratios if f"{g.id}/{r}" not in state["points"]]
    t0 = time.perf_counter()
    if todo:
        bar = progress_bar(len(todo), "ana", "pt", enabled=progress)
        fa = sh.fast_analysis()
        if fa is not None:
            _fast_points(fa, sh, state, mine, lambda: _save(ws, fname, config, state), bar)
            _add_overhead(state, source, fa.take_cost())
        else:
            _full_points(sh, state, mine, todo, lambda: _save(ws, fname, config, state), bar)
    state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
    _save(ws, fname, config, state)


def _add_overhead(state: dict, source: str, cost: dict) -> None:
    """Add a process's images (baseline, captures, checks, points) to its entry of ``state["overhead"]``."""
    mine = state.setdefault("overhead", {}).setdefault(source, {})
    for k, v in cost.items():
        mine[k] = {**mine.get(k, {}), **v} if isinstance(v, dict) else mine.get(k, 0) + v


def _fast_points(fa: fast_ana.FastAnalysis, sh: _Share, state: dict, mine: list, save: Callable[[], None], bar) -> None:
    """The fast analysis of the groups ``mine`` (in forward order, so cached activations grow forward)."""
    info, collapsed = state.setdefault("info", {}), state.setdefault("collapsed", [])
    try:
        for g in fa.order(mine):
            keys = [f"{g.id}/{r}" for r in sh.ratios]
            if all(k in state["points"] for k in keys):
                continue
            known = {i: (state["points"][k], info.get(k, {})) for i, k in enumerate(keys) if k in state["points"]}

            def emit(i: int, res: fast_ana.PointResult, keys=keys) -> None:
                key, new = keys[i], keys[i] not in state["points"]
                state["points"][key], info[key] = res.value, res.info()
                if (res.how == "collapsed") != (key in collapsed):
                    collapsed.append(key) if res.how == "collapsed" else collapsed.remove(key)
                save()
                if bar is not None and new:
                    bar.update(1)

            fa.analyse(g, sh.ratios, known, emit)
            if bar is None:
                sh.log(_group_line(g, sh.ratios, state["points"], mine))
    finally:
        if bar is not None:
            bar.close()


def _in_workers(sh: _Share, ws: Workspace, config: dict, state: dict, workers: int, progress: bool) -> None:
    """Fork ``workers`` processes that share the groups (each on its share of the cores)."""
    import multiprocessing
    import os
    import traceback

    if next((t.device.type for t in sh.model.parameters()), "cpu") != "cpu":
        raise ValueError(
            f"workers={workers} forks processes on this machine's CPU cores; the model is on "
            "an accelerator: use workers=1 (or torchrun, one process per device)"
        )
    fa = sh.fast_analysis()  # built here once: the workers inherit its batches and baseline
    if fa is not None:
        _add_overhead(state, "main", fa.take_cost())
        _INHERITED[(id(sh.model), id(sh.eval_fn))] = fa
    threads = max(1, torch.get_num_threads() // workers)
    groups = sh.pruner.prunable_groups

    def work(r: int) -> None:
        code = 0
        try:
            torch.set_num_threads(threads)
            mine = groups[r::workers]
            _points(sh, ws, f"ana.rank{r}.json", config, state, mine, f"worker{r}of{workers}", False)
        except BaseException:  # noqa: BLE001 - reported by the parent as a failed worker
            traceback.print_exc()
            code = 1
        os._exit(code)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=work, args=(r,), daemon=True) for r in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    _INHERITED.clear()
    failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise RuntimeError(
            f"ana workers {failed} of {workers} failed (see their messages above); the points they "
            "finished are saved in the workspace: run ana again to resume"
        )


def _cost(merged: dict, method: Any, keys: list[str]) -> dict:
    """What the analysis evaluated and estimated: points by ``how``, images, early stops, fallbacks."""
    info = merged.get("info", {})
    hows = [info.get(k, {}).get("how", "full") for k in keys]
    out: dict[str, Any] = {
        "method": "full" if method == "full" else "fast",
        "points": len(keys),
        "evaluated": sum(h in fast_ana.EVALUATED for h in hows),
        "full": hows.count("full"),
        "early_stop": hows.count("early_stop"),
        "interpolated": hows.count("interpolated"),
        "collapsed": hows.count("collapsed"),
        "stopped_precise": sum(info.get(k, {}).get("stop") == "precise" for k in keys),
        "stopped_collapsed": sum(info.get(k, {}).get("stop") == "collapsed" for k in keys),
        "seconds": round(merged.get("seconds", 0.0), 3),
    }
    if isinstance(method, dict) and "fast" in method:
        out["settings"] = dict(method["fast"])  # the fast settings the points were estimated with
    over = merged.get("overhead", {})
    if over:
        for name in (
            "images",
            "image_equivalents",
            "baseline_images",
            "capture_images",
            "verify_images",
            "prefix_groups",
            "batched_groups",
        ):
            out[name] = sum(v.get(name, 0) for v in over.values())
        out["image_equivalents"] = round(out["image_equivalents"], 1)
        out["point_images"] = sum(info.get(k, {}).get("images", 0) for k in keys)
        out["fallbacks"] = {g: why for v in over.values() for g, why in v.get("fallbacks", {}).items()}
    return out


@torch.no_grad()
def evaluate_point(model, plan, prior, eval_fn, args, calibrate=None) -> float:
    """The metric of ``model`` pruned by ``plan`` (after ``calibrate(model)``, evaluated in eval
    mode), then the model as it was: weights, and with ``calibrate`` every buffer and the mode."""
    saved = {name: sparse.get_tensor(model, name).detach().clone() for name in plan.pruned}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()} if calibrate is not None else None
    was = model.training
    sparse.apply_plan(model, plan)
    try:
        if calibrate is not None:
            calibrate(model)
            model.eval()
        with torch.enable_grad():
            return _score(eval_fn, model, args)
    finally:
        sparse.remove_masks(model)
        for name, t in saved.items():
            sparse.get_tensor(model, name).copy_(t)
        if state is not None:
            for k, v in model.state_dict().items():
                v.copy_(state[k])
            model.train(was)
        if prior is not None:
            sparse.apply_plan(model, prior)


def _load(ws: Workspace, config: dict, forced: bool, log) -> dict:
    fresh: dict = {"points": {}}
    if forced:
        return fresh
    state: dict = {"points": {}}
    if ws.exists(artifacts.ANA):
        data = ws.read_json(artifacts.ANA)
        if data.get("format") != FORMAT or data.get("config") != config:
            why = (
                "is not a prunekit analysis"
                if data.get("format") != FORMAT
                else f"is stale ({_explain(data.get('config', {}), config)} changed)"
            )
            old = ws.set_aside(
                [
                    artifacts.ANA,
                    artifacts.SENSITIVITY,
                    artifacts.SENSITIVITY_PLOT,
                    *(p.name for p in ws.glob("ana.rank*.json")),
                ],
                "ana",
            )
            log(f"the sensitivity analysis in {ws.root} {why}; measuring it again (the old one is kept in {old})")
            return fresh
        state["points"].update(data.get("points", {}))
        state["collapsed"] = list(data.get("collapsed", []))
        state["seconds"] = data.get("seconds", 0.0)
        state["info"] = dict(data.get("info", {}))
        state["overhead"] = dict(data.get("overhead", {}))
        if "baseline" in data:
            state["baseline"] = data["baseline"]
    for p in ws.glob("ana.rank*.json"):  # this and other ranks' results (also before any merge)
        other = ws.read_json(p.name)
        if other.get("format") == FORMAT and other.get("config") == config:
            state["points"].update(other.get("points", {}))
            state["collapsed"] = sorted(set(state.get("collapsed", [])) | set(other.get("collapsed", [])))
            state.setdefault("info", {}).update(other.get("info", {}))
            state.setdefault("overhead", {}).update(other.get("overhead", {}))
            if "baseline" in other:
                state.setdefault("baseline", other["baseline"])
    done = len(state["points"])
    if done:
        log(f"reusing {done} analysed points from {ws.path('ana.json')}")
    return state


def _save(ws: Workspace, fname: str, config: dict, state: dict) -> None:
    ws.write_json(fname, {"format": FORMAT, "version": 1, "config": config, **state})


def _merge(ws: Workspace, config: dict, state: dict) -> dict:
    merged = {**state, "points": {}, "collapsed": set(state.get("collapsed", [])), "info": {}, "overhead": {}}
    for p in sorted(ws.glob("ana*.json"), key=lambda p: p.name != artifacts.ANA):  # the ranks' files last: newer
        other = ws.read_json(p.name)
        if other.get("format") == FORMAT and other.get("config") == config:
            merged["points"].update(other.get("points", {}))
            merged["collapsed"] |= set(other.get("collapsed", []))
            merged["info"].update(other.get("info", {}))
            merged["overhead"].update(other.get("overhead", {}))
    merged["points"].update(state["points"])  # this run's points win (forced=True recomputed them)
    merged["info"].update(state.get("info", {}))
    merged["overhead"].update(state.get("overhead", {}))
    merged["collapsed"] = sorted(k for k in merged["collapsed"] if k in merged["points"])
    ws.write_json(artifacts.ANA, {"format": FORMAT, "version": 1, "config": config, **merged})
    return merged
