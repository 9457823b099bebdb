"""How far the fast analysis's curves are from the full analysis's, on the same validation images.

Reads the full curves that ``benchmarks/ana_cost.py`` stored (``--reference``), runs the fast
analysis again with each ``FastAnaConfig`` variant on the same validation subset (same model, same
seed, same images), and reports the error of the fast points against the full ones: the mean
(bias; negative: the fast curve is lower) and the RMS, in points of accuracy, over the points whose
full value is above 60% of the baseline (past that a group has collapsed and its value does not
steer the allocation), split by how each point was obtained (``early_stop``, ``interpolated``,
``full``). It also allocates -50% MACs from each variant's curves and from the full ones and reports
how far apart the two allocations are (the summed and the largest per-group ratio difference). Only
validation images are used: nothing here looks at the test split.

Usage:
    python benchmarks/fast_ana_error.py --model resnet20 --reference benchmarks/results/ana_cost_d20_iso.json
    python benchmarks/fast_ana_error.py --model resnet56 --reference benchmarks/results/ana_cost_d56_iso.json \\
        --variants default rel0 tol03_rel0
Writes ``benchmarks/results/fast_ana_error_<model>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import prunekit
from prunekit.workflow.evaluation import make_eval_fn
from prunekit.workflow.options import FastAnaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ana_cost  # noqa: E402  (the same models, subsets and batches)

VARIANTS = {
    "default": {},
    "rel0": dict(rel_tolerance=0.0),
    "rel0.1": dict(rel_tolerance=0.1),
    "tol03_rel0": dict(tolerance=0.03, rel_tolerance=0.0),
    "tol03_rel0_stride3": dict(tolerance=0.03, rel_tolerance=0.0, stride=3),
    "noadapt": dict(adaptive=False),
    "itol01": dict(interp_tolerance=0.01),
    "tol015": dict(tolerance=0.015),
}


def allocation(model, example, sens: prunekit.Sensitivity) -> dict[int, float]:
    """The per-group ratios ``prune`` allocates at -50% MACs from ``sens`` (L2, as ``ana_cost.py``)."""
    res = prunekit.prune(
        copy.deepcopy(model), example, removal_ratio=0.5, sensitivity=sens, criterion="l2", log=lambda m: None
    )
    return res.ratios


def distance(a: dict[int, float], b: dict[int, float]) -> dict:
    """Summed and largest per-group ratio difference of two allocations."""
    d = [abs(a.get(g, 0.0) - b.get(g, 0.0)) for g in set(a) | set(b)]
    return {"alloc_l1": round(sum(d), 3), "alloc_max": round(max(d, default=0.0), 3)}


def errors(sens: prunekit.Sensitivity, full: dict) -> dict:
    """Bias and RMS (points) of the fast points against the full curves, in all and by ``how``."""
    by_how: dict[str, list[float]] = {}
    for g, curve in sens.curves.items():
        for r, v in curve.items():
            ref = full[str(g)][str(r)]
            if ref > 0.6 * sens.baseline:
                how = sens.details.get(g, {}).get(r, {}).get("how", "full")
                by_how.setdefault(how, []).append(100 * (v - ref))

    def stats(d: list[float]) -> dict:
        return {
            "points": len(d),
            "bias": round(statistics.mean(d), 2),
            "rms": round(math.sqrt(statistics.mean(x * x for x in d)), 2),
        }

    everything = [x for d in by_how.values() for x in d]
    return {**stats(everything), "by_how": {h: stats(d) for h, d in sorted(by_how.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    ap.add_argument("--reference", type=Path, required=True, help="an ana_cost.py JSON with this model's full curves")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = ana_cost.cifar_folder()
    if isinstance(root, str):
        print(f"skipping: {root}", file=sys.stderr)
        return 1
    rows = [r for r in json.loads(args.reference.read_text())["rows"] if r["model"] == args.model]
    if not rows:
        raise SystemExit(
            f"{args.reference} holds no {args.model} row: run benchmarks/ana_cost.py --models {args.model}"
        )
    ref = rows[0]
    model, example, val, _, _ = ana_cost.build(args.model, root, ref["sizes"], 0)
    val_b = ana_cost.batches(*val, ref["sizes"]["batch"])
    curves = {int(g): {float(r): v for r, v in c.items()} for g, c in ref["full"]["curves"].items()}
    ratios = sorted({r for c in curves.values() for r in c})
    full_alloc = allocation(model, example, prunekit.Sensitivity(ref["full"]["baseline_val"], False, ratios, curves))
    out = {"model": args.model, "reference": str(args.reference), "full_images": ref["full"]["images"], "variants": {}}
    print(
        f"{'variant':<20} {'images':>8} {'wall s':>7} {'bias':>6} {'RMS':>5} {'alloc L1':>8} {'max':>5}  "
        "by how (points, bias, RMS)"
    )
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            sens = prunekit.ana(
                model,
                example,
                make_eval_fn(val_b, "accuracy"),
                workspace=tmp,
                criterion="l2",
                collapse=0.5,
                fast=FastAnaConfig(**VARIANTS[name]),
                progress=False,
                log=lambda m: None,
            )
            wall = round(time.perf_counter() - t0, 1)
        e = errors(sens, ref["full"]["curves"])
        a = distance(allocation(model, example, sens), full_alloc)
        out["variants"][name] = {"settings": VARIANTS[name], "images": sens.cost["images"], "wall_s": wall, **e, **a}
        how = ", ".join(f"{h} {s['points']} {s['bias']:+.2f} {s['rms']:.2f}" for h, s in e["by_how"].items())
        print(
            f"{name:<20} {sens.cost['images']:>8} {wall:>7} {e['bias']:>+6.2f} {e['rms']:>5.2f} "
            f"{a['alloc_l1']:>8.3f} {a['alloc_max']:>5.3f}  {how}",
            flush=True,
        )
    dest = args.out or Path(__file__).resolve().parent / "results" / f"fast_ana_error_{args.model}.json"
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(dest)
    print(f"wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
