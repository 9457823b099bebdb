"""YOLO pruning: prunekit and Torch-Pruning 1.6.1 on YOLOv8n/s and YOLO11n/s, -30% and -50% MACs.

Each model comes from its Ultralytics YAML (random weights, 80 classes), gets BatchNorm statistics
from one batch of random images (healthy output scales, so the equivalence check is not vacuous) and
one eval forward pass (the ``Detect`` head caches its anchors, as in every trained model), and runs in
``export_mode`` (the heads return their decoded predictions, as in the ONNX files). Then, at 30% and 50%
fewer MACs (``--imgsz``, default 320):

- **prunekit**: ``prunekit.workflow.prune.prune(model, x, removal_ratio=r, round_to=8)`` (uniform
  allocation, L2), then ``checked_slim``; "equiv. err" is ``max|slim - sparse| / (1 + max|sparse|)`` on
  the predictions (``tests/integrations/test_ultralytics.py`` also checks the raw head outputs).
- **Torch-Pruning 1.6.1** as its README shows a new user: ``tp.pruner.MetaPruner(model, x,
  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=p, ignored_layers=[detect_head],
  round_to=8).step()``, ``p`` bisected until the measured MACs are within 1 point of the target. Each
  attempt runs in a subprocess with a time and memory limit (``--tp-timeout``, ``--tp-memory-gb``);
  "equiv. err" compares its pruned model with the original whose removed channels are zeroed.

Every slim model that works is exported to ONNX (checked against PyTorch) and timed together with the
original in ONNX Runtime on the CPU, 1 thread, batch 1 and 8 (:func:`prunekit.deploy.bench.bench`,
interleaved; "speed-up" = median of paired ``time(original) / time(slim)``, "CPU" the same from process
CPU time, which other processes on the machine do not inflate). One subprocess per model; results in
``benchmarks/results/yolo.json`` after each model, a rerun skips models done with the same settings.

Usage:
    pip install ultralytics torch-pruning==1.6.1
    YOLO_OFFLINE=1 python benchmarks/yolo.py                  # the four models
    python benchmarks/yolo.py --models yolov8n --imgsz 640    # one model at 640
    python benchmarks/yolo.py --table                         # the markdown table of saved results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "yolo.json"
MODELS = ["yolov8n", "yolov8s", "yolo11n", "yolo11s"]
TARGETS = (0.3, 0.5)
ROUND_TO = 8
TARGET_SPEEDUP = 1.5  # ONNX Runtime latency ratio wanted at -50% MACs


def build(name: str, imgsz: int, seed: int = 0):
    """The calibrated model after one eval forward, and its example input."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from prunekit.integrations.ultralytics import export_mode

    torch.manual_seed(seed)
    net = DetectionModel(f"{name}.yaml", verbose=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed + 1)))
    for m in bns:
        m.momentum = 0.03
    x = torch.randn(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        net.eval()(x)
    export_mode(net)  # the deployed outputs (decoded predictions), as ONNX runs it
    return net, x


# ----- prunekit ------------------------------------------------------------------------------------


def prunekit_row(net, x, target: float) -> tuple[dict, object]:
    import copy

    import prunekit
    from prunekit.engine.equivalence import checked_slim
    from prunekit.workflow.prune import prune

    model = copy.deepcopy(net)
    t0 = time.perf_counter()
    try:
        res = prune(model, x, removal_ratio=target, round_to=ROUND_TO, mode="sparse", log=lambda s: None)
        slim, err = checked_slim(model, x)
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        return {
            "tool": "prunekit",
            "target": target,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
            "seconds": time.perf_counter() - t0,
        }, None
    after = prunekit.count(slim, x)
    return {
        "tool": "prunekit",
        "target": target,
        "ok": True,
        "equiv_err": err,
        "macs_after": after.macs,
        "params_after": after.params,
        "macs_reduction": res.macs_reduction,
        "seconds": time.perf_counter() - t0,
        "pruned_groups": len(res.plan.meta.get("groups", {})),
    }, slim


# ----- Torch-Pruning (in a subprocess: it may crash, hang or take all memory) ----------------------


def tp_prune(net, x, ratio: float):
    """Torch-Pruning 1.6.1 as its README shows; returns the pruned model and the removed output channels."""
    import torch_pruning as tp

    for p in net.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(
        net,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[net.model[-1]],
        round_to=ROUND_TO,
    )
    names = {id(m): n for n, m in net.named_modules()}
    removed: dict[str, list[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            mod = dep.target.module
            if dep.handler.__name__ == "prune_out_channels" and id(mod) in names:
                removed.setdefault(names[id(mod)], sorted(int(i) for i in idxs))
        group.prune()
    return net, removed


def zeroed(net, removed: dict[str, list[int]]):
    """The original model with the output channels Torch-Pruning removed held at zero (its sparse twin)."""
    import copy

    import torch

    ref = copy.deepcopy(net)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, idx in removed.items():
            m = mods[name]
            i = torch.tensor(idx)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[i] = 0
                m.bias[i] = 0
            elif isinstance(m, torch.nn.Conv2d):
                m.weight[i] = 0
                if m.bias is not None:
                    m.bias[i] = 0
    return ref


def tp_worker(name: str, imgsz: int, target: float, out: Path) -> None:
    """Bisect Torch-Pruning's pruning_ratio to the MACs target; write the result (and model) to ``out``."""
    import copy

    import torch
    import torch_pruning as tp

    import prunekit

    net, x = build(name, imgsz)
    base = prunekit.count(net, x).macs
    lo, hi, best = 0.0, 0.9, None
    for _ in range(6):
        ratio = (lo + hi) / 2 if best is not None else target  # first guess: the MACs target itself
        model, removed = tp_prune(copy.deepcopy(net), x, ratio)
        macs, params = tp.utils.count_ops_and_params(model, x)
        reduction = 1 - prunekit.count(model, x).macs / base
        if best is None or abs(reduction - target) < abs(best[1] - target):
            best = (ratio, reduction, model, removed, params)
        if abs(reduction - target) <= 0.01:
            break
        lo, hi = (ratio, hi) if reduction < target else (lo, ratio)
    ratio, reduction, model, removed, params = best
    model.eval()
    with torch.no_grad():
        err = prunekit.max_error(zeroed(net, removed).eval()(x), model(x))
    torch.save(model, out.with_suffix(".pt"))
    after = prunekit.count(model, x)
    out.write_text(
        json.dumps(
            {
                "ok": True,
                "pruning_ratio": ratio,
                "macs_reduction": reduction,
                "equiv_err": err,
                "macs_after": after.macs,
                "params_after": after.params,
            }
        )
    )


def tp_row(name: str, imgsz: int, target: float, args, tmp: Path) -> tuple[dict, object]:
    import torch

    out = tmp / f"tp_{name}_{target}.json"
    cmd = [
        sys.executable,
        __file__,
        "--tp-worker",
        name,
        "--imgsz",
        str(imgsz),
        "--target",
        str(target),
        "--tp-out",
        str(out),
    ]
    t0 = time.perf_counter()
    limit = int(args.tp_memory_gb * 2**30)

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    row = {"tool": "torch-pruning 1.6.1", "target": target}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tp_timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {
            **row,
            "ok": False,
            "error": f"no result after {args.tp_timeout} s (killed)",
            "seconds": time.perf_counter() - t0,
        }, None
    row["seconds"] = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if proc.returncode < 0 or "MemoryError" in last:
            last += f" (memory limit {args.tp_memory_gb} GB)" if "Memory" in last else f" (signal {-proc.returncode})"
        return {**row, "ok": False, "error": last[:300]}, None
    return {**row, **json.loads(out.read_text())}, torch.load(out.with_suffix(".pt"), weights_only=False)


# ----- one model -----------------------------------------------------------------------------------


def run_model(name: str, args) -> dict:
    import torch

    import prunekit
    from prunekit.deploy.bench import bench

    torch.set_num_threads(args.threads)
    net, x = build(name, args.imgsz)
    base = prunekit.count(net, x)
    rows, timed = [], {"original": net}
    with tempfile.TemporaryDirectory(prefix="yolo-bench-") as tmp:
        tp_stuck = None  # a Torch-Pruning attempt killed for time or memory is not repeated at the next target
        for target in TARGETS:
            for tool in ("prunekit", "tp"):
                print(f"{name} -{target:.0%} {tool} ...", flush=True)
                if tool == "tp" and tp_stuck:
                    row, model = (
                        {
                            "tool": "torch-pruning 1.6.1",
                            "target": target,
                            "ok": False,
                            "error": f"not retried: {tp_stuck}",
                        },
                        None,
                    )
                elif tool == "prunekit":
                    row, model = prunekit_row(net, x, target)
                else:
                    row, model = tp_row(name, args.imgsz, target, args, Path(tmp))
                    if not row["ok"] and ("killed" in row["error"] or "memory" in row["error"].lower()):
                        tp_stuck = f"at -{target:.0%}: {row['error']}"
                rows.append(row)
                print(f"  {row}", flush=True)
                if model is not None:
                    timed[f"{row['tool']} -{target:.0%}"] = model.eval()
        lat = bench(
            timed,
            lambda b: torch.randn(b, 3, args.imgsz, args.imgsz),
            batch_sizes=args.batch_sizes,
            backends=["onnxruntime"],
            threads=1,
            repeats=args.repeats,
            warmup=2,
            devices=["cpu"],
            time_budget=args.time_budget,
            out=None,
        )
    for row in rows:
        key = f"{row['tool']} -{row['target']:.0%}"
        for r in lat:
            if r["model"] == key:
                row[f"ort_speedup_b{r['batch']}"] = r["speedup"]
                row[f"ort_cpu_speedup_b{r['batch']}"] = r["cpu_speedup"]
                row[f"ort_ms_b{r['batch']}"] = r["median_ms"]
    orig_ms = {f"ort_ms_b{r['batch']}": r["median_ms"] for r in lat if r["model"] == "original"}
    return {
        "model": name,
        "macs_before": base.macs,
        "params_before": base.params,
        "original": orig_ms,
        "rows": rows,
        "latency": lat,
        "settings": settings_of(args),
    }


def settings_of(args) -> dict:
    return {
        "imgsz": args.imgsz,
        "batch_sizes": args.batch_sizes,
        "threads_ort": 1,
        "round_to": ROUND_TO,
        "repeats": args.repeats,
        "tp_timeout_s": args.tp_timeout,
        "tp_memory_gb": args.tp_memory_gb,
    }


# ----- table ---------------------------------------------------------------------------------------


def table(results: dict) -> str:
    head = [
        "model",
        "MACs",
        "tool",
        "ok",
        "equiv. err",
        "MACs (G) before → after",
        "params (M) before → after",
        "ORT speed-up b1 (CPU)",
        "ORT speed-up b8 (CPU)",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    missed = []
    for name in MODELS:
        res = results.get(name)
        if not res:
            continue
        for r in res["rows"]:
            ok = r["ok"]
            macs = f"{res['macs_before'] / 1e9:.2f} → {r['macs_after'] / 1e9:.2f}" if ok else "—"
            params = f"{res['params_before'] / 1e6:.2f} → {r['params_after'] / 1e6:.2f}" if ok else "—"
            sp = [
                f"{r[f'ort_speedup_b{b}']:.2f}x ({r[f'ort_cpu_speedup_b{b}']:.2f}x)"
                if ok and f"ort_speedup_b{b}" in r
                else "—"
                for b in (1, 8)
            ]
            note = r.get("error", "") if not ok else f"-{r['macs_reduction']:.1%} MACs"
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        f"-{r['target']:.0%}",
                        r["tool"],
                        "yes" if ok else "**failed**",
                        f"{r['equiv_err']:.1e}" if ok else "—",
                        macs,
                        params,
                        *sp,
                        note.replace("|", "/"),
                    ]
                )
                + " |"
            )
            if r["tool"] == "prunekit" and (not ok or r["equiv_err"] > 1e-4):
                missed.append(f"{name} -{r['target']:.0%}: not pruned with equivalence")
            if r["tool"] == "prunekit" and ok and r["target"] == 0.5:
                worst = min(r.get("ort_speedup_b1", 0), r.get("ort_speedup_b8", 0))
                if worst < TARGET_SPEEDUP:
                    missed.append(f"{name} -50%: ORT speed-up {worst:.2f}x < {TARGET_SPEEDUP}x")
    lines.append("")
    lines.append("Targets: " + ("all met" if not missed else "missed: " + "; ".join(missed)))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--time-budget", type=float, default=20.0, help="seconds per latency configuration")
    ap.add_argument("--threads", type=int, default=2, help="torch threads while pruning (ORT is timed with 1)")
    ap.add_argument("--tp-timeout", type=int, default=240)
    ap.add_argument("--tp-memory-gb", type=float, default=6.0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--tp-worker", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--tp-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tp_worker:
        tp_worker(args.tp_worker, args.imgsz, args.target, Path(args.tp_out))
        return 0
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if not args.table:
        try:
            import torch_pruning  # noqa: F401
            import ultralytics  # noqa: F401
        except ImportError as exc:
            print(f"skipped: {exc.name} is not installed (pip install ultralytics torch-pruning==1.6.1)")
            return 0
        for name in args.models:
            if name in results and results[name].get("settings") == settings_of(args) and not args.force:
                print(f"{name}: done (use --force to redo)")
                continue
            t0 = time.time()
            results[name] = run_model(name, args)
            results[name]["seconds"] = time.time() - t0
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
