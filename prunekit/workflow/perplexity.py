"""Perplexity of causal language models over token batches, at a stated sequence length.

``make_eval_fn(loader, "perplexity")`` builds the evaluator (see :func:`make_perplexity_fn`):
every batch is a ``(B, T)`` tensor of token ids, a dict of model inputs with ``input_ids``
(``attention_mask`` and Hugging Face ``labels`` are honoured), or an ``(inputs, labels)`` pair.
The next-token loss is computed from the model's logits (Hugging Face ``.logits``, the first
element of a tuple, or a plain ``(B, T, vocab)`` tensor), token-weighted over every batch;
``exp`` of the mean is the perplexity. Labels are the input ids shifted by one (``-100`` and
padding positions do not count).

Published numbers depend on the context length (128 and 2048 are common), so the evaluator
states it: ``seq_len`` splits longer sequences into non-overlapping windows of that many
tokens; without it the length is the first batch's. ``eval_fn.seq_len`` holds it and
``eval_fn.describe()`` says ``"perplexity@128 over 4,096 tokens (8 batches)"``.

Example:
    >>> import torch, torch.nn as nn
    >>> lm = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    >>> eval_fn = make_perplexity_fn([torch.randint(0, 11, (2, 16))], seq_len=8)
    >>> eval_fn(lm) > 1.0, eval_fn.seq_len, eval_fn.lower_is_better
    (True, 8, True)
    >>> eval_fn.describe()
    'perplexity@8 over 28 tokens (1 batch)'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.graph.trace import call_model
from prunekit.utils.devices import model_device, to_device

__all__ = ["make_perplexity_fn", "TokenBatch"]


@dataclass
class TokenBatch:
    """One window of tokens: model inputs, next-token targets and which positions count."""

    inputs: Any
    labels: torch.Tensor
    mask: torch.Tensor


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(model inputs, labels or None) of one loader item."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[0], batch[1]
    if isinstance(batch, dict) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    return batch, None


def _ids(inputs: Any) -> torch.Tensor:
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
        what = (
            f"a tensor of shape {tuple(ids.shape)} ({ids.dtype})"
            if isinstance(ids, torch.Tensor)
            else type(ids).__name__
        )
        raise ValueError(
            f"metric 'perplexity' needs token ids of shape (batch, tokens): a LongTensor, a dict with "
            f"'input_ids' or an (inputs, labels) pair; got {what}"
        )
    return ids


def _windows(batch: Any, seq_len: int) -> Iterator[TokenBatch]:
    """Windows of at most ``seq_len`` tokens of one batch (at least two tokens each)."""
    inputs, labels = _split(batch)
    ids = _ids(inputs)
    labels = ids if labels is None else labels
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    for start in range(0, ids.shape[1], seq_len):
        stop = min(start + seq_len, ids.shape[1])
        if stop - start < 2:
            break
        part = slice(start, stop)
        if isinstance(inputs, dict):
            win = {
                k: (v[:, part] if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape else v)
                for k, v in inputs.items()
            }
        else:
            win = ids[:, part]
        yield TokenBatch(win, labels[:, part], mask[:, part] & (labels[:, part] != -100))


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise TypeError(
            "metric 'perplexity' needs next-token logits of shape (batch, tokens, vocab) (a tensor, a "
            f"tuple starting with one, or an output with .logits), got {type(output).__name__}"
        )
    return logits


def _nll(model: nn.Module, win: TokenBatch) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window, and the tokens it counts."""
    logits = _logits(call_model(model, win.inputs))[:, :-1]
    target, keep = win.labels[:, 1:], win.mask[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), target.reshape(-1).clamp(min=0), reduction="none"
    )
    keep = keep.reshape(-1)
    return float(nll[keep].sum()), int(keep.sum())


def _first_length(loader: Iterable) -> int:
    for batch in loader:
        return int(_ids(_split(batch)[0]).shape[1])
    raise ValueError("the loader yielded no batches; nothing to evaluate")


def make_perplexity_fn(
    loader: Iterable,
    seq_len: int | None = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> Callable[[nn.Module], float]:
    """``eval_fn(model) -> perplexity`` (lower is better) over (the first ``max_batches`` of) ``loader``.

    Args:
        loader: Re-iterable token batches (see the module docstring).
        seq_len: Context length: longer sequences are split into windows of this many tokens.
            Default: the first batch's length.
        max_batches: Evaluate at most this many batches.
        device: Move the batches there; default: the model's device.

    Returns:
        The evaluator, with ``lower_is_better=True``, ``metric='perplexity'``, ``seq_len``,
        ``tokens`` / ``batches`` (of the last call) and ``describe()``.
    """
    if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(f"loader must be an iterable of token batches, got {type(loader).__name__}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len must be an int >= 2 (tokens per window), got {seq_len!r}")
    length = seq_len if seq_len is not None else _first_length(loader)
    dev = torch.device(device) if device is not None else None

    def eval_fn(model: nn.Module) -> float:
        where = dev if dev is not None else model_device(model)
        was = model.training
        model.eval()
        total, tokens, seen = 0.0, 0, 0
        try:
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    if max_batches is not None and i >= max_batches:
                        break
                    for win in _windows(to_device(batch, where), length):
                        nll, n = _nll(model, win)
                        total, tokens = total + nll, tokens + n
                    seen += 1
        finally:
            model.train(was)
        if not tokens:
            raise ValueError("no token to predict: every batch needs sequences of at least two (unmasked) tokens")
        eval_fn.tokens, eval_fn.batches = tokens, seen  # type: ignore[attr-defined]
        return math.exp(total / tokens)

    def describe() -> str:
        tokens, seen = getattr(eval_fn, "tokens", None), getattr(eval_fn, "batches", 0)
        over = f" over {tokens:,} tokens ({seen} batch{'es' if seen != 1 else ''})" if tokens else ""
        return f"perplexity@{length}{over}"

    eval_fn.lower_is_better = True  # type: ignore[attr-defined]
    eval_fn.metric = "perplexity"  # type: ignore[attr-defined]
    eval_fn.seq_len = length  # type: ignore[attr-defined]
    eval_fn.describe = describe  # type: ignore[attr-defined]
    return eval_fn
