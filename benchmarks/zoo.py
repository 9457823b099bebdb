"""Prune every torchvision model to 50% of the channels of every prunable group.

For each model: build the channel groups (timed), prune 50% per group (L2), transform to
the slim model (timed), and check slim == sparse on the example input. Groups whose slim
model would not match are found by ``Pruner.validate`` and reported as frozen.
The classifier output is kept automatically (model outputs never lose channels).

Each model runs in its own subprocess (a crash or time-out costs one row); results are
appended to ``benchmarks/results/zoo.json`` after every model, and a rerun skips models
already done (``--force`` to redo).

Usage:
    python benchmarks/zoo.py                      # the 80 classification models
    python benchmarks/zoo.py --family all         # + segmentation, detection, video, flow
    python benchmarks/zoo.py resnet18 vit_b_16    # some models
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
RESULTS = HERE / "results" / "zoo.json"
TOL = None  # filled from prunekit.engine.pruner


def _inputs(family: str, name: str):
    import torch

    g = torch.Generator().manual_seed(0)
    if family == "classification":
        size = 299 if name == "inception_v3" else 224
        return torch.randn(1, 3, size, size, generator=g)
    if family == "segmentation":
        return torch.randn(1, 3, 224, 224, generator=g)
    if family == "detection":
        return ([torch.rand(3, 320, 320, generator=g)],)
    if family == "video":
        frames, size = (16, 224) if name.startswith(("mvit", "s3d")) else (8, 112)
        if name.startswith("swin3d"):
            frames, size = 8, 224
        return torch.randn(1, 3, frames, size, size, generator=g)
    if family == "optical_flow":
        a = torch.randn(1, 3, 128, 128, generator=g)
        return (a, torch.randn(1, 3, 128, 128, generator=g))
    raise ValueError(family)


def make_alive(model, x, family: str) -> None:
    """Random-init models can make the equivalence check vacuous: ViT's head starts at zero
    (every output is 0), and deep nets with default BatchNorm statistics can shrink their
    outputs to ~1e-20. Give zero-initialised tensors small random values and calibrate the
    BatchNorm statistics on one batch, so outputs have a healthy scale."""
    import torch

    from prunekit.graph.trace import call_model

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and float(p.detach().abs().max()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if family == "detection":
        return
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    model.train()
    batch = x
    if isinstance(x, torch.Tensor) and x.shape[0] == 1:
        batch = torch.cat([x, torch.randn(x.shape, generator=g)])
    with torch.no_grad():
        call_model(model, batch)
    model.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def _compare(sparse_model, slim_model, x) -> tuple[float, float, str]:
    """(max_error(sparse, slim), max |sparse output|, note) on one input.

    A detector's final output is a thresholded, non-max-suppressed list whose length can flip
    on a score that sits at the threshold, and with random weights it is often empty; so for
    detectors the dense head outputs (class logits and box regressions for every anchor: what
    the post-processing reads; for two-stage detectors the RPN head and the box head on the same
    proposals) are compared, and the final detections' difference is only reported."""
    import torch
    from torch.utils._pytree import tree_flatten

    import prunekit
    from prunekit.graph.trace import call_model

    def biggest(out):
        return max(
            (float(t.abs().max()) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.numel()),
            default=0.0,
        )

    def shapes(out):
        return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]

    note = ""
    with torch.no_grad():
        a = call_model(sparse_model.eval(), x)
        b = call_model(slim_model.eval(), x)
        detector = hasattr(sparse_model, "backbone") and hasattr(sparse_model, "transform")
        if not detector:
            return prunekit.max_error(a, b), biggest(a), note
        images = sparse_model.transform(list(x[0]))[0]
        # the backbone's own outputs may be pruned (the FPN width is internal): compare what
        # the heads compute from them, on the sparse model's proposals for the box head
        fa, fb = sparse_model.backbone(images.tensors), slim_model.backbone(images.tensors)
        err, scale, parts = 0.0, 0.0, []
        heads = [
            ("head", getattr(sparse_model, "head", None), getattr(slim_model, "head", None)),
            (
                "rpn head",
                getattr(getattr(sparse_model, "rpn", None), "head", None),
                getattr(getattr(slim_model, "rpn", None), "head", None),
            ),
        ]
        for what, ha, hb in heads:
            if ha is not None and hb is not None:
                oa, ob = ha(list(fa.values())), hb(list(fb.values()))
                err, scale = max(err, prunekit.max_error(oa, ob)), max(scale, biggest(oa))
                parts.append(what)
        roi_a, roi_b = getattr(sparse_model, "roi_heads", None), getattr(slim_model, "roi_heads", None)
        if roi_a is not None and roi_b is not None:
            proposals, _ = sparse_model.rpn(images, fa)
            oa, ob = [
                r.box_predictor(r.box_head(r.box_roi_pool(f, proposals, images.image_sizes)))
                for r, f in ((roi_a, fa), (roi_b, fb))
            ]
            err, scale = max(err, prunekit.max_error(oa, ob)), max(scale, biggest(oa))
            parts.append(f"box head on {sum(len(p) for p in proposals)} proposals")
        # the final detections are a discrete selection (top-k, NMS) among near-equal random
        # scores: a 1e-6 difference can swap a box, so they are reported, not judged
        final = f"{prunekit.max_error(a, b):.1e}" if shapes(a) == shapes(b) else "counts differ"
        note = f"{', '.join(parts)} compared (final detections: {final})"
    return err, scale, note


