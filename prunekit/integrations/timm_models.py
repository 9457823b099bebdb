"""timm support: attention width attributes after pruning, and CaiT's attention blocks.

Loaded lazily by the engine registries (``PACKAGE_PREPARERS`` in :mod:`prunekit.engine.prepare`,
``PACKAGE_UPDATERS`` in :mod:`prunekit.engine.slim`) the first time a timm module is met.

- After pruning, every timm attention module's widths follow its weights (``num_heads``,
  ``head_dim``, ``attn_dim``, ``num_kv_heads``); its ``scale`` stays the unpruned one, as in
  the sparse model.
- CaiT's ``ClassAttn`` and ``TalkingHeadAttn`` derive the head width from the *input* width
  (``C // num_heads``), which tracing cannot see and which goes wrong as soon as the residual
  stream or the heads are pruned. :func:`prepare_module` switches them to drop-in subclasses
  (same parameters, same state-dict names, same outputs) that take the head width from their
  weights; the query scale is passed explicitly, so head widths may be pruned too.

Example:
    >>> import timm, torch, prunekit  # doctest: +SKIP
    >>> model = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2)  # doctest: +SKIP
    >>> pruner = prunekit.Pruner(model, torch.randn(1, 3, 32, 32))  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = prunekit.to_slim(model)  # runs without validate()  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.cait import ClassAttn, TalkingHeadAttn

from prunekit.engine import slim as _slim

__all__ = ["prepare_module", "update_module", "PrunedClassAttn", "PrunedTalkingHeadAttn"]


class PrunedClassAttn(ClassAttn):
    """CaiT's class attention with the head width read from the query weight (``-1``)."""

    num_heads: int
    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.num_heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, h, -1).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, h, -1).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, h, -1).permute(0, 2, 1, 3)
        if getattr(self, "fused_attn", False):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(B, 1, -1)
        return self.proj_drop(self.proj(out))


class PrunedTalkingHeadAttn(TalkingHeadAttn):
    """CaiT's talking-heads attention with the head width read from the qkv weight (``-1``)."""

    num_heads: int
    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


_PRUNED: dict[type, type] = {ClassAttn: PrunedClassAttn, TalkingHeadAttn: PrunedTalkingHeadAttn}


def prepare_module(mod: nn.Module) -> bool:
    """Switch CaiT's class / talking-heads attention to its pruned subclass (in place)."""
    cls = _PRUNED.get(type(mod))
    if cls is None:
        return False
    mod.__class__ = cls
    return True


def _children(mod: nn.Module, *names: str) -> list[nn.Linear] | None:
    kids = [getattr(mod, n, None) for n in names]
    return kids if all(isinstance(k, nn.Linear) for k in kids) else None


def _query_key_widths(mod: nn.Module, old: dict) -> tuple[int, int, int, int] | None:
    """(query width now, before, key width now, before) of a timm attention module."""

    def out(child: str) -> tuple[int, int]:
        w = getattr(mod, child).weight
        return w.shape[0], old.get(f"{child}.weight", list(w.shape))[0]

    if _children(mod, "qkv"):
        (new, was) = out("qkv")
        return new // 3, was // 3, new // 3, was // 3
    if _children(mod, "q", "k"):
        return (*out("q"), *out("k"))
    if _children(mod, "q", "kv"):
        kv_new, kv_was = out("kv")
        return (*out("q"), kv_new // 2, kv_was // 2)
    return None


def _int_attr(mod: nn.Module, name: str) -> int | None:
    v = getattr(mod, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def update_module(mod: nn.Module, old: dict) -> None:
    """Slim updater for every timm module: attention widths follow the weights, and so does the
    stored ``shape`` that MetaFormer's ``Scale`` views its 1-D ``scale`` to (``(dim, 1, 1)``)."""
    prepare_module(mod)  # a freshly built model being resized by load_slim
    scale, shape = getattr(mod, "scale", None), getattr(mod, "shape", None)
    if isinstance(scale, nn.Parameter) and scale.ndim == 1 and isinstance(shape, tuple) and shape:
        mod.shape = (scale.numel(), *shape[1:])
    heads0 = _int_attr(mod, "num_heads")
    widths = _query_key_widths(mod, old) if heads0 else None
    if widths is None:
        return
    q_new, q_old, k_new, k_old = widths
    if q_new == q_old and k_new == k_old:
        return
    dim0 = _int_attr(mod, "head_dim") or q_old // heads0
    choice = _slim.head_split(mod) or ("heads" if q_new % dim0 == 0 and k_new % dim0 == 0 else "head_dim")
    if choice == "heads":
        dim, heads = dim0, q_new // dim0
    else:
        dim, heads = q_new // heads0, heads0
    mod.num_heads = heads
    if _int_attr(mod, "head_dim") is not None:
        mod.head_dim = dim
    if _int_attr(mod, "attn_dim") is not None:
        mod.attn_dim = q_new
    if _int_attr(mod, "num_kv_heads") is not None:
        mod.num_kv_heads = k_new // dim
