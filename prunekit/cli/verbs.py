"""The workflow verbs of the ``prunekit`` command: ana, groups, prune, finetune, run, report.

Each verb mirrors its Python function and reads a YAML config (see :mod:`prunekit.cli.job`);
flags override the config, and once the verb succeeded the resolved config is saved in the
workspace as ``config.yaml`` (a failed command leaves the previous one). ``groups`` is the dry
run: the channel groups, what is prunable and why not, and the widths an allocation would
choose, without writing anything. Errors are one line (:mod:`prunekit.cli.errors`). A minimal
config::

    model:
      factory: torchvision.models:resnet18      # package.module:callable
      kwargs: {num_classes: 10}
      checkpoint: resnet18-cifar10.pt           # optional
    data:
      dataset: cifar10                          # or loaders: mypkg.data:get_loaders
      root: ./data
    workspace: ws-resnet18
    run: {target: 0.5, steps: 3, max_drop: 0.01}

Then ``prunekit run -c config.yaml`` does ana -> (prune -> finetune) x steps -> slim, and
``prunekit report ws-resnet18`` writes the HTML report.

``ana``, ``finetune`` and ``run`` also run under ``torchrun --nproc_per_node N`` (see
:mod:`prunekit.workflow.distributed`): the process group starts by itself, rank 0 prints and writes the
workspace. The other verbs run on rank 0 only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from prunekit.cli.errors import CliError, guard, use_workspace
from prunekit.utils import artifacts
from prunekit.utils.files import ArtifactError, atomic_write

__all__ = ["register"]

_CONFIG_HELP = "YAML config (model, data, metric, and each stage's options); flags override it"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("-w", "--workspace", metavar="DIR", help="workspace directory (overrides the config's)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override any config option, e.g. --set finetune.epochs=3 --set data.batch_size=64 "
        "(repeatable; values are YAML)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="where to compute: cpu, cuda, cuda:1, mps (the config's device; checked before any work)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (one line per ana group and per fine-tuning epoch instead, as without a terminal)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ana, groups, prune, finetune, run and report sub-commands to ``sub``."""
    p = sub.add_parser(
        "ana",
        help="sensitivity analysis: the metric when each channel group alone is pruned",
        description="Prune every channel group alone at each ratio of ana.ratios, evaluate, and "
        "save the curves (ana.json, sensitivity.json, sensitivity.png) in the "
        "workspace. Resumable: a rerun reuses every point already measured.",
    )
    _common(p)
    p.add_argument("--forced", action="store_true", help="recompute every point even if cached")
    p.set_defaults(func=cmd_ana)

    p = sub.add_parser(
        "groups",
        help="dry run: the channel groups, what is prunable and why not",
        description="Trace and validate the configured model (structural, then numeric) and list "
        "its channel groups: size, how many channels can go, and why the others stay "
        "(model input/output, an op without a channel rule, validation). With "
        "--removal-ratio, also the width of every layer the allocation would choose "
        "(ana's results from the workspace if there are any, else prune.fallback). "
        "Changes no file.",
    )
    _common(p)
    p.add_argument("--removal-ratio", type=float, metavar="R", help="show the widths for this MACs removal ratio")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser(
        "prune",
        help="prune once to a MACs reduction or a tolerated loss",
        description="Prune the model (guided by ana's results in the same workspace, if any) "
        "and save the sparse model in WORKSPACE/pruned (model.safetensors + "
        "plan.json). Fine-tune it next with 'prunekit finetune'.",
    )
    _common(p)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--removal-ratio", type=float, help="fraction of MACs to remove, e.g. 0.5")
    goal.add_argument("--threshold", type=float, help="largest predicted relative metric loss (needs ana)")
    goal.add_argument("--spec", metavar="PLAN", help="apply a saved plan.json as given")
    p.add_argument(
        "--search",
        type=int,
        metavar="N",
        help="evaluate the computed allocation and N variants of it at the same MACs, keep the best "
        "(needs ana results; prune.search)",
    )
    p.add_argument(
        "--calibrate-batches",
        type=int,
        metavar="N",
        help="re-estimate BatchNorm statistics on N training batches before each evaluation and "
        "for the result (prune.calibrate_batches)",
    )
    p.add_argument(
        "--start-from",
        metavar="DIR",
        help="start from a fine-tuned sparse model (e.g. WORKSPACE/finetuned) to prune further: its "
        "weights are loaded into the original architecture and its pruned channels stay pruned",
    )
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the sparse model of 'prunekit prune'",
        description="Load the sparse model (WORKSPACE/pruned by default), train it with the "
        "built-in loop (finetune section of the config), evaluate every epoch, keep "
        "the best weights and save them in WORKSPACE/finetuned. Per-epoch "
        "checkpoints in WORKSPACE/finetune make a killed run resume.",
    )
    _common(p)
    p.add_argument("--input", metavar="DIR", help="sparse model to fine-tune (default: WORKSPACE/pruned)")
    p.add_argument("--epochs", type=int, help="override finetune.epochs")
    p.add_argument("--lr", type=float, help="override finetune.lr")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "run",
        help="the whole workflow: ana, then prune -> finetune steps, then slim",
        description="Iterative pruning: ana once on the baseline, then steps of prune -> "
        "finetune with a growing removal ratio (run.schedule, or run.target in "
        "run.steps), each retried with a smaller increment when it loses more than "
        "run.max_drop; the last accepted step becomes the slim model in "
        "WORKSPACE/final (model.safetensors + spec.json). Resumable.",
    )
    _common(p)
    p.add_argument("--target", type=float, help="override run.target (final fraction of MACs to remove)")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--max-drop", type=float, help="override run.max_drop (tolerated metric drop, metric units)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "report",
        help="write an HTML report of a workspace and print a summary",
        description="Read a workspace (ana, prune, run or demo results) and write a self-contained "
        "HTML page with the sensitivity curves, channels per layer, metric and MACs "
        "per step and the before/after table; print a summary.",
    )
    p.add_argument("workspace", metavar="WORKSPACE", help="the workspace directory")
    p.add_argument("-o", "--output", metavar="FILE", help="HTML file (default: WORKSPACE/report.html)")
    p.set_defaults(func=cmd_report)


