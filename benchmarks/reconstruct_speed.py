"""Speed of the least-squares reconstruction: dense targets cached across layers against one dense pass per layer.

``prunekit.engine.reconstruct.reconstruct`` refits every layer whose inputs lost channels. The unpruned model's
outputs (the targets) do not depend on the refits, so with ``cache_bytes`` > 0 one dense forward per batch captures
the targets of as many consecutive layers as the budget holds; ``cache_bytes=0`` runs one dense forward per layer
and batch (the behaviour before the cache). This times both, interleaved, on the same pruned CIFAR ResNet-20 and
the same calibration batches, and checks that they give the same weights.

Model and data: a CIFAR ResNet-20 with random weights (BatchNorm statistics calibrated on the batches), pruned
to ``--ratio`` fewer MACs by ``prunekit.prune`` (L2; no ana), ``--batches`` random batches of ``--batch-size``
32x32 images. No shared data needed: the time depends on the shapes, not on the weights.

Usage:
    python benchmarks/reconstruct_speed.py --threads 1 --repeats 2
Writes ``benchmarks/results/reconstruct_speed.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.engine.reconstruct import reconstruct
from prunekit.engine.sparse import apply_plan
from prunekit.models.cifar_resnet import cifar_resnet
from prunekit.utils.files import atomic_write
from prunekit.utils.text import table
from prunekit.workflow.evaluation import make_bn_calibration

RESULTS = Path(__file__).resolve().parent / "results" / "reconstruct_speed.json"
DEFAULT_CACHE = 512 * 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.5, help="MACs reduction")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    """The dense model, its pruning plan and the calibration batches (seeded)."""
    torch.manual_seed(0)
    dense = cifar_resnet(args.depth)
    batches = [torch.randn(args.batch_size, 3, 32, 32) for _ in range(args.batches)]
    make_bn_calibration(batches)(dense)
    dense.eval()
    res = prunekit.prune(copy.deepcopy(dense), batches[0][:2], removal_ratio=args.ratio, log=lambda m: None)
    return dense, res.plan, res.macs_reduction, batches


def timed(dense, plan, batches, cache_bytes: int) -> tuple[float, int, torch.nn.Module, int]:
    """Seconds of one reconstruction, the dense forwards it ran, the refit model and the layers refit."""
    model = apply_plan(copy.deepcopy(dense), plan)
    passes: list[int] = []
    h = dense.register_forward_pre_hook(lambda m, a: passes.append(1))
    try:
        t = time.perf_counter()
        report = reconstruct(dense, model, plan, batches, cache_bytes=cache_bytes)
        seconds = time.perf_counter() - t
    finally:
        h.remove()
    return seconds, len(passes), model, len(report.layers)


def max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, plan, reduction, batches = setup(args)
    runs: dict[str, list[float]] = {"per layer (cache_bytes=0)": [], "cached (512 MiB)": []}
    info: dict[str, dict] = {}
    models = {}
    for rep in range(args.repeats):
        for name, cache in zip(runs, (0, DEFAULT_CACHE), strict=True):
            seconds, passes, model, layers = timed(dense, plan, batches, cache)
            runs[name].append(round(seconds, 2))
            info[name] = {"dense_passes": passes, "layers": layers}
            models[name] = model
            print(f"repeat {rep + 1}: {name}: {seconds:.2f} s, {passes} dense forwards", flush=True)
    gap = max_weight_gap(*models.values())
    rows = [
        [name, " / ".join(f"{s:.2f}" for s in secs), info[name]["dense_passes"], info[name]["layers"]]
        for name, secs in runs.items()
    ]
    first, second = (min(s) for s in runs.values())
    print(f"ResNet-{args.depth}, {reduction:.1%} fewer MACs, {args.batches} batches of {args.batch_size}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(table(rows, ["variant", "seconds (repeats)", "dense forwards", "layers refit"]))
    print(f"speed-up (best of each): {first / second:.2f}x; max |weight difference|: {gap:.3g}")
    out = {
        "settings": vars(args) | {"out": str(args.out)},
        "macs_reduction": reduction,
        "seconds": runs,
        "info": info,
        "speedup": round(first / second, 3),
        "max_weight_difference": gap,
    }
    atomic_write(args.out, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
