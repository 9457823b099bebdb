"""CIFAR-10 benchmark: the pretrained CIFAR ResNets pruned to -50% / -70% MACs, prunekit side by side with the peers.

Data: the JPEG CIFAR-10 of ``../shared/data/cifar10/cifar10-jpg.tar.gz`` (extracted once into ``--scratch``),
read with ``data.dataset: imagefolder``'s code (:mod:`prunekit.cli.images`): a validation split of
``--val-fraction`` of the training images per class (seed 0) is held out; ana, the iterative loop's
verdicts and the one-shot search see it (``--val-batches`` batches of it); the test split (10,000 images) is only
reported. Models: the pretrained ResNet-20 / ResNet-56 of ``../shared/data/cifar-resnet`` (option-A shortcuts).
Without the shared data the benchmark says so and exits.

Every row starts from the same pretrained weights and gets the same data, augmentation (random crop with 4 px
zero padding, horizontal flip), seed and total fine-tuning budget (``--epochs``; SGD with Nesterov momentum,
cosine schedule, ``--lr``), and reports the test accuracy of its *final* epoch (no selection on test, no best-epoch
restore anywhere), with MACs and parameters measured on the final model:

- ``dense``: the unpruned model fine-tuned for the same budget (the reference);
- ``prunekit``: the full workflow, ana + the iterative ``run`` (``--steps`` prune -> fine-tune steps, the budget
  split over them, BatchNorm re-estimated after every prune step, slim fine-tuning);
- ``prunekit-kd``: the same with knowledge distillation from the unpruned model (``--kd-weight``,
  ``--kd-temperature``);
- ``prunekit-search``: the same workflow with every step's allocation searched (``prune.search``: ``--search``
  variants evaluated after BatchNorm re-estimation) and the budget split 1 : 2 : 7 over three steps
  (``run.epoch_split``: most of it to the final architecture);
- ``oneshot``: prunekit's ana-guided prune (with ``--search`` variants evaluated after BatchNorm
  re-estimation), then the whole budget of fine-tuning;
- ``oneshot-rec`` / ``prunekit-search-rec``: ``oneshot`` / ``prunekit-search`` with ``reconstruct=True``: after
  each prune, the layers after the pruned channels are refit by least squares to the unpruned model's outputs on
  ``--calibrate-batches`` training batches (:mod:`prunekit.engine.reconstruct`);
- ``prunekit-search-kdprev``: ``prunekit-search`` with knowledge distillation (``--kd-weight``, ``--kd-temperature``)
  from the previous step's fine-tuned model (``run.teacher: previous``; the first step without distillation),
  a teacher fitted to the JPEG data, where the unpruned model scores below every fine-tuned row;
- ``oneshot-kd``: the same with knowledge distillation from the unpruned model during the fine-tuning;
- ``l1-uniform``: one ratio for every channel group, L1 criterion (Li et al., 2017), then fine-tuning;
- ``l2-global``: one L2 threshold across groups, then fine-tuning;
- ``tp-group`` / ``tp-global``: Torch-Pruning 1.6.1's ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)``
  (DepGraph's group criterion), per-layer ratio or ``global_pruning=True``, then fine-tuning. Torch-Pruning cannot
  follow the zero-padding shortcut: it gets the same network with every padded shortcut rewritten as the equal
  fixed (not trained) 1x1 stride-2 convolution (outputs checked equal before pruning); its MACs count those
  convolutions (0.6% of ResNet-20's).

Rows are written to the JSON one by one (atomically) and skipped when a finished row with the same settings is
there, and every fine-tuning keeps per-epoch checkpoints in ``--work``: a killed run, started again with the same
command, resumes.

Usage:
    python benchmarks/cifar10.py --depth 20 --ratios 0.5 0.7 --epochs 10 --seeds 0 1
    python benchmarks/cifar10.py --depth 20 --train-subset 512 --epochs 1 --val-batches 2   # a smoke test
Writes ``benchmarks/results/cifar10.json`` and prints the table (``--table`` prints it from the JSON only).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import shutil
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import prunekit
from prunekit.cli.build import load_checkpoint
from prunekit.cli.images import image_folder_splits, make_loaders
from prunekit.cli.job import DataConfig
from prunekit.models.cifar_resnet import PadShortcut, cifar_resnet
from prunekit.utils.files import atomic_write
from prunekit.workflow.evaluation import make_bn_calibration, make_eval_fn
from prunekit.workflow.finetune import finetune
from prunekit.workflow.iterative import IterativePruner

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cifar10.json"
SHARED = HERE.parent.parent / "shared" / "data"
TARBALL = SHARED / "cifar10" / "cifar10-jpg.tar.gz"
WEIGHTS = SHARED / "cifar-resnet"
ROWS = (
    "dense",
    "prunekit",
    "prunekit-kd",
    "prunekit-search",
    "prunekit-search-rec",
    "prunekit-search-kdprev",
    "oneshot",
    "oneshot-rec",
    "oneshot-kd",
    "l1-uniform",
    "l2-global",
    "tp-group",
    "tp-global",
)
PEERS = ("l1-uniform", "l2-global", "tp-group", "tp-global")
OURS = tuple(r for r in ROWS if r != "dense" and r not in PEERS)
FINAL_HEAVY = (1, 2, 7)  # prunekit-search's run.epoch_split (three steps)
FORMAT = "prunekit-cifar10-benchmark"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[20], choices=[20, 32, 44, 56])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7], help="MACs reductions")
    p.add_argument("--epochs", type=int, default=10, help="total fine-tuning epochs of every row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="fine-tune on N training images (class-balanced, seed 0) instead of all 45,000",
    )
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        metavar="N",
        help="report on N test images (class-balanced) instead of all 10,000: smoke tests only",
    )
    p.add_argument("--ana-ratios", type=float, nargs="+", default=None, help="ana's ratios (default: prunekit's)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-batches", type=int, default=20, help="validation batches per evaluation (ana, epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=float, default=0.2, help="warm-up epochs")
    p.add_argument("--steps", type=int, default=3, help="steps of the iterative rows")
    p.add_argument("--calibrate-batches", type=int, default=20, help="BatchNorm re-estimation batches")
    p.add_argument("--search", type=int, default=8, help="allocation variants the one-shot row evaluates")
    p.add_argument(
        "--criterion",
        default="l2",
        choices=["l2", "l1", "fpgm", "taylor", "activation"],
        help="which channels prunekit's rows (ana, the iterative loop, one-shot) remove first; taylor and "
        "activation read --calibrate-batches training batches (the peer rows keep their own criteria)",
    )
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/prunekit-cifar10"), help="where the JPEGs go")
    p.add_argument("--work", type=Path, default=Path("/tmp/prunekit-cifar10-work"), help="row workspaces")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--table", action="store_true", help="only print the table of the JSON")
    return p.parse_args(argv)


# ----- data and models -------------------------------------------------------------------------------------------
def data_root(scratch: Path) -> Path | None:
    """The extracted JPEG folder (``train/``, ``test/``), extracting the shared tarball once; None if absent."""
    if (scratch / "train").is_dir() and (scratch / "test").is_dir():
        return scratch
    if not TARBALL.exists():
        return None
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"extracting {TARBALL} into {scratch} ...", flush=True)
    with tarfile.open(TARBALL) as tar:
        tar.extractall(scratch, filter="data")
    return scratch


def pretrained(depth: int) -> nn.Module:
    model = cifar_resnet(depth)
    load_checkpoint(model, WEIGHTS / f"cifar_resnet{depth}.safetensors")
    return model.eval()


def conv_shortcuts(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every option-A shortcut as the equal fixed 1x1 stride-2 convolution."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, PadShortcut):
                conv = nn.Conv2d(child.in_planes, child.planes, 1, 2, bias=False)
                with torch.no_grad():
                    conv.weight.zero_()
                    for i in range(child.in_planes):
                        conv.weight[child.before + i, i, 0, 0] = 1.0
                setattr(mod, name, conv)
    _freeze_shortcuts(model)
    return model


def _freeze_shortcuts(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if name.endswith("shortcut") and isinstance(m, nn.Conv2d):
            m.weight.requires_grad_(False)


@dataclass
class Bench:
    """What every row shares."""

    args: argparse.Namespace
    train: object
    val: object
    val_fn: Callable
    test_fn: Callable
    x: torch.Tensor
    work: Path
    settings: dict
    depth: int = 20

    def ft_config(self, seed: int, epochs: int | None = None, distill: bool = False) -> prunekit.FinetuneConfig:
        a = self.args
        return prunekit.FinetuneConfig(
            epochs=a.epochs if epochs is None else epochs,
            lr=a.lr,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=a.warmup,
            restore_best=False,
            seed=seed,
            progress=a.progress,
            device=a.device,
            distill_weight=a.kd_weight if distill else 0.0,
            distill_temperature=a.kd_temperature,
        )


def quiet(msg: str) -> None:
    if not msg.startswith(("learning-rate", "resuming")):
        print(f"    {msg}", flush=True)


# ----- rows -------------------------------------------------------------------------------------------------------
def finish(b: Bench, model: nn.Module, base: nn.Module, t0: float, history: list[dict], **extra) -> dict:
    """The row: final-epoch test accuracy, measured MACs / parameters, time."""
    model.eval()
    c, c0 = prunekit.count(copy.deepcopy(model).cpu(), b.x), prunekit.count(base, b.x)
    row = {
        "test_acc": float(b.test_fn(model)),
        "val_acc": float(b.val_fn(model)),
        "macs": c.macs,
        "params": c.params,
        "macs_reduction": 1 - c.macs / c0.macs,
        "params_reduction": 1 - c.params / c0.params,
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    row.update(extra)
    return row


def tune(b: Bench, model: nn.Module, ws: Path, seed: int, teacher: nn.Module | None = None) -> list[dict]:
    """Fine-tune for the whole budget (with ``teacher``: distillation from it, weight ``--kd-weight``)."""
    cfg = b.ft_config(seed, distill=teacher is not None)
    res = finetune(model.to(b.args.device), b.train, b.val_fn, cfg, workspace=ws, teacher=teacher, log=quiet)
    return res.history


def row_dense(b: Bench, base: nn.Module, ratio: float | None, seed: int, ws: Path) -> dict:
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    return finish(b, model, base, t0, tune(b, model, ws / "finetune", seed))


def shared_ana(b: Bench, base: nn.Module) -> tuple[prunekit.Sensitivity, Path]:
    """ana once per depth on the validation batches (every row that uses it reuses its cached points)."""
    ws = b.work / f"ana-d{b.depth}-{row_key(b.depth, 'ana', None, 0, b.settings).rsplit('/', 1)[1]}"
    kw = {"ratios": b.args.ana_ratios} if b.args.ana_ratios else {}
    kw.update(criterion=b.args.criterion, **criterion_data(b))
    return prunekit.ana(base, b.x, b.val_fn, workspace=ws, progress=b.args.progress, log=quiet, **kw), ws


def criterion_data(b: Bench) -> dict:
    """The calibration batches of a criterion that reads data (the first --calibrate-batches, seed 0)."""
    if not prunekit.CRITERIA[b.args.criterion].reads_data:
        return {}
    torch.manual_seed(0)
    return {"calibration": list(itertools.islice(b.train, b.args.calibrate_batches))}


def row_iterative(
    b: Bench,
    base: nn.Module,
    ratio: float,
    seed: int,
    ws: Path,
    distill: bool = False,
    search: bool = False,
    reconstruct: bool = False,
    teacher: str = "original",
) -> dict:
    t0 = time.perf_counter()
    _, ana_ws = shared_ana(b, base)
    ws.mkdir(parents=True, exist_ok=True)
    for f in ("ana.json", "sensitivity.json"):  # the shared analysis: its points are reused, not re-measured
        if (ana_ws / f).exists() and not (ws / f).exists():
            shutil.copy(ana_ws / f, ws / f)
    cfg = prunekit.IterativeConfig(
        target=ratio,
        steps=b.args.steps,
        total_epochs=b.args.epochs,
        epoch_split=list(FINAL_HEAVY) if search else None,
        calibrate_batches=b.args.calibrate_batches,
        max_drop=None,
        teacher=teacher,
    )
    ana_cfg = prunekit.AnaConfig(ratios=b.args.ana_ratios) if b.args.ana_ratios else None
    res = IterativePruner(
        base,
        b.x,
        b.val_fn,
        b.train,
        workspace=ws,
        config=cfg,
        ana=ana_cfg,
        prune=prunekit.PruneConfig(search=b.args.search, reconstruct=reconstruct) if search else None,
        finetune=b.ft_config(seed, distill=distill),
        test_fn=b.test_fn,
        criterion=b.args.criterion,
        log=quiet,
    ).run()
    history = [h for a in res.attempts for h in a.get("history", [])]
    return finish(
        b,
        res.model,
        base,
        t0,
        history,
        steps=[
            {
                k: a.get(k)
                for k in ("step", "ratio", "metric", "test_metric", "macs_reduction", "epochs", "finetune_seconds")
            }
            for a in res.attempts
        ],
        notes=res.notes,
    )


def row_kd(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return row_iterative(b, base, ratio, seed, ws, distill=True)


def row_search(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path, reconstruct: bool = False, **kw) -> dict:
    if b.args.steps != len(FINAL_HEAVY):  # never an even split under this row's name
        raise SystemExit(f"prunekit-search splits its budget {FINAL_HEAVY} over 3 steps: run it with --steps 3")
    return row_iterative(b, base, ratio, seed, ws, search=True, reconstruct=reconstruct, **kw)


def row_search_kdprev(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return row_search(b, base, ratio, seed, ws, distill=True, teacher="previous")


def row_search_rec(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return row_search(b, base, ratio, seed, ws, reconstruct=True)


def _prune_then_tune(b: Bench, base: nn.Module, seed: int, ws: Path, teacher=None, **prune_kwargs) -> dict:
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    res = prunekit.prune(model, b.x, seed=seed, log=quiet, **prune_kwargs)
    slim = prunekit.to_slim(model)
    err = prunekit.max_error(model(b.x), slim(b.x))
    return finish(
        b,
        slim,
        base,
        t0,
        tune(b, slim, ws / "finetune", seed, teacher=teacher),
        method=res.method,
        equivalence_error=err,
        macs_after_prune=res.macs_after,
    )


def row_oneshot(
    b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path, distill: bool = False, reconstruct: bool = False
) -> dict:
    calibrate = make_bn_calibration(b.train, max_batches=b.args.calibrate_batches)
    sens, _ = shared_ana(b, base)
    extra = {"criterion": b.args.criterion, **criterion_data(b)}
    if reconstruct:  # the least-squares refit's batches; then the same seed as `oneshot`: only the refit differs
        extra.update(reconstruct=True, calibration=list(itertools.islice(b.train, b.args.calibrate_batches)))
    torch.manual_seed(seed)
    return _prune_then_tune(
        b,
        base,
        seed,
        ws,
        removal_ratio=ratio,
        sensitivity=sens,
        search=b.args.search,
        eval_fn=b.val_fn,
        calibrate=calibrate,
        teacher=copy.deepcopy(base).eval() if distill else None,
        **extra,
    )


def row_oneshot_rec(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return row_oneshot(b, base, ratio, seed, ws, reconstruct=True)


def row_oneshot_kd(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return row_oneshot(b, base, ratio, seed, ws, distill=True)


def row_l1_uniform(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return _prune_then_tune(b, base, seed, ws, removal_ratio=ratio, criterion="l1", fallback="uniform")


def row_l2_global(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return _prune_then_tune(b, base, seed, ws, removal_ratio=ratio, criterion="l2", fallback="global")


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, global_pruning: bool) -> tuple[nn.Module, float]:
    """Torch-Pruning to a MACs reduction of ``ratio`` (its channel ratio found by bisection); (model, channel ratio)."""
    import torch_pruning as tp

    dense = prunekit.count(model, x).macs

    def pruned(r: float) -> nn.Module:
        m = copy.deepcopy(model)
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        tp.pruner.MetaPruner(
            m, x, importance=imp, pruning_ratio=r, global_pruning=global_pruning, ignored_layers=[m.linear]
        ).step()
        return m

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = pruned(mid)
        red = 1 - prunekit.count(m, x).macs / dense
        if best is None or abs(red - ratio) < abs(best[2] - ratio):
            best = (m, mid, red)
        if abs(red - ratio) < 0.002:
            break
        lo, hi = (mid, hi) if red < ratio else (lo, mid)
    m, r, _ = best
    _freeze_shortcuts(m)
    return m, r


def _tp_row(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path, global_pruning: bool) -> dict:
    import torch_pruning as tp

    t0 = time.perf_counter()
    conv = conv_shortcuts(base).eval()
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((conv(probe) - base(probe)).abs().max())
    if gap > 1e-5:
        raise AssertionError(f"the conv-shortcut network differs from the option-A one by {gap}")
    model, channel_ratio = tp_prune(conv, b.x, ratio, global_pruning)
    return finish(
        b,
        model,
        base,
        t0,
        tune(b, model, ws / "finetune", seed),
        tp_version=tp.__version__,
        channel_ratio=round(channel_ratio, 4),
        shortcut_gap=gap,
    )


def row_tp_group(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return _tp_row(b, base, ratio, seed, ws, global_pruning=False)


def row_tp_global(b: Bench, base: nn.Module, ratio: float, seed: int, ws: Path) -> dict:
    return _tp_row(b, base, ratio, seed, ws, global_pruning=True)


RUNNERS = {
    "dense": row_dense,
    "prunekit": row_iterative,
    "prunekit-kd": row_kd,
    "prunekit-search": row_search,
    "prunekit-search-rec": row_search_rec,
    "prunekit-search-kdprev": row_search_kdprev,
    "oneshot": row_oneshot,
    "oneshot-rec": row_oneshot_rec,
    "oneshot-kd": row_oneshot_kd,
    "l1-uniform": row_l1_uniform,
    "l2-global": row_l2_global,
    "tp-group": row_tp_group,
    "tp-global": row_tp_global,
}


# ----- results ----------------------------------------------------------------------------------------------------
def load_results(path: Path) -> dict:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("format") == FORMAT:
            return data
    return {"format": FORMAT, "rows": {}}


def save(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def row_key(depth: int, row: str, ratio: float | None, seed: int, settings: dict) -> str:
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"d{depth}/{row}/{'dense' if ratio is None else f'r{ratio:g}'}/s{seed}/{tag}"


def table(data: dict, settings: dict | None = None) -> str:
    """Mean (and spread) over seeds per depth, target and row."""
    groups: dict[tuple, list[dict]] = {}
    for r in data["rows"].values():
        if settings is not None and r["settings"] != settings:
            continue
        groups.setdefault((r["depth"], r["ratio"] or 0.0, ROWS.index(r["row"])), []).append(r)
    dense = {d: statistics.mean(x["test_acc"] for x in v) for (d, _, i), v in groups.items() if ROWS[i] == "dense"}
    head = ["ResNet", "target", "row", "test acc", "vs dense", "MACs", "MACs -", "params", "seeds", "min/row"]
    lines = []
    for (d, ratio, i), v in sorted(groups.items()):
        accs = [x["test_acc"] * 100 for x in v]
        mean = statistics.mean(accs)
        spread = f" ±{statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        delta = f"{mean - dense[d] * 100:+.2f}" if d in dense and ROWS[i] != "dense" else ""
        x = v[0]
        lines.append(
            [
                f"{d}",
                f"-{ratio:.0%}" if ratio else "",
                ROWS[i] + (" *" if ROWS[i].startswith("tp") else ""),
                f"{mean:.2f}{spread}",
                delta,
                f"{x['macs'] / 1e6:.1f}M",
                f"{x['macs_reduction']:.1%}",
                f"{x['params'] / 1e3:.0f}k",
                str(len(v)),
                f"{statistics.mean(y['seconds'] for y in v) / 60:.1f}",
            ]
        )
    widths = [max(len(str(r[k])) for r in [head, *lines]) for k in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if k < 3 else str(c).rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in lines)]
    out.append(
        "* Torch-Pruning on the same network with every zero-padding shortcut rewritten as the equal fixed "
        "1x1 stride-2 convolution (outputs checked equal); its MACs include those convolutions."
    )
    return "\n".join(out)


def budget(settings: dict) -> str:
    """One line naming a budget: every row of a table shares it."""
    train = settings.get("train_subset") or 45000
    return (
        f"budget: {settings['epochs']} fine-tuning epochs on {train:,} training images, batch "
        f"{settings['batch_size']}, lr {settings['lr']}, {settings['steps']} iterative steps, "
        f"{settings['val_batches']} validation batches per evaluation"
    )


def all_tables(data: dict) -> str:
    """One table per budget (rows measured under other settings are never compared), with its targets."""
    seen: list[dict] = []
    for r in data["rows"].values():
        if r["settings"] not in seen:
            seen.append(r["settings"])
    parts = []
    for settings in seen:
        parts.append("\n".join([budget(settings), table(data, settings), *targets(data, settings)]))
    return "\n\n".join(parts)


def targets(data: dict, settings: dict) -> list[str]:
    """The issue's targets, checked on the rows present (means over seeds)."""
    acc: dict[tuple, list[float]] = {}
    for r in data["rows"].values():
        if r["settings"] == settings:
            acc.setdefault((r["depth"], r["ratio"], r["row"]), []).append(r["test_acc"] * 100)
    m = {k: statistics.mean(v) for k, v in acc.items()}
    out = []

    def best(depth, ratio, names):
        have = [(m[(depth, ratio, n)], n) for n in names if (depth, ratio, n) in m]
        return max(have) if have else None

    for depth, ratio in sorted({(k[0], k[1]) for k in m if k[1] is not None}):
        ours, dense = best(depth, ratio, OURS), m.get((depth, None, "dense"))
        tp_best, l1 = best(depth, ratio, ("tp-group", "tp-global")), m.get((depth, ratio, "l1-uniform"))
        peers = best(depth, ratio, PEERS)
        if ours is None:
            continue
        lead = f"ResNet-{depth} -{ratio:.0%}: best prunekit row {ours[1]} {ours[0]:.2f}"
        if depth == 20 and math.isclose(ratio, 0.5):
            checks = []
            if tp_best:
                checks.append(
                    f">= best Torch-Pruning ({tp_best[0]:.2f}) + 1.0: "
                    f"{'met' if ours[0] >= tp_best[0] + 1.0 else 'MISSED'}"
                )
            if l1 is not None:
                checks.append(f"> uniform L1 ({l1:.2f}): {'met' if ours[0] > l1 else 'MISSED'}")
            if dense is not None:
                checks.append(f"within 1.0 of dense ({dense:.2f}): {'met' if ours[0] >= dense - 1.0 else 'MISSED'}")
            out.append(lead + "; " + "; ".join(checks))
        elif depth == 20 and peers:
            out.append(
                lead + f"; ahead of every peer row (best {peers[1]} {peers[0]:.2f}): "
                f"{'met' if ours[0] > peers[0] else 'MISSED'}"
            )
        elif depth == 56 and math.isclose(ratio, 0.5) and dense is not None:
            out.append(
                lead + f"; within 0.5 of dense ({dense:.2f}) at {settings['epochs']} epochs: "
                f"{'met' if ours[0] >= dense - 0.5 else 'MISSED'}"
            )
    return out