def run_one(name: str, family: str) -> dict:
    import torch
    import torchvision

    import prunekit
    from prunekit.engine.pruner import TOL

    torch.manual_seed(0)
    torch.set_num_threads(2)
    kwargs = {"weights": None}
    if family in ("detection", "segmentation"):
        kwargs["weights_backbone"] = None
    if family == "classification" and name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True
        kwargs["aux_logits"] = False if name == "googlenet" else True
    if family == "optical_flow":
        kwargs = {"weights": None}
    model = torchvision.models.get_model(name, **kwargs).eval()
    x = _inputs(family, name)
    make_alive(model, x, family)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    row = {"model": name, "family": family}
    t0 = time.perf_counter()
    pruner = prunekit.Pruner(model, x)
    row["build_s"] = round(pruner.build_seconds, 4)
    row["groups"] = len(pruner.groups)
    row["prunable"] = len(pruner.prunable_groups)
    row["warnings"] = pruner.warnings[:5]
    before = prunekit.count(model, x)
    row["macs_before"], row["params_before"] = before.macs, before.params
    pruner.prune(0.5)
    t1 = time.perf_counter()
    frozen = []
    try:
        slim = prunekit.to_slim(model)
        row["transform_s"] = round(time.perf_counter() - t1, 4)
        err, scale, note = _compare(model, slim, x)
    except Exception as exc:  # noqa: BLE001 - recorded, then validated
        err, scale, note = float("inf"), 0.0, ""
        row["first_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if not err <= TOL:
        prunekit.remove_masks(model)
        model.load_state_dict(reference)  # the dense weights again
        tv = time.perf_counter()
        bad = pruner.validate(0.5)
        row["validate_s"] = round(time.perf_counter() - tv, 2)
        frozen = [f"group {g.id}: {g.reasons[0]}" for g in bad]
        pruner.prune(0.5)
        t1 = time.perf_counter()
        slim = prunekit.to_slim(model)
        row["transform_s"] = round(time.perf_counter() - t1, 4)
        err, scale, note = _compare(model, slim, x)
    if note:
        row["checked"] = note
    row["frozen_by_validation"] = frozen
    row["equiv_err"] = err
    row["out_scale"] = scale
    after = prunekit.count(slim, x)
    row["macs_after"], row["params_after"] = after.macs, after.params
    row["ok"] = bool(err <= TOL and after.macs < before.macs and after.params < before.params)
    row["total_s"] = round(time.perf_counter() - t0, 2)
    return row


def models_for(family: str) -> list[tuple[str, str]]:
    import torchvision.models as M

    fams = {
        "classification": M,
        "segmentation": M.segmentation,
        "detection": M.detection,
        "video": M.video,
        "optical_flow": M.optical_flow,
    }
    chosen = list(fams) if family == "all" else [family]
    return [(n, f) for f in chosen for n in M.list_models(module=fams[f])]


def load(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(results: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def table(results: dict, family: str | None = None) -> str:
    rows = [r for r in results.values() if family in (None, r.get("family"))]
    lines = [
        "| model | ok | prunable/groups | equiv. err | max abs output | MACs (M) before → after"
        " | params (M) before → after | build s | transform s | frozen by validation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"])):
        if "error" in r:
            lines.append(f"| {r['model']} | FAILED | | | | | | | | {r['error'][:120]} |")
            continue
        lines.append(
            f"| {r['model']} | {'yes' if r['ok'] else 'NO'} | {r['prunable']}/{r['groups']} | {r['equiv_err']:.1e} | "
            f"{r.get('out_scale', float('nan')):.3g} | "
            f"{r['macs_before'] / 1e6:,.0f} → {r['macs_after'] / 1e6:,.0f} | "
            f"{r['params_before'] / 1e6:,.2f} → {r['params_after'] / 1e6:,.2f} | {r['build_s']:.3f} | "
            f"{r.get('transform_s', 0):.3f} | {len(r['frozen_by_validation'])} |"
        )
    ok = [r for r in rows if r.get("ok")]
    builds = [r["build_s"] for r in rows if "build_s" in r]
    if builds:
        lines.append("")
        lines.append(
            f"{len(ok)} of {len(rows)} pruned with equivalence; group building median "
            f"{statistics.median(builds):.3f} s, max {max(builds):.2f} s"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument(
        "--family",
        default="classification",
        choices=["classification", "segmentation", "detection", "video", "optical_flow", "all"],
    )
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--table", action="store_true", help="print the table of saved results and exit")
    ap.add_argument("--earlier", type=Path, help="results of an earlier run, used (marked) for models not in this one")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "FAMILY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(*args.one)))
        return 0
    if args.table:
        results = load(args.out)
        if args.earlier and args.earlier.exists():
            for name, row in json.loads(args.earlier.read_text()).items():
                if name not in results or "error" in results[name]:
                    results[name] = {**row, "model": name + " †"}
        print(table(results, None if args.family == "all" else args.family))
        return 0
    todo = models_for(args.family)
    if args.models:
        fam_of = {n: f for n, f in models_for("all")}
        unknown = [n for n in args.models if n not in fam_of]
        if unknown:
            ap.error(f"unknown torchvision model(s) {unknown}")
        todo = [(n, fam_of[n]) for n in args.models]
    results = load(args.out)
    for i, (name, fam) in enumerate(todo):
        if name in results and "error" not in results[name] and not args.force:
            continue
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name, fam], capture_output=True, text=True, timeout=args.timeout
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            row = (
                json.loads(line[-1][4:])
                if line
                else {"model": name, "family": fam, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            )
        except subprocess.TimeoutExpired:
            row = {"model": name, "family": fam, "error": f"timeout after {args.timeout} s"}
        results[name] = row
        save(results, args.out)
        status = (
            "ERROR " + row["error"]
            if "error" in row
            else (
                f"ok={row['ok']} err={row['equiv_err']:.1e} build={row['build_s']:.3f}s "
                f"frozen={len(row['frozen_by_validation'])}"
            )
        )
        print(f"[{i + 1}/{len(todo)}] {name}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
