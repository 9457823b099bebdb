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
    python benchmarks/zoo.py --family timm        # one model per timm module, with Torch-Pruning 1.6
                                                  # (results/zoo_timm.json)
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
            elif family == "timm" and p.ndim == 1 and 0.0 < float(p.detach().abs().max()) < 1e-3:
                # layer scale (ConvNeXt, CaiT, EdgeNeXt: 1e-6 at init) would make every residual
                # branch vanish, and with it what the check compares
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
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
    from prunekit.engine.equivalence import TOLERANCE as TOL

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


# ----- timm: one model per architecture module ------------------------------------------------
TIMM_RESULTS = HERE / "results" / "zoo_timm.json"
TIMM_CHOICE = HERE / "results" / "zoo_timm_models.json"
#: timm modules left out, with the reason
TIMM_SKIP = {}
#: the image side tried first (most timm models take any size; the ones that do not fall back to their default)
TIMM_SMALL = 128
#: modules whose smallest variant is larger than this are skipped (CPU time and memory)
TIMM_MAX_PARAMS = 150e6


def timm_modules() -> list[str]:
    """The architecture modules of ``timm.models`` that have models."""
    import timm

    return timm.list_modules()


def timm_choice(mod: str, refresh: bool = False) -> dict:
    """``{"model": the smallest variant of ``mod`` by parameter count, "params": n}`` (or ``{"skip": reason}``).

    Parameters are counted on models built on the meta device (no memory, no init cost); the
    ``test_*`` models (reduced configs timm keeps for its own tests) are left out in favour of the
    smallest real variant. Cached per module in ``results/zoo_timm_models.json``."""
    if mod in TIMM_SKIP:
        return {"skip": TIMM_SKIP[mod]}
    cache = load(TIMM_CHOICE)
    if mod in cache and not refresh:
        got = cache[mod]
        if got.get("params", 0) > TIMM_MAX_PARAMS:
            got["skip"] = (
                f"smallest variant {got['model']} has {got['params'] / 1e6:.0f} M parameters (too slow on a CPU)"
            )
        return got
    import warnings

    import timm
    import torch

    warnings.filterwarnings("ignore")
    sizes = {}
    for name in timm.list_models(module=mod):
        if name.startswith("test_"):
            continue
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            sizes[name] = sum(p.numel() for p in m.parameters())
        except Exception:  # noqa: BLE001 - a variant that does not build is not a candidate
            continue
    if sizes:
        best = min(sizes, key=lambda n: (sizes[n], n))
        got = {"model": best, "params": sizes[best]}
        if sizes[best] > TIMM_MAX_PARAMS:
            got["skip"] = f"smallest variant {best} has {sizes[best] / 1e6:.0f} M parameters (too slow on a CPU)"
    else:
        got = {"skip": "no variant builds with pretrained=False"}
    cache = load(TIMM_CHOICE)
    cache[mod] = got
    save(cache, TIMM_CHOICE)
    return got


def timm_build(name: str):
    """(model, input): the model at a small input size where it allows one, else its default size."""
    import timm
    import torch

    cfg = timm.get_pretrained_cfg(name)
    default = tuple(cfg.input_size[1:]) if cfg is not None else (224, 224)
    g = torch.Generator().manual_seed(0)
    tries = []
    if max(default) > TIMM_SMALL:
        tries += [({"img_size": TIMM_SMALL}, TIMM_SMALL), ({}, TIMM_SMALL)]
    tries.append(({}, default))
    last = None
    for kwargs, size in tries:
        hw = (size, size) if isinstance(size, int) else size
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            x = torch.randn(1, 3, *hw, generator=g)
            with torch.no_grad():
                model(x)
            return model, x
        except Exception as exc:  # noqa: BLE001 - try the next size
            last = exc
    raise RuntimeError(f"{name} does not run at {default}: {type(last).__name__}: {str(last)[:200]}")


