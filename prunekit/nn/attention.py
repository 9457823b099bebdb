"""``nn.MultiheadAttention`` whose inner width (heads x head_dim) may differ from embed_dim."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention after head pruning: ``num_heads * head_dim != embed_dim``.

    Weights keep the names and layout of :class:`torch.nn.MultiheadAttention`
    (``in_proj_weight`` of shape ``(3 * num_heads * head_dim, embed_dim)``, ``out_proj``),
    so the state dict of a pruned model loads into it. The slim transform switches a
    pruned ``nn.MultiheadAttention`` to this class; you rarely build one yourself.

    Example:
        >>> m = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> m.__class__ = PrunedMultiheadAttention
        >>> m(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))[0].shape
        torch.Size([1, 3, 8])
    """

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        h = self.num_heads
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq)  # (L, B, h*hd)
        k = F.linear(key, wk, bk)
        v = F.linear(value, wv, bv)
        hd = q.shape[-1] // h
        q, k, v = (t.reshape(t.shape[0], bsz, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))
        mask = None
        if attn_mask is not None:
            mask = attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
            if mask.dim() == 3:
                mask = mask.view(bsz, -1, tgt, src)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src)
            if kpm.dtype == torch.bool:
                kpm = torch.zeros_like(kpm, dtype=q.dtype).masked_fill_(kpm, float("-inf"))
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * hd**-0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                future = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            attn = F.dropout(scores.softmax(-1), p, self.training)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
            attn = None
        out = out.permute(2, 0, 1, 3).reshape(tgt, bsz, h * hd)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if attn is not None and average_attn_weights:
            attn = attn.mean(1)
        return out, attn
