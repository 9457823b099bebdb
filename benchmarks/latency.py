"""Does the measured latency follow the MACs? Slim vs original torchvision models on the CPU.

For each model (torchvision, random weights, eval mode, 3x224x224 inputs): prune to 30% and
50% fewer MACs with ``prunekit.workflow.prune.prune(..., mode='slim')`` (uniform allocation, L2
criterion), plus 50% with ``round_to=8``; then time the original and the slim models together
with :func:`prunekit.deploy.bench.bench` (interleaved: every repeat times each model once, in
alternating order) in PyTorch eager mode and in ONNX Runtime, at batch 1 and 32.
``speed-up`` is the median over repeats of ``time(original) / time(slim)`` within a repeat.

Results go to ``benchmarks/results/latency.json`` (``latency_quick.json`` with ``--quick``)
after every model; a rerun skips models already measured with the same settings (``--force``
redoes them). The markdown table is printed at the end (``--table`` prints it without running).

Usage:
    python benchmarks/latency.py                               # all six models, batch 1 and 32
    python benchmarks/latency.py --models resnet18 resnet50    # some models
    python benchmarks/latency.py --quick                       # batch 32 only, fewer repeats
    python benchmarks/latency.py --table                       # print the table of saved results
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16"]
VARIANTS = [("30%", 0.3, 1), ("50%", 0.5, 1), ("50% r8", 0.5, 8)]  # label, MACs removal ratio, round_to

#: Why a model's speed-up can trail its MACs ratio (printed only where it does).
WHY = {
    "depthwise": "depthwise 3x3 convs, SE blocks, BatchNorm/activations are memory-bound: their time falls "
    "linearly with width, not quadratically like the MACs of the 1x1 convs",
    "vit": "attention softmax, LayerNorm, GELU and the reshapes are memory-bound and shrink only linearly "
    "with width; the patch embedding keeps its input channels",
    "align": "channel counts that are not multiples of 8 (the AVX2 float width): ONNX Runtime runs a conv in "
    "its blocked NCHWc layout only when its channels are multiples of the block; other widths fall back to "
    "the generic (im2col / per-group) kernels, much slower for depthwise convs; compare the r8 row",
    "other": "activations (memory traffic, element-wise ops, pooling) shrink linearly with width, MACs "
    "quadratically; at batch 32 the activations no longer fit in the caches",
}
FAMILY = {
    "mobilenet_v2": "depthwise",
    "mobilenet_v3_large": "depthwise",
    "efficientnet_b0": "depthwise",
    "vit_b_16": "vit",
}


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "quick": args.quick,
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
        "backends": args.backends,
        "round8": not args.no_round8,
        "timers": ["wall", "cpu"],
    }


def run_model(name: str, args: argparse.Namespace, log) -> dict:
    import torch
    import torchvision

    from prunekit.deploy.bench import bench
    from prunekit.engine.counting import count
    from prunekit.workflow.prune import prune

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base = count(model, x1)
    models = {"original": model}
    info = {"original": {"macs": base.macs, "params": base.params}}
    for label, ratio, round_to in VARIANTS:
        if round_to > 1 and args.no_round8:
            continue
        t = time.perf_counter()
        res = prune(copy.deepcopy(model), x1, removal_ratio=ratio, round_to=round_to, mode="slim", log=lambda s: None)
        models[label] = res.model.eval()
        info[label] = {
            "removal_ratio": ratio,
            "round_to": round_to,
            "macs": res.macs_after,
            "params": res.params_after,
            "macs_reduction": res.macs_reduction,
            "macs_ratio": res.macs_before / res.macs_after,
            "params_ratio": res.params_before / res.params_after,
            "prune_s": time.perf_counter() - t,
        }
        log(
            f"{name} {label}: MACs -{res.macs_reduction:.1%} ({info[label]['macs_ratio']:.2f}x), "
            f"pruned in {info[label]['prune_s']:.1f} s"
        )
    big = name == "vit_b_16"  # ~18 GMACs per image: batch 32 takes seconds per call on two cores
    budget = args.time_budget * (0.5 if big else 1.0)
    rows = bench(
        models,
        lambda b: torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(1)),
        batch_sizes=args.batch_sizes,
        backends=args.backends,
        warmup=args.warmup,
        repeats=args.repeats,
        min_repeats=2 if big else args.min_repeats,
        time_budget=budget,
        threads=args.threads,
        devices=["cpu"],
        out=None,
        log=lambda s: log(f"{name} {s}"),
    )
    for r in rows:
        r["macs_ratio"] = info[r["model"]].get("macs_ratio", 1.0)
    return {"model": name, "variants": info, "rows": rows, "settings": settings_of(args)}


def _get(result: dict, variant: str, backend: str, batch: int, key: str) -> float | None:
    for r in result["rows"]:
        if (r["model"], r["backend"], r["batch"]) == (variant, backend, batch):
            return r.get(key)
    return None


def _pair(a: float | None, b: float | None, fmt: str) -> str:
    if a is None:
        return "-"
    return format(a, fmt) + ("" if b is None else " / " + format(b, fmt))


def table(results: dict) -> str:
    """Markdown: MACs ratio next to the measured speed-ups, one row per model and variant."""
    configs = [(b, n) for b in ("eager", "onnxruntime") for n in (1, 32)]
    label = {"eager": "eager", "onnxruntime": "ORT"}
    head = ["model", "slim", "MACs", "MACs ratio", "params ratio"] + [f"{label[b]} b{n}" for b, n in configs] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["--:"] * (len(head) - 3) + ["---"]) + "|"]
    notes_used = {}
    for name in [m for m in MODELS if m in results] + [m for m in results if m not in MODELS]:
        res = results[name]
        orig = res["variants"]["original"]
        cells = [name, "original", f"{orig['macs'] / 1e9:.2f} G", "1.00x", "1.00x"]
        for b, n in configs:
            ms = _pair(_get(res, "original", b, n, "median_ms"), _get(res, "original", b, n, "cpu_median_ms"), ".0f")
            cells.append(ms + (" ms" if ms != "-" else ""))
        lines.append("| " + " | ".join(cells + [""]) + " |")
        for variant, v in res["variants"].items():
            if variant == "original":
                continue
            cells = [
                "",
                f"-{v['macs_reduction']:.0%}" + (f" r{v['round_to']}" if v["round_to"] > 1 else ""),
                f"{v['macs'] / 1e9:.2f} G",
                f"{v['macs_ratio']:.2f}x",
                f"{v['params_ratio']:.2f}x",
            ]
            for b, n in configs:
                cells.append(_pair(_get(res, variant, b, n, "speedup"), _get(res, variant, b, n, "cpu_speedup"), ".2f"))
            # the target: ONNX Runtime at the largest batch gets at least 80% of the MACs ratio
            # (at 50% fewer MACs: >= 1.6x), judged on the wall clock and on CPU time
            batches = sorted({r["batch"] for r in res["rows"] if r["backend"] == "onnxruntime"})
            target = 0.8 * v["macs_ratio"]
            short = [
                k
                for k, key in (("wall", "speedup"), ("cpu", "cpu_speedup"))
                if batches and (_get(res, variant, "onnxruntime", batches[-1], key) or target) < target
            ]
            note = ""
            if short:  # widths off the SIMD blocks first; what remains is the model family's
                fam = "align" if v["round_to"] == 1 else FAMILY.get(name, "other")
                notes_used[fam] = WHY[fam]
                note = f"{' and '.join(short)} < {target:.2f}x: {fam}"
            cells.append(note)
            lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    out += (
        "\n\nCells are `wall / cpu`: original rows give the median latency per call (wall clock) and the "
        "median process CPU time per call, in ms; slim rows the speed-up over the original (median of the "
        "ratios paired within a repeat). Target: ONNX Runtime at the largest batch reaches at least 0.8 x "
        "the MACs ratio."
    )
    for fam, why in notes_used.items():
        out += f"\n- *{fam}*: {why}."
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help=f"torchvision names (default: {' '.join(MODELS)})")
    p.add_argument("--quick", action="store_true", help="batch 32 only, fewer repeats")
    p.add_argument("--force", action="store_true", help="redo models already in the results")
    p.add_argument("--table", action="store_true", help="print the table of saved results and exit")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime intra-op threads (1: steadiest on a shared machine)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 32 (--quick: 32)")
    p.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"])
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds (fewer when a round takes over 1 s)")
    p.add_argument("--repeats", type=int, default=None, help="most timed rounds (default 15; --quick 5)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds per configuration, cuts repeats (default 60; --quick 20; halved for ViT)",
    )
    p.add_argument("--no-round8", action="store_true", help="skip the round_to=8 variant")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/latency.json)")
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([32] if args.quick else [1, 32])
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.time_budget = args.time_budget or (20.0 if args.quick else 60.0)
    out = args.out or HERE / "results" / ("latency_quick.json" if args.quick else "latency.json")

    import torch

    from prunekit.deploy.bench import environment
    from prunekit.utils.files import atomic_write

    data = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if args.table:
        print(table(data["models"]))
        return 0
    torch.set_num_threads(args.threads)
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    for name in args.models:
        old = data["models"].get(name)
        if old and old.get("settings") == settings_of(args) and not args.force:
            log(f"{name}: done already (--force to redo)")
            continue
        t = time.perf_counter()
        data["models"][name] = run_model(name, args, log)
        data["models"][name].update(
            seconds=time.perf_counter() - t, command=command.strip(), environment=environment(args.threads)
        )
        atomic_write(out, json.dumps(data, indent=1))
        log(f"{name}: done in {data['models'][name]['seconds']:.0f} s -> {out}")
        gc.collect()
    print(table({m: data["models"][m] for m in data["models"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
