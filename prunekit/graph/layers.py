"""Channel rules for ops that carry parameters: conv, linear, norms, attention, matmul.

Rules are keyed by the torch function, not the module class, so subclasses and custom
modules that call ``F.conv2d`` / ``F.layer_norm`` / ... with their own parameters work.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from prunekit.graph.trace import Labels, Tracer, arg, register_rule


def _couple(tr: Tracer, x_ids: torch.Tensor | None, w_ids: torch.Tensor | None, what: str) -> None:
    """Couple activation channels with a parameter dim; unknown activation channels fix it."""
    if w_ids is None:
        if x_ids is not None:
            tr.fix(x_ids, f"{what}: the weight's input dim is not prunable")
        return
    if x_ids is None:
        tr.fix(w_ids, f"{what}: its input channels come from a tensor that cannot be pruned")
    elif x_ids.shape != w_ids.shape:
        tr.fix(torch.cat([x_ids, w_ids]), f"{what}: channel counts disagree")
    else:
        tr.union(x_ids, w_ids)


def _tie(tr: Tracer, ids: torch.Tensor, groups: int) -> torch.Tensor:
    """Couple position j of every group; returns group 0's ids."""
    rows = ids.view(groups, -1)
    tr.union(rows, rows[:1].expand_as(rows))
    return rows[0]


def _fix_other_dims(tr: Tracer, t: torch.Tensor | None, used: tuple[int, ...], what: str) -> None:
    if t is None or id(t) in tr.names:
        return
    for d, (ids, _) in tr.get(t).items():
        if d not in used:
            tr.fix(ids, f"{what}: channels along a weight dim that has no meaning here")


@register_rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv(tr: Tracer, name, func, args, kwargs, out):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    bias = arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    nsp = int(name[-2])
    cdim = x.ndim - nsp - 1
    lab = tr.get(x)
    for d, (ids, _) in lab.items():
        if d != cdim:
            tr.fix(ids, f"'{name}' slides over channels")
    xin = lab.get(cdim, (None, False))[0]
    what = f"'{name}'"
    _fix_other_dims(tr, w, (0, 1), what)
    zero = tr.zero(w, 0) and (bias is None or tr.zero(bias, 0))
    if "transpose" not in name:
        wout, ipg = tr.dim_ids(w, 0), w.shape[1]
        if groups == 1:
            _couple(tr, xin, tr.dim_ids(w, 1), what)
            outv = wout
        elif ipg == 1:  # depthwise: output channel o reads input channel o // m
            m = w.shape[0] // groups
            if wout is not None and xin is not None:
                tr.union(xin.repeat_interleave(m), wout)
            elif wout is not None:
                tr.fix(wout, f"{what}: depthwise input channels cannot be pruned")
            outv = wout
        else:  # grouped: every group keeps the same positions
            win = tr.dim_ids(w, 1)
            if xin is not None:
                xin = _tie(tr, xin, groups)
            _couple(tr, xin, win, what)
            if wout is not None:
                _tie(tr, wout, groups)
            outv = wout
    else:
        win, wout = tr.dim_ids(w, 0), tr.dim_ids(w, 1)
        opg = w.shape[1]
        if groups == 1:
            _couple(tr, xin, win, what)
            outv = wout
        elif w.shape[0] == groups:  # depthwise transposed: out (b, j) reads in b
            _couple(tr, xin, win, what)
            outv = win.repeat_interleave(opg) if win is not None else None
            tr.fix(wout, f"{what}: the channel multiplier of a depthwise transposed conv")  # j stays
        else:
            if xin is not None:
                xin = _tie(tr, xin, groups)
            if win is not None:
                win = _tie(tr, win, groups)
            _couple(tr, xin, win, what)
            outv = wout.repeat(groups) if wout is not None else None
    if bias is not None:
        _couple(tr, outv, tr.dim_ids(bias, 0), what)
    tr.set(out, {cdim: (outv, zero)} if outv is not None else {})


@register_rule("linear")
def _linear(tr: Tracer, name, func, args, kwargs, out):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    bias = arg(args, kwargs, 2, "bias")
    lab = tr.get(x)
    last = x.ndim - 1
    _fix_other_dims(tr, w, (0, 1), "'linear'")
    win = tr.dim_ids(w, 1) if w.ndim == 2 else None
    xin = lab.get(last, (None, False))
    _couple(tr, xin[0], win, "'linear'")
    if win is not None and xin[0] is not None and not (xin[1] or tr.zero(w, 1)):
        tr.fix(win, "'linear': neither input nor weight is zero at pruned channels")
    res: Labels = {d: v for d, v in lab.items() if d != last}
    wout = tr.dim_ids(w, 0)
    if bias is not None:
        _couple(tr, wout, tr.dim_ids(bias, 0), "'linear' bias")
    if wout is not None:
        res[out.ndim - 1] = (wout, tr.zero(w, 0) and (bias is None or tr.zero(bias, 0)))
    tr.set(out, res)


