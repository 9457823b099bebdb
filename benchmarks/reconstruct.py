"""Least-squares reconstruction right after pruning: the pretrained CIFAR ResNets, with and without the refit.

For each depth and MACs target, one ana-guided allocation (the ``cifar10.py`` benchmark's cached ana) is applied
three ways, side by side in one run: ``plain`` (BatchNorm re-estimated), ``compensate`` (FLAP's bias
compensation, then BatchNorm) and ``reconstruct`` (every layer after the pruned channels refit by least squares
to the unpruned model's outputs, then BatchNorm). Reported: validation and test accuracy with no fine-tuning,
the reconstruction's mean relative output error before -> after, and the seconds of each ``prune``. Calibration:
the first ``--calibrate-batches`` training batches (augmented, seeded), the same for every variant.

Needs ``../shared/data`` (skips with a message without it); reuses ``benchmarks/cifar10.py``'s data and ana.

Usage:
    python benchmarks/reconstruct.py --depth 20 --ratios 0.5 0.7 --scratch /tmp/cifar10 --work /tmp/bench/c10work
Writes ``benchmarks/results/reconstruct.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10 as C  # noqa: E402  (the shared data, models and ana of the CIFAR benchmark)

import prunekit  # noqa: E402
from prunekit.utils.files import atomic_write  # noqa: E402
from prunekit.workflow.evaluation import make_bn_calibration  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reconstruct.json"
VARIANTS = ("plain", "compensate", "reconstruct")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, nargs="+", default=[20], choices=[20, 32, 44, 56])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/prunekit-cifar10"))
    p.add_argument("--work", type=Path, default=Path("/tmp/prunekit-cifar10-work"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--bench-args", default="--epochs 10 --train-subset 10000 --val-batches 10",
                   help="cifar10.py settings whose cached ana to reuse")  # fmt: skip
    return p.parse_args(argv)


def one(b: C.Bench, base, sens, ratio: float, variant: str) -> dict:
    """Prune a copy of ``base`` to ``ratio`` with ``variant``; accuracy without fine-tuning."""
    n = b.args.calibrate_batches
    torch.manual_seed(0)
    calibration = list(itertools.islice(b.train, n))
    torch.manual_seed(0)
    notes: list[str] = []
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    extra = {} if variant == "plain" else {variant: True, "calibration": calibration}
    res = prunekit.prune(
        model,
        b.x,
        removal_ratio=ratio,
        sensitivity=sens,
        calibrate=make_bn_calibration(b.train, max_batches=n),
        log=notes.append,
        **extra,
    )
    seconds = time.perf_counter() - t0
    slim = prunekit.to_slim(model).eval()
    line = next((x for x in notes if x.startswith("reconstruction:")), "")
    return {
        "val_acc": float(b.val_fn(slim)),
        "test_acc": float(b.test_fn(slim)),
        "macs_reduction": 1 - res.macs_after / res.macs_before,
        "seconds": round(seconds, 1),
        "note": line,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = C.data_root(args.scratch)
    if root is None or not C.WEIGHTS.is_dir():
        print(f"skipped: the JPEG CIFAR-10 ({C.TARBALL}) or the pretrained weights ({C.WEIGHTS}) are not there")
        return 0
    bargs = C.parse_args([*args.bench_args.split(), "--scratch", str(args.scratch), "--work", str(args.work)])
    torch.set_num_threads(args.threads or torch.get_num_threads())
    b = C.build_bench(bargs, root)
    rows = []
    for depth in args.depth:
        base, b.depth = C.pretrained(depth), depth
        sens, _ = C.shared_ana(b, base)
        for ratio in args.ratios:
            for variant in VARIANTS:
                r = {"depth": depth, "ratio": ratio, "variant": variant, **one(b, base, sens, ratio, variant)}
                rows.append(r)
                print(
                    f"ResNet-{depth} -{ratio:.0%} {variant}: val {r['val_acc']:.4f}, test {r['test_acc']:.4f}, "
                    f"{r['seconds']} s {r['note']}",
                    flush=True,
                )
                atomic_write(args.out, json.dumps({"settings": b.settings, "rows": rows}, indent=1))
    print("\n| ResNet | MACs - | variant | val acc | test acc | prune s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['depth']} | {r['macs_reduction']:.1%} | {r['variant']} | {r['val_acc']:.2%} | "
            f"{r['test_acc']:.2%} | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
