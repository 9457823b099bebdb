"""Sensitivity analysis (``ana``): how much the metric drops when one group loses channels.

For every prunable channel group and every ratio, the group alone is pruned in sparse form
(only the affected tensors are saved and restored, never the whole model), the user's
``eval_fn(model, *args)`` is called, and the model is restored. The group is the unit:
coupled layers (both sides of a residual) are always measured together.

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
    >>> score = lambda m: -float((m(x) - model(x).detach()).abs().mean())
    >>> sens = ana(model, x, score, workspace=tempfile.mkdtemp(), ratios=(0.5,), progress=False)
    >>> list(sens.curves) == [g.id for g in sens.groups_info]  # doctest: +SKIP
"""

from __future__ import annotations

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
from prunekit.workflow import distributed as pdist
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["ana", "Sensitivity", "DEFAULT_RATIOS"]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FORMAT = "prunekit-ana"


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
    """

    baseline: float
    lower_is_better: bool
    ratios: list[float]
    curves: dict[int, dict[float, float]]
    labels: dict[int, str] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    def loss(self, gid: int, ratio: float) -> float:
        """Relative metric loss of pruning group ``gid`` alone at ``ratio`` (interpolated).

        0 at ratio 0; beyond the last analysed ratio the last value holds; a group that was
        not analysed (excluded, unprunable) costs ``inf``.
        """
        if ratio <= 0:
            return 0.0
        curve = self.curves.get(gid)
        if not curve:
            return math.inf
        xs = [0.0] + sorted(curve)
        ys = [0.0] + [self._rel(curve[r]) for r in sorted(curve)]
        if ratio >= xs[-1]:
            return ys[-1] if ratio <= xs[-1] + 1e-9 else math.inf
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= ratio <= x1:
                return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
        return ys[-1]

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
        lines = [f"baseline metric {self.baseline:.4g} ({'lower' if self.lower_is_better else 'higher'} is better);"
                 " cells: metric after pruning that group alone", head, "-" * len(head)]
        for gid in self.order()[:limit]:
            cells = []
            for r in ratios:
                v = self.curves[gid].get(r)
                cells.append(f"{v:>6.3g}" if v is not None else f"{'-':>6}")
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
            ax.plot([0] + xs, [self.baseline] + [self.curves[gid][x] for x in xs], marker="o",
                    label=f"{gid}: {self.labels.get(gid, '')[:30]}")
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
        return {"baseline": self.baseline, "lower_is_better": self.lower_is_better, "ratios": self.ratios,
                "curves": {str(g): {str(r): v for r, v in c.items()} for g, c in self.curves.items()},
                "labels": {str(g): v for g, v in self.labels.items()},
                "sizes": {str(g): v for g, v in self.sizes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls(d["baseline"], d["lower_is_better"], list(d["ratios"]),
                   {int(g): {float(r): v for r, v in c.items()} for g, c in d["curves"].items()},
                   {int(g): v for g, v in d.get("labels", {}).items()},
                   {int(g): v for g, v in d.get("sizes", {}).items()})


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


def group_label(group) -> str:
    m = group.members[0]
    return m.module or m.name


def _config(pruner: Pruner, excludes, ratios, criterion, lower_is_better, collapse) -> dict:
    return {"model": model_fingerprint(pruner.model), "excludes": sorted(excludes), "ratios": list(ratios),
            "criterion": criterion, "lower_is_better": lower_is_better, "collapse": collapse,
            "groups": [[m.name for m in g.members][:4] + [g.n_units] for g in pruner.prunable_groups]}


def _explain(old: dict, new: dict) -> str:
    keys = ("model", "excludes", "ratios", "criterion", "lower_is_better", "collapse", "groups")
    what = [k for k in keys if old.get(k) != new.get(k)]
    names = {"model": "the model's weights or architecture", "excludes": "the excludes", "ratios": "the ratios",
             "criterion": "the criterion", "lower_is_better": "the metric direction", "collapse": "collapse",
             "groups": "the channel groups"}
    return ", ".join(names[w] for w in what) or "the configuration"


def ana(model: nn.Module, example_inputs: Any, eval_fn: Callable[..., float], args: Sequence = (), *,
        workspace: str | Workspace, excludes: Iterable[str] = (), ratios: Sequence[float] = DEFAULT_RATIOS,
        criterion: str = "l2", forced: bool = False, lower_is_better: bool = False,
        collapse: float | None = 0.5, rank: int | None = None, world_size: int | None = None, progress: bool = True,
        pruner: Pruner | None = None, log: Callable[[str], None] = print) -> Sensitivity:
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

    Returns:
        The :class:`Sensitivity` over all groups evaluated so far (all ranks).
    """
    ratios = sorted({float(r) for r in ratios})  # ascending: a collapsed curve stays collapsed
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ValueError(f"ratios must be fractions in (0, 1), got {ratios}")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    pdist.init_if_needed()
    together = pdist.collective() and world_size in (None, pdist.world_size()) and rank in (None, pdist.rank())
    world_size = (pdist.world_size() if together else 1) if world_size is None else world_size
    rank = (pdist.rank() if together else 0) if rank is None else rank
    if together and rank != 0:
        log, progress = (lambda m: None), False  # rank 0 reports
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    declared = getattr(eval_fn, "lower_is_better", None)
    if declared is not None and bool(declared) != bool(lower_is_better):
        log(f"warning: eval_fn says lower_is_better={declared} but ana got lower_is_better={lower_is_better}; "
            "a metric in the wrong direction makes every loss look like zero")
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    excludes = list(excludes)
    pruner = pruner or Pruner(model, example_inputs, ignore=excludes, criterion=criterion)
    config = _config(pruner, excludes, ratios, criterion, lower_is_better, collapse)
    fname = "ana.json" if world_size == 1 else f"ana.rank{rank}.json"
    if together:  # rank 0 reads (and cleans) the workspace, measures the baseline, tells the others
        state = None
        if rank == 0:
            if forced:
                for p in ws.glob("ana.rank*.json"):
                    p.unlink()
            state = _load(ws, config, forced, log)
            if "baseline" not in state:
                state["baseline"] = _score(eval_fn, model, args)
                _save(ws, fname, config, state)
        state = pdist.broadcast_object(state)
    else:
        state = _load(ws, config, forced, log)
    if "baseline" not in state:
        state["baseline"] = _score(eval_fn, model, args)
        _save(ws, fname, config, state)
    groups = pruner.prunable_groups
    mine = [g for i, g in enumerate(groups) if i % world_size == rank]
    todo = [(g, r) for g in mine for r in ratios if f"{g.id}/{r}" not in state["points"]]
    prior = sparse.get_plan(model) if sparse.is_sparse(model) else None
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="ana", unit="pt")
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
    t0 = time.perf_counter()
    try:
        for g, r in todo:
            key = f"{g.id}/{r}"
            if g.id in collapsed:
                state["points"][key] = collapsed[g.id]
                state.setdefault("collapsed", []).append(key)
            else:
                plan = pruner.plan({g.id: r})
                state["points"][key] = evaluate_point(model, plan, prior, eval_fn, args)
                if collapse is not None and rel(state["points"][key]) > collapse:
                    collapsed[g.id] = state["points"][key]
            _save(ws, fname, config, state)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
    _save(ws, fname, config, state)
    if together:  # every rank's points are in its file: rank 0 merges, the others get the result
        pdist.barrier()
        merged = pdist.broadcast_object(_merge(ws, config, state) if rank == 0 else None)
    else:
        merged = _merge(ws, config, state)
    sens = Sensitivity(merged["baseline"], lower_is_better, ratios, {}, {}, {})
    for g in groups:
        pts = {r: merged["points"][f"{g.id}/{r}"] for r in ratios if f"{g.id}/{r}" in merged["points"]}
        if pts:
            sens.curves[g.id] = pts
            sens.labels[g.id] = group_label(g)
            sens.sizes[g.id] = g.n_units
    if not together or rank == 0:
        ws.write_json("sensitivity.json", sens.to_dict())
        if sens.curves:
            tmp = ws.path(".sensitivity.tmp.png")
            if sens.plot(str(tmp)):
                tmp.replace(ws.path("sensitivity.png"))
    if together:
        pdist.barrier()  # the workspace is complete when any rank returns
    return sens


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
    if ws.exists("ana.json"):
        data = ws.read_json("ana.json")
        if data.get("format") != FORMAT:
            log(f"{ws.path('ana.json')} is not a prunekit analysis; starting a new one")
            return fresh
        if data.get("config") != config:
            log(f"cached sensitivity analysis in {ws.root} is stale ({_explain(data.get('config', {}), config)} "
                "changed); recomputing")
            for p in ws.glob("ana.rank*.json"):
                p.unlink()
            return fresh
        state["points"].update(data.get("points", {}))
        state["collapsed"] = list(data.get("collapsed", []))
        state["seconds"] = data.get("seconds", 0.0)
        if "baseline" in data:
            state["baseline"] = data["baseline"]
    for p in ws.glob("ana.rank*.json"):  # this and other ranks' results (also before any merge)
        other = ws.read_json(p.name)
        if other.get("format") == FORMAT and other.get("config") == config:
            state["points"].update(other.get("points", {}))
            state["collapsed"] = sorted(set(state.get("collapsed", [])) | set(other.get("collapsed", [])))
            if "baseline" in other:
                state.setdefault("baseline", other["baseline"])
    done = len(state["points"])
    if done:
        log(f"reusing {done} analysed points from {ws.path('ana.json')}")
    return state


def _save(ws: Workspace, fname: str, config: dict, state: dict) -> None:
    ws.write_json(fname, {"format": FORMAT, "version": 1, "config": config, **state})


def _merge(ws: Workspace, config: dict, state: dict) -> dict:
    merged = {**state, "points": {}, "collapsed": set(state.get("collapsed", []))}
    for p in ws.glob("ana*.json"):
        other = ws.read_json(p.name)
        if other.get("format") == FORMAT and other.get("config") == config:
            merged["points"].update(other.get("points", {}))
            merged["collapsed"] |= set(other.get("collapsed", []))
    merged["points"].update(state["points"])  # this run's points win (forced=True recomputed them)
    merged["collapsed"] = sorted(k for k in merged["collapsed"] if k in merged["points"])
    ws.write_json("ana.json", {"format": FORMAT, "version": 1, "config": config, **merged})
    return merged
