"""Allocation benchmark: sensitivity-guided (ana) vs uniform vs global-L2 per-group ratios.

A DemoNet (small ResNet-style CNN) is trained on scikit-learn's digits (bundled, no
download), split train/val/test with a fixed seed. ``ana`` measures each channel group's
sensitivity on the validation split (accuracy); then the trained model is pruned to 30/50/70%
MACs reduction three ways, all with the L2 criterion within a group:

- ``sensitivity``: per-group ratios from the ana curves (``prune(..., sensitivity=...)``),
- ``search``: the same, plus ``prune(..., search=N, eval_fn=...)``: the computed allocation and
  N variants of it at the same MACs are evaluated on the validation split and the best kept
  (in the second table each candidate is BatchNorm-calibrated before it is evaluated),
- ``uniform``: one ratio for every group,
- ``global``: one L2-score threshold across groups (scores normalised per group),

and the *test* accuracy right after pruning (no fine-tuning) is reported side by side, with
the achieved (measured) MACs reduction and the analysis cost (evaluations, wall time).

A second, separately labelled table re-estimates the BatchNorm statistics of each pruned
model on the training split (forward passes only, no gradient step, no weight changes)
before the same test evaluation: without it, a pruned BatchNorm network is mostly hurt by
shifted activation statistics that no allocation predicts, which hides the allocation's effect.

CIFAR-10 and Fashion-MNIST are used too when ``../shared/data/`` holds them in torchvision's
layout (nothing is downloaded); otherwise they are skipped with a message.

Usage:
    python benchmarks/allocation.py                       # digits, seeds 0-4
    python benchmarks/allocation.py --seeds 0 --epochs 10
Writes ``benchmarks/results/allocation.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from prunekit.models.demo import DemoNet
from prunekit.workflow.ana import DEFAULT_RATIOS
from prunekit.workflow.evaluation import make_bn_calibration, make_eval_fn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocation.json"
SHARED_DATA = HERE.parent.parent / "shared" / "data"
METHODS = ("sensitivity", "search", "uniform", "global")


# ----- data ------------------------------------------------------------------------------
def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def split(x: torch.Tensor, y: torch.Tensor, seed: int, batch: int = 256):
    """60% train, 20% validation (for ana), 20% test (for the reported accuracy)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = n_test = len(x) // 5
    va, te, tr = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    return (x[tr], y[tr]), batches(x[va], y[va], batch), batches(x[te], y[te], batch)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    return (x - x.mean()) / x.std(), torch.tensor(d.target, dtype=torch.long)


