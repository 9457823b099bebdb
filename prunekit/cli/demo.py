"""``prunekit demo``: the whole workflow on a small ResNet-style CNN, end to end.

Train the baseline :class:`~prunekit.models.demo.DemoNet` on scikit-learn's 8x8 digits (no
download), run the sensitivity analysis, prune iteratively (prune -> fine-tune steps) to the
MACs target, transform the last step into the slim model and compare it with the baseline:
test accuracy, MACs, parameters, measured CPU latency and file size. ``--dataset cifar10``,
``fashion-mnist`` or ``mnist`` (with ``--data-dir``) run the same workflow on those.

Everything lives in the workspace (``prunekit-demo`` by default): a second run reuses the
finished stages, a killed one resumes. ``prunekit report prunekit-demo`` shows it again.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from typing import TextIO

from prunekit.cli.errors import CliError, guard
from prunekit.utils import artifacts

__all__ = ["register", "measure_latency"]

_DEFAULT_EPOCHS = {"digits": 20, "mnist": 3, "fashion-mnist": 8, "cifar10": 30}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command to ``sub``."""
    from prunekit.cli.job import TORCHVISION_DATASETS

    p = sub.add_parser(
        "demo",
        help="the whole workflow on a small CNN: train, ana, iterative pruning, slim, before/after table",
        description="Train a small ResNet-style CNN on scikit-learn's 8x8 digits (or --dataset cifar10 / "
        "fashion-mnist / mnist from --data-dir), analyse its sensitivity, prune it in steps with "
        "fine-tuning in between until --target of the MACs are gone, transform it into the slim model "
        "and compare: test accuracy, MACs, parameters, CPU latency and file size. Resumable: "
        "results live in --workspace.",
    )
    p.add_argument(
        "--dataset",
        choices=("digits",) + TORCHVISION_DATASETS,
        default="digits",
        help="data set (digits ships with scikit-learn; the others are read from --data-dir)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="root directory of a torchvision data set")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set (needs a network)")
    p.add_argument("--workspace", metavar="DIR", default="prunekit-demo", help="workspace directory (prunekit-demo)")
    p.add_argument("--fresh", action="store_true", help="delete the workspace first instead of resuming")
    p.add_argument("--target", type=float, default=0.55, help="fraction of MACs to remove in the end (0.55)")
    p.add_argument("--steps", type=int, default=3, help="prune -> fine-tune steps (3)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="tolerated validation accuracy drop per step before a retry (0.01 = 1 point)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="baseline training epochs (default: " + ", ".join(f"{k} {v}" for k, v in _DEFAULT_EPOCHS.items()) + ")",
    )
    p.add_argument("--finetune-epochs", type=int, default=8, help="fine-tuning epochs per step (8)")
    p.add_argument("--width", type=int, default=24, help="channels of the first stage (24)")
    p.add_argument("--blocks", type=int, default=2, help="residual blocks per stage (2)")
    p.add_argument(
        "--criterion",
        default="l2",
        help="importance criterion (l1, l2, fpgm, bn_scale, taylor, activation, ...; the data-driven ones read 20 "
        "training batches)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for digits, whose model is too small to gain from more)",
    )
    p.add_argument("--output", metavar="DIR", default=None, help="also save the slim model into DIR")
    p.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="where to train and prune (cpu, cuda; default cpu); latency is always measured on the CPU",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (one line per ana group and fine-tuning epoch instead)",
    )
    p.set_defaults(func=cmd_demo)


