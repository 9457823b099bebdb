"""Iterative pruning: ana once, then prune -> fine-tune steps of growing removal ratio.

Each step prunes the *original* architecture again, starting from the previous step's
fine-tuned weights: those keep the earlier pruned channels at exactly zero, so the L2 (or L1,
FPGM ...) criterion chooses them first, and the previous plan is merged in should it not.
After fine-tuning, a step that loses more than ``max_drop`` against the baseline is retried
with a smaller increment (at most ``max_retries`` times). The last accepted step is turned
into the slim model.

Everything lives in a workspace directory::

    ana.json, sensitivity.json, sensitivity.png   the sensitivity analysis (resumable)
    iterative.json                                the state: every finished attempt
    steps/step<k>-try<a>/finetune/                per-epoch checkpoints of that attempt
    steps/step<k>-try<a>/model/                   its sparse model (save_sparse)
    baseline/model.safetensors                    the starting weights
    final/                                        the slim model (save_slim) and summary.json

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
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from prunekit.engine import sparse
from prunekit.engine.counting import count
from prunekit.engine.equivalence import checked_slim
from prunekit.engine.plan import PruningPlan
from prunekit.engine.slim import save_slim, to_slim
from prunekit.workflow import distributed as pdist
from prunekit.workflow.ana import Sensitivity, ana
from prunekit.workflow.finetune import FinetuneConfig, finetune
from prunekit.workflow.options import AnaConfig, IterativeConfig, PruneConfig
from prunekit.workflow.prune import prune
from prunekit.workflow.workspace import Workspace, model_fingerprint

__all__ = ["IterativePruner", "IterativeResult", "iterative_prune", "IterativeConfig", "STATE"]

STATE = "iterative.json"
FORMAT = "prunekit-iterative"


@dataclass
class IterativeResult:
    """The outcome of :meth:`IterativePruner.run`.

    Attributes:
        model: The slim model of the last accepted step (the baseline if none was accepted).
        sparse_model: The same as a sparse model of the original architecture.
        baseline: ``{"metric", "macs", "params"}`` of the starting model.
        attempts: Every attempt: step, try, ratio, metric, macs, params, accepted, notes.
        final: ``{"metric", "macs", "params", "macs_reduction", "step"}`` of the slim model.
        notes: What the loop decided (retries, early stop, merged plans).
        workspace: Where the artifacts are.
    """

    model: nn.Module
    sparse_model: nn.Module
    baseline: dict
    attempts: list[dict]
    final: dict
    notes: list[str] = field(default_factory=list)
    workspace: Path | None = None

    @property
    def steps(self) -> list[dict]:
        return [a for a in self.attempts if a["accepted"]]

    def table(self) -> str:
        """Metric, MACs and parameters per step, as text."""
        return steps_table(self.baseline, self.attempts, self.final)


def steps_table(baseline: dict, attempts: list[dict], final: dict | None = None) -> str:
    head = ["step", "ratio", "MACs", "MACs -", "params", "metric", "drop", ""]
    rows = [["base", "", _h(baseline["macs"]), "", _h(baseline["params"]), f"{baseline['metric']:.4f}", "", ""]]
    for a in attempts:
        tag = f"{a['step']}" + (f".{a['try']}" if a["try"] else "")
        rows.append([tag, f"{a['ratio']:.3f}", _h(a["macs"]), f"{a['macs_reduction']:.1%}", _h(a["params"]),
                     f"{a['metric']:.4f}", f"{a['drop']:+.4f}", "accepted" if a["accepted"] else "retried"])
    if final:
        rows.append(["slim", "", _h(final["macs"]), f"{final['macs_reduction']:.1%}", _h(final["params"]),
                     f"{final['metric']:.4f}", f"{final['drop']:+.4f}", ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def _h(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


class IterativePruner:
    """Gradual pruning with fine-tuning between steps, resumable in a workspace.

    Args:
        model: The trained, dense baseline (left unchanged).
        example_inputs: Inputs for tracing and counting MACs (a batch of one for MACs/sample).
        eval_fn: ``eval_fn(model) -> number``: for ana, after every fine-tuning epoch and
            for the step's verdict.
        train_loader: Batches for the built-in fine-tuning (or pass ``train_fn``).
        workspace: The directory of the whole run.
        config: Schedule, tolerated drop and retries (:class:`IterativeConfig`).
        finetune: Options of each step's fine-tuning (:class:`FinetuneConfig`).
        ana: Options of the sensitivity analysis (:class:`AnaConfig`).
        prune: Options of each pruning (:class:`PruneConfig`; its ratio is set per step).
        excludes: Module names whose channels stay.
        criterion: Importance criterion for ana and prune.
        lower_is_better: The metric is a loss.
        train_fn: ``train_fn(model, epoch)``: your own training epoch (see
            :func:`prunekit.workflow.finetune.finetune`).
        loss_fn: Loss of the built-in loop (default cross-entropy).
        log: Where messages go.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, eval_fn: Callable[[nn.Module], float],
                 train_loader: Iterable | None = None, *, workspace: str | Workspace,
                 config: IterativeConfig | None = None, finetune: FinetuneConfig | None = None,
                 ana: AnaConfig | None = None, prune: PruneConfig | None = None, excludes: Iterable[str] = (),
                 criterion: str = "l2", lower_is_better: bool = False,
                 train_fn: Callable[[nn.Module, int], Any] | None = None, loss_fn: Callable | None = None,
                 log: Callable[[str], None] = print) -> None:
        if sparse.is_sparse(model):
            raise ValueError("IterativePruner starts from the dense baseline; this model is already sparse")
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable as eval_fn(model) -> number, got {type(eval_fn).__name__}")
        if train_loader is None and train_fn is None:
            raise ValueError("give a train_loader for the built-in fine-tuning, or your own train_fn")
        self.template = model
        self.inputs = example_inputs
        self.eval_fn = eval_fn
        self.train_loader = train_loader
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.config = config or IterativeConfig()
        self.ft = finetune or FinetuneConfig()
        self.ana_cfg = ana or AnaConfig()
        self.prune_cfg = prune or PruneConfig()
        self.excludes = list(excludes)
        self.criterion = criterion
        self.lower = lower_is_better
        self.train_fn = train_fn
        self.loss_fn = loss_fn
        self.log = log

    # ----- state ------------------------------------------------------------------------
    def _signature(self) -> dict:
        ft = {k: v for k, v in self.ft.to_dict().items() if k not in ("progress", "device")}
        return {"model": model_fingerprint(self.template), "run": dataclasses.asdict(self.config), "finetune": ft,
                "ana": dataclasses.asdict(self.ana_cfg), "prune": self.prune_cfg.kwargs(),
                "excludes": sorted(self.excludes), "criterion": self.criterion, "lower_is_better": self.lower,
                "custom_train_fn": self.train_fn is not None}

    def _load_state(self, signature: dict) -> dict:
        fresh = {"format": FORMAT, "version": 1, "config": signature, "attempts": [], "notes": []}
        if not self.ws.exists(STATE):
            return fresh
        state = self.ws.read_json(STATE)
        if state.get("format") != FORMAT or state.get("config") != signature:
            changed = [k for k in signature if state.get("config", {}).get(k) != signature[k]]
            self.log(f"the iterative run in {self.ws.root} was made with other settings ({', '.join(changed)} "
                     "changed); starting the steps over")
            for d in ("steps", "final"):
                shutil.rmtree(self.ws.path(d), ignore_errors=True)
            if self.ws.exists("summary.json"):
                self.ws.path("summary.json").unlink()
            return fresh
        if state["attempts"]:
            self.log(f"resuming: {len(state['attempts'])} finished step attempt(s) in {self.ws.path(STATE)}")
        return state

    def _save_state(self, state: dict) -> None:
        if pdist.is_main():
            self.ws.write_json(STATE, state)

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> IterativeResult:
        """Run (or resume) the whole loop; returns the slim model and the table."""
        t_start = time.perf_counter()
        pdist.init_if_needed()
        together = pdist.collective()
        if together and not pdist.is_main():
            self.log = lambda m: None  # rank 0 reports
        signature = self._signature()
        state = pdist.broadcast_object(self._load_state(signature) if pdist.is_main() else None)
        base_counts = count(self.template, self.inputs)
        sens = ana(self.template, self.inputs, self.eval_fn, workspace=self.ws, excludes=self.excludes,
                   ratios=self.ana_cfg.ratios, criterion=self.criterion, forced=self.ana_cfg.forced,
                   lower_is_better=self.lower, collapse=self.ana_cfg.collapse, progress=self.ft.progress,
                   log=self.log)
        baseline = {"metric": sens.baseline, "macs": base_counts.macs, "params": base_counts.params}
        state["baseline"] = baseline
        self._save_baseline()
        notes: list[str] = list(state.get("notes", []))
        done = {(a["step"], a["try"]): a for a in state["attempts"]}
        prev_ratio, prev_dir = 0.0, None
        cfg = self.config
        for k, goal in enumerate(cfg.schedule_ratios(), start=1):
            # Reach this step's ratio; a failed attempt is retried with a smaller increment, and
            # after an accepted smaller increment the rest of the way is tried again from there.
            # At most max_retries failures per step; the decisions depend only on the recorded
            # attempts, so a resumed run replays them exactly.
            a, fails, streak = 0, 0, 0
            while prev_ratio < goal - 1e-9 and fails <= cfg.max_retries:
                ratio = round(prev_ratio + (goal - prev_ratio) * cfg.retry_factor ** streak, 6)
                att = done.get((k, a))
                if att is None:
                    att = self._attempt(k, a, ratio, prev_dir, sens, baseline)
                    state["attempts"].append(att)
                    for n in att["notes"]:
                        notes.append(f"step {k} try {a}: {n}")
                    if not att["accepted"]:
                        msg = (f"step {k}: removal ratio {ratio:.3f} lost {att['drop']:.4f} "
                               f"(> max_drop {cfg.max_drop}) after fine-tuning")
                        msg += "; retrying with a smaller increment" if fails < cfg.max_retries else "; no retries left"
                        notes.append(msg)
                        self.log(msg)
                    state["notes"] = notes
                    self._save_state(state)
                a += 1
                if att["accepted"]:
                    prev_ratio, prev_dir = att["ratio"], self.ws.path(att["dir"])
                    streak = 0
                else:
                    fails += 1
                    streak += 1
            if prev_ratio < goal - 1e-9:
                msg = (f"stopped at step {k}: {fails} attempt(s) missed max_drop={cfg.max_drop}; keeping the model "
                       f"at removal ratio {prev_ratio:.3f}" if prev_dir is not None else
                       f"stopped at step {k}: no attempt met max_drop={cfg.max_drop}; nothing was pruned")
                if msg not in notes:
                    notes.append(msg)
                self.log(msg)
                break
        if prev_ratio < cfg.schedule_ratios()[-1] and prev_dir is not None:
            msg = f"the final removal ratio is {prev_ratio:.3f}, below the planned {cfg.schedule_ratios()[-1]:.3f}"
            if msg not in notes:
                notes.append(msg)
        state["notes"] = notes
        self._save_state(state)
        if together:  # rank 0 transforms, checks, saves and evaluates the slim model once
            result = None
            if pdist.is_main():
                with pdist.local():
                    result = self._finish(state, prev_dir, baseline, notes)
            final = pdist.broadcast_object(result.final if result is not None else None)
            if result is None:
                result = self._load_result(state, prev_dir, baseline, notes, final)
        else:
            result = self._finish(state, prev_dir, baseline, notes)
        state["done"] = True
        state["final"] = result.final
        self._save_state(state)
        self.log(f"iterative pruning finished in {time.perf_counter() - t_start:.1f} s (this session)")
        return result

    def _dense(self, weights_dir: Path | None) -> nn.Module:
        """A dense copy of the original architecture, with the weights saved in ``weights_dir``."""
        from safetensors.torch import load_model

        model = copy.deepcopy(self.template)
        if weights_dir is not None:
            load_model(model, str(weights_dir / "model.safetensors"))
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

    def _attempt(self, k: int, a: int, ratio: float, prev_dir: Path | None, sens: Sensitivity,
                 baseline: dict) -> dict:
        t0 = time.perf_counter()
        rel = f"steps/step{k}-try{a}"
        d = self.ws.path(rel)
        self.log(f"step {k}{f' (retry {a})' if a else ''}: prune to a MACs removal ratio of {ratio:.3f}"
                 + (f", starting from {prev_dir.name}" if prev_dir else ""))
        model = self._dense(prev_dir / "model" if prev_dir else None)
        res = prune(model, self.inputs, removal_ratio=ratio, sensitivity=sens, excludes=self.excludes,
                    criterion=self.criterion, log=self.log, **self.prune_cfg.kwargs())
        notes = list(res.notes)
        if prev_dir is not None:
            prev = PruningPlan.load(prev_dir / "model" / "plan.json")
            if not res.plan.contains(prev):
                sparse.apply_plan(model, prev)  # merges: earlier pruned channels stay pruned
                notes.append("the new plan did not contain every earlier pruned channel; merged the previous plan")
        plan = sparse.get_plan(model)
        ref = pdist.broadcast_object(plan.to_dict())  # every rank trains rank 0's masks
        if ref != plan.to_dict():
            warnings.warn(f"rank {pdist.rank()} pruned other channels than rank 0 in step {k}; using rank 0's plan",
                          stacklevel=1)
            model = self._dense(prev_dir / "model" if prev_dir else None)
            plan = PruningPlan.from_dict(ref)
            sparse.apply_plan(model, plan)
        ft_cfg = dataclasses.replace(self.ft, seed=self.ft.seed + 1000 * k + 10 * a)
        ft = finetune(model, self.train_loader, self.eval_fn, ft_cfg, workspace=self.ws.path(f"{rel}/finetune"),
                      train_fn=self.train_fn, loss_fn=self.loss_fn, lower_is_better=self.lower, log=self.log)
        metric = ft.best_metric if ft.best_metric is not None else float(self.eval_fn(model))
        slim = to_slim(model)
        c = count(slim, self.inputs)
        from prunekit.engine.sparse import save_sparse

        if pdist.is_main():
            save_sparse(model, d / "model")
        pdist.barrier()  # the next step starts from this directory on every rank
        drop = (metric - baseline["metric"]) if self.lower else (baseline["metric"] - metric)
        ok = self.config.max_drop is None or drop <= self.config.max_drop + 1e-12
        att = {"step": k, "try": a, "ratio": ratio, "metric": metric, "drop": drop, "macs": c.macs,
               "params": c.params, "macs_reduction": 1 - c.macs / baseline["macs"] if baseline["macs"] else 0.0,
               "params_reduction": 1 - c.params / baseline["params"] if baseline["params"] else 0.0,
               "accepted": ok, "dir": rel, "notes": notes, "history": ft.history, "lr": ft.lr,
               "pruned_channels": sum(len(v) for v in plan.meta.get("groups", {}).values()),
               "seconds": round(time.perf_counter() - t0, 2)}
        self.log(f"step {k}{f' (retry {a})' if a else ''}: MACs -{att['macs_reduction']:.1%}, params "
                 f"-{att['params_reduction']:.1%}, metric {metric:.4f} (baseline {baseline['metric']:.4f}); "
                 + ("accepted" if ok else "rejected"))
        return att

    def _final_sparse(self, last_dir: Path | None) -> nn.Module:
        sparse_model = self._dense(last_dir / "model" if last_dir else None)
        if last_dir is not None:
            sparse.apply_plan(sparse_model, PruningPlan.load(last_dir / "model" / "plan.json"))
        else:
            sparse.apply_plan(sparse_model, PruningPlan({}, {}, {}))
        return sparse_model.eval()

    def _load_result(self, state: dict, last_dir: Path | None, baseline: dict, notes: list[str],
                     final: dict) -> IterativeResult:
        """The result on ranks other than 0: the slim model rank 0 saved in ``final/``."""
        from prunekit.engine.slim import load_slim

        slim = load_slim(copy.deepcopy(self.template), self.ws.path("final")).eval()
        return IterativeResult(slim, self._final_sparse(last_dir), baseline, state["attempts"], final, notes,
                               self.ws.root)

    def _finish(self, state: dict, last_dir: Path | None, baseline: dict, notes: list[str]) -> IterativeResult:
        sparse_model = self._final_sparse(last_dir)
        slim, err = checked_slim(sparse_model, self.inputs)
        final_dir = self.ws.path("final")
        save_slim(slim, final_dir)
        c = count(slim, self.inputs)
        metric = float(self.eval_fn(slim))
        drop = (metric - baseline["metric"]) if self.lower else (baseline["metric"] - metric)
        final = {"metric": metric, "drop": drop, "macs": c.macs, "params": c.params,
                 "macs_reduction": 1 - c.macs / baseline["macs"] if baseline["macs"] else 0.0,
                 "params_reduction": 1 - c.params / baseline["params"] if baseline["params"] else 0.0,
                 "step": last_dir.name if last_dir else None, "equivalence_error": err,
                 "file_bytes": (final_dir / "model.safetensors").stat().st_size,
                 "baseline_file_bytes": self.ws.path("baseline/model.safetensors").stat().st_size}
        summary = {"format": "prunekit-summary", "version": 1, "baseline": baseline, "final": final,
                   "attempts": state["attempts"], "notes": notes, "layers": layer_table(self.template, slim)}
        self.ws.write_json("summary.json", summary)
        return IterativeResult(slim, sparse_model, baseline, state["attempts"], final, notes, self.ws.root)


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
            rows.append({"name": name, "type": type(m).__name__, "out_before": out_b, "out_after": out_a,
                         "in_before": in_b, "in_after": in_a})
    return rows


def iterative_prune(model: nn.Module, example_inputs: Any, eval_fn: Callable[[nn.Module], float],
                    train_loader: Iterable | None = None, **kwargs: Any) -> IterativeResult:
    """``IterativePruner(model, example_inputs, eval_fn, train_loader, **kwargs).run()``."""
    return IterativePruner(model, example_inputs, eval_fn, train_loader, **kwargs).run()
