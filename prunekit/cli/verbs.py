"""The workflow verbs of the ``prunekit`` command: ana, prune, finetune, run, report.

Each verb mirrors its Python function and reads a YAML config (see :mod:`prunekit.cli.job`);
flags override the config, and the resolved config is saved in the workspace as
``config.yaml``. A minimal config::

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

__all__ = ["register"]

_CONFIG_HELP = "YAML config (model, data, metric, and each stage's options); flags override it"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("-w", "--workspace", metavar="DIR", help="workspace directory (overrides the config's)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override any config option, e.g. --set finetune.epochs=3 --set data.batch_size=64 "
                        "(repeatable; values are YAML)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ana, prune, finetune, run and report sub-commands to ``sub``."""
    p = sub.add_parser("ana", help="sensitivity analysis: the metric when each channel group alone is pruned",
                       description="Prune every channel group alone at each ratio of ana.ratios, evaluate, and "
                                   "save the curves (ana.json, sensitivity.json, sensitivity.png) in the "
                                   "workspace. Resumable: a rerun reuses every point already measured.")
    _common(p)
    p.add_argument("--forced", action="store_true", help="recompute every point even if cached")
    p.set_defaults(func=cmd_ana)

    p = sub.add_parser("prune", help="prune once to a MACs reduction or a tolerated loss",
                       description="Prune the model (guided by ana's results in the same workspace, if any) "
                                   "and save the sparse model in WORKSPACE/pruned (model.safetensors + "
                                   "plan.json). Fine-tune it next with 'prunekit finetune'.")
    _common(p)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--removal-ratio", type=float, help="fraction of MACs to remove, e.g. 0.5")
    goal.add_argument("--threshold", type=float, help="largest predicted relative metric loss (needs ana)")
    goal.add_argument("--spec", metavar="PLAN", help="apply a saved plan.json as given")
    p.add_argument("--search", type=int, metavar="N",
                   help="evaluate the computed allocation and N variants of it at the same MACs, keep the best "
                        "(needs ana results; prune.search)")
    p.add_argument("--calibrate-batches", type=int, metavar="N",
                   help="re-estimate BatchNorm statistics on N training batches before each evaluation and "
                        "for the result (prune.calibrate_batches)")
    p.add_argument("--start-from", metavar="DIR",
                   help="start from a fine-tuned sparse model (e.g. WORKSPACE/finetuned) to prune further: its "
                        "weights are loaded into the original architecture and its pruned channels stay pruned")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune the sparse model of 'prunekit prune'",
                       description="Load the sparse model (WORKSPACE/pruned by default), train it with the "
                                   "built-in loop (finetune section of the config), evaluate every epoch, keep "
                                   "the best weights and save them in WORKSPACE/finetuned. Per-epoch "
                                   "checkpoints in WORKSPACE/finetune make a killed run resume.")
    _common(p)
    p.add_argument("--input", metavar="DIR", help="sparse model to fine-tune (default: WORKSPACE/pruned)")
    p.add_argument("--epochs", type=int, help="override finetune.epochs")
    p.add_argument("--lr", type=float, help="override finetune.lr")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("run", help="the whole workflow: ana, then prune -> finetune steps, then slim",
                       description="Iterative pruning: ana once on the baseline, then steps of prune -> "
                                   "finetune with a growing removal ratio (run.schedule, or run.target in "
                                   "run.steps), each retried with a smaller increment when it loses more than "
                                   "run.max_drop; the last accepted step becomes the slim model in "
                                   "WORKSPACE/final (model.safetensors + spec.json). Resumable.")
    _common(p)
    p.add_argument("--target", type=float, help="override run.target (final fraction of MACs to remove)")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--max-drop", type=float, help="override run.max_drop (tolerated metric drop, metric units)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write an HTML report of a workspace and print a summary",
                       description="Read a workspace (ana, prune, run or demo results) and write a self-contained "
                                   "HTML page with the sensitivity curves, channels per layer, metric and MACs "
                                   "per step and the before/after table; print a summary.")
    p.add_argument("workspace", metavar="WORKSPACE", help="the workspace directory")
    p.add_argument("-o", "--output", metavar="FILE", help="HTML file (default: WORKSPACE/report.html)")
    p.set_defaults(func=cmd_report)