# ----- shared set-up ---------------------------------------------------------------------
class _Job:
    """The resolved config and what it names, built once per command."""

    def __init__(self, args: argparse.Namespace, extra: dict | None = None, need_data: bool | str = True) -> None:
        """``need_data``: build the loaders and the metric; ``"inputs"``: only if the example input needs them."""
        from prunekit.cli import build as loading
        from prunekit.cli.job import load_config, parse_set
        from prunekit.workflow.workspace import Workspace

        overrides = parse_set(args.overrides)
        overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
        if args.workspace:
            overrides["workspace"] = args.workspace
        if getattr(args, "device", None):
            overrides["device"] = args.device
        if args.no_progress:
            overrides["finetune.progress"] = False
        self.cfg = load_config(args.config, overrides)
        self.device = self._devices()
        self.search = [Path(args.config).resolve().parent] if args.config else []
        self.search.append(Path.cwd())
        self.ws = Workspace(self.cfg.workspace)  # config.yaml is written after the verb succeeded: save_config
        use_workspace(self.ws)
        self.model = loading.build_model(self.cfg.model, self.search).to(self.device or "cpu")
        self.test_fn = None
        if need_data == "inputs" and self.cfg.model.input_shape:
            need_data, self.inputs = False, loading.example_inputs(self.cfg.model, [])
        if need_data:
            data = loading.build_loaders(
                self.cfg.data, self.cfg.seed, self.search, log=lambda m: print(m, file=sys.stderr)
            )
            self.train, self.val = data.train, data.val
            self.eval_fn, self.lower = loading.build_eval_fn(self.cfg, data.val, self.search)  # selects
            #: the test split's metric: only reported, never used to choose (None: no test split)
            self.test_fn = (
                loading.build_eval_fn(self.cfg, data.test, self.search, whole=True)[0]
                if data.test is not None
                else None
            )
            self.inputs = loading.example_inputs(self.cfg.model, data.val)
        if hasattr(self, "inputs"):
            from prunekit.utils.devices import to_device

            self.inputs = to_device(self.inputs, self.device)
        self.progress = not args.no_progress and self.cfg.finetune.progress

    def _devices(self):
        """The config's device, checked (``finetune.device`` defaults to it); before any work is done."""
        import dataclasses

        from prunekit.utils.devices import check_device

        device = check_device(self.cfg.device, "device (--device)")
        if self.cfg.finetune.device is None and device is not None:
            self.cfg.finetune = dataclasses.replace(self.cfg.finetune, device=self.cfg.device)
        check_device(self.cfg.finetune.device, "finetune.device")
        return device

    def save_config(self) -> None:
        """Write the resolved config as ``WORKSPACE/config.yaml``: only once the verb succeeded, so it
        always describes the results next to it."""
        from prunekit.cli.job import dump_config
        from prunekit.workflow import distributed as pdist

        if pdist.is_main():
            atomic_write(self.ws.path(artifacts.CONFIG), dump_config(self.cfg))

    def test_text(self, model, baseline=None) -> str:
        """``'; test accuracy 0.8123'`` (with the baseline's, if given), or ``''`` without a test split."""
        if self.test_fn is None:
            return ""
        base = f"{baseline:.4f} baseline, " if baseline is not None else ""
        return f"; test {self.cfg.metric} {base}{self.test_fn(model):.4f} (reported only, never used to choose)"

    def teacher(self):
        """A copy of the unpruned model for distillation (``finetune.distill_weight`` > 0), else ``None``."""
        import copy

        return copy.deepcopy(self.model).eval() if self.cfg.finetune.distill_weight > 0 else None