def _per_channel(tr: Tracer, name: str, x, cdim: int, params, out, zero: bool) -> None:
    lab = tr.get(x)
    xin = lab.get(cdim, (None, False))[0]
    for p in params:
        if p is not None and p.numel() > 1:
            _couple(tr, xin, tr.dim_ids(p, 0), f"'{name}'")
    tr.set(out, {d: (i, z and zero) for d, (i, z) in lab.items()})


@register_rule("batch_norm", "instance_norm")
def _batch_norm(tr, name, func, args, kwargs, out):
    x = args[0]
    rm, rv = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    zero = w is not None and b is not None
    _per_channel(tr, name, x, 1 if x.ndim > 1 else 0, (rm, rv, w, b), out, zero)


@register_rule("prelu")
def _prelu(tr, name, func, args, kwargs, out):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    _per_channel(tr, name, x, 1 if x.ndim >= 2 else 0, (w,), out, True)


def _masked_norm(tr: Tracer, name: str, x, dim: int, w, b, groups: int, out) -> None:
    """LayerNorm/GroupNorm over channels: the sparse model normalises kept channels only."""
    lab = tr.get(x)
    ent = lab.get(dim)
    res = dict(lab)
    if ent is not None:
        ids = ent[0]
        if w is None or tr.name_of(w) is None or (b is not None and tr.name_of(b) is None):
            tr.fix(ids, f"'{name}' normalises over channels without its own affine weight")
            res.pop(dim)
        else:
            if groups > 1:
                ids = _tie(tr, ids, groups)
                ids = ent[0]
            _couple(tr, ids, tr.dim_ids(w, 0), f"'{name}'")
            if b is not None:
                _couple(tr, ids, tr.dim_ids(b, 0), f"'{name}'")
            tr.norm_weights.add(tr.name_of(w))
            res[dim] = (ent[0], True)
    tr.set(out, res)


@register_rule("layer_norm", "rms_norm")
def _layer_norm(tr, name, func, args, kwargs, out):
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    w = arg(args, kwargs, 2, "weight")
    b = arg(args, kwargs, 3, "bias") if name == "layer_norm" else None
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    lab = tr.get(x)
    for d in range(x.ndim - k, x.ndim - 1):
        if d in lab:
            tr.fix(lab[d][0], f"'{name}' normalises over several channel dims")
    _masked_norm(tr, name, x, x.ndim - 1, w, b, 1, out)
    if w is not None and tr.name_of(w) is not None:
        tr.layer_norm_weights.add(tr.name_of(w))


@register_rule("group_norm")
def _group_norm(tr, name, func, args, kwargs, out):
    x, g = args[0], arg(args, kwargs, 1, "num_groups")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    _masked_norm(tr, name, x, 1, w, b, g, out)


@register_rule("embedding")
def _embedding(tr, name, func, args, kwargs, out):
    idx, w = args[0], arg(args, kwargs, 1, "weight")
    tr.fix_labels(tr.get(idx), "'embedding' indices carry channels")
    ids = tr.dim_ids(w, 1)
    tr.set(out, {out.ndim - 1: (ids, tr.zero(w, 1))} if ids is not None else {})