# ----- main -------------------------------------------------------------------------------------------------------
def build_bench(args: argparse.Namespace, root: Path) -> Bench:
    t0 = time.perf_counter()
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(root),
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        crop_padding=4,
        hflip=True,
    )
    splits = image_folder_splits(root, val_fraction=args.val_fraction, seed=0, workers=2, log=quiet)
    if args.train_subset:
        splits.train = splits.train.subset(args.train_subset, seed=0)
    if args.test_subset:
        splits.test = splits.test.subset(args.test_subset, seed=0)
    train, val, test = make_loaders(splits, cfg)
    print(
        f"data: {len(splits.train)} train, {len(splits.val)} validation ({args.val_batches} batches per "
        f"evaluation), {len(splits.test)} test images; {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    settings = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "train_subset",
            "test_subset",
            "val_fraction",
            "val_batches",
            "batch_size",
            "lr",
            "warmup",
            "steps",
            "calibrate_batches",
            "search",
            "kd_weight",
            "kd_temperature",
            "ana_ratios",
        )
    }
    if args.criterion != "l2":  # the rows measured before the option keep their keys
        settings["criterion"] = args.criterion
    val_fn = make_eval_fn(val, "accuracy", max_batches=args.val_batches)
    return Bench(
        args, train, val, val_fn, make_eval_fn(test, "accuracy"), torch.zeros(1, 3, 32, 32), args.work, settings
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_results(args.out)
    if args.table:
        print(all_tables(data))
        return 0
    root = data_root(args.scratch)
    if root is None or not WEIGHTS.is_dir():
        print(f"skipped: the JPEG CIFAR-10 ({TARBALL}) or the pretrained weights ({WEIGHTS}) are not there")
        return 0
    torch.set_num_threads(args.threads or torch.get_num_threads())
    b = build_bench(args, root)
    for depth in args.depth:
        base, b.depth = pretrained(depth), depth
        print(f"ResNet-{depth}: pretrained test accuracy {b.test_fn(base):.4f} (no fine-tuning)", flush=True)
        for seed in args.seeds:
            for ratio in [None, *args.ratios]:
                for row in args.rows:
                    if (row == "dense") != (ratio is None):
                        continue
                    run_row(b, data, depth, base, row, ratio, seed)
    print()
    print(budget(b.settings))
    print(table(data, b.settings))
    for line in targets(data, b.settings):
        print(line)
    return 0


def run_row(b: Bench, data: dict, depth: int, base: nn.Module, row: str, ratio: float | None, seed: int) -> None:
    key = row_key(depth, row, ratio, seed, b.settings)
    if key in data["rows"]:
        return
    ws = b.work / key
    print(f"{key}: running", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    result = RUNNERS[row](b, base, ratio, seed, ws)
    result.update(
        {
            "depth": depth,
            "row": row,
            "ratio": ratio,
            "seed": seed,
            "settings": b.settings,
            "device": b.args.device,
            "threads": torch.get_num_threads(),
        }
    )
    data["rows"][key] = result
    current = load_results(b.args.out)  # rows another invocation finished meanwhile are kept
    current["rows"].update(data["rows"])
    data["rows"] = current["rows"]
    save(b.args.out, data)
    print(
        f"{key}: test {result['test_acc']:.4f}, MACs -{result['macs_reduction']:.1%}, {time.perf_counter() - t0:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
