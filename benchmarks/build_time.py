"""Group-building time for every torchvision classification model, side by side with
Torch-Pruning's dependency graph when it is installed (``pip install torch-pruning``).

Both are timed in the same process on the same model and input, alternating, best of
``--repeat`` runs each, so the ratio is fair even on a noisy machine. Results go to
``benchmarks/results/build_time.json``; reruns skip finished models (``--force`` redoes).

Usage:
    python benchmarks/build_time.py [--repeat 3] [--no-baseline] [--out FILE] [models ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "build_time.json"


def run_one(name: str, repeat: int, baseline: bool = True) -> dict:
    import torch
    import torchvision

    import prunekit

    torch.set_num_threads(2)
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(init_weights=True, aux_logits=name == "inception_v3")
    model = torchvision.models.get_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 299 if name == "inception_v3" else 224, 224 if name != "inception_v3" else 299)
    row = {"model": name}
    ours, ours_cpu, theirs = [], [], []
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    if not baseline:
        tp = None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        p = prunekit.Pruner(model, x)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        if tp is not None:
            try:
                t = time.perf_counter()
                tp.DependencyGraph().build_dependency(model, example_inputs=x)
                theirs.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001
                row["tp_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    row["prunekit_s"] = min(ours)
    # prunekit's tracing is single-threaded: its CPU time is what the wall time is on an idle machine
    row["prunekit_cpu_s"] = min(ours_cpu)
    row["trace_mode"] = p.tracer.mode
    row["prunable"] = len(p.prunable_groups)
    if theirs:
        row["torch_pruning_s"] = min(theirs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="do not time torch-pruning next to prunekit"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.repeat, args.baseline)))
        return 0
    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    out = args.out
    results = json.loads(out.read_text()) if out.exists() else {}
    for i, name in enumerate(names):
        if name in results and not args.force:
            continue
        extra = [] if args.baseline else ["--no-baseline"]
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--repeat", str(args.repeat), *extra],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        results[name] = json.loads(line[-1][4:]) if line else {"model": name, "error": proc.stderr[-300:]}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
        r = results[name]
        print(
            f"[{i + 1}/{len(names)}] {name}: prunekit {r.get('prunekit_s', float('nan')):.3f}s "
            f"torch-pruning {r.get('torch_pruning_s', float('nan')):.3f}s",
            flush=True,
        )
    rows = [r for r in results.values() if "prunekit_s" in r]
    ours = [r["prunekit_s"] for r in rows]
    theirs = [r["torch_pruning_s"] for r in rows if "torch_pruning_s" in r]
    print(
        f"\n{len(rows)} models. prunekit median {statistics.median(ours):.3f} s, max {max(ours):.2f} s "
        f"({max(rows, key=lambda r: r['prunekit_s'])['model']})"
    )
    cpu = [r["prunekit_cpu_s"] for r in rows if "prunekit_cpu_s" in r]
    if cpu:
        print(
            f"prunekit CPU time (single thread): median {statistics.median(cpu):.3f} s, max {max(cpu):.2f} s "
            f"({max((r for r in rows if 'prunekit_cpu_s' in r), key=lambda r: r['prunekit_cpu_s'])['model']})"
        )
    if theirs:
        ratios = [r["torch_pruning_s"] / r["prunekit_s"] for r in rows if "torch_pruning_s" in r]
        print(
            f"torch-pruning median {statistics.median(theirs):.3f} s on {len(theirs)} models; "
            f"median speed ratio (torch-pruning / prunekit) {statistics.median(ratios):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
