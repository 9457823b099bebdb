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
fine-tune of the slim model (same seed, same batches).

Models and data (nothing is downloaded; a model whose data is missing is skipped with a message):

- ``resnet20``, ``resnet56``: the CIFAR ResNets (``prunekit.models.cifar_resnet``) with the
  pretrained weights of ``../shared/data/cifar-resnet``, on the JPEG CIFAR-10 of
  ``../shared/data/cifar10``: validation images (for ana) and fine-tuning images from the train
  split (disjoint), test images from the test split, all fixed subsets (sizes below).
- ``resnet18``: torchvision's ImageNet ResNet-18 with **random weights** (seed 0; BatchNorm
  statistics estimated on 512 training images so the network is a sane function), on CIFAR-10
  images upsampled to 64x64. Its labels are the unpruned model's own top-1 predictions, so its
  "accuracy" is agreement with the unpruned model; the fine-tune distils towards those labels.

Usage:
    python benchmarks/ana_cost.py                       # all three models, default subsets
    python benchmarks/ana_cost.py --models resnet20 --val 2000
Writes ``benchmarks/results/ana_cost.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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
SIZES = {  # validation (ana), test, fine-tuning images; ana batch size
    "resnet20": dict(val=2000, test=2000, train=5000, batch=250),
    "resnet56": dict(val=1000, test=2000, train=3000, batch=250),
    "resnet18": dict(val=512, test=1000, train=2000, batch=128),
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
    order = torch.randperm(len(ds.samples), generator=torch.Generator().manual_seed(seed))[skip:skip + n]
    xs = np.stack([np.asarray(Image.open(ds.samples[i][0]).convert("RGB")) for i in order.tolist()])
    y = torch.tensor([ds.samples[i][1] for i in order.tolist()])
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), y


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


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
    import torchvision

    up = [(F.interpolate(x, size=64, mode="bilinear", align_corners=False), y) for x, y in (val, test, train)]
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    make_bn_calibration(batches(up[2][0][:512], up[2][1][:512], 128))(model)
    model.eval()
    with torch.no_grad():  # labels: the unpruned model's own predictions
        up = [(x, torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])) for x, _ in up]
    return model, up[0][0][:1], *up


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


def analyse(model, example, val, fast: bool, workspace: Path) -> tuple[prunekit.Sensitivity, dict]:
    loader = CountingLoader(val)
    fn = make_eval_fn(loader, "accuracy")
    t0 = time.perf_counter()
    sens = prunekit.ana(model, example, fn, workspace=workspace, criterion="l2", collapse=0.5, fast=fast,
                        progress=False, log=lambda m: None)
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
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def prune_and_tune(model, example, sens, test, train, args, seed: int) -> dict:
    test_acc = make_eval_fn(test, "accuracy")
    calibrate = make_bn_calibration(train, max_batches=args.bn_batches)
    res = prunekit.prune(copy.deepcopy(model), example, removal_ratio=0.5, sensitivity=sens, criterion="l2",
                         calibrate=calibrate, mode="slim", log=lambda m: None)
    slim = res.model
    out = {"macs_reduction": round(res.macs_reduction, 4), "acc_pruned_bn": test_acc(slim),
           "ratios": {str(g): round(r, 3) for g, r in sorted(res.ratios.items())}}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    finetune(slim, train, args.ft_epochs, seed)
    out["finetune_s"] = round(time.perf_counter() - t0, 1)
    out["acc_finetuned"] = test_acc(slim)
    return out


def run_model(name: str, root: Path, args) -> dict:
    sizes = dict(SIZES[name])
    for k in ("val", "test", "train"):
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    t0 = time.perf_counter()
    model, example, val, test, train = build(name, root, sizes, args.seed)
    val_b, test_b, train_b = batches(*val, sizes["batch"]), batches(*test, 500), batches(*train, 128)
    row = {"model": name, "sizes": sizes, "macs": count(model, example).macs, "data_s": 0.0,
           "baseline_test": make_eval_fn(test_b, "accuracy")(model)}
    row["data_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, fast in (("full", False), ("fast", True)):
            sens, stats = analyse(model, example, val_b, fast, Path(tmp) / kind)
            row[kind] = {**stats, "groups": len(sens.curves), "baseline_val": sens.baseline}
            row[kind]["curves"] = {str(g): {str(r): round(v, 5) for r, v in c.items()} for g, c in sens.curves.items()}
            print(f"{name}: {kind} ana {stats['wall_s']} s, {stats['images']} images", file=sys.stderr)
            same = kind == "fast" and row["full"]["ratios"] == _ratios(model, example, sens)
            if same:  # the same allocation: the same slim model, the same fine-tune (deterministic)
                row[kind].update({k: row["full"][k] for k in ("macs_reduction", "acc_pruned_bn", "ratios",
                                                               "acc_finetuned", "finetune_s")})
                row[kind]["same_allocation"] = True
            else:
                row[kind].update(prune_and_tune(model, example, sens, test_b, train_b, args, args.seed))
                row[kind]["same_allocation"] = False
    f, q = row["full"], row["fast"]
    row["images_x"] = round(f["images"] / q["images"], 2)
    row["wall_x"] = round(f["wall_s"] / q["wall_s"], 2)
    row["ft_gap_points"] = round(100 * (q["acc_finetuned"] - f["acc_finetuned"]), 2)
    row["max_ratio_diff"] = round(max(abs(f["ratios"].get(g, 0.0) - q["ratios"].get(g, 0.0))
                                      for g in set(f["ratios"]) | set(q["ratios"])), 3)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _ratios(model, example, sens) -> dict:
    res = prunekit.prune(copy.deepcopy(model), example, removal_ratio=0.5, sensitivity=sens, criterion="l2",
                         log=lambda m: None)
    return {str(g): round(r, 3) for g, r in sorted(res.ratios.items())}


# ----- report ------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (f"{'model':<9} {'ana':<5} {'images':>8} {'wall s':>7} {'points eval/interp/coll':>24} {'early':>6} "
            f"{'MACs -':>7} {'acc pruned+BN':>14} {'acc fine-tuned':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for kind in ("full", "fast"):
            a = r[kind]
            c = a["cost"]
            pts = f"{c['evaluated']}/{c['interpolated']}/{c['collapsed']}"
            lines.append(f"{r['model']:<9} {kind:<5} {a['images']:>8} {a['wall_s']:>7.1f} {pts:>24} "
                         f"{c['early_stop']:>6} {a['macs_reduction']:>7.1%} {a['acc_pruned_bn']:>14.2%} "
                         f"{a['acc_finetuned']:>15.2%}")
        lines.append(f"{'':<9} fast vs full: {r['images_x']}x fewer images, {r['wall_x']}x less wall time, "
                     f"fine-tuned accuracy {r['ft_gap_points']:+.2f} points, largest per-group ratio difference "
                     f"{r['max_ratio_diff']}{' (same allocation)' if r['fast']['same_allocation'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet18"], choices=list(SIZES))
    ap.add_argument("--val", type=int, help="validation images for ana (default per model)")
    ap.add_argument("--test", type=int, help="test images (default per model)")
    ap.add_argument("--train", type=int, help="fine-tuning images (default per model)")
    ap.add_argument("--ft-epochs", type=int, default=1, help="passes over the fine-tuning images")
    ap.add_argument("--bn-batches", type=int, default=8, help="training batches (128) for BatchNorm re-estimation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
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
    out = {"command": "python benchmarks/ana_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch": torch.__version__, "threads": args.threads, "seconds": round(time.perf_counter() - t0, 1),
           "rows": rows}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