def load_torchvision(name: str, limit: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The training split of CIFAR-10 / Fashion-MNIST from ../shared/data, or why not."""
    import torchvision

    cls, folder = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "fashion_mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST"),
    }[name]
    if not (SHARED_DATA / folder).exists():
        return f"{SHARED_DATA / folder} not found (nothing is downloaded)"
    try:
        ds = cls(str(SHARED_DATA), train=True, download=False)
    except (RuntimeError, OSError) as exc:
        return f"cannot read it from {SHARED_DATA}: {exc}"
    data = torch.as_tensor(ds.data[:limit])
    x = data.permute(0, 3, 1, 2).float() / 255 if data.dim() == 4 else data.unsqueeze(1).float() / 255
    y = torch.as_tensor(ds.targets[:limit], dtype=torch.long)
    return (x - x.mean()) / x.std(), y


# ----- training --------------------------------------------------------------------------
def train(model, x, y, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


# ----- one model ---------------------------------------------------------------------------
def run_one(name: str, x, y, seed: int, args) -> dict:
    (xtr, ytr), val, test = split(x, y, seed)
    torch.manual_seed(seed)
    model = DemoNet(in_channels=x.shape[1], num_classes=10, width=args.width, blocks=args.blocks)
    t0 = time.perf_counter()
    train(model, xtr, ytr, args.epochs, seed)
    train_s = time.perf_counter() - t0
    x1 = x[:1]
    val_acc = make_eval_fn(val, "accuracy")
    # BatchNorm statistics re-estimated on the training split (forward passes only, no weight change)
    bn_calibrate = make_bn_calibration(batches(xtr, ytr, 256))
    test_acc = make_eval_fn(test, "accuracy")
    calls = [0]

    def counted(m):
        calls[0] += 1
        return val_acc(m)

    with tempfile.TemporaryDirectory() as ws:
        t0 = time.perf_counter()
        sens = prunekit.ana(
            model,
            x1,
            counted,
            workspace=ws,
            ratios=args.ana_ratios,
            criterion="l2",
            collapse=args.collapse,
            progress=False,
            log=lambda m: None,
        )
        ana_s = time.perf_counter() - t0
    row = {
        "dataset": name,
        "seed": seed,
        "train_seconds": round(train_s, 2),
        "baseline": {"val": val_acc(model), "test": test_acc(model)},
        "ana": {
            "evaluations": calls[0],
            "seconds": round(ana_s, 2),
            "groups": len(sens.curves),
            "ratios": sens.ratios,
            "val_samples": sum(len(b[1]) for b in val),
        },
        "points": [],
    }
    for R in args.targets:
        for method in METHODS:
            guided = method in ("sensitivity", "search")
            kw = {"search": args.search, "eval_fn": val_acc, "seed": seed} if method == "search" else {}
            t0 = time.perf_counter()
            res = prunekit.prune(
                copy.deepcopy(model),
                x1,
                removal_ratio=R,
                criterion="l2",
                sensitivity=sens if guided else None,
                fallback="uniform" if guided else method,
                log=lambda m: None,
                **kw,
            )
            seconds = time.perf_counter() - t0
            assert res.method == ("sensitivity" if guided else method), f"asked for {method}, got {res.method}"
            point = {
                "target": R,
                "method": method,
                "macs_reduction": res.macs_reduction,
                "test": test_acc(res.model),
                "val": val_acc(res.model),
                "predicted_loss": res.predicted_loss,
                "prune_seconds": round(seconds, 2),
                "ratios": {str(g): round(r, 3) for g, r in sorted(res.ratios.items())},
            }
            if args.bn:
                if method == "search":  # candidates compared after calibration, as they will be used
                    res = prunekit.prune(
                        copy.deepcopy(model),
                        x1,
                        removal_ratio=R,
                        criterion="l2",
                        sensitivity=sens,
                        calibrate=bn_calibrate,
                        log=lambda m: None,
                        **kw,
                    )
                    point["macs_reduction_bn"] = res.macs_reduction
                bn_calibrate(res.model)  # idempotent for the search result: the same batches again
                point["test_bn"] = test_acc(res.model)
            row["points"].append(point)
    return row


# ----- report ------------------------------------------------------------------------------
def summarise(rows: list[dict], targets: list[float], key: str = "test") -> tuple[str, dict]:
    lines, summary = [], {}
    what = (
        "test accuracy right after pruning (no fine-tuning)"
        if key == "test"
        else "test accuracy after pruning + BatchNorm statistics re-estimated (no gradient step)"
    )
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        seeds = [r["seed"] for r in mine]
        base = statistics.mean(r["baseline"]["test"] for r in mine)
        evals = statistics.mean(r["ana"]["evaluations"] for r in mine)
        secs = statistics.mean(r["ana"]["seconds"] for r in mine)
        lines.append(f"{name}: DemoNet, seeds {seeds}; {what}, mean over seeds (min..max); baseline {base:.2%}")
        lines.append(
            f"  ana on the validation split: {evals:.0f} evaluations, {secs:.1f} s per model "
            f"({mine[0]['ana']['groups']} groups x {len(mine[0]['ana']['ratios'])} ratios, "
            f"{mine[0]['ana']['val_samples']} images)"
        )
        head = f"  {'MACs -':>6}  " + "  ".join(f"{m:>22}" for m in METHODS) + "  best        wins (seeds)"
        lines += [head, "  " + "-" * (len(head) - 2)]
        summary[name] = {"baseline_test": base, "ana_evaluations": evals, "ana_seconds": secs, "targets": {}}
        for R in targets:
            cells, means = [], {}
            for m in METHODS:
                pts = [p for r in mine for p in r["points"] if p["target"] == R and p["method"] == m]
                accs = [p[key] for p in pts]
                means[m] = statistics.mean(accs)
                red = statistics.mean(p["macs_reduction"] for p in pts)
                cells.append(f"{means[m]:>7.2%} ({min(accs):.1%}..{max(accs):.1%}) {red:>4.0%}")
            best = max(means, key=means.get)
            short = {"sensitivity": "sens", "search": "srch", "uniform": "u", "global": "g"}
            wins = {
                f"{short[a]}>{short[b]}": sum(1 for r in mine if _acc(r, R, a, key) > _acc(r, R, b, key))
                for a in ("sensitivity", "search")
                for b in ("uniform", "global")
            }
            beats = " ".join(f"{k}:{v}/{len(mine)}" for k, v in wins.items())
            lines.append(f"  {R:>6.0%}  " + "  ".join(f"{c:>22}" for c in cells) + f"  {best:<11} {beats}")
            summary[name]["targets"][str(R)] = {
                "mean_test": means,
                "best": best,
                "wins_per_seed": wins,
                "seeds": len(mine),
            }
        lines.append(
            "  cells: mean test accuracy (min..max over seeds), achieved MACs reduction (mean); "
            "wins: seeds where sens(itivity) / s(ea)rch beats u(niform) / g(lobal)"
        )
    return "\n".join(lines), summary


def _acc(row: dict, R: float, method: str, key: str) -> float:
    return next(p[key] for p in row["points"] if p["target"] == R and p["method"] == method)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of the digits model")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="MACs reductions")
    ap.add_argument("--ana-ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    ap.add_argument("--collapse", type=float, default=0.5, help="ana's early stop (relative loss); -1: never")
    ap.add_argument("--datasets", nargs="+", default=["digits", "cifar10", "fashion_mnist"])
    ap.add_argument("--limit", type=int, default=10000, help="images used from CIFAR-10 / Fashion-MNIST")
    ap.add_argument(
        "--no-bn",
        dest="bn",
        action="store_false",
        help="skip the second table (BatchNorm statistics re-estimated after pruning)",
    )
    ap.add_argument("--search", type=int, default=8, help="variants evaluated by the 'search' method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.collapse < 0:
        args.collapse = None
    torch.set_num_threads(args.threads)
    rows = []
    t_all = time.perf_counter()
    for name in args.datasets:
        if name == "digits":
            data = load_digits()
        elif name in ("cifar10", "fashion_mnist"):
            data = load_torchvision(name, args.limit)
            if isinstance(data, str):
                print(f"skipping {name}: {data}", file=sys.stderr)
                continue
        else:
            raise SystemExit(f"unknown dataset {name!r}; choose from digits, cifar10, fashion_mnist")
        for seed in args.seeds:
            t0 = time.perf_counter()
            rows.append(run_one(name, *data, seed, args))
            print(f"{name} seed {seed}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if not rows:
        print("no data set available", file=sys.stderr)
        return 1
    table, summary = summarise(rows, args.targets)
    print(table)
    if args.bn:
        table_bn, summary["bn_recalibrated"] = summarise(rows, args.targets, "test_bn")
        print("\n" + table_bn)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "command": "python benchmarks/allocation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "epochs": args.epochs,
        "width": args.width,
        "blocks": args.blocks,
        "collapse": args.collapse,
        "seconds": round(time.perf_counter() - t_all, 1),
        "summary": summary,
        "runs": rows,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