# ----- shared set-up ---------------------------------------------------------------------
class _Job:
    """The resolved config and what it names, built once per command."""

    def __init__(self, args: argparse.Namespace, extra: dict | None = None, need_data: bool = True) -> None:
        from prunekit.cli import build as loading
        from prunekit.cli.job import dump_config, load_config, parse_set
        from prunekit.workflow.workspace import Workspace

        overrides = parse_set(args.overrides)
        overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
        if args.workspace:
            overrides["workspace"] = args.workspace
        if args.no_progress:
            overrides["finetune.progress"] = False
        self.cfg = load_config(args.config, overrides)
        self.search = [Path(args.config).resolve().parent] if args.config else []
        self.search.append(Path.cwd())
        self.ws = Workspace(self.cfg.workspace)
        self.ws.root.mkdir(parents=True, exist_ok=True)
        from prunekit.utils.files import atomic_write
        from prunekit.workflow import distributed as pdist

        if pdist.is_main():
            atomic_write(self.ws.path("config.yaml"), dump_config(self.cfg))
        self.model = loading.build_model(self.cfg.model, self.search)
        if need_data:
            self.train, self.evald = loading.build_loaders(self.cfg.data, self.cfg.seed, self.search)
            self.eval_fn, self.lower = loading.build_eval_fn(self.cfg, self.evald, self.search)
            self.inputs = loading.example_inputs(self.cfg.model, self.evald)
        self.progress = not args.no_progress and self.cfg.finetune.progress


def _fail(verb: str, exc: Exception) -> int:
    print(f"prunekit {verb}: error: {exc}", file=sys.stderr)
    return 2


def _guard(verb: str, distributed: bool = False):
    """Turn configuration errors into a message and exit status 2. Under ``torchrun`` a
    ``distributed`` verb starts the process group and prints on rank 0 only; any other verb
    runs on rank 0 alone."""
    def deco(fn):
        def wrapper(args: argparse.Namespace, out: TextIO) -> int:
            import os

            import torch

            from prunekit.cli.job import ConfigError
            from prunekit.workflow import distributed as pdist

            if not distributed and os.environ.get("RANK", "0") != "0":
                return 0  # torchrun: one process is enough
            if distributed and pdist.init_if_needed() and not pdist.is_main():
                out = open(os.devnull, "w")  # closed at exit
            threads = torch.get_num_threads()
            if args.__dict__.get("threads"):
                torch.set_num_threads(args.threads)
            try:
                return fn(args, out)
            except (ConfigError, FileNotFoundError) as exc:
                return _fail(verb, exc)
            except KeyboardInterrupt:
                print(f"prunekit {verb}: interrupted; run the same command again to resume", file=sys.stderr)
                return 130
            finally:
                torch.set_num_threads(threads)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper

    return deco


