"""torchvision Swin attention whose widths may change: heads, head_dim and the residual width.

torchvision's ``shifted_window_attention`` derives the head width from the *input* width
(``C // num_heads``) and zeroes a slice of the qkv bias (v2), so it can neither trace to
prunable heads nor run once heads or the residual width are pruned. The classes here are
drop-in subclasses (same parameters, same state-dict names, same outputs) whose forward
takes every width from the weights: :func:`prepare_swin_attention` switches a model's
attention modules to them before tracing, and the slim updater
(:func:`update_swin_attention`) sets ``num_heads`` after pruning.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = [
    "PrunedShiftedWindowAttention",
    "PrunedShiftedWindowAttentionV2",
    "prepare_swin_attention",
    "update_swin_attention",
    "window_attention",
]


def window_attention(
    mod: ShiftedWindowAttention,
    x: torch.Tensor,
    relative_position_bias: torch.Tensor,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` with every width read from the weights.

    The inner width is ``qkv.weight.shape[0] // 3`` (not the input width), heads are
    ``mod.num_heads`` and the v1 query scale is the constant ``mod.scale`` of the unpruned model.
    """
    window_size, num_heads = mod.window_size, mod.num_heads
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(mod.shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    qkv_bias = mod.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # v2: no key bias
        qb, kb, vb = qkv_bias.chunk(3)
        qkv_bias = torch.cat([qb, torch.zeros_like(kb), vb])
    qkv = F.linear(x, mod.qkv.weight, qkv_bias)
    head_dim = qkv.shape[-1] // 3 // num_heads
    qkv = qkv.reshape(x.size(0), x.size(1), 3, -1, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=4.605170185988092).exp()  # log(100)
    else:
        attn = (q * mod.scale).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, -1, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(x.size(0), -1, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=mod.attention_dropout, training=mod.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
    x = F.linear(x, mod.proj.weight, mod.proj.bias)
    x = F.dropout(x, p=mod.dropout, training=mod.training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, -1)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class PrunedShiftedWindowAttention(ShiftedWindowAttention):
    """:class:`torchvision.models.swin_transformer.ShiftedWindowAttention` after pruning.

    Same parameters and outputs; ``scale`` is the query scale of the unpruned model.
    """

    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x, self.get_relative_position_bias())


class PrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """:class:`torchvision.models.swin_transformer.ShiftedWindowAttentionV2` after pruning."""

    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)


def _heads(mod: nn.Module) -> int:
    if isinstance(mod, ShiftedWindowAttentionV2):
        return int(mod.logit_scale.shape[0])
    return int(mod.relative_position_bias_table.shape[1])


def prepare_swin_attention(mod: nn.Module, old: dict | None = None) -> bool:
    """Switch a Swin attention module to its pruned class (in place). ``old`` (shapes before
    pruning, as the slim updaters get them) recovers the unpruned query scale."""
    if isinstance(mod, (PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2)):
        return False
    old = old or {}
    width = old.get("qkv.weight", list(mod.qkv.weight.shape))[1]
    if isinstance(mod, ShiftedWindowAttentionV2):
        heads = old.get("logit_scale", list(mod.logit_scale.shape))[0]
        mod.__class__ = PrunedShiftedWindowAttentionV2
    else:
        heads = old.get("relative_position_bias_table", list(mod.relative_position_bias_table.shape))[1]
        mod.__class__ = PrunedShiftedWindowAttention
    mod.scale = float((width // heads) ** -0.5)
    return True


def update_swin_attention(mod: nn.Module, old: dict) -> None:
    """Slim updater: pruned class, ``num_heads`` from the weights (relative position bias / logit scale)."""
    prepare_swin_attention(mod, old)
    mod.num_heads = _heads(mod)
