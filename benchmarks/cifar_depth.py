"""Depth + width vs width only: the pretrained CIFAR ResNet-56 at 50% fewer MACs.

The He et al. ResNet-56 (``prunekit.models.cifar_resnet``, Idelbayev's pretrained weights from
``../shared/data/cifar-resnet``) on the JPEG CIFAR-10 of ``../shared/data/cifar10`` (see its
README: the model scores about 83% on that test split as is). Two ways to remove half the MACs:

* ``width``: channels only (L2 criterion, one ratio for every group);
* ``depth + width``: ``--blocks`` whole residual blocks first (ShortGPT's block influence,
  ``1 - cos(input, output)``, on calibration images; the blocks that change their input least),
  then the same width pruning for the rest of the MACs target.

Each is evaluated on a fixed test subset right after pruning, after re-estimating the BatchNorm
statistics on training batches (forward passes only), and after a short fine-tune (SGD, cosine
schedule) on a training subset. Skipped with a message when the data or weights are absent.

Usage:
    python benchmarks/cifar_depth.py                      # ~10 min on 2 busy cores (2,560 / 2,000 images)
    python benchmarks/cifar_depth.py --train 10000 --epochs 2 --test 10000
Writes ``benchmarks/results/cifar_depth.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import prunekit  # noqa: E402
from prunekit.models.cifar_resnet import cifar_resnet56  # noqa: E402
from prunekit.workflow.evaluation import make_bn_calibration, make_eval_fn  # noqa: E402
from prunekit.workflow.finetune import FinetuneConfig, finetune  # noqa: E402
from prunekit.workflow.prune import prune  # noqa: E402

RESULTS = HERE / "results" / "cifar_depth.json"
DATA = HERE.parent.parent / "shared" / "data"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def image_folder(root: Path) -> Path:
    """The extracted JPEG CIFAR-10 (``train/``, ``test/``), extracted once into the temp folder."""
    out = Path(tempfile.gettempdir()) / "prunekit-cifar10-jpg"
    if not (out / "train").is_dir() or not (out / "test").is_dir():
        with tarfile.open(root / "cifar10-jpg.tar.gz") as tar:
            tar.extractall(out, filter="data")
    return out


def load_split(folder: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``folder`` (a seeded random subset), decoded and normalised."""
    from torchvision.io import decode_jpeg, read_file

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).glob("*.jpg"))]
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs = torch.stack([decode_jpeg(read_file(str(files[i][0]))) for i in pick]).float() / 255
    ys = torch.tensor([files[i][1] for i in pick])
    return (xs - MEAN[:, None, None]) / STD[:, None, None], ys


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None = None) -> list:
    order = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(len(x))
    )
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def variant(original, name, blocks, train, test_fn, example, args) -> dict:
    model = copy.deepcopy(original)
    t0 = time.time()
    res = prune(
        model, example, removal_ratio=args.target, remove_blocks=blocks, calibration=train[:4], log=lambda s: None
    )
    row = {
        "variant": name,
        "macs_reduction": res.macs_reduction,
        "params": res.params_after,
        "blocks_removed": res.plan.meta.get("blocks", []),
        "prune_seconds": round(time.time() - t0, 1),
        "accuracy_pruned": test_fn(model),
    }
    make_bn_calibration(train, max_batches=args.bn_batches)(model)
    row["accuracy_bn"] = test_fn(model)
    t0 = time.time()
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, weight_decay=5e-4, progress=False, restore_best=False)
    finetune(model, batches(*args.train_data, 128, seed=1), None, cfg, log=lambda s: None)
    row["finetune_seconds"] = round(time.time() - t0, 1)
    row["accuracy_finetuned"] = test_fn(model)
    slim = prunekit.to_slim(model)
    with torch.no_grad():
        row["slim_vs_sparse"] = prunekit.max_error(model.eval()(example), slim.eval()(example))
    return row


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.5, help="MACs reduction")
    ap.add_argument("--blocks", type=int, default=8, help="residual blocks removed by the depth variant (of 27)")
    ap.add_argument("--train", type=int, default=2560, help="training images (BN statistics, fine-tuning)")
    ap.add_argument("--test", type=int, default=2000, help="test images (a fixed random subset)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--bn-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    weights = DATA / "cifar-resnet" / "cifar_resnet56.safetensors"
    if not weights.exists() or not (DATA / "cifar10" / "cifar10-jpg.tar.gz").exists():
        print(f"skipped: needs {weights} and {DATA / 'cifar10' / 'cifar10-jpg.tar.gz'} (see ../shared/data/README.md)")
        return None
    torch.set_num_threads(args.threads)
    t_start = time.time()
    from safetensors.torch import load_model

    original = cifar_resnet56()
    load_model(original, str(weights))
    original.eval()
    folder = image_folder(DATA / "cifar10")
    args.train_data = load_split(folder / "train", args.train, seed=0)
    test = batches(*load_split(folder / "test", args.test, seed=1), 250)
    train = batches(*args.train_data, 128, seed=0)
    test_fn = make_eval_fn(test, "accuracy")
    example = test[0][0][:2]
    dense = {"variant": "original", "accuracy": test_fn(original), "macs": prunekit.count(original, example).macs}
    print(f"[{time.time() - t_start:6.1f}s] original: {dense}", flush=True)
    rows = []
    for name, blocks in (("width", 0), (f"depth ({args.blocks} blocks) + width", args.blocks)):
        rows.append(variant(original, name, blocks, train, test_fn, example, args))
        print(f"[{time.time() - t_start:6.1f}s] {rows[-1]}", flush=True)
    out = {
        "model": "CIFAR ResNet-56 (Idelbayev)",
        "data": "JPEG CIFAR-10",
        "train_images": args.train,
        "test_images": args.test,
        "target": args.target,
        "epochs": args.epochs,
        "lr": args.lr,
        "original": dense,
        "rows": rows,
        "seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(out))
    return out


def table(out: dict) -> str:
    lines = [
        f"original: {out['original']['accuracy']:.2%} on {out['test_images']} test images",
        "",
        "| variant | MACs removed | blocks removed | params | accuracy pruned | + BN re-estimation | "
        f"+ {out['epochs']} epoch fine-tune |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['variant']} | {r['macs_reduction']:.1%} | {len(r['blocks_removed'])} | "
            f"{r['params'] / 1e3:.0f} k | {r['accuracy_pruned']:.2%} | {r['accuracy_bn']:.2%} | "
            f"{r['accuracy_finetuned']:.2%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