# ----- verbs -----------------------------------------------------------------------------
@_guard("ana", distributed=True)
def cmd_ana(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.workflow.ana import ana

    job = _Job(args)
    c = job.cfg
    sens = ana(job.model, job.inputs, job.eval_fn, workspace=job.ws, excludes=c.excludes, ratios=c.ana.ratios,
               criterion=c.criterion, forced=args.forced or c.ana.forced, lower_is_better=job.lower,
               collapse=c.ana.collapse, progress=job.progress, log=lambda m: print(m, file=out))
    print(sens.table(), file=out)
    print(f"\nsensitivity results in {job.ws.root} (sensitivity.json, sensitivity.png)", file=out)
    return 0


@_guard("prune")
def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.engine.sparse import save_sparse
    from prunekit.workflow.prune import prune

    job = _Job(args, {"prune.removal_ratio": args.removal_ratio, "prune.threshold": args.threshold,
                      "prune.search": args.search, "prune.calibrate_batches": args.calibrate_batches})
    c = job.cfg
    goal = {}
    if args.spec:
        goal = {"spec": args.spec}
    elif c.prune.threshold is not None:
        goal = {"threshold": c.prune.threshold}
    elif c.prune.removal_ratio is not None:
        goal = {"removal_ratio": c.prune.removal_ratio}
    else:
        raise _config_error("say how much to prune: --removal-ratio R, --threshold T, --spec plan.json, or "
                            "prune.removal_ratio in the config")
    prev = None
    if args.start_from:
        prev = _load_weights(job.model, Path(args.start_from))
    extra = {}
    if c.prune.calibrate_batches:
        from prunekit.workflow.evaluation import make_bn_calibration

        extra["calibrate"] = make_bn_calibration(job.train, max_batches=c.prune.calibrate_batches)
    if c.prune.search:
        extra.update(search=c.prune.search, eval_fn=job.eval_fn, seed=c.seed)
    try:
        res = prune(job.model, job.inputs, workspace=job.ws, excludes=c.excludes, criterion=c.criterion,
                    log=lambda m: print(m, file=out), **goal, **c.prune.kwargs(), **extra)
    except ValueError as exc:
        raise _config_error(str(exc)) from exc
    if prev is not None:
        from prunekit.engine.sparse import apply_plan

        if not res.plan.contains(prev):
            apply_plan(job.model, prev)  # merges: the earlier pruned channels stay pruned
            print("merged the earlier plan: the new one did not contain every earlier pruned channel", file=out)
    metric = job.eval_fn(job.model)
    path = save_sparse(job.model, job.ws.path("pruned"))
    print(f"method {res.method}: MACs {res.macs_before:,} -> {res.macs_after:,} (-{res.macs_reduction:.1%}), "
          f"params {res.params_before:,} -> {res.params_after:,}; {c.metric} without fine-tuning {metric:.4f}",
          file=out)
    print(f"sparse model saved in {path}; fine-tune it with: prunekit finetune -w {job.ws.root}"
          + (f" -c {args.config}" if args.config else ""), file=out)
    return 0


def _load_weights(model, src: Path):
    """Load a save_sparse directory's weights into the dense ``model``; returns its plan."""
    from safetensors.torch import load_model

    from prunekit.engine.plan import PruningPlan

    if not (src / "plan.json").exists():
        raise _config_error(f"no sparse model in {src} (no plan.json): pass a directory written by "
                            "'prunekit finetune' or prunekit.save_sparse")
    try:
        load_model(model, str(src / "model.safetensors"))
    except RuntimeError as exc:
        raise _config_error(f"the sparse model in {src} does not fit the configured model: {exc}") from exc
    return PruningPlan.load(src / "plan.json")


@_guard("finetune", distributed=True)
def cmd_finetune(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.engine.sparse import load_sparse, save_sparse
    from prunekit.workflow.finetune import finetune

    job = _Job(args, {"finetune.epochs": args.epochs, "finetune.lr": args.lr})
    src = Path(args.input) if args.input else job.ws.path("pruned")
    if not (src / "plan.json").exists():
        raise _config_error(f"no sparse model in {src}: run 'prunekit prune' first, or pass --input DIR "
                            "(a directory written by prunekit.save_sparse)")
    try:
        model = load_sparse(job.model, src)
    except (ValueError, RuntimeError) as exc:
        raise _config_error(f"the sparse model in {src} does not fit the configured model: {exc}") from exc
    before = job.eval_fn(model)
    res = finetune(model, job.train, job.eval_fn, job.cfg.finetune, workspace=job.ws.path("finetune"),
                   lower_is_better=job.lower, log=lambda m: print(m, file=out))
    from prunekit.workflow import distributed as pdist

    path = save_sparse(model, job.ws.path("finetuned")) if pdist.is_main() else job.ws.path("finetuned")
    print(f"{job.cfg.metric}: {before:.4f} before fine-tuning, best {res.best_metric:.4f} at epoch "
          f"{res.best_epoch} of {len(res.history)} (lr {res.lr:g})", file=out)
    print(f"fine-tuned sparse model saved in {path}", file=out)
    return 0


@_guard("run", distributed=True)
def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.workflow.iterative import IterativePruner

    job = _Job(args, {"run.target": args.target, "run.steps": args.steps, "run.max_drop": args.max_drop})
    c = job.cfg
    res = IterativePruner(job.model, job.inputs, job.eval_fn, job.train, workspace=job.ws, config=c.run,
                          finetune=c.finetune, ana=c.ana, prune=c.prune, excludes=c.excludes, criterion=c.criterion,
                          lower_is_better=job.lower, log=lambda m: print(m, file=out)).run()
    print(file=out)
    print(res.table(), file=out)
    for n in res.notes:
        print(f"note: {n}", file=out)
    print(f"\nslim model in {job.ws.path('final')} (model.safetensors + spec.json; prunekit.load_slim); "
          f"report: prunekit report {job.ws.root}", file=out)
    return 0


def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from prunekit.cli.report import summary_text, write_report

    try:
        path = write_report(args.workspace, args.output)
        print(summary_text(args.workspace), file=out)
    except (FileNotFoundError, ValueError) as exc:
        return _fail("report", exc)
    print(f"\nreport written to {path}", file=out)
    return 0


def _config_error(msg: str) -> Exception:
    from prunekit.cli.job import ConfigError

    return ConfigError(msg)