def measure_latency(models: dict, x, repeats: int = 300, rounds: int = 6) -> dict[str, float]:
    """Median forward time in ms of each model on ``x`` (interleaved rounds against load drift)."""
    import torch

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(20):
                m(x)
        for _ in range(rounds):
            for k, m in models.items():
                for _ in range(repeats // rounds):
                    t0 = time.perf_counter()
                    m(x)
                    times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _data(args: argparse.Namespace):
    """``(train_loader, val_loader, test_loader, in_channels, name)``."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset, random_split

    from prunekit.cli.build import digits_tensors, torchvision_datasets

    if args.dataset == "digits":
        d = digits_tensors(args.seed, val_fraction=0.2)  # 360 validation images: steadier step verdicts
        train = DataLoader(TensorDataset(*d["train"]), batch_size=64, shuffle=True)
        val = DataLoader(TensorDataset(*d["val"]), batch_size=512)
        test = DataLoader(TensorDataset(*d["test"]), batch_size=512)
        return (
            train,
            val,
            test,
            1,
            (
                f"scikit-learn digits (8x8; {len(d['train'][0])} train, {len(d['val'][0])} "
                f"validation, {len(d['test'][0])} test images)"
            ),
        )
    train_ds, test_ds = torchvision_datasets(args.dataset, args.data_dir, args.download)
    n_val = min(5000, len(train_ds) // 10)
    tr, va = random_split(train_ds, [len(train_ds) - n_val, n_val], generator=torch.Generator().manual_seed(args.seed))
    train = DataLoader(tr, batch_size=128, shuffle=True)
    val = DataLoader(va, batch_size=256)
    test = DataLoader(test_ds, batch_size=256)
    channels = 3 if args.dataset == "cifar10" else 1
    return train, val, test, channels, f"{args.dataset} ({len(tr)} train, {n_val} validation, {len(test_ds)} test)"


@guard("demo", resumable=True)
def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    from prunekit.engine.criteria import CRITERIA

    if args.criterion not in CRITERIA:
        raise CliError(f"unknown criterion {args.criterion!r}; choose one of {sorted(CRITERIA)}")
    for name, v, lo, hi in (("--target", args.target, 0.0, 1.0), ("--max-drop", args.max_drop, 0.0, 1.0)):
        if not lo < v < hi:
            raise CliError(f"{name} must be in ({lo:g}, {hi:g}), got {v}")
    for name, v in (
        ("--steps", args.steps),
        ("--finetune-epochs", args.finetune_epochs),
        ("--width", args.width),
        ("--blocks", args.blocks),
    ):
        if v < 1:
            raise CliError(f"{name} must be at least 1, got {v}")
    from prunekit.utils.devices import check_device

    check_device(args.device, "--device")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.dataset == "digits" else threads))
    try:
        return _demo(args, out)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    """Train, then ana -> prune/fine-tune steps -> slim, then the before/after table (each step resumable)."""
    import prunekit
    from prunekit.cli.report import write_report

    t_start = time.perf_counter()
    say = lambda m: print(m, file=out, flush=True)
    ws = _workspace(args)
    train, val, test, channels, data_name = _data(args)
    say(f"prunekit {prunekit.__version__} demo: DemoNet(width={args.width}, blocks={args.blocks}) on {data_name}")
    say(
        f"workspace {ws.root}; goal: remove {args.target:.0%} of the MACs in {args.steps} steps, each step "
        f"fine-tuned {args.finetune_epochs} epochs and losing at most {args.max_drop:g} validation accuracy"
    )
    model, val_acc, epochs = _train_baseline(args, ws, train, val, channels, say)  # 1.
    x1 = next(iter(test))[0][:1].to(args.device or "cpu")  # MACs and latency per image
    res = _prune_in_steps(args, ws, model, x1, val_acc, train, say)  # 2.-4. ana, prune -> fine-tune steps, slim
    slim = res.model.eval()
    table, lat, lat_b, batch, acc = _before_after(ws, model, slim, test, x1, res)  # 5.
    wall = time.perf_counter() - t_start
    ws.write_json(artifacts.DEMO, _demo_record(args, epochs, table, acc, lat, lat_b, batch, wall))
    report = write_report(ws.root)
    _print_result(args, ws, res, table, channels, say)
    if args.output:
        prunekit.save_slim(slim, args.output)
        say(f"slim model also saved to {args.output}")
    say(f"report: {report} (prunekit report {ws.root})")
    say(f"demo finished in {wall:.1f} s")
    return 0


def _workspace(args: argparse.Namespace):
    """The demo's workspace; ``--fresh`` empties it, but only when it is a demo workspace."""
    from prunekit.workflow.workspace import Workspace

    ws = Workspace(args.workspace)
    if args.fresh and ws.root.exists():
        if not (ws.exists(artifacts.DEMO) or ws.exists(artifacts.ITERATIVE) or not any(ws.root.iterdir())):
            raise CliError(f"--fresh would delete {ws.root}, which is not a demo workspace; not deleting it")
        shutil.rmtree(ws.root)
    return ws


def _train_baseline(args: argparse.Namespace, ws, train, val, channels: int, say):
    """The DemoNet trained from scratch (resumable like any fine-tuning): ``(model, val_acc, epochs)``."""
    import torch

    from prunekit.models.demo import DemoNet
    from prunekit.workflow.evaluation import make_eval_fn
    from prunekit.workflow.finetune import FinetuneConfig, finetune

    torch.manual_seed(args.seed)
    model = DemoNet(in_channels=channels, num_classes=10, width=args.width, blocks=args.blocks)
    val_acc = make_eval_fn(val, "accuracy", max_batches=None if args.dataset == "digits" else 20)
    epochs = args.epochs if args.epochs is not None else _DEFAULT_EPOCHS[args.dataset]
    t0 = time.perf_counter()
    model.to(args.device or "cpu")
    cfg = FinetuneConfig(
        epochs=epochs,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=1e-4,
        warmup_epochs=1,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    finetune(model, train, val_acc, cfg, workspace=ws.path("baseline-training"), log=say)
    say(f"baseline trained ({epochs} epochs) in {time.perf_counter() - t0:.1f} s")
    return model, val_acc, epochs


def _prune_in_steps(args: argparse.Namespace, ws, model, x1, val_acc, train, say):
    """ana, then the iterative prune -> fine-tune steps to ``--target``, then the slim model."""
    from prunekit.cli.job import AnaConfig, IterativeConfig, PruneConfig
    from prunekit.workflow.finetune import FinetuneConfig
    from prunekit.workflow.iterative import IterativePruner

    ft_cfg = FinetuneConfig(
        epochs=args.finetune_epochs,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=1e-4,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    return IterativePruner(
        model,
        x1,
        val_acc,
        train,
        workspace=ws,
        config=IterativeConfig(target=args.target, steps=args.steps, max_drop=args.max_drop),
        finetune=ft_cfg,
        ana=AnaConfig(),
        prune=PruneConfig(),
        criterion=args.criterion,
        log=say,
    ).run()


def _before_after(ws, model, slim, test, x1, res):
    """The before/after rows (test accuracy, MACs, parameters, CPU latency, file size) and what they measured."""
    import torch

    from prunekit.utils.text import file_size
    from prunekit.utils.text import human as h
    from prunekit.workflow.evaluation import make_eval_fn

    test_acc = make_eval_fn(test, "accuracy")
    acc = {"baseline": test_acc(model), "slim": test_acc(slim)}
    model, slim, x1 = model.cpu(), slim.cpu(), x1.cpu()  # the table's latency is CPU latency
    lat = measure_latency({"baseline": model, "slim": slim}, x1)
    xb = torch.cat([b[0] for b in test])[:256]
    lat_b = measure_latency({"baseline": model, "slim": slim}, xb, repeats=60)
    n_thr = torch.get_num_threads()
    thr = f"{n_thr} thread{'s' if n_thr > 1 else ''}"
    size_b = (ws.path("baseline") / artifacts.WEIGHTS).stat().st_size
    size_a = (ws.path("final") / artifacts.WEIGHTS).stat().st_size
    b, f = res.baseline, res.final
    pct = lambda x, y: f"{100 * (y - x) / x:+.1f}%"
    acc_b, acc_a = acc["baseline"], acc["slim"]
    table = [
        ["test accuracy", f"{acc_b:.2%}", f"{acc_a:.2%}", f"{100 * (acc_a - acc_b):+.2f} pt"],
        ["MACs / image", h(b["macs"]), h(f["macs"]), pct(b["macs"], f["macs"])],
        ["parameters", h(b["params"]), h(f["params"]), pct(b["params"], f["params"])],
        [
            f"CPU latency, batch 1 ({thr})",
            f"{lat['baseline']:.3f} ms",
            f"{lat['slim']:.3f} ms",
            pct(lat["baseline"], lat["slim"]),
        ],
        [
            f"CPU latency, batch {len(xb)} ({thr})",
            f"{lat_b['baseline']:.2f} ms",
            f"{lat_b['slim']:.2f} ms",
            pct(lat_b["baseline"], lat_b["slim"]),
        ],
        ["file size (safetensors)", file_size(size_b), file_size(size_a), pct(size_b, size_a)],
    ]
    return table, lat, lat_b, len(xb), acc


def _demo_record(args: argparse.Namespace, epochs: int, table, acc, lat, lat_b, batch: int, wall: float) -> dict:
    """``demo.json``: the settings and the before/after numbers."""
    import torch

    return {
        "dataset": args.dataset,
        "width": args.width,
        "blocks": args.blocks,
        "target": args.target,
        "steps": args.steps,
        "max_drop": args.max_drop,
        "epochs": epochs,
        "finetune_epochs": args.finetune_epochs,
        "seed": args.seed,
        "criterion": args.criterion,
        "threads": torch.get_num_threads(),
        "wall_seconds_this_session": round(wall, 1),
        "table": table,
        "test_accuracy": acc,
        "latency_ms": {"batch_1": lat, f"batch_{batch}": lat_b},
    }


def _print_result(args: argparse.Namespace, ws, res, table, channels: int, say) -> None:
    """The steps, the before/after table, the equivalence and where the slim model is."""
    from prunekit.cli.report import text_table

    say("")
    say(res.table())
    for n in res.notes:
        say(f"note: {n}")
    say("")
    say(text_table(table, ["", "baseline", "pruned (slim)", "change"]))
    say("")
    say(f"slim == sparse on the example input: relative error {res.final['equivalence_error']:.1e}")
    say(
        f"slim model: {ws.path('final')} (model.safetensors + spec.json); load it with prunekit.load_slim("
        f"DemoNet(in_channels={channels}, width={args.width}, blocks={args.blocks}), {str(ws.path('final'))!r})"
    )