def _timm_backward(model, x) -> str:
    """'' when a training step's backward reaches every trainable parameter that the loss uses, else why not."""
    import torch
    from torch.utils._pytree import tree_flatten

    model.train()
    try:
        out = model(torch.cat([x, torch.randn(x.shape, generator=torch.Generator().manual_seed(3))]))
        loss = sum(t.float().pow(2).mean() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - recorded
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        model.eval()
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()):
        return "no parameter got a gradient"
    return ""


def run_one_timm(name: str) -> dict:
    """prunekit on one timm model: the torchvision zoo's checks plus backward on the slim model."""
    import torch

    import prunekit
    from prunekit.engine.equivalence import TOLERANCE as TOL

    torch.set_num_threads(2)
    model, x = timm_build(name)
    make_alive(model, x, "timm")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    row = {"model": name, "family": "timm", "input": list(x.shape)}
    t0 = time.perf_counter()
    stage = "group building"
    try:
        pruner = prunekit.Pruner(model, x)
        row["build_s"] = round(pruner.build_seconds, 4)
        row["groups"] = len(pruner.groups)
        row["prunable"] = len(pruner.prunable_groups)
        row["warnings"] = pruner.warnings[:5]
        stage = "counting"
        before = prunekit.count(model, x)
        row["macs_before"], row["params_before"] = before.macs, before.params
        stage = "pruning"
        pruner.prune(0.5)
        frozen = []
        t1 = time.perf_counter()
        try:
            slim = prunekit.to_slim(model)
            row["transform_s"] = round(time.perf_counter() - t1, 4)
            err, scale, _ = _compare(model, slim, x)
        except Exception as exc:  # noqa: BLE001 - recorded, then validated
            err, scale = float("inf"), 0.0
            row["first_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if not err <= TOL:
            stage = "validate"
            prunekit.remove_masks(model)
            model.load_state_dict(reference)
            tv = time.perf_counter()
            bad = pruner.validate(0.5)
            row["validate_s"] = round(time.perf_counter() - tv, 2)
            frozen = [f"group {g.id}: {g.reasons[0]}" for g in bad]
            pruner.prune(0.5)
            stage = "transform"
            t1 = time.perf_counter()
            slim = prunekit.to_slim(model)
            row["transform_s"] = round(time.perf_counter() - t1, 4)
            err, scale, _ = _compare(model, slim, x)
        row["frozen_by_validation"] = frozen
        row["equiv_err"] = err
        row["out_scale"] = scale
        stage = "counting the slim model"
        after = prunekit.count(slim, x)
        row["macs_after"], row["params_after"] = after.macs, after.params
        stage = "backward"
        row["backward"] = _timm_backward(slim, x) or "ok"
    except Exception as exc:  # noqa: BLE001 - a crash is a result
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:200]}"
        return row
    row["ok"] = bool(
        err <= TOL and after.macs < before.macs and after.params < before.params and row["backward"] == "ok"
    )
    row["total_s"] = round(time.perf_counter() - t0, 2)
    return row


def run_one_torch_pruning(name: str) -> dict:
    """Torch-Pruning 1.6 on the same model and input, as its README shows a new user: a
    ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=2)`` at ratio 0.5, the classifier ignored.
    It has no sparse model to compare with, so the row says how far it got: pruned, runs, keeps
    the output shape, MACs/params, backward."""
    import torch
    import torch_pruning as tp

    torch.set_num_threads(2)
    model, x = timm_build(name)
    make_alive(model, x, "timm")
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else [heads]
    ignored = [m for h in heads for m in h.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        want = model(x)
    row = {"model": name}
    stage = "pruner"
    t0 = time.perf_counter()
    try:
        before_macs, before_params = tp.utils.count_ops_and_params(model, x)
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_inputs=x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=ignored,
        )
        stage = "step"
        pruner.step()
        row["prune_s"] = round(time.perf_counter() - t0, 3)
        stage = "forward"
        with torch.no_grad():
            got = model(x)
        same = getattr(got, "shape", None) == getattr(want, "shape", None)
        row["output_shape_kept"] = bool(same)
        stage = "counting"
        macs, params = tp.utils.count_ops_and_params(model, x)
        row["macs_before"], row["params_before"] = int(before_macs), int(before_params)
        row["macs_after"], row["params_after"] = int(macs), int(params)
        stage = "backward"
        row["backward"] = _timm_backward(model, x) or "ok"
    except Exception as exc:  # noqa: BLE001 - a crash is a result
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:200]}"
        return row
    row["ok"] = bool(same and macs < before_macs and row["backward"] == "ok")
    return row


