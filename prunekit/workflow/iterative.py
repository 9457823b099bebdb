"""Iterative pruning: ana once, then prune -> fine-tune steps of growing removal ratio.

Every step's removal ratio is a fraction of the *original* model's MACs. By default
(``run.finetune_on: slim``) a step prunes the slim model the previous step ended with (traced
again: a fraction of a second), transforms it to the new slim model and fine-tunes that, so an
epoch costs what the pruned model costs, not what the unpruned one costs. The bookkeeping
stays in the original model's terms: each step's ``plan.json`` is the plan over the original
architecture (the step's own plan over the model it started from is ``step_plan.json``), and
``final/`` rebuilds with ``load_slim(original_factory(), "ws/final")``. ana's curves, measured
on the original model, are read for each group from the channels it has left (or, with
``run.reanalyse``, ana runs again on each step's starting slim model). ``run.finetune_on:
sparse`` keeps the original shapes instead: each step prunes the original architecture again,
starting from the previous step's fine-tuned sparse weights, whose zeros the criterion picks
first (the previous plan is merged in should it not, and the step's MACs goal is met with it).

After pruning, the BatchNorm statistics are re-estimated on ``run.calibrate_batches`` training
batches, then the step fine-tunes (``run.total_epochs`` splits one budget over the steps). A
step that loses more than ``max_drop`` against the baseline is retried from the previous
step's model with a smaller increment (at most ``max_retries`` times). The last accepted step
is the final slim model.

Everything lives in a workspace directory::

    ana.json, sensitivity.json, sensitivity.png   the sensitivity analysis (resumable)
    iterative.json                                the state: every finished attempt
    steps/step<k>-try<a>/finetune/                per-epoch checkpoints of that attempt
    steps/step<k>-try<a>/model/                   its model: slim (save_slim + plan.json +
                                                  step_plan.json) or sparse (save_sparse)
    steps/step<k>-try<a>/ana/                     with run.reanalyse: ana of that model
    baseline/model.safetensors                    the starting weights
    final/                                        the slim model (save_slim)
    summary.json                                  baseline, attempts, final, layer table

A killed run, started again with the same arguments, resumes from the last finished step
and, inside a step, from the last finished epoch. Every file is written to a temp name and
renamed, so nothing half-written is ever read back.

Under ``torchrun`` (see :mod:`prunekit.workflow.distributed`) every process runs the loop: ana's
points are split over the processes, each step fine-tunes in ``DistributedDataParallel``,
rank 0 alone writes the workspace (a directory every node can read) and transforms, checks
and evaluates the slim model; the other processes load it from ``final/``.

Example:
    >>> import torch, torchvision  # doctest: +SKIP
    >>> res = iterative_prune(model, x, eval_fn, train_loader, workspace="ws",  # doctest: +SKIP
    ...                       config=IterativeConfig(target=0.5, steps=3, max_drop=0.01))
    >>> print(res.table())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.counting import count
from prunekit.engine.criteria import CRITERIA
from prunekit.engine.equivalence import checked_slim
from prunekit.engine.plan import PruningPlan
from prunekit.engine.pruner import Pruner
from prunekit.engine.slim import load_slim, save_slim, to_slim
from prunekit.graph.groups import ChannelGroup
from prunekit.utils import artifacts
from prunekit.utils.text import human, table
from prunekit.workflow import distributed as pdist
from prunekit.workflow.ana import Sensitivity, ana
from prunekit.workflow.evaluation import make_bn_calibration
from prunekit.workflow.finetune import FinetuneConfig, FinetuneResult, finetune
from prunekit.workflow.options import AnaConfig, ConfigError, IterativeConfig, PruneConfig
from prunekit.workflow.prune import prune
from prunekit.workflow.validation import group_label, validated_pruner
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["IterativePruner", "IterativeResult", "iterative_prune", "IterativeConfig", "RebasedSensitivity", "STATE"]

STATE = artifacts.ITERATIVE
FORMAT = "prunekit-iterative"


@dataclass
class IterativeResult:
    """The outcome of :meth:`IterativePruner.run`.

    Attributes:
        model: The slim model of the last accepted step (the baseline if none was accepted).
        sparse_model: The same as a sparse model of the original architecture.
        baseline: ``{"metric", "macs", "params"}`` of the starting model.
        attempts: Every attempt: step, try, ratio, metric, macs, params, accepted, notes,
            epochs, prune/fine-tune seconds, ``test_metric``.
        final: ``{"metric", "macs", "params", "macs_reduction", "step", "test_metric"}`` of the slim model.
        notes: What the loop decided (retries, early stop, merged plans, the epoch budget).
        workspace: Where the artifacts are.
        test_metric: ``test_fn`` of the final model (reported only, never used to choose), or None.
    """

    model: nn.Module
    sparse_model: nn.Module
    baseline: dict
    attempts: list[dict]
    final: dict
    notes: list[str] = field(default_factory=list)
    workspace: Path | None = None
    test_metric: float | None = None

    @property
    def steps(self) -> list[dict]:
        return [a for a in self.attempts if a["accepted"]]

    def table(self) -> str:
        """Metric, MACs and parameters per step, as text."""
        return steps_table(self.baseline, self.attempts, self.final)


def steps_table(baseline: dict, attempts: list[dict], final: dict | None = None) -> str:
    test = any(a.get("test_metric") is not None for a in attempts) or bool(
        final and final.get("test_metric") is not None
    )
    t = lambda d: [f"{d['test_metric']:.4f}" if d.get("test_metric") is not None else ""] if test else []
    h = lambda n: human(n, sep="")

    def row(tag: str, ratio: str, d: dict, verdict: str) -> list[str]:
        counts = [h(d["macs"]), f"{d['macs_reduction']:.1%}", h(d["params"]), f"{d['metric']:.4f}"]
        return [tag, ratio, *counts, f"{d['drop']:+.4f}", *t(d), verdict]

    head = ["step", "ratio", "MACs", "MACs -", "params", "metric", "drop"] + (["test"] if test else []) + [""]
    rows = [["base", "", h(baseline["macs"]), "", h(baseline["params"]), f"{baseline['metric']:.4f}", ""]]
    rows[0] += t(baseline) + [""]
    for a in attempts:
        tag = f"{a['step']}" + (f".{a['try']}" if a["try"] else "")
        rows.append(row(tag, f"{a['ratio']:.3f}", a, "accepted" if a["accepted"] else "retried"))
    if final:
        rows.append(row("slim", "", final, ""))
    return table(rows, head)


@dataclass
class RebasedSensitivity(Sensitivity):
    """The original model's curves, read from a slim model whose groups already lost channels.

    Slim group ``g`` at ratio ``q`` is original group ``origin[g] = (h, start)`` at ratio
    ``start + q * (1 - start)``, where ``start`` is the fraction of ``h``'s channels already
    removed. The predicted loss is that of the whole cut, already at ``q = 0``: the
    ``equal_loss`` allocation is then the one the original model's curves give for the total
    (a group already cut past the common loss stays as it is), and ``greedy`` pays only for
    the increments.

    Example:
        >>> base = Sensitivity(1.0, False, [0.5], {0: {0.5: 0.5}})
        >>> rebased = RebasedSensitivity(1.0, False, [], {}, source=base, origin={3: (0, 0.25)})
        >>> rebased.loss(3, 0.0), rebased.loss(3, 1 / 3)
        (0.25, 0.5)
    """

    source: Sensitivity | None = None
    origin: dict[int, tuple[int, float]] = field(default_factory=dict)

    def loss(self, gid: int, ratio: float) -> float:
        if gid not in self.origin or self.source is None:
            return 0.0 if ratio <= 0 else math.inf
        orig, start = self.origin[gid]
        return self.source.loss(orig, start + max(ratio, 0.0) * (1 - start))


@dataclass
class StepStart:
    """The model a step prunes and the plan (over the original model) that made it."""

    model: nn.Module
    plan: PruningPlan
    slim: bool


@dataclass
class PrunedStep:
    """A pruned step, ready to fine-tune.

    Attributes:
        model: What fine-tunes: the slim model, or the sparse model of the original architecture.
        plan: Everything removed so far, over the original model.
        step_plan: This step's own plan over the model it started from (slim mode).
        notes: What pruning reported.
    """

    model: nn.Module
    plan: PruningPlan
    step_plan: PruningPlan | None
    notes: list[str]


class IterativePruner:
    """Gradual pruning with fine-tuning between steps, resumable in a workspace.

    Args:
        model: The trained, dense baseline (left unchanged).
        example_inputs: Inputs for tracing and counting MACs (a batch of one for MACs/sample).
        eval_fn: ``eval_fn(model) -> number``: for ana, after every fine-tuning epoch and
            for the step's verdict.
        train_loader: Batches for the built-in fine-tuning (or pass ``train_fn``) and for
            re-estimating the BatchNorm statistics after each prune step.
        workspace: The directory of the whole run.
        config: Schedule, tolerated drop, retries, what fine-tunes, the epoch budget
            (:class:`IterativeConfig`).
        finetune: Options of each step's fine-tuning (:class:`FinetuneConfig`; with
            ``config.total_epochs`` its ``epochs`` is replaced by each step's share).
        ana: Options of the sensitivity analysis (:class:`AnaConfig`).
        prune: Options of each pruning (:class:`PruneConfig`; its ratio is set per step).
        excludes: Module names whose channels stay.
        criterion: Importance criterion for ana and prune.
        lower_is_better: The metric is a loss.
        train_fn: ``train_fn(model, epoch)``: your own training epoch (see
            :func:`prunekit.workflow.finetune.finetune`).
        loss_fn: Loss of the built-in loop (default cross-entropy).
        test_fn: ``test_fn(model) -> number`` on held-out data, reported for the baseline,
            every attempt and the final model (``test_metric``); never used to choose anything.
        log: Where messages go.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        eval_fn: Callable[[nn.Module], float],
        train_loader: Iterable | None = None,
        *,
        workspace: str | Workspace,
        config: IterativeConfig | None = None,
        finetune: FinetuneConfig | None = None,
        ana: AnaConfig | None = None,
        prune: PruneConfig | None = None,
        excludes: Iterable[str] = (),
        criterion: str = "l2",
        lower_is_better: bool = False,
        train_fn: Callable[[nn.Module, int], Any] | None = None,
        loss_fn: Callable | None = None,
        test_fn: Callable[[nn.Module], float] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if sparse.is_sparse(model):
            raise ValueError("IterativePruner starts from the dense baseline; this model is already sparse")
        for name, fn in (("eval_fn", eval_fn), ("test_fn", test_fn)):
            if fn is not None and not callable(fn) or fn is None and name == "eval_fn":
                raise TypeError(f"{name} must be callable as {name}(model) -> number, got {type(fn).__name__}")
        if train_loader is None and train_fn is None:
            raise ValueError("give a train_loader for the built-in fine-tuning, or your own train_fn")
        self.template = model
        self.inputs = example_inputs
        self.eval_fn = eval_fn
        self.test_fn = test_fn
        self.train_loader = train_loader
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.config = config or IterativeConfig()
        self.ft = finetune or FinetuneConfig()
        self.ana_cfg = ana or AnaConfig()
        self.prune_cfg = prune or PruneConfig()
        _refuse_one_prune_options(self.prune_cfg)
        self.excludes = list(excludes)
        self.criterion = criterion
        self.lower = lower_is_better
        self.train_fn = train_fn
        self.loss_fn = loss_fn
        self.log = log
        self.epochs = self.config.epochs_per_step(self.ft.epochs)
        n_cal = self.config.calibrate_batches
        self.calibrate = make_bn_calibration(train_loader, max_batches=n_cal) if n_cal and train_loader else None
        self.reads_data = criterion in CRITERIA and CRITERIA[criterion].reads_data
        for what, on in (
            ("prune.reconstruct refits", self.prune_cfg.reconstruct),
            (f"criterion {criterion!r} scores", self.reads_data),
        ):
            if on and self.calibrate is None:
                raise ConfigError(
                    f"{what} every step on run.calibrate_batches training batches: set "
                    f"run.calibrate_batches (e.g. 20; now {n_cal}) and give a train_loader"
                )
        self.pruner: Pruner | None = None  # the original model's groups (set by run)

    # ----- state ------------------------------------------------------------------------
    def _signature(self) -> dict:
        ft = {k: v for k, v in self.ft.to_dict().items() if k not in ("progress", "device")}
        return {
            "model": model_fingerprint(self.template),
            "run": self._run_signature(),
            "finetune": ft,
            "ana": dataclasses.asdict(self.ana_cfg),
            "prune": {**self.prune_cfg.kwargs(), **self._prune_signature()},
            "excludes": sorted(self.excludes),
            "criterion": self.criterion,
            "lower_is_better": self.lower,
            "custom_train_fn": self.train_fn is not None,
            "calibrate": self.calibrate is not None,
        }

    def _run_signature(self) -> dict:
        """The ``run`` options; options added later are left out at their defaults, so a workspace
        made before them keeps resuming."""
        defaults = {"epoch_split": None, "teacher": "original"}
        items = dataclasses.asdict(self.config).items()
        return {k: v for k, v in items if k not in defaults or v != defaults[k]}

    def _prune_signature(self) -> dict:
        """``prune.search`` / ``prune.reconstruct`` when set (a run without them keeps the signature it
        had before the options)."""
        out: dict = {"search": self.prune_cfg.search} if self.prune_cfg.search else {}
        if self.prune_cfg.reconstruct:
            out["reconstruct"] = True
        return out

    def _load_state(self, signature: dict) -> dict:
        fresh = {"format": FORMAT, "version": 2, "config": signature, "attempts": [], "notes": []}
        if not self.ws.exists(STATE):
            return fresh
        state = self.ws.read_json(STATE)
        if state.get("format") != FORMAT or state.get("config") != signature:
            changed = [k for k in signature if state.get("config", {}).get(k) != signature[k]]
            old = self.ws.set_aside([STATE, "steps", "final", artifacts.SUMMARY], "run")
            self.log(
                f"the iterative run in {self.ws.root} was made with other settings ({', '.join(changed)} "
                f"changed); starting the steps over (the old run is kept in {old})"
            )
            return fresh
        if state["attempts"]:
            self.log(f"resuming: {len(state['attempts'])} finished step attempt(s) in {self.ws.path(STATE)}")
        return state

    def _save_state(self, state: dict) -> None:
        if pdist.is_main():
            self.ws.write_json(STATE, state)

    def _note(self, notes: list[str], msg: str) -> None:
        if msg not in notes:
            notes.append(msg)

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> IterativeResult:
        """Run (or resume) the whole loop; returns the slim model and the table."""
        t_start = time.perf_counter()
        pdist.init_if_needed()
        together = pdist.collective()
        if together and not pdist.is_main():
            self.log = lambda m: None  # rank 0 reports
        state = pdist.broadcast_object(self._load_state(self._signature()) if pdist.is_main() else None)
        base_counts = count(self.template, self.inputs)
        self.pruner = validated_pruner(
            self.template, self.inputs, excludes=self.excludes, criterion=self.criterion, log=self.log
        )
        sens = ana(
            self.template,
            self.inputs,
            self.eval_fn,
            workspace=self.ws,
            excludes=self.excludes,
            ratios=self.ana_cfg.ratios,
            criterion=self.criterion,
            forced=self.ana_cfg.forced,
            lower_is_better=self.lower,
            collapse=self.ana_cfg.collapse,
            progress=self.ft.progress,
            pruner=self.pruner,
            log=self.log,
            **self._criterion_data(self.ft.seed),
        )
        baseline = {"metric": sens.baseline, "macs": base_counts.macs, "params": base_counts.params}
        if self.test_fn is not None:
            baseline["test_metric"] = float(self.test_fn(self.template))
        state["baseline"] = baseline
        self._save_baseline()
        notes: list[str] = list(state.get("notes", []))
        if self.config.total_epochs is not None:
            self._note(
                notes,
                f"fine-tuning budget: run.total_epochs={self.config.total_epochs} split over "
                f"{len(self.epochs)} steps as {' + '.join(map(str, self.epochs))} epochs "
                "(a retry fine-tunes its step's share again)",
            )
        prev_ratio, prev_dir = self._steps(state, sens, baseline, notes)
        planned = self.config.schedule_ratios()[-1]
        if prev_ratio < planned and prev_dir is not None:
            self._note(notes, f"the final removal ratio is {prev_ratio:.3f}, below the planned {planned:.3f}")
        state["notes"] = notes
        self._save_state(state)
        result = self._conclude(state, prev_dir, baseline, notes, together)
        state["done"] = True
        state["final"] = result.final
        self._save_state(state)
        self.log(f"iterative pruning finished in {time.perf_counter() - t_start:.1f} s (this session)")
        return result

    def _steps(self, state: dict, sens: Sensitivity, baseline: dict, notes: list[str]) -> tuple[float, Path | None]:
        """Every step of the schedule; returns the ratio and directory of the last accepted attempt.

        A failed attempt is retried with a smaller increment, and after an accepted smaller
        increment the rest of the way is tried again from there. At most ``max_retries``
        failures per step; the decisions depend only on the recorded attempts, so a resumed
        run replays them exactly.
        """
        done = {(a["step"], a["try"]): a for a in state["attempts"]}
        prev_ratio, prev_dir = 0.0, None
        cfg = self.config
        for k, goal in enumerate(cfg.schedule_ratios(), start=1):
            a, fails, streak = 0, 0, 0
            while prev_ratio < goal - 1e-9 and fails <= cfg.max_retries:
                ratio = round(prev_ratio + (goal - prev_ratio) * cfg.retry_factor**streak, 6)
                att = done.get((k, a))
                if att is None:
                    att = self._attempt(k, a, ratio, prev_dir, sens, baseline)
                    state["attempts"].append(att)
                    notes += [f"step {k} try {a}: {n}" for n in att["notes"]]
                    if not att["accepted"]:
                        msg = (
                            f"step {k}: removal ratio {ratio:.3f} lost {att['drop']:.4f} "
                            f"(> max_drop {cfg.max_drop}) after fine-tuning"
                        )
                        msg += "; retrying with a smaller increment" if fails < cfg.max_retries else "; no retries left"
                        notes.append(msg)
                        self.log(msg)
                    state["notes"] = notes
                    self._save_state(state)
                a += 1
                if att["accepted"]:
                    prev_ratio, prev_dir, streak = att["ratio"], self.ws.path(att["dir"]), 0
                else:
                    fails, streak = fails + 1, streak + 1
            if prev_ratio < goal - 1e-9:
                msg = (
                    f"stopped at step {k}: {fails} attempt(s) missed max_drop={cfg.max_drop}; keeping the model "
                    f"at removal ratio {prev_ratio:.3f}"
                    if prev_dir is not None
                    else f"stopped at step {k}: no attempt met max_drop={cfg.max_drop}; nothing was pruned"
                )
                self._note(notes, msg)
                self.log(msg)
                break
        return prev_ratio, prev_dir

    def _conclude(
        self, state: dict, last_dir: Path | None, baseline: dict, notes: list[str], together: bool
    ) -> IterativeResult:
        if not together:
            return self._finish(state, last_dir, baseline, notes)
        result = None  # rank 0 transforms, checks, saves and evaluates the slim model once
        if pdist.is_main():
            with pdist.local():
                result = self._finish(state, last_dir, baseline, notes)
        final = pdist.broadcast_object(result.final if result is not None else None)
        if result is None:
            result = self._load_result(state, last_dir, baseline, notes, final)
        return result

    def _dense(self, weights_dir: Path | None) -> nn.Module:
        """A dense copy of the original architecture, with the weights saved in ``weights_dir``."""
        from safetensors.torch import load_model

        model = copy.deepcopy(self.template)
        if weights_dir is not None:
            load_model(model, str(weights_dir / artifacts.WEIGHTS))
        return model

    def _save_baseline(self) -> None:
        from safetensors.torch import save_model

        if not pdist.is_main():
            return
        path = self.ws.path("baseline/model.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".model.safetensors.tmp")
        save_model(self.template, str(tmp))
        tmp.replace(path)

    # ----- one attempt ------------------------------------------------------------------
    def _attempt(self, k: int, a: int, ratio: float, prev_dir: Path | None, sens: Sensitivity, baseline: dict) -> dict:
        t0 = time.perf_counter()
        rel = f"steps/step{k}-try{a}"
        slim_mode = self.config.finetune_on == "slim"
        self.log(
            f"step {k}{f' (retry {a})' if a else ''}: prune to a MACs removal ratio of {ratio:.3f} (of the "
            f"original MACs)"
            + (f", starting from {prev_dir.name}" if prev_dir else "")
            + f"; fine-tune the {self.config.finetune_on} model for {self.epochs[k - 1]} epoch(s)"
        )
        seed = self.ft.seed + 1000 * k + 10 * a
        torch.manual_seed(seed)  # the random criterion
        start = self._start(prev_dir)
        if slim_mode:
            step = self._prune_slim(start, ratio, sens, prev_dir, baseline["macs"], seed)
        else:
            step = self._prune_sparse(start, ratio, sens, prev_dir, seed)
        step = self._agree(step, prev_dir, k, seed)
        if self.calibrate is not None:  # on what fine-tunes: the slim model costs less
            torch.manual_seed(seed)  # the calibration batches
            self.calibrate(step.model)
        t_pruned = time.perf_counter()
        ft_cfg = dataclasses.replace(self.ft, seed=seed, epochs=self.epochs[k - 1])
        teacher = self._teacher(prev_dir) if ft_cfg.distill_weight > 0 else None
        if teacher is None and ft_cfg.distill_weight > 0:  # run.teacher: previous, first step
            ft_cfg = dataclasses.replace(ft_cfg, distill_weight=0.0)
            self.log(f"step {k}: no fine-tuned model yet to distil from (run.teacher: previous): plain fine-tuning")
        elif teacher is not None:
            whom = "the unpruned model" if self.config.teacher == "original" else f"{prev_dir.name}'s fine-tuned model"
            self.log(f"step {k}: distilling from {whom} (weight {ft_cfg.distill_weight:g})")
        ft = finetune(
            step.model,
            self.train_loader,
            self.eval_fn,
            ft_cfg,
            workspace=self.ws.path(f"{rel}/finetune"),
            train_fn=self.train_fn,
            loss_fn=self.loss_fn,
            teacher=teacher,
            lower_is_better=self.lower,
            example_inputs=self.inputs,
            log=self.log,
        )
        t_tuned = time.perf_counter()
        metric = ft.best_metric if ft.best_metric is not None else float(self.eval_fn(step.model))
        test = float(self.test_fn(step.model)) if self.test_fn is not None else None
        self._save_step(step, self.ws.path(f"{rel}/model"))
        att = self._record(k, a, ratio, step, ft, metric, baseline, rel)
        att.update(
            {
                "test_metric": test,
                "epochs": ft_cfg.epochs,
                "finetune_on": self.config.finetune_on,
                "prune_seconds": round(t_pruned - t0, 3),
                "finetune_seconds": round(t_tuned - t_pruned, 3),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        self.log(
            f"step {k}{f' (retry {a})' if a else ''}: MACs -{att['macs_reduction']:.1%}, params "
            f"-{att['params_reduction']:.1%}, metric {metric:.4f} (baseline {baseline['metric']:.4f}); "
            + ("accepted" if att["accepted"] else "rejected")
        )
        return att

    def _teacher(self, prev_dir: Path | None) -> nn.Module | None:
        """Whom the step distils from (``run.teacher``): the unpruned model, or the last accepted
        step's fine-tuned model as it was saved (slim, or sparse with its zeros; None before
        the first step has one)."""
        if self.config.teacher == "original":
            return self.template
        return self._start(prev_dir).model.eval() if prev_dir is not None else None

    def _start(self, prev_dir: Path | None) -> StepStart:
        """The model the step prunes: the original, the previous slim model, or (sparse mode) the
        original architecture with the previous step's sparse weights (masks not applied)."""
        if prev_dir is None:
            return StepStart(copy.deepcopy(self.template), PruningPlan({}, {}, {}), False)
        plan = PruningPlan.load(prev_dir / "model" / artifacts.PLAN)
        if (prev_dir / "model" / artifacts.SPEC).exists():
            return StepStart(load_slim(copy.deepcopy(self.template), prev_dir / "model"), plan, True)
        return StepStart(self._dense(prev_dir / "model"), plan, False)

    def _prune_sparse(
        self, start: StepStart, ratio: float, sens: Sensitivity, prev_dir: Path | None, seed: int
    ) -> PrunedStep:
        """Prune the original architecture again (its earlier pruned channels are zeros); merge if needed."""
        if start.slim:
            raise ValueError(
                f"{prev_dir} holds a slim model, but run.finetune_on is 'sparse'; start the run over in a new workspace"
            )
        res = prune(
            start.model,
            self.inputs,
            removal_ratio=ratio,
            sensitivity=sens,
            excludes=self.excludes,
            criterion=self.criterion,
            log=self.log,
            keep_pruned=start.plan if start.plan.pruned else None,  # the goal is met with the earlier cuts
            **self.prune_cfg.kwargs(),
            **self._search_kwargs(seed),
            **self._data_kwargs(seed),
        )
        return PrunedStep(start.model, sparse.get_plan(start.model), None, list(res.notes))

    def _search_kwargs(self, seed: int) -> dict:
        """``prune.search``: each step tries that many allocations, each evaluated after BatchNorm re-estimation."""
        if not self.prune_cfg.search:
            return {}
        return {"search": self.prune_cfg.search, "eval_fn": self.eval_fn, "calibrate": self.calibrate, "seed": seed}

    def _data_kwargs(self, seed: int) -> dict:
        """What each step reads from ``run.calibrate_batches`` training batches (seeded, so a killed run
        resumes with the same ones): ``prune.reconstruct``'s refit, and a criterion's statistics
        (``activation``, ``fluctuation``) or gradients (``taylor``, of the loop's ``loss_fn``)."""
        kwargs = self._criterion_data(seed)
        if self.prune_cfg.reconstruct:
            kwargs.setdefault("calibration", self._calibration(seed))
            kwargs["reconstruct"] = True
        return kwargs

    def _criterion_data(self, seed: int) -> dict:
        """``calibration`` and ``loss_fn`` for a criterion that reads data (ana's and prune's)."""
        return {"calibration": self._calibration(seed), "loss_fn": self.loss_fn} if self.reads_data else {}

    def _calibration(self, seed: int) -> list:
        """The first ``run.calibrate_batches`` training batches, seeded."""
        torch.manual_seed(seed)
        return list(itertools.islice(self.train_loader, self.config.calibrate_batches))

    def _prune_slim(
        self, start: StepStart, ratio: float, sens: Sensitivity, prev_dir: Path | None, base_macs: int, seed: int
    ) -> PrunedStep:
        """Prune the start model to ``ratio`` of the original MACs, then make the new slim model."""
        macs = count(start.model, self.inputs).macs
        local = max(0.0, 1.0 - base_macs * (1.0 - ratio) / macs) if macs else 0.0
        here = Pruner(start.model, self.inputs, excludes=self.excludes, criterion=self.criterion)
        pairs = self._matches(here)
        kwargs = {
            **self.prune_cfg.kwargs(),
            "tolerance": min(0.99, self.prune_cfg.tolerance * base_macs / macs),
            "max_ratio": self._caps(here, pairs),
        }
        if start.plan.pruned:
            sens = self._step_sensitivity(start, sens, prev_dir, here, pairs, seed)
        res = prune(
            start.model,
            self.inputs,
            removal_ratio=min(local, 0.99),
            sensitivity=sens,
            excludes=self.excludes,
            criterion=self.criterion,
            log=self.log,
            **kwargs,
            **self._search_kwargs(seed),
            **self._data_kwargs(seed),
        )
        notes = [n for n in res.notes if not n.startswith("reached a MACs reduction")]
        return self._slim_step(start, res.plan, notes)

    def _slim_step(self, start: StepStart, step_plan: PruningPlan, notes: list[str]) -> PrunedStep:
        """The slim model of the (sparse) start model, made from the original architecture so that its
        spec, attributes and equivalence check are the original model's."""
        plan = self._original_meta(start.plan.compose(step_plan))
        expanded = sparse.from_slim(copy.deepcopy(self.template), start.model, start.plan)
        sparse.apply_plan(expanded, plan)
        slim, _ = checked_slim(expanded, self.inputs)
        return PrunedStep(slim, plan, step_plan, notes)

    def _step_sensitivity(
        self,
        start: StepStart,
        sens: Sensitivity,
        prev_dir: Path,
        here: Pruner,
        pairs: list[tuple[ChannelGroup, ChannelGroup]],
        seed: int,
    ) -> Sensitivity:
        """Curves for the groups of a slim start model: ana's, re-read (:class:`RebasedSensitivity`), or
        with ``run.reanalyse`` measured on it (cached in the previous step's ``ana/``)."""
        if self.config.reanalyse:
            return ana(
                copy.deepcopy(start.model),
                self.inputs,
                self.eval_fn,
                workspace=Workspace(prev_dir / "ana"),
                excludes=self.excludes,
                ratios=self.ana_cfg.ratios,
                criterion=self.criterion,
                lower_is_better=self.lower,
                collapse=self.ana_cfg.collapse,
                progress=self.ft.progress,
                log=self.log,
                **self._criterion_data(seed),
            )
        origin = {g.id: (h.id, 1 - g.n_units / h.n_units) for g, h in pairs if h.id in sens.curves}
        return RebasedSensitivity(
            sens.baseline,
            sens.lower_is_better,
            sens.ratios,
            {},
            {g.id: group_label(g) for g in here.groups},
            {},
            source=sens,
            origin=origin,
        )

    def _matches(self, here: Pruner) -> list[tuple[ChannelGroup, ChannelGroup]]:
        """``(group of a slim model, the original model's group)`` for every prunable group of ``here``,
        matched by the first coupled tensor dim."""
        where = {(m.name, m.dim): g for g in self.pruner.groups for m in g.members}
        pairs = []
        for g in here.prunable_groups:
            h = where.get((g.members[0].name, g.members[0].dim))
            if h is not None and h.n_units >= g.n_units:
                pairs.append((g, h))
        return pairs

    def _caps(self, here: Pruner, pairs: list[tuple[ChannelGroup, ChannelGroup]]) -> dict[int, float]:
        """``prune.max_ratio`` of the original groups, as fractions of what each group of ``here`` has left."""
        cap = self.prune_cfg.max_ratio
        left = {g.id: g.n_units / h.n_units for g, h in pairs}
        return {g.id: max(0.0, 1 - (1 - cap) / left.get(g.id, 1.0)) for g in here.prunable_groups}

    def _original_meta(self, plan: PruningPlan) -> PruningPlan:
        """``plan`` with ``groups``, ``ratios`` and ``labels`` of the original model's groups."""
        groups = {}
        for g in self.pruner.prunable_groups:
            m = g.members[0]
            idx = plan.pruned.get(m.name, {}).get(m.dim, [])
            if idx:
                groups[g.id] = sorted(set(m.unit[torch.as_tensor(idx, dtype=torch.long)].tolist()))
        plan.meta.update(
            {
                "method": "iterative",
                "groups": groups,
                "ratios": {str(g): len(u) / self.pruner.groups[g].n_units for g, u in groups.items()},
                "labels": {str(g): group_label(self.pruner.groups[g]) for g in groups},
            }
        )
        return plan

    def _agree(self, step: PrunedStep, prev_dir: Path | None, k: int, seed: int) -> PrunedStep:
        """Under torchrun every rank trains rank 0's plan."""
        ref = pdist.broadcast_object(
            {"plan": step.plan.to_dict(), "step": step.step_plan.to_dict() if step.step_plan is not None else None}
        )
        if ref["plan"] == step.plan.to_dict():
            return step
        warnings.warn(
            f"rank {pdist.rank()} pruned other channels than rank 0 in step {k}; using rank 0's plan", stacklevel=1
        )
        torch.manual_seed(seed)
        start = self._start(prev_dir)
        plan = PruningPlan.from_dict(ref["step"] if ref["step"] is not None else ref["plan"])
        sparse.apply_plan(start.model, plan)
        if ref["step"] is None:
            return PrunedStep(start.model, sparse.get_plan(start.model), None, step.notes)
        return self._slim_step(start, plan, step.notes)

    def _save_step(self, step: PrunedStep, directory: Path) -> None:
        if pdist.is_main():
            if step.step_plan is None:
                sparse.save_sparse(step.model, directory)
            else:
                save_slim(step.model, directory)
                step.plan.save(directory / artifacts.PLAN)
                step.step_plan.save(directory / "step_plan.json")
        pdist.barrier()  # the next step starts from this directory on every rank

    def _record(
        self,
        k: int,
        a: int,
        ratio: float,
        step: PrunedStep,
        ft: FinetuneResult,
        metric: float,
        baseline: dict,
        rel: str,
    ) -> dict:
        c = count(step.model if step.step_plan is not None else to_slim(step.model), self.inputs)
        drop = (metric - baseline["metric"]) if self.lower else (baseline["metric"] - metric)
        ok = self.config.max_drop is None or drop <= self.config.max_drop + 1e-12
        return {
            "step": k,
            "try": a,
            "ratio": ratio,
            "metric": metric,
            "drop": drop,
            "macs": c.macs,
            "params": c.params,
            "macs_reduction": 1 - c.macs / baseline["macs"] if baseline["macs"] else 0.0,
            "params_reduction": 1 - c.params / baseline["params"] if baseline["params"] else 0.0,
            "accepted": ok,
            "dir": rel,
            "notes": step.notes,
            "history": ft.history,
            "lr": ft.lr,
            "pruned_channels": sum(len(v) for v in step.plan.meta.get("groups", {}).values()),
        }

    # ----- the end ----------------------------------------------------------------------
    def _final_sparse(self, last_dir: Path | None) -> nn.Module:
        """The last accepted step as a sparse model of the original architecture."""
        if last_dir is None:
            return sparse.apply_plan(copy.deepcopy(self.template), PruningPlan({}, {}, {})).eval()
        start = self._start(last_dir)
        if start.slim:
            return sparse.from_slim(copy.deepcopy(self.template), start.model, start.plan).eval()
        return sparse.apply_plan(start.model, start.plan).eval()

    def _load_result(
        self, state: dict, last_dir: Path | None, baseline: dict, notes: list[str], final: dict
    ) -> IterativeResult:
        """The result on ranks other than 0: the slim model rank 0 saved in ``final/``."""
        slim = load_slim(copy.deepcopy(self.template), self.ws.path("final")).eval()
        return IterativeResult(
            slim,
            self._final_sparse(last_dir),
            baseline,
            state["attempts"],
            final,
            notes,
            self.ws.root,
            final.get("test_metric"),
        )

    def _finish(self, state: dict, last_dir: Path | None, baseline: dict, notes: list[str]) -> IterativeResult:
        sparse_model = self._final_sparse(last_dir)
        slim, err = checked_slim(sparse_model, self.inputs)
        final_dir = self.ws.path("final")
        save_slim(slim, final_dir)
        c = count(slim, self.inputs)
        metric = float(self.eval_fn(slim))
        test = float(self.test_fn(slim)) if self.test_fn is not None else None
        drop = (metric - baseline["metric"]) if self.lower else (baseline["metric"] - metric)
        final = {
            "metric": metric,
            "drop": drop,
            "macs": c.macs,
            "params": c.params,
            "macs_reduction": 1 - c.macs / baseline["macs"] if baseline["macs"] else 0.0,
            "params_reduction": 1 - c.params / baseline["params"] if baseline["params"] else 0.0,
            "step": last_dir.name if last_dir else None,
            "equivalence_error": err,
            "test_metric": test,
            "file_bytes": (final_dir / artifacts.WEIGHTS).stat().st_size,
            "baseline_file_bytes": self.ws.path("baseline/model.safetensors").stat().st_size,
        }
        summary = {
            "format": "prunekit-summary",
            "version": 1,
            "baseline": baseline,
            "final": final,
            "test_metric": test,
            "finetune_on": self.config.finetune_on,
            "epochs_per_step": self.epochs,
            "attempts": state["attempts"],
            "notes": notes,
            "layers": layer_table(self.template, slim),
        }
        self.ws.write_json(artifacts.SUMMARY, summary)
        return IterativeResult(slim, sparse_model, baseline, state["attempts"], final, notes, self.ws.root, test)


def layer_table(before: nn.Module, after: nn.Module) -> list[dict]:
    """Output channels of every conv / linear layer before and after pruning."""
    rows = []
    after_mods = dict(after.named_modules())
    for name, m in before.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            a = after_mods.get(name)
            out_b = m.out_channels if hasattr(m, "out_channels") else m.out_features
            out_a = getattr(a, "out_channels", getattr(a, "out_features", out_b))
            in_b = m.in_channels if hasattr(m, "in_channels") else m.in_features
            in_a = getattr(a, "in_channels", getattr(a, "in_features", in_b))
            rows.append(
                {
                    "name": name,
                    "type": type(m).__name__,
                    "out_before": out_b,
                    "out_after": out_a,
                    "in_before": in_b,
                    "in_after": in_a,
                }
            )
    return rows


def iterative_prune(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: Callable[[nn.Module], float],
    train_loader: Iterable | None = None,
    **kwargs: Any,
) -> IterativeResult:
    """``IterativePruner(model, example_inputs, eval_fn, train_loader, **kwargs).run()``."""
    return IterativePruner(model, example_inputs, eval_fn, train_loader, **kwargs).run()


def _refuse_one_prune_options(cfg: PruneConfig) -> None:
    """The options of one ``prunekit prune`` that the steps do not apply: refused, never silently ignored."""
    names = ("compensate", "remove_blocks", "remove_experts")
    unused = [f"prune.{k}={getattr(cfg, k)!r}" for k in names if getattr(cfg, k)]
    if unused:
        raise ConfigError(
            f"{', '.join(unused)}: applied by a single 'prunekit prune' only, not by the iterative run's steps; "
            "unset it for 'prunekit run', or prune once with 'prunekit prune' and fine-tune"
        )