# ----- verbs -----------------------------------------------------------------------------
@guard("ana", distributed=True, resumable=True)
def cmd_ana(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.workflow.ana import ana
    from prunekit.workflow.options import PruneConfig

    job = _Job(args)
    c = job.cfg
    sens = ana(
        job.model,
        job.inputs,
        job.eval_fn,
        workspace=job.ws,
        excludes=c.excludes,
        ratios=c.ana.ratios,
        criterion=c.criterion,
        forced=args.forced or c.ana.forced,
        lower_is_better=job.lower,
        collapse=c.ana.collapse,
        progress=job.progress,
        log=lambda m: print(m, file=out),
        fast=c.ana.fast,
        workers=c.ana.workers,
        calibration=_calibration(job, [f"criterion {c.criterion!r}"])
        if PruneConfig().needs_calibration(c.criterion)
        else None,
    )
    print(sens.table(), file=out)
    print(sens.summary(), file=out)
    print(f"\nsensitivity results in {job.ws.root} (sensitivity.json, sensitivity.png)", file=out)
    job.save_config()
    return 0


@guard("groups")
def cmd_groups(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.utils.text import table
    from prunekit.workflow.validation import validated_pruner

    job = _Job(args, {"prune.removal_ratio": args.removal_ratio}, need_data="inputs")
    c = job.cfg
    seen: set[str] = set()

    def say(m: str) -> None:
        if m not in seen:  # validation repeats itself inside prune(): once is enough
            seen.add(m)
            print(m, file=out)

    pruner = validated_pruner(job.model, job.inputs, excludes=c.excludes, criterion=c.criterion, log=say)
    rows = [
        [
            str(g.id),
            _group_name(g),
            str(g.n_units),
            str(g.n_prunable if g.prunable else 0),
            "; ".join(dict.fromkeys(g.reasons))[:110] if g.reasons else "",
        ]
        for g in pruner.groups
    ]
    print(table(rows, ["group", "layers", "channels", "prunable", "why channels stay"], "rlrrl"), file=out)
    if c.prune.removal_ratio is not None:
        _dry_widths(job, pruner, c.prune.removal_ratio, say)
    print("(dry run: no file was changed)", file=out)
    return 0


def _group_name(group) -> str:
    """``'stage2.0.conv2 (+7 more)'``: the first layer producing the group's channels."""
    modules = list(dict.fromkeys(m.module for m in group.members if m.module))
    producers = [m.module for m in group.members if m.name.endswith("weight") and m.dim == 0 and m.module]
    if not modules:
        return group.members[0].name
    first = producers[0] if producers else modules[0]
    return first + (f" (+{len(modules) - 1} more)" if len(modules) > 1 else "")


def _dry_widths(job: _Job, pruner, ratio: float, say) -> None:
    """The per-layer widths ``prune --removal-ratio ratio`` would choose, on a copy; nothing is written."""
    import copy

    import torch.nn as nn

    from prunekit.utils.text import table
    from prunekit.workflow.prune import matching_sensitivity, prune

    c = job.cfg
    sens = matching_sensitivity(job.ws, None, pruner, job.model)  # read only; refused if made for another model
    res = prune(
        copy.deepcopy(job.model),
        job.inputs,
        removal_ratio=ratio,
        sensitivity=sens,
        mode="slim",
        excludes=c.excludes,
        criterion=c.criterion,
        log=say,
        **c.prune.kwargs(),
    )
    slim = dict(res.model.named_modules())
    rows = []
    for name, m in job.model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            (ob, ib), (oa, ia) = _widths(m), _widths(slim.get(name, m))
            rows.append(
                [
                    name,
                    type(m).__name__,
                    f"{ob} -> {oa}" if oa != ob else str(ob),
                    f"{ib} -> {ia}" if ia != ib else str(ib),
                ]
            )
    say(
        f"\nwith --removal-ratio {ratio}: method {res.method}"
        + (" (ana's results in the workspace)" if sens is not None else " (no ana results: prune.fallback)")
        + f", MACs {res.macs_before:,} -> {res.macs_after:,} (-{res.macs_reduction:.1%}), params "
        f"{res.params_before:,} -> {res.params_after:,}"
    )
    say(table(rows, ["layer", "type", "out channels", "in channels"], "llrr"))


def _widths(mod) -> tuple[int, int]:
    """``(out, in)`` channels of a conv or linear layer."""
    if hasattr(mod, "out_channels"):
        return mod.out_channels, mod.in_channels
    return mod.out_features, mod.in_features


@guard("prune")
def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    import copy

    from prunekit.engine.sparse import save_sparse
    from prunekit.workflow.prune import prune

    job = _Job(
        args,
        {
            "prune.removal_ratio": args.removal_ratio,
            "prune.threshold": args.threshold,
            "prune.search": args.search,
            "prune.calibrate_batches": args.calibrate_batches,
        },
    )
    c = job.cfg
    goal = _prune_goal(args, c)
    prev = baseline = None
    if args.start_from:
        baseline = copy.deepcopy(job.model)  # the configured model: the one ana analysed
        prev = _load_weights(job.model, Path(args.start_from))
    extra = {}
    if c.prune.calibrate_batches:
        from prunekit.workflow.evaluation import make_bn_calibration

        extra["calibrate"] = make_bn_calibration(job.train, max_batches=c.prune.calibrate_batches)
    if c.prune.search:
        extra.update(search=c.prune.search, eval_fn=job.eval_fn, seed=c.seed)
    extra.update(_oneshot(job))
    before = job.eval_fn(baseline if baseline is not None else job.model)
    res = prune(
        job.model,
        job.inputs,
        workspace=job.ws,
        excludes=c.excludes,
        criterion=c.criterion,
        keep_pruned=prev,
        baseline=baseline,
        log=lambda m: print(m, file=out),
        **goal,
        **c.prune.kwargs(),
        **extra,
    )
    metric = job.eval_fn(job.model)
    old = job.ws.set_aside(["finetuned", artifacts.FINETUNE], "finetune")  # they belong to the previous plan
    path = save_sparse(job.model, job.ws.path("pruned"))
    _write_prune_json(job, res, before, metric, args.start_from)
    print(
        f"method {res.method}: MACs {res.macs_before:,} -> {res.macs_after:,} (-{res.macs_reduction:.1%}), "
        f"params {res.params_before:,} -> {res.params_after:,}; {c.metric} {before:.4f} before, {metric:.4f} "
        "after pruning (no fine-tuning yet)" + job.test_text(job.model),
        file=out,
    )
    if old is not None:
        print(f"the earlier fine-tuned model (of the previous plan) is kept in {old}", file=out)
    print(
        f"sparse model saved in {path}; fine-tune it with: prunekit finetune -w {job.ws.root}"
        + (f" -c {args.config}" if args.config else ""),
        file=out,
    )
    job.save_config()
    return 0


def _oneshot(job: _Job) -> dict:
    """One-shot and structure options of ``prune``; their calibration data: the first
    ``prune.calibrate_batches`` training batches (the BatchNorm re-estimation's)."""
    from prunekit.workflow.options import PruneConfig

    c = job.cfg
    kwargs = c.prune.oneshot_kwargs()
    if c.prune.needs_calibration(c.criterion):
        names = ("compensate", "reconstruct", "remove_blocks", "remove_experts")
        what = [f"prune.{k}" for k in names if getattr(c.prune, k)]
        if PruneConfig().needs_calibration(c.criterion):
            what.insert(0, f"criterion {c.criterion!r}")
        kwargs["calibration"] = _calibration(job, what)
    if c.prune.remove_blocks and c.prune.block_criterion == "metric":
        kwargs["eval_fn"] = job.eval_fn
    return kwargs


def _calibration(job: _Job, what: list[str]) -> list:
    """The first ``prune.calibrate_batches`` training batches: the calibration data of ``what``."""
    import itertools

    n = job.cfg.prune.calibrate_batches
    if not n:
        raise CliError(
            f"{' and '.join(what)} read calibration batches: set prune.calibrate_batches (e.g. 16) "
            "or pass --calibrate-batches 16"
        )
    return list(itertools.islice(job.train, n))


def _prune_goal(args: argparse.Namespace, c) -> dict:
    """``{"spec" | "threshold" | "removal_ratio": value}`` from the flags and the config."""
    if args.spec:
        return {"spec": args.spec}
    if c.prune.threshold is not None:
        return {"threshold": c.prune.threshold}
    if c.prune.removal_ratio is not None:
        return {"removal_ratio": c.prune.removal_ratio}
    if c.prune.remove_blocks or c.prune.remove_experts:
        return {}  # blocks / experts only
    raise CliError(
        "say how much to prune: --removal-ratio R, --threshold T, --spec plan.json, or "
        "prune.removal_ratio in the config"
    )


def _write_prune_json(job: _Job, res, before: float, after: float, start_from: str | None) -> None:
    """``WORKSPACE/prune.json``: the before/after of this pruning, for the report."""
    from prunekit.workflow.workspace import json_fingerprint

    job.ws.write_json(
        artifacts.PRUNE,
        {
            "format": "prunekit-prune",
            "version": 1,
            "metric": job.cfg.metric,
            "method": res.method,
            "start_from": start_from,
            "plan": json_fingerprint(res.plan.to_dict()["pruned"]),
            "notes": res.notes,
            "baseline": {"metric": before, "macs": res.macs_before, "params": res.params_before},
            "pruned": {"metric": after, "macs": res.macs_after, "params": res.params_after},
        },
    )


def _load_weights(model, src: Path):
    """Load a save_sparse directory's weights into the dense ``model``; returns its plan."""
    from prunekit.engine.plan import PruningPlan
    from prunekit.utils.files import load_weights

    if not (src / artifacts.PLAN).exists():
        raise CliError(
            f"no sparse model in {src} (no plan.json): pass a directory written by "
            "'prunekit finetune' or prunekit.save_sparse"
        )
    fix = "write it again ('prunekit finetune', or prunekit.save_sparse)"
    plan = PruningPlan.load(src / artifacts.PLAN, fix)
    try:
        load_weights(model, src / artifacts.WEIGHTS, "sparse model weights", fix)
    except RuntimeError as exc:
        raise CliError(
            f"the sparse model in {src} does not fit the configured model: {' '.join(str(exc).split())[:300]}"
        ) from exc
    return plan


@guard("finetune", distributed=True, resumable=True)
def cmd_finetune(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.engine.sparse import load_sparse, save_sparse
    from prunekit.workflow.finetune import finetune

    job = _Job(args, {"finetune.epochs": args.epochs, "finetune.lr": args.lr})
    src = Path(args.input) if args.input else job.ws.path("pruned")
    if not (src / artifacts.PLAN).exists():
        raise CliError(
            f"no sparse model in {src}: run 'prunekit prune' first, or pass --input DIR "
            "(a directory written by prunekit.save_sparse)"
        )
    teacher = job.teacher()  # the unpruned model, before load_sparse prunes job.model in place
    try:
        model = load_sparse(job.model, src)
    except ArtifactError:
        raise  # damaged, not mismatched
    except (ValueError, RuntimeError) as exc:
        raise CliError(
            f"the sparse model in {src} does not fit the configured model: {' '.join(str(exc).split())[:300]}"
        ) from exc
    before = job.eval_fn(model)
    res = finetune(
        model,
        job.train,
        job.eval_fn,
        job.cfg.finetune,
        workspace=job.ws.path("finetune"),
        teacher=teacher,
        lower_is_better=job.lower,
        example_inputs=job.inputs,
        log=lambda m: print(m, file=out),
    )
    from prunekit.workflow import distributed as pdist

    path = save_sparse(model, job.ws.path("finetuned")) if pdist.is_main() else job.ws.path("finetuned")
    print(
        f"{job.cfg.metric}: {before:.4f} before fine-tuning, best {res.best_metric:.4f} at epoch "
        f"{res.best_epoch} of {len(res.history)} (lr {res.lr:g}; validation)" + job.test_text(model),
        file=out,
    )
    print(f"fine-tuned sparse model saved in {path}", file=out)
    if pdist.is_main():
        _write_finetune_json(job, model, src, before, res)
    job.save_config()
    return 0


def _write_finetune_json(job: _Job, model, src: Path, before: float, res) -> None:
    """``WORKSPACE/finetune.json``: what fine-tuning did, for the report (tied to the plan it trained)."""
    from prunekit.engine.sparse import get_plan
    from prunekit.workflow.workspace import json_fingerprint

    job.ws.write_json(
        artifacts.FINETUNE,
        {
            "format": "prunekit-finetune-result",
            "version": 1,
            "metric": job.cfg.metric,
            "input": str(src),
            "plan": json_fingerprint(get_plan(model).to_dict()["pruned"]),
            "before": before,
            "best_metric": res.best_metric,
            "best_epoch": res.best_epoch,
            "lr": res.lr,
            "history": res.history,
        },
    )


@guard("run", distributed=True, resumable=True)
def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.workflow.iterative import IterativePruner

    job = _Job(args, {"run.target": args.target, "run.steps": args.steps, "run.max_drop": args.max_drop})
    c = job.cfg
    res = IterativePruner(
        job.model,
        job.inputs,
        job.eval_fn,
        job.train,
        workspace=job.ws,
        config=c.run,
        finetune=c.finetune,
        ana=c.ana,
        prune=c.prune,
        excludes=c.excludes,
        criterion=c.criterion,
        lower_is_better=job.lower,
        test_fn=job.test_fn,
        log=lambda m: print(m, file=out),
    ).run()
    print(file=out)
    print(res.table(), file=out)
    for n in res.notes:
        print(f"note: {n}", file=out)
    base, final = res.baseline.get("test_metric"), res.final.get("test_metric")
    if base is not None and final is not None:
        print(
            f"test {c.metric} (reported only, never used to choose): baseline {base:.4f}, slim model "
            f"{final:.4f} ({final - base:+.4f})",
            file=out,
        )
    print(
        f"\nslim model in {job.ws.path('final')} (model.safetensors + spec.json; prunekit.load_slim); "
        f"report: prunekit report {job.ws.root}",
        file=out,
    )
    job.save_config()
    if res.final.get("step") is None:  # the slim model is the baseline: the run did not reach its goal
        print(
            f"prunekit run: error: nothing was pruned: no step kept the metric within run.max_drop="
            f"{c.run.max_drop}; allow a larger drop (--max-drop), prune less per step (--steps, --target) or "
            "fine-tune longer (finetune.epochs)",
            file=sys.stderr,
        )
        return 1
    return 0


@guard("report")
def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.cli.report import summary_text, write_report
    from prunekit.workflow.workspace import Workspace

    use_workspace(Workspace(args.workspace))
    path = write_report(args.workspace, args.output)
    print(summary_text(args.workspace), file=out)
    print(f"\nreport written to {path}", file=out)
    return 0