def _timm_subprocess(name: str, timeout: int, torch_pruning: bool, prunekit: bool = True) -> tuple[dict, dict]:
    """(prunekit row, Torch-Pruning row) from one subprocess (one interpreter start per model):
    a crash or time-out becomes the ``error`` of the side that was running."""
    if not prunekit:  # Torch-Pruning only
        args = [sys.executable, __file__, "--one-tp", name]
    else:
        args = [sys.executable, __file__, "--one", name, "timm"] + ([] if torch_pruning else ["--no-torch-pruning"])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        why = None
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        why = f"timeout after {timeout} s"
    rows = {}
    for ln in out.splitlines():
        for tag in ("ROW ", "TPROW "):
            if ln.startswith(tag):
                rows[tag if prunekit else "TPROW "] = json.loads(ln[len(tag) :])
    if not prunekit:
        return {}, rows.get("TPROW ", {"model": name, "error": why or (err.strip().splitlines() or ["?"])[-1][:300]})
    tail = [ln for ln in err.strip().splitlines() if ln.strip()]
    why = why or (tail or [f"exit code {proc.returncode}"])[-1][:300]
    ours = rows.get("ROW ", {"model": name, "error": why})
    theirs = rows.get("TPROW ", {"model": name, "error": why} if torch_pruning and "ROW " in rows else {})
    return ours, theirs