# ----- contractions -----------------------------------------------------------------
def contract(tr: Tracer, name: str, specs: list[str], operands: list, out_spec: str, out) -> None:
    """Einsum-style rule: letters shared by operands couple; dropped letters are summed."""
    labs = [tr.get(t) for t in operands]
    sizes: dict[str, int] = {}
    for s, t in zip(specs, operands):
        for ch, n in zip(s, t.shape):
            sizes[ch] = max(sizes.get(ch, 1), n)
    res: Labels = {}
    for ch, size in sizes.items():
        vecs, flags, unlabeled = [], [], False
        for s, t, lab in zip(specs, operands, labs):
            if ch not in s:
                continue
            d = s.index(ch)
            ent = lab.get(d)
            if ent is not None and t.shape[d] == size:
                vecs.append(ent[0])
                flags.append(ent[1])
            elif ent is not None:
                tr.fix(ent[0], f"'{name}' broadcasts a single channel")
            elif t.shape[d] == size and size > 1:
                unlabeled = True
        if not vecs:
            continue
        if unlabeled:
            for v in vecs:
                tr.fix(v, f"'{name}' contracts channels with a tensor whose channels are not prunable")
            continue
        if ch not in out_spec and not any(flags):
            for v in vecs:
                tr.fix(v, f"'{name}': pruned channels meet here without being zero on either side")
            continue
        for v in vecs[1:]:
            tr.union(vecs[0], v)
        if ch in out_spec:
            res[out_spec.index(ch)] = (vecs[0], any(flags))
    tr.set(out, res)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _matmul_specs(a: torch.Tensor, b: torch.Tensor) -> tuple[list[str], str]:
    na, nb = a.ndim, b.ndim
    nbatch = max(na, nb) - 2
    batch = _LETTERS[: max(nbatch, 0)]
    sa = batch[nbatch - (na - 2) :] + "nk" if na >= 2 else "k"
    sb = batch[nbatch - (nb - 2) :] + "km" if nb >= 2 else "k"
    so = batch + ("n" if na >= 2 else "") + ("m" if nb >= 2 else "")
    return [sa, sb], so


@register_rule("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
def _matmul(tr, name, func, args, kwargs, out):
    a, b = args[0], args[1]
    if name == "__rmatmul__":
        a, b = b, a
    specs, so = _matmul_specs(a, b)
    contract(tr, name, specs, [a, b], so, out)


@register_rule("_grouped_mm", "grouped_mm", "grouped_mm_fallback")
def _grouped_mm(tr, name, func, args, kwargs, out):
    """Mixture-of-experts ``grouped_mm(x (S, K), w (E, K, N), offs)``: rows of ``x`` grouped by
    expert; ``K`` couples ``x`` with every expert's weight, ``N`` is the output width. The
    experts dim stays here: whole experts go with their router rows (:mod:`prunekit.engine.experts`)."""
    x, w = args[0], arg(args, kwargs, 1, "weight", arg(args, kwargs, 1, "mat_b"))
    if not isinstance(w, torch.Tensor) or w.ndim != 3 or x.ndim != 2:
        raise ValueError(f"'{name}' with a {getattr(w, 'ndim', None)}-d weight and a {x.ndim}-d input")
    contract(tr, name, ["sk", "ekn"], [x, w], "sn", out)
    tr.fix(tr.dim_ids(w, 0), f"'{name}': the experts dim (remove whole experts, router rows with them)")


@register_rule("addmm", "baddbmm", "addbmm")
def _addmm(tr, name, func, args, kwargs, out):
    pair = ("mat1", "mat2") if name == "addmm" else ("batch1", "batch2")  # Bloom: alibi.baddbmm(batch1=q, ...)
    inp, a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, pair[0]), arg(args, kwargs, 2, pair[1])
    specs, so = _matmul_specs(a, b)
    contract(tr, name, specs, [a, b], so, out)
    prod_lab = tr.get(out)
    from prunekit.graph.rules import elementwise

    proxy = out.detach()
    tr.set(proxy, prod_lab)
    elementwise(tr, name, [proxy, inp], [out], "add")


@register_rule("einsum")
def _einsum(tr, name, func, args, kwargs, out):
    eq = args[0].replace(" ", "")
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    ins = lhs.split(",")
    used = set(re.sub(r"[^A-Za-z]", "", lhs))
    free = [c for c in _LETTERS if c not in used]
    ell = None
    specs = []
    for s, t in zip(ins, ops):
        if "..." in s:
            n = t.ndim - (len(s) - 3)
            ell = ell if ell is not None and len(ell) >= n else "".join(free[:n])
            s = s.replace("...", ell[len(ell) - n :] if n else "")
        specs.append(s)
    if rhs is None:
        counts = {}
        for s in specs:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        rhs = (ell or "") + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in (ell or "")))
    rhs = rhs.replace("...", ell or "")
    contract(tr, name, specs, ops, rhs, out)


