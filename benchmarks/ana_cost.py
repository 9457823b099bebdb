"""The cost of the sensitivity analysis: the full ``ana`` against the fast one, side by side.

For each model, one run analyses the same fixed validation subset twice: ``fast=False`` (every
group at every ratio on every validation image, as before) and the default fast analysis
(cached activations before each group, early-stopped points, adaptive ratios; see
``prunekit/workflow/fast_ana.py``). Both use the same ratios (0.1 ... 0.9), criterion (L2) and
collapse (0.5). Reported: images put through the model (counted at the loader for the full
analysis; the fast analysis counts every forward, partial ones included, and its
MACs-weighted "image equivalents"), wall time, and the allocation each gives at -50% MACs
(``prune(..., removal_ratio=0.5, sensitivity=...)``) with the test accuracy right after
pruning (BatchNorm statistics re-estimated on training images) and after the same short
fine-tune of the slim model (same seed, same batches). For each analysis it also reads the same curves
with the running maximum that ``Sensitivity.loss`` used before its isotonic fit (``fit="running_max"``)
and, where that gives another allocation, fine-tunes it with the same seeds: the fit's gain, paired on
the same test images (``--no-fit-compare`` skips it). Two allocations are the same when they remove the
same channels (``PruningPlan.key``). The fast-vs-full gap's standard error combines the test images
(per-image correctness averaged over the seeds, paired) and the fine-tuning seeds (Welch, from each
allocation's ``--ft-seeds`` accuracies).

Models and data (nothing is downloaded; a model whose data is missing is skipped with a message):

- ``resnet20``, ``resnet56``: the CIFAR ResNets (``prunekit.models.cifar_resnet``) with the
  pretrained weights of ``../shared/data/cifar-resnet``, on the JPEG CIFAR-10 of
  ``../shared/data/cifar10``: validation images (for ana) and fine-tuning images from the train
  split (disjoint), test images from the test split, all fixed subsets (sizes below).
- ``resnet18``: torchvision's ImageNet ResNet-18 architecture with a 10-class head, **from random
  weights** (no pretrained ImageNet weights offline; a random network's predictions collapse at
  the first pruning ratio, so it is trained first: 2 epochs on 10,000 other CIFAR-10 training
  images, at 32x32, cached in the temp dir), on the same CIFAR-10 subsets.

``--workers N`` adds the fast analysis forked into N processes (one thread each). It is off by
default: an earlier run reported "13x less wall time with 2 workers" for ResNet-20 on a 2-core
machine, because its single-process fast row had been slowed (to 92.6 s; 43.6 s when rerun)
by other jobs on the shared cores while the workers' row ran later; the workers speed-up is only
meaningful on cores nothing else uses, against the fast row of the same run.

Usage:
    python benchmarks/ana_cost.py                       # all three models, default subsets
    python benchmarks/ana_cost.py --models resnet20 --val 2000
Writes ``benchmarks/results/ana_cost.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.engine.counting import count
from prunekit.workflow.evaluation import make_bn_calibration, make_eval_fn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ana_cost.json"
SHARED = HERE.parent.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# validation (ana), test, fine-tuning images; ana batch size. All 10,000 test images and 6 fine-tunes per allocation:
# with 2,000 test images and 3 seeds the test-set standard error of the gap (0.6 points) was twice the 0.3 target
SIZES = {
    "resnet20": dict(val=2000, test=10000, train=4000, batch=250),
    "resnet56": dict(val=1000, test=10000, train=2000, batch=250),
    "resnet18": dict(val=1000, test=2000, train=2000, batch=250, pretrain=10000, pretrain_epochs=2),
}


# ----- data --------------------------------------------------------------------------------
def cifar_folder() -> Path | str:
    """The extracted JPEG CIFAR-10 (extracted once into the temp dir), or why not."""
    tar = SHARED / "cifar10" / "cifar10-jpg.tar.gz"
    if not tar.exists():
        return f"{tar} not found (nothing is downloaded)"
    out = Path(tempfile.gettempdir()) / "prunekit-cifar10-jpg"
    if not (out / "test").is_dir():
        with tarfile.open(tar) as t:
            t.extractall(out, filter="data")
    return out


def load_images(root: Path, split: str, n: int, seed: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a split (a fixed random subset, after the first ``skip`` of that order), as floats."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / split))
    order = torch.randperm(len(ds.samples), generator=torch.Generator().manual_seed(seed))[skip : skip + n]
    xs = np.stack([np.asarray(Image.open(ds.samples[i][0]).convert("RGB")) for i in order.tolist()])
    y = torch.tensor([ds.samples[i][1] for i in order.tolist()])
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), y


def batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----- models ------------------------------------------------------------------------------
def build(name: str, root: Path, sizes: dict, seed: int):
    """``(model, example, val, test, train)``; each split a list of (inputs, labels) batches."""
    from safetensors.torch import load_file

    val = load_images(root, "train", sizes["val"], seed)
    train = load_images(root, "train", sizes["train"], seed, skip=sizes["val"])
    test = load_images(root, "test", sizes["test"], seed)
    if name in ("resnet20", "resnet56"):
        from prunekit.models.cifar_resnet import cifar_resnet20, cifar_resnet56

        model = {"resnet20": cifar_resnet20, "resnet56": cifar_resnet56}[name]()
        model.load_state_dict(load_file(str(SHARED / "cifar-resnet" / f"cifar_{name}.safetensors")))
        return model.eval(), val[0][:1], val, test, train
    return resnet18(root, sizes, seed), val[0][:1], val, test, train


def resnet18(root: Path, sizes: dict, seed: int) -> nn.Module:
    """torchvision's ResNet-18 (10 outputs) from random weights, trained briefly on other CIFAR-10 images.

    Cached in the temp dir (no pretrained ImageNet weights are available offline).
    """
    import torchvision

    n, epochs = sizes["pretrain"], sizes["pretrain_epochs"]
    cache = Path(tempfile.gettempdir()) / f"prunekit-ana-cost-resnet18-{seed}-{n}-{epochs}.pt"
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    x, y = load_images(root, "train", n, seed, skip=sizes["val"] + sizes["train"])
    t0 = time.perf_counter()
    finetune(model, batches(x, y, 128), epochs, seed, lr=0.05)
    print(
        f"resnet18: trained from random weights on {n} images x {epochs} epochs in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    torch.save(model.state_dict(), cache)
    return model.eval()


# ----- one analysis, pruning, fine-tuning ------------------------------------------------
class CountingLoader:
    """A list of batches that counts the images it hands out."""

    def __init__(self, data):
        self.data, self.images = data, 0

    def __iter__(self):
        for x, y in self.data:
            self.images += len(y)
            yield x, y

    def __len__(self):
        return len(self.data)


def analyse(model, example, val, fast: bool, workspace: Path, workers: int = 1) -> tuple[prunekit.Sensitivity, dict]:
    loader = CountingLoader(val)
    fn = make_eval_fn(loader, "accuracy")
    t0 = time.perf_counter()
    sens = prunekit.ana(
        model,
        example,
        fn,
        workspace=workspace,
        criterion="l2",
        collapse=0.5,
        fast=fast,
        progress=False,
        log=lambda m: None,
        workers=workers,
    )
    wall = time.perf_counter() - t0
    images = sens.cost["images"] if fast else loader.images
    return sens, {"wall_s": round(wall, 2), "images": images, "cost": sens.cost}


def finetune(model: nn.Module, train, steps_epochs: int, seed: int, lr: float = 0.01, batch: int = 64) -> None:
    """SGD (momentum 0.9, wd 5e-4, cosine to 0) over the training images, ``steps_epochs`` passes."""
    x, y = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    g = torch.Generator().manual_seed(seed)
    steps = steps_epochs * math.ceil(len(x) / batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps_epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def right(model: nn.Module, test) -> torch.Tensor:
    """Per test image: whether ``model`` classifies it correctly."""
    model.eval()
    return torch.cat([model(x).argmax(1) == y for x, y in test])


def prune_and_tune(model, example, sens, test, train, args, seed: int) -> dict:
    test_acc = make_eval_fn(test, "accuracy")
    calibrate = make_bn_calibration(train, max_batches=args.bn_batches)
    res = prunekit.prune(
        copy.deepcopy(model),
        example,
        removal_ratio=0.5,
        sensitivity=sens,
        criterion="l2",
        calibrate=calibrate,
        mode="slim",
        log=lambda m: None,
    )
    out = {
        "macs_reduction": round(res.macs_reduction, 4),
        "acc_pruned_bn": test_acc(res.model),
        "ratios": {str(g): round(r, 3) for g, r in sorted(res.ratios.items())},
        "_plan": res.plan.key(),  # the channels removed (not saved): equal keys, the same slim model
    }
    t0 = time.perf_counter()
    accs, correct = [], []
    for k in range(args.ft_seeds):  # the same slim model fine-tuned with each seed (batch order, nothing else)
        slim = copy.deepcopy(res.model)
        torch.manual_seed(seed + k)
        finetune(slim, train, args.ft_epochs, seed + k)
        accs.append(test_acc(slim))
        correct.append(right(slim, test))
    out["_correct"] = torch.stack(correct).double().mean(0)  # per test image, over the seeds (not saved)
    out["finetune_s"] = round((time.perf_counter() - t0) / args.ft_seeds, 1)
    out["acc_finetuned_seeds"] = accs
    out["acc_finetuned"] = statistics.mean(accs)
    out["acc_finetuned_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return out


def run_model(name: str, root: Path, args) -> dict:
    sizes = dict(SIZES[name])
    for k in ("val", "test", "train"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    t0 = time.perf_counter()
    model, example, val, test, train = build(name, root, sizes, args.seed)
    val_b, test_b, train_b = batches(*val, sizes["batch"]), batches(*test, 500), batches(*train, 128)
    row = {
        "model": name,
        "sizes": sizes,
        "macs": count(model, example).macs,
        "data_s": 0.0,
        "baseline_test": make_eval_fn(test_b, "accuracy")(model),
    }
    row["data_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = [("full", False, 1), ("fast", True, 1)] + (
            [("fast_workers", True, args.workers)] if args.workers > 1 else []
        )
        for kind, fast, workers in kinds:
            if workers > 1:
                torch.set_num_threads(1)  # one thread per worker process
            sens, stats = analyse(model, example, val_b, fast, Path(tmp) / kind, workers)
            torch.set_num_threads(args.threads)
            stats["workers"] = workers
            row[kind] = {**stats, "groups": len(sens.curves), "baseline_val": sens.baseline}
            row[kind]["curves"] = {str(g): {str(r): round(v, 5) for r, v in c.items()} for g, c in sens.curves.items()}
            print(f"{name}: {kind} ana {stats['wall_s']} s, {stats['images']} images", file=sys.stderr)
            ref = "fast" if kind == "fast_workers" else "full"
            same = kind != "full" and row[ref]["_plan"] == _plan(model, example, sens)
            if same:  # the same allocation: the same slim model, the same fine-tune (deterministic)
                row[kind].update(
                    {
                        k: row[ref][k]
                        for k in (
                            "macs_reduction",
                            "acc_pruned_bn",
                            "ratios",
                            "acc_finetuned",
                            "acc_finetuned_seeds",
                            "acc_finetuned_std",
                            "finetune_s",
                            "_correct",
                            "_plan",
                        )
                    }
                )
                row[kind]["same_allocation"] = ref == "full"
            else:
                row[kind].update(prune_and_tune(model, example, sens, test_b, train_b, args, args.seed))
                row[kind]["same_allocation"] = False
            if kind != "fast_workers" and args.fit_compare:
                row[kind]["running_max"] = fit_compared(model, example, sens, row[kind], test_b, train_b, args)
    if "fast_workers" in row:  # against the one-process fast analysis: what the processes add
        row["wall_x_workers"] = round(row["fast"]["wall_s"] / row["fast_workers"]["wall_s"], 2)
    f, q = row["full"], row["fast"]
    row["images_x"] = round(f["images"] / q["images"], 2)
    row["wall_x"] = round(f["wall_s"] / q["wall_s"], 2)
    row["ft_gap_points"] = round(100 * (q["acc_finetuned"] - f["acc_finetuned"]), 2)
    # the gap's sampling error from the test images alone (paired: the same images for both)
    if "_correct" in q and "_correct" in f:
        d = q["_correct"] - f["_correct"]
        row["ft_gap_se_test"] = round(100 * float(d.std() / math.sqrt(len(d))), 2)
    else:
        row["ft_gap_se_test"] = 0.0  # the same allocation: the same models
    # ... and from the fine-tuning seeds (each allocation's seeds are its own sample), then both together
    row["ft_gap_se_seeds"] = 0.0 if q["same_allocation"] else round(100 * _se_of_difference(f, q), 2)
    row["ft_gap_se"] = round(math.hypot(row["ft_gap_se_test"], row["ft_gap_se_seeds"]), 2)
    for a in (f, q, row.get("fast_workers", {}), f.get("running_max", {}), q.get("running_max", {})):
        a.pop("_correct", None)
        a.pop("_plan", None)
    row["max_ratio_diff"] = round(
        max(abs(f["ratios"].get(g, 0.0) - q["ratios"].get(g, 0.0)) for g in set(f["ratios"]) | set(q["ratios"])), 3
    )
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fit_compared(model, example, sens, done: dict, test, train, args) -> dict:
    """The allocation of the same curves read with the running maximum (the fit before the isotonic one).

    Fine-tuned with the same seeds when it differs from ``done``'s; ``gain_points`` is the isotonic fit's
    fine-tuned accuracy minus this one's, with its paired test-set standard error.
    """
    old = dataclasses.replace(sens, fit="running_max")
    if _plan(model, example, old) == done["_plan"]:
        return {"same_allocation": True, "gain_points": 0.0, "gain_se_test": 0.0}
    out = prune_and_tune(model, example, old, test, train, args, args.seed)
    d = done["_correct"] - out["_correct"]
    out.update(
        same_allocation=False,
        gain_points=round(100 * (done["acc_finetuned"] - out["acc_finetuned"]), 2),
        gain_se_test=round(100 * float(d.std() / math.sqrt(len(d))), 2),
    )
    return out


def _plan(model, example, sens) -> tuple:
    """The channels the allocation of ``sens`` at -50% MACs removes (:meth:`PruningPlan.key`)."""
    res = prunekit.prune(
        copy.deepcopy(model), example, removal_ratio=0.5, sensitivity=sens, criterion="l2", log=lambda m: None
    )
    return res.plan.key()


def _se_of_difference(a: dict, b: dict) -> float:
    """Standard error of the difference of two mean fine-tuned accuracies, from their seeds (Welch)."""
    n, m = len(a["acc_finetuned_seeds"]), len(b["acc_finetuned_seeds"])
    if n < 2 or m < 2:
        return 0.0
    return math.sqrt(a["acc_finetuned_std"] ** 2 / n + b["acc_finetuned_std"] ** 2 / m)


# ----- report ------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (
        f"{'model':<9} {'ana':<16} {'images':>8} {'wall s':>7} {'points eval/interp/coll':>24} {'early':>6} "
        f"{'MACs -':>7} {'acc pruned+BN':>14} {'acc fine-tuned (sd)':>20}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        for kind in [k for k in ("full", "fast", "fast_workers") if k in r]:
            a = r[kind]
            c = a["cost"]
            pts = f"{c['evaluated']}/{c['interpolated']}/{c['collapsed']}"
            label = kind if kind != "fast_workers" else f"fast, {a['workers']} workers"
            lines.append(
                f"{r['model']:<9} {label:<16} {a['images']:>8} {a['wall_s']:>7.1f} {pts:>24} "
                f"{c['early_stop']:>6} {a['macs_reduction']:>7.1%} {a['acc_pruned_bn']:>14.2%} "
                f"{a['acc_finetuned']:>13.2%} ({100 * a['acc_finetuned_std']:.2f})"
            )
        for kind in ("full", "fast"):
            m = r[kind].get("running_max")
            if m:
                lines.append(
                    f"{'':<9} {kind}: isotonic curve fit vs running max: "
                    + (
                        "the same allocation"
                        if m["same_allocation"]
                        else f"fine-tuned accuracy {m['gain_points']:+.2f} points (test-set standard error "
                        f"{m['gain_se_test']:.2f}; running max {m['acc_finetuned']:.2%})"
                    )
                )
        lines.append(
            f"{'':<9} fast vs full: {r['images_x']}x fewer images, {r['wall_x']}x less wall time, "
            f"fine-tuned accuracy {r['ft_gap_points']:+.2f} points (standard error {r.get('ft_gap_se', 0.0):.2f}: "
            f"test images {r.get('ft_gap_se_test', 0.0):.2f}, fine-tuning seeds {r.get('ft_gap_se_seeds', 0.0):.2f}), "
            "largest per-group ratio difference "
            f"{r['max_ratio_diff']}{' (same allocation)' if r['fast']['same_allocation'] else ''}"
            + (
                f"; the workers take {r['wall_x_workers']}x less wall time than one process"
                if "wall_x_workers" in r
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet18"], choices=list(SIZES))
    ap.add_argument("--val", type=int, help="validation images for ana (default per model)")
    ap.add_argument("--test", type=int, help="test images (default per model)")
    ap.add_argument("--train", type=int, help="fine-tuning images (default per model)")
    ap.add_argument("--ft-epochs", type=int, default=1, help="passes over the fine-tuning images")
    ap.add_argument("--ft-seeds", type=int, default=6, help="fine-tunes per allocation (seeds); the mean is reported")
    ap.add_argument("--bn-batches", type=int, default=8, help="training batches (128) for BatchNorm re-estimation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-fit-compare",
        dest="fit_compare",
        action="store_false",
        help="skip the allocation of the curves read with the running maximum (and its fine-tunes)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the full and the fast analysis")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also the fast analysis in this many processes (one thread each), compared with the fast row; "
        "1 (default): not (on a machine whose cores other jobs share, the rows are not a side-by-side)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = cifar_folder()
    if isinstance(root, str):
        print(f"skipping every model: {root}", file=sys.stderr)
        return 1
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        if name != "resnet18" and not (SHARED / "cifar-resnet" / f"cifar_{name}.safetensors").exists():
            print(f"skipping {name}: no weights in {SHARED / 'cifar-resnet'}", file=sys.stderr)
            continue
        rows.append(run_model(name, root, args))
        print(table(rows[-1:]), file=sys.stderr)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "command": "python benchmarks/ana_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