def timm_table(results: dict) -> str:
    """Markdown table of the timm rows: prunekit and Torch-Pruning side by side."""
    lines = [
        "| module | model | input | prunekit | equiv. err | MACs (M) before → after | params (M) before → after"
        " | frozen | Torch-Pruning 1.6 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mod, r in sorted(results.items()):
        if "skip" in r:
            lines.append(f"| {mod} | | | skipped: {r['skip']} | | | | | |")
            continue
        p, t = r.get("prunekit", {}), r.get("torch_pruning", {})
        size = "x".join(str(v) for v in p.get("input", [])[2:])
        if "error" in p:
            ours, err, macs, params, frozen = f"FAILED: {p['error'][:100]}", "", "", "", ""
        else:
            ours = "yes" if p["ok"] else f"NO (backward: {p['backward'][:60]})" if p["backward"] != "ok" else "NO"
            err = f"{p['equiv_err']:.1e}"
            macs = f"{p['macs_before'] / 1e6:,.0f} → {p['macs_after'] / 1e6:,.0f}"
            params = f"{p['params_before'] / 1e6:,.2f} → {p['params_after'] / 1e6:,.2f}"
            frozen = str(len(p["frozen_by_validation"]))
        if not t:
            theirs = ""
        elif "error" in t:
            theirs = f"crash ({t['error'][:70]})"
        elif t["ok"]:
            theirs = f"runs, {t['macs_before'] / 1e6:,.0f} → {t['macs_after'] / 1e6:,.0f} M MACs"
        else:
            why = [] if t["output_shape_kept"] else ["output shape changed"]
            why += [] if t["backward"] == "ok" else [f"backward: {t['backward'][:50]}"]
            why += [] if t["macs_after"] < t["macs_before"] else ["MACs not reduced"]
            theirs = "runs; " + ", ".join(why)
        lines.append(
            f"| {mod} | {p.get('model', r.get('model', ''))} | {size} | {ours} | {err} | {macs} | {params} | {frozen}"
            f" | {theirs} |"
        )
    rows = [r for r in results.values() if "skip" not in r]
    ok = sum(bool(r.get("prunekit", {}).get("ok")) for r in rows)
    tp_rows = [r["torch_pruning"] for r in rows if r.get("torch_pruning")]
    tp_ok = sum(bool(t.get("ok")) for t in tp_rows)
    tp_crash = sum("error" in t for t in tp_rows)
    skipped = len(results) - len(rows)
    lines += [
        "",
        f"prunekit: {ok} of {len(rows)} modules pruned with equivalence, counting and backward"
        f" ({100 * ok / max(len(rows), 1):.1f}%; {skipped} modules skipped). Torch-Pruning 1.6: {tp_ok} of"
        f" {len(tp_rows)} run pruned, ran with the output shape kept, fewer MACs and backward;"
        f" {tp_crash} crashed or timed out.",
    ]
    return "\n".join(lines)


def main_timm(args) -> int:
    """``--family timm``: one model per timm architecture module, prunekit then Torch-Pruning."""
    out = args.out if args.out != RESULTS else TIMM_RESULTS
    results = load(out)
    if args.table:
        print(timm_table(results))
        return 0
    todo = [m for m in timm_modules() if not args.models or m in args.models]
    for i, mod in enumerate(todo):
        c = timm_choice(mod, refresh=args.refresh_choice)
        if "skip" in c:
            results[mod] = c
            save(results, out)
            continue
        done = results.get(mod, {})
        need_ours = not args.only_torch_pruning and (
            args.force or not done.get("prunekit") or "error" in done["prunekit"]
        )
        need_theirs = not args.no_torch_pruning and (args.force or not done.get("torch_pruning"))
        if not (need_ours or need_theirs):
            continue
        t = time.perf_counter()
        if need_ours:
            ours, theirs = _timm_subprocess(c["model"], args.timeout, need_theirs)
        else:
            ours, theirs = done.get("prunekit", {}), _timm_subprocess(c["model"], args.timeout, True, prunekit=False)[1]
        theirs = theirs or done.get("torch_pruning", {})
        results[mod] = {"model": c["model"], "params": c["params"], "prunekit": ours, "torch_pruning": theirs}
        save(results, out)
        status = (
            "(prunekit not run)"
            if not ours
            else "ERROR " + ours["error"]
            if "error" in ours
            else f"ok={ours['ok']} err={ours['equiv_err']:.1e} frozen={len(ours['frozen_by_validation'])}"
            f" backward={ours['backward'][:40]}"
        )
        tp_status = (
            ""
            if not theirs
            else " | tp: " + ("ERROR " + theirs["error"][:80] if "error" in theirs else f"ok={theirs['ok']}")
        )
        print(
            f"[{i + 1}/{len(todo)}] {mod} {c['model']}: {status}{tp_status} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    print(timm_table(results))
    return 0


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
        choices=["classification", "segmentation", "detection", "video", "optical_flow", "all", "timm"],
    )
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--timeout", type=int, default=None, help="seconds per model (default 900; timm: 400 for both tools)"
    )
    ap.add_argument("--no-torch-pruning", action="store_true", help="timm: skip the Torch-Pruning side")
    ap.add_argument("--only-torch-pruning", action="store_true", help="timm: only the Torch-Pruning side")
    ap.add_argument("--refresh-choice", action="store_true", help="timm: pick the smallest variants again")
    ap.add_argument("--table", action="store_true", help="print the table of saved results and exit")
    ap.add_argument("--earlier", type=Path, help="results of an earlier run, used (marked) for models not in this one")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "FAMILY"), help=argparse.SUPPRESS)
    ap.add_argument("--one-tp", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_tp:
        print("ROW " + json.dumps(run_one_torch_pruning(args.one_tp)))
        return 0
    if args.one and args.one[1] == "timm":
        print("ROW " + json.dumps(run_one_timm(args.one[0])), flush=True)
        if not args.no_torch_pruning:
            print("TPROW " + json.dumps(run_one_torch_pruning(args.one[0])), flush=True)
        return 0
    if args.one:
        print("ROW " + json.dumps(run_one(*args.one)))
        return 0
    if args.family == "timm":
        args.timeout = args.timeout or 400
        return main_timm(args)
    args.timeout = args.timeout or 900
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