@register_rule("scaled_dot_product_attention")
def _sdpa(tr, name, func, args, kwargs, out):
    q, k, v = args[0], arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
    mask = arg(args, kwargs, 3, "attn_mask")
    scale = arg(args, kwargs, 6, "scale")
    if scale is None:
        for t in (q, k):
            ent = tr.get(t).get(t.ndim - 1)
            if ent is not None:
                tr.fix(
                    ent[0],
                    "'scaled_dot_product_attention' with the default scale: "
                    "pruning the query/key width would change the scale",
                )
    n = max(q.ndim, k.ndim, v.ndim) - 2
    batch = _LETTERS[:n]
    sq = batch[n - (q.ndim - 2) :] + "LE"
    sk = batch[n - (k.ndim - 2) :] + "SE"
    sv = batch[n - (v.ndim - 2) :] + "SV"
    if arg(args, kwargs, 7, "enable_gqa", False) and k.ndim > 2 and k.shape[-3] != q.shape[-3]:
        # grouped-query attention: query head i reads key/value head i // (Hq / Hkv); seen
        # as repeated key/value heads, a group's query heads go with their key/value head
        k, v = (_repeat_heads(tr, t, q.shape[-3] // t.shape[-3]) for t in (k, v))
    # scores = q k^T (contract E), out = softmax(scores) v (contract S)
    bshape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    scores = torch.empty(*bshape, q.shape[-2], k.shape[-2])
    sb = batch[n - len(bshape) :] + "LS"
    contract(tr, name, [sq, sk], [q, k], sb, scores)
    if isinstance(mask, torch.Tensor) and tr.get(mask):
        # the mask is added to the scores: a per-head bias (Swin's relative position table)
        # loses the heads the query loses
        from prunekit.graph.rules import elementwise

        elementwise(tr, name, [scores, mask], [scores], "add")
    contract(tr, name, [sb, sv], [scores, v], batch + "LV", out)
    res = dict(tr.get(out))
    ent = tr.get(q).get(q.ndim - 2)
    if ent is not None:
        res[out.ndim - 2] = ent
    tr.set(out, res)


def _repeat_heads(tr: Tracer, t: torch.Tensor, rep: int) -> torch.Tensor:
    """A stand-in for ``t.repeat_interleave(rep, dim=-3)`` carrying the repeated labels."""
    shape = list(t.shape)
    shape[-3] *= rep
    proxy = torch.empty(shape, device="meta")
    lab = {}
    for d, (ids, z) in tr.get(t).items():
        lab[d] = (ids.repeat_interleave(rep) if d == t.ndim - 3 else ids, z)
    tr.set(proxy, lab)
    return proxy


_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


@register_rule("multi_head_attention_forward")
def _mha(tr, name, func, args, kwargs, out):
    a = _MHA_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    q, k, v = p["query"], p["key"], p["value"]
    h = p["num_heads"]
    what = "'nn.MultiheadAttention'"
    if p["use_separate_proj_weight"]:
        _couple(tr, tr.get(q).get(q.ndim - 1, (None,))[0], tr.dim_ids(p["q_proj_weight"], 1), what)
        _couple(tr, tr.get(k).get(k.ndim - 1, (None,))[0], tr.dim_ids(p["k_proj_weight"], 1), what)
        _couple(tr, tr.get(v).get(v.ndim - 1, (None,))[0], tr.dim_ids(p["v_proj_weight"], 1), what)
        inner = [tr.dim_ids(p[n], 0) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
    else:
        win = tr.dim_ids(p["in_proj_weight"], 1)
        for t in (q, k, v):
            _couple(tr, tr.get(t).get(t.ndim - 1, (None,))[0], win, what)
        wo = tr.dim_ids(p["in_proj_weight"], 0)
        inner = list(wo.view(3, -1)) if wo is not None else [None]
    o_in = tr.dim_ids(p["out_proj_weight"], 1)
    bias = tr.dim_ids(p["in_proj_bias"], 0)
    parts = [x for x in inner if x is not None] + ([o_in] if o_in is not None else [])
    if len(parts) == 4:
        heads = torch.stack([x.view(h, -1) for x in parts], 1).reshape(h, -1)  # head i: all its rows
        tr.union(heads, heads[:, :1].expand_as(heads))
        if bias is not None:
            tr.union(bias, torch.cat(inner))
        if p["bias_k"] is not None or p["need_weights"] or p["static_k"] is not None:
            tr.fix(
                heads,
                f"{what}: heads stay when attention weights are returned "
                "(need_weights=True) or bias_k/static_k are used",
            )
    else:
        for x in parts:
            tr.fix(x, f"{what}: unusual projection layout")
    wout = tr.dim_ids(p["out_proj_weight"], 0)
    _couple(tr, wout, tr.dim_ids(p["out_proj_bias"], 0), what)
    outs = tree_flatten(out)[0]
    if wout is not None and outs:
        tr.set(outs[0], {outs[0].ndim - 1: (wout, True)})
    for o in outs[1:]:
        tr.set(o, {})
