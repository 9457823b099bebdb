"""Channel rules for parameter-free torch ops: elementwise, layout, reductions, pooling.

Each rule reads the labels of an op's inputs from the :class:`~prunekit.graph.trace.Tracer`,
records couplings or fixed channels, and sets the labels of the op's outputs. Layout ops
(view, permute, cat, pixel_shuffle, ...) are not described by hand: the op itself is run
on a tensor of channel ids, and the result says where every channel went.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten

from prunekit.graph.trace import Labels, Tracer, register_rule

# f(0) == 0: a pruned channel held at zero stays zero.
ZERO_UNARY = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "tanh",
    "hardswish",
    "hardtanh",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "mish",
    "neg",
    "abs",
    "sin",
    "erf",
    "sqrt",
    "square",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "clone",
    "contiguous",
    "detach",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type",
    "type_as",
    "requires_grad_",
    "tril",
    "triu",
    "nan_to_num",
    "threshold",
    "softshrink",
    "hardshrink",
    "tanhshrink",
    "sign",
    "trunc",
    "round",
    "floor",
    "ceil",
    "cpu",
    "cuda",
    "zeros_like",
    "positive",
    "asinh",
    "atan",
    "sinh",
    "tan",
    "expm1",
    "log1p",
    "rrelu",
)
OTHER_UNARY = (
    "sigmoid",
    "hardsigmoid",
    "exp",
    "log",
    "rsqrt",
    "reciprocal",
    "cos",
    "softplus",
    "softsign",
    "logsigmoid",
    "logical_not",
    "bitwise_not",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "isnan",
    "isinf",
    "isfinite",
    "log2",
    "log10",
    "exp2",
    "sigmoid_",
    "cosh",
    "acos",
    "asin",
    "erfc",
    "lgamma",
    "digamma",
    "frac",
    "bernoulli",
    "normal_",
    "uniform_",
    "fill_",
    "zero_",
    "exponential_",
    "invert",
)
ADD_LIKE = (
    "add",
    "sub",
    "rsub",
    "where",
    "lerp",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "addcmul",
    "addcdiv",
    "copy_",
    "hypot",
    "logaddexp",
)
MUL_LIKE = ("mul", "multiply", "masked_fill", "logical_and", "bitwise_and", "and")
DIV_LIKE = ("div", "true_divide", "divide", "floor_divide", "fmod", "remainder", "floordiv", "truediv", "mod")
OTHER_BINARY = (
    "pow",
    "eq",
    "ne",
    "lt",
    "gt",
    "le",
    "ge",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "atan2",
    "copysign",
    "logical_or",
    "logical_xor",
    "bitwise_or",
    "bitwise_xor",
    "or",
    "xor",
    "float_power",
    "greater",
    "less",
    "equal_",
    "not_equal",
    "greater_equal",
    "less_equal",
    "isclose",
    "heaviside",
)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _has_number(args) -> bool:
    return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args[1:])


def elementwise(tr: Tracer, name: str, operands: list[torch.Tensor], outs, zero: str) -> None:
    """Broadcasting elementwise op: operands aligned from the right couple per channel."""
    outs = [o for o in outs if isinstance(o, torch.Tensor)]
    if not outs:
        return
    o = outs[0]
    labs = [tr.get(t) for t in operands]
    if not any(labs):
        for x in outs:
            tr.set(x, {})
        return
    result: Labels = {}
    for d in range(o.ndim):
        size = o.shape[d]
        vecs, flags, full_unlabeled, broadcast_unlabeled = [], [], False, False
        for t, lab in zip(operands, labs):
            td = d - (o.ndim - t.ndim)
            if td < 0:
                continue
            ent = lab.get(td)
            if ent is not None:
                if t.shape[td] == size:
                    vecs.append(ent[0])
                    flags.append(ent[1])
                else:
                    tr.fix(ent[0], f"'{name}' broadcasts a single channel")
            elif t.shape[td] == size and size > 1:
                full_unlabeled = True
            else:
                broadcast_unlabeled = True
        if not vecs:
            continue
        if full_unlabeled:
            for v in vecs:
                tr.fix(v, f"'{name}' combines channels with a tensor whose channels are not prunable")
            continue
        for v in vecs[1:]:
            tr.union(vecs[0], v)
        if zero == "unary0":
            flag = flags[0]
        elif zero == "add":
            flag = (
                all(flags)
                and not broadcast_unlabeled
                and len(vecs) == len([t for t in operands if d - (o.ndim - t.ndim) >= 0])
            )
        elif zero == "mul":
            flag = any(flags)
        elif zero == "div":
            flag = bool(labs[0].get(d - (o.ndim - operands[0].ndim))) and flags[0]
        else:
            flag = False
        result[d] = (vecs[0], flag)
    for x in outs:
        if x.shape == o.shape:
            tr.set(x, result)


@register_rule(*ZERO_UNARY)
def _unary_zero(tr, name, func, args, kwargs, out):
    if args and isinstance(args[0], torch.Tensor):
        elementwise(tr, name, [args[0]], tree_flatten(out)[0], "unary0")


@register_rule(*OTHER_UNARY)
def _unary(tr, name, func, args, kwargs, out):
    if args and isinstance(args[0], torch.Tensor):
        elementwise(tr, name, [args[0]], tree_flatten(out)[0], "none")


def _binary(zero: str):
    def rule(tr, name, func, args, kwargs, out):
        ops = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        if zero == "add" and _has_number(args):
            z = "none"
        else:
            z = zero
        elementwise(tr, name, ops, tree_flatten(out)[0], z)

    return rule


register_rule(*ADD_LIKE)(_binary("add"))
register_rule(*MUL_LIKE)(_binary("mul"))
register_rule(*DIV_LIKE)(_binary("div"))
register_rule(*OTHER_BINARY)(_binary("none"))


# ----- layout ops: run the op on the channel ids themselves ---------------------------
INDEX_OPS = (
    "__getitem__",
    "index_select",
    "gather",
    "narrow",
    "select",
    "take",
    "take_along_dim",
    "masked_select",
    "roll",
    "flip",
    "fliplr",
    "flipud",
    "index",
    "diagonal",
    "unfold",
    "as_strided",
)
LAYOUT_OPS = (
    "view",
    "reshape",
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "view_as",
    "reshape_as",
    "repeat",
    "tile",
    "movedim",
    "moveaxis",
    "t",
    "T",
    "mT",
    "data",
    "cat",
    "concat",
    "concatenate",
    "stack",
    "hstack",
    "vstack",
    "dstack",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
    "native_channel_shuffle",
    "pad",
    "chunk",
    "tensor_split",
    "split",
    "unbind",
    "split_with_sizes",
    "repeat_interleave",
    "atleast_1d",
    "atleast_2d",
    "atleast_3d",
    "ravel",
    "broadcast_to",
    "unsafe_chunk",
    "unsafe_split",
    "hsplit",
    "vsplit",
)


def _varying(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Narrow ``t`` to one index along every dim it is constant along; list varying dims."""
    vary = []
    for k in range(t.ndim):
        if t.shape[k] <= 1:
            continue
        if t.stride(k) == 0:
            t = t.narrow(k, 0, 1)
            continue
        first = t.narrow(k, 0, 1)
        if torch.equal(t, first.expand_as(t)):
            t = first
        else:
            vary.append(k)
    return t, vary


def _canon(
    tr: Tracer, name: str, t: torch.Tensor, shape: list[int] | None = None
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Reduce a tensor of channel ids to ``(dim, ids)``; tie dims when ids vary along several.

    ``shape``: for a view/reshape/unflatten, the output sizes as given (``-1``: inferred).
    """
    c, vary = _varying(t)
    if not vary:
        v = c.reshape(-1)[:1].long()
        return None if v.numel() == 0 or int(v[0]) < 0 else (-1, v, v)
    if len(vary) == 1:
        v = c.reshape(-1).long()
        k = vary[0]
        if (
            name in RESHAPE_OPS
            and shape is not None
            and len(shape) == t.ndim
            and k > 0
            and shape[k] != -1
            and shape[k - 1] == -1
            and t.shape[k - 1] == 1
        ):
            # (..., -1, head_dim) with a single head: head_dim is given explicitly, so it can
            # only change along with the module's attribute (head_dim pruning)
            if tr.attention == "head_dim":
                prev = tr.head_dims.setdefault((tr.where(), t.shape[k]), v)
                tr.union(prev, v)
            else:
                tr.fix(v, f"'{name}' splits a width into one head of an explicit head_dim")
                return None
        return k, v, v
    # ids vary along several dims (a channel dim split in two, pixel shuffle, cat along a
    # non-channel dim): keep the innermost dim whose slices hold disjoint ids prunable and
    # couple positions along the others, so the pruned layout stays a valid product.
    # A reshape into (heads, head_dim) may keep the heads factor instead (Tracer.attention).
    n = tr.book.n

    def disjoint(k: int) -> bool:
        rows = c.movedim(k, 0).reshape(c.shape[k], -1).long()
        pos = torch.arange(rows.shape[0]).unsqueeze(1).expand_as(rows)
        ok = rows >= 0
        ids, at = rows[ok], pos[ok]
        lo = torch.full((n,), rows.shape[0], dtype=torch.long).scatter_reduce(0, ids, at, "amin")
        hi = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, ids, at, "amax")
        return bool((lo[ids] == hi[ids]).all())

    order = list(reversed(vary))
    reshape = name in RESHAPE_OPS
    shape = shape if shape is not None and len(shape) == c.ndim else None
    if reshape and tr.attention == "heads":
        order.insert(0, vary[-2])
    elif reshape and tr.attention == "auto" and shape is not None and -1 in shape and shape.index(-1) in vary:
        order.insert(0, shape.index(-1))
    choice = next((k for k in order if disjoint(k)), None)
    if choice is None:
        tr.fix(c.long().reshape(-1), f"'{name}' scatters channels in a way that cannot be pruned")
        return None
    ref = _distinct_rows(c.movedim(choice, -1).reshape(-1, c.shape[choice]).long())
    tr.union(ref, ref[:1].expand_as(ref))
    if reshape:
        tr.head_splits[tr.where()] = "head_dim" if choice == vary[-1] else "heads"
        if shape is not None and shape[choice] != -1:
            # a size the module gives explicitly (``view(b, n, -1, self.head_dim)``): every
            # split of this module with that size must keep the same width (q, k and v)
            prev = tr.head_dims.setdefault((tr.where(), c.shape[choice]), ref[0])
            tr.union(prev, ref[0])
    return choice, ref[0], ref.reshape(-1)


def _distinct_rows(rows: torch.Tensor) -> torch.Tensor:
    """The distinct rows of an id matrix (first row first), found by hashing, then checked."""
    if rows.shape[0] <= 8:
        return rows
    w = torch.rand(rows.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = rows.double() @ w
    _, inv = torch.unique(h, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), rows.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(rows.shape[0]), "amin")
    if not torch.equal(rows, rows[first[inv]]):  # a hash collision: keep every row
        return rows
    first = first.sort().values
    return rows[first]


def _realise(a):
    """Index tensors computed on fake tensors have no values; any valid index gives the
    same channel layout along the dims it does not index (and indexed channel dims are
    caught by the index-op check), so zeros stand in for them."""
    if isinstance(a, (list, tuple)):
        return type(a)(_realise(x) for x in a)
    if isinstance(a, FakeTensor) or (isinstance(a, torch.Tensor) and a.is_meta):
        if a.dtype in (torch.bool, torch.uint8) or a.is_floating_point():
            raise RuntimeError("boolean or float tensor argument has no values (fake/meta tracing)")
        return torch.zeros(a.shape, dtype=a.dtype)
    return a


RESHAPE_OPS = ("view", "reshape", "unflatten")


def _given_shape(name: str, args, kwargs, out) -> list[int] | None:
    """The output sizes of a view/reshape/unflatten as its caller gave them (``-1``: inferred)."""
    try:
        if name == "unflatten":
            x, dim = args[0], _arg_or(args, kwargs, 1, "dim")
            sizes = list(_arg_or(args, kwargs, 2, "sizes"))
            dim %= x.ndim
            shape = [-2] * dim + sizes + [-2] * (x.ndim - dim - 1)  # -2: not part of the call
        else:
            shape = args[1:] if len(args) > 1 else [kwargs.get("shape", kwargs.get("size"))]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = shape[0]
            shape = list(shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            return None
        return shape if isinstance(out, torch.Tensor) and len(shape) == out.ndim else None
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return None


def _arg_or(args, kwargs, pos: int, key: str):
    return kwargs[key] if key in kwargs else args[pos]


def _layout(tr: Tracer, name: str, func, args, kwargs, out) -> None:
    """Layout ops (reshape, permute, pad, cat, index, ...): run the op on channel-id tensors to see
    where each input channel lands; whatever merges, selects or drops channels is fixed."""
    data = args[0] if args else next(iter(kwargs.values()), None)
    many = isinstance(data, (list, tuple))
    inputs = [t for t in (list(data) if many else [data]) if isinstance(t, torch.Tensor)]
    labs = [tr.get(t) for t in inputs]
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not any(labs):
        for o in outs:
            tr.set(o, {})
        return
    results: list[Labels] = [{} for _ in outs]
    given = _given_shape(name, args, kwargs, out) if name in RESHAPE_OPS else None
    for d in sorted({d for lab in labs for d in lab}):
        zero = all(lab[d][1] for lab in labs if d in lab)
        in_ids = torch.cat([lab[d][0] for lab in labs if d in lab])
        res = _on_ids(tr, name, func, args, kwargs, _id_tensors(inputs, labs, d), many)
        found = _place(tr, name, res, given, results, in_ids, zero)
        want = in_ids[in_ids >= 0].unique()
        _fix_partial(tr, name, found, want, results)
        if name in INDEX_OPS:
            _fix_reordered(tr, name, labs[0].get(d), want, results)
    for o, r in zip(outs, results):
        tr.set(o, r)


def _id_tensors(inputs: list[torch.Tensor], labs: list[Labels], d: int) -> list[torch.Tensor]:
    """Each input as a tensor of its channel ids along ``d`` (``-1`` where it has none)."""
    subs = []
    for t, lab in zip(inputs, labs):
        ent = lab.get(d) if d < t.ndim else None
        if ent is None:
            subs.append(torch.tensor(-1.0, dtype=torch.float64).expand(t.shape))
        else:
            shape = [1] * t.ndim
            shape[d] = -1
            subs.append(ent[0].to(torch.float64).view(shape).expand(t.shape))
    return subs


def _on_ids(tr: Tracer, name: str, func, args, kwargs, subs: list[torch.Tensor], many: bool):
    """The op applied to the id tensors (a pad adds ``-1``: channels of no group)."""
    new_args = ((subs if many else subs[0]),) + tuple(_realise(a) for a in args[1:])
    kw = dict(kwargs)
    if name == "pad":
        if len(new_args) > 3:
            new_args = new_args[:3] + (-1.0,) + new_args[4:]
        else:
            kw["value"] = -1.0
    # expand_as / view_as / reshape_as: the second argument only donates its shape
    with tr.paused():
        try:
            return func(*new_args, **kw)
        except RuntimeError:  # the broadcast id tensor is not viewable where the input was
            if name not in ("view", "view_as"):
                raise
            return func(subs[0].contiguous(), *new_args[1:], **kw)


def _place(tr: Tracer, name: str, res, given, results: list[Labels], in_ids, zero: bool) -> list[torch.Tensor]:
    """Record where the ids landed in each output; returns the ids present in the outputs."""
    found = []
    for i, r in enumerate(t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)):
        got = _canon(tr, name, r, given)
        if got is None:
            continue
        od, ids, present = got
        found.append(present)
        if od < 0:
            tr.fix(in_ids, f"'{name}' selects a single channel")
            continue
        prev = results[i].get(od)
        if prev is not None:
            tr.fix(torch.cat([prev[0], ids]), f"'{name}' merges two channel dims")
            results[i].pop(od)
            continue
        results[i][od] = (ids, zero)
    return found


def _fix_partial(tr: Tracer, name: str, found: list[torch.Tensor], want: torch.Tensor, results: list[Labels]) -> None:
    """Channels that do not all reach the outputs are fixed (and dropped from the outputs' labels)."""
    kept = torch.cat(found).unique() if found else want[:0]
    kept = kept[kept >= 0]
    if kept.shape != want.shape or not torch.equal(kept, want):
        tr.fix(want, f"'{name}' keeps only part of the channels (fixed indices)")
        for r in results:
            for k in [k for k, v in r.items() if torch.isin(v[0], want).any()]:
                r.pop(k)


def _fix_reordered(tr: Tracer, name: str, src, want: torch.Tensor, results: list[Labels]) -> None:
    """An index op that reorders or repeats channels fixes them."""
    for r in results:
        for k, (ids, _) in list(r.items()):
            if src is None or ids.shape != src[0].shape or not torch.equal(ids, src[0]):
                tr.fix(torch.cat([ids, want]), f"'{name}' reorders or indexes channels")
                r.pop(k)


def _split_like(tr: Tracer, name: str, func, args, kwargs, out) -> None:
    """chunk/split/unbind: pieces along a channel dim must lose the same positions."""
    x = args[0]
    lab = tr.get(x)
    if name in ("unbind",):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    else:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    dim = dim % x.ndim if isinstance(dim, int) else dim
    ent = lab.get(dim) if isinstance(dim, int) else None
    if ent is not None:
        n = len(out) if isinstance(out, (tuple, list)) else 1
        sizes = {o.shape[dim] for o in out} if isinstance(out, (tuple, list)) and name != "unbind" else set()
        dynamic = name in ("chunk", "tensor_split", "unsafe_chunk") and not (
            len(args) > 1 and isinstance(args[1], (list, tuple))
        )
        if not dynamic and name in ("split", "unsafe_split") and _attribute_size(tr, args, kwargs):
            dynamic = True  # the size is a module attribute that the slim updaters keep in line
        if name == "unbind" or not dynamic or len(sizes) != 1 or n * next(iter(sizes)) != x.shape[dim]:
            tr.fix(ent[0], f"'{name}' cuts the channels at fixed sizes")
        else:
            rows = ent[0].view(n, -1)
            tr.union(rows, rows[:1].expand_as(rows))
    _layout(tr, name, func, args, kwargs, out)


#: Module attributes that hold the width of one piece of an equal ``split`` and that the slim
#: updaters keep in line (e.g. GPT-2's ``split_size``): such a split prunes like ``chunk``.
SPLIT_SIZE_ATTRS: set[str] = {"split_size"}


def _attribute_size(tr: Tracer, args, kwargs) -> bool:
    size = kwargs.get("split_size", kwargs.get("split_size_or_sections", args[1] if len(args) > 1 else None))
    if not isinstance(size, int) or isinstance(size, bool):
        return False
    mod = tr.current_module()
    return any(getattr(mod, a, None) == size for a in SPLIT_SIZE_ATTRS)


def _acted_dims(name: str, x: torch.Tensor, args, kwargs) -> list[int] | None:
    """The dims roll/pad/flip act on (None: all of them)."""
    tr_dims = None
    if name == "roll":
        dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
        if dims is None:
            return None
        tr_dims = [dims] if isinstance(dims, int) else list(dims)
    elif name == "pad":
        pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
        tr_dims = list(range(x.ndim - len(pad) // 2, x.ndim))
    elif name in ("flip",):
        dims = kwargs.get("dims", args[1] if len(args) > 1 else None)
        tr_dims = [dims] if isinstance(dims, int) else list(dims)
    return tr_dims


@register_rule(*LAYOUT_OPS, *INDEX_OPS)
def _layout_rule(tr, name, func, args, kwargs, out):
    if name in ("roll", "pad", "flip") and isinstance(args[0], torch.Tensor):
        x = args[0]
        dims = _acted_dims(name, x, args, kwargs)
        lab = tr.get(x)
        if dims is not None and isinstance(out, torch.Tensor) and out.ndim == x.ndim:
            dims = {d % x.ndim for d in dims}
            if not any(d in lab for d in dims):
                tr.set(out, dict(lab))
                return
    if name in (
        "chunk",
        "split",
        "unbind",
        "tensor_split",
        "split_with_sizes",
        "unsafe_chunk",
        "unsafe_split",
        "hsplit",
        "vsplit",
    ):
        _split_like(tr, name, func, args, kwargs, out)
    else:
        _layout(tr, name, func, args, kwargs, out)


def _rows_write(tr, args) -> bool:
    """``dest[rows] = value`` that writes whole rows (an index along dim 0 only, every other
    dim whole): each channel of ``value`` lands in the same channel of ``dest``, so their
    channels couple (torchvision's multi-scale RoI pooling fills one result this way, level
    by level). Returns False for any other write, which the caller then fixes."""
    if len(args) != 3:
        return False
    dest, index, value = args
    if not (isinstance(dest, torch.Tensor) and isinstance(value, torch.Tensor)):
        return False
    first = index[0] if isinstance(index, tuple) and index else index
    rest = index[1:] if isinstance(index, tuple) else ()
    whole = all(r is Ellipsis or (isinstance(r, slice) and r == slice(None)) for r in rest)
    if not (
        whole
        and (
            isinstance(first, slice)
            or (isinstance(first, torch.Tensor) and first.ndim == 1 and not first.is_floating_point())
        )
    ):
        return False
    if value.ndim != dest.ndim or tuple(value.shape[1:]) != tuple(dest.shape[1:]):
        return False
    dl, vl = tr.get(dest), tr.get(value)
    if 0 in dl or 0 in vl or (isinstance(first, torch.Tensor) and tr.get(first)):
        return False
    if not dl:  # a fresh tensor (torch.zeros(...)) being filled: it takes the value's channels;
        # its other rows hold whatever it held, so pruned channels are not known to be zero
        tr.set(dest, {d: (ids, False) for d, (ids, _) in vl.items()})
        return True
    res: Labels = {}
    for d in set(dl) | set(vl):
        a, b = dl.get(d), vl.get(d)
        if a is not None and b is not None:
            tr.union(a[0], b[0])
            res[d] = (a[0], a[1] and b[1])
        else:  # channels on one side only: the other side's values sit at pruned positions
            tr.fix((a or b)[0], "'__setitem__' writes rows whose other side carries no channels")
    tr.set(dest, res)
    return True


@register_rule(
    "__setitem__",
    "index_put_",
    "index_put",
    "scatter",
    "scatter_",
    "scatter_add",
    "scatter_add_",
    "index_add",
    "index_add_",
    "masked_scatter",
    "index_copy",
    "index_fill",
    "index_fill_",
    "masked_fill_",
)
def _write_into(tr, name, func, args, kwargs, out):
    if name in ("masked_fill_", "index_fill", "index_fill_"):
        lab = tr.get(args[0])
        if name == "masked_fill_":
            elementwise(tr, name, _tensors(args), [args[0]], "mul")
            return
        dim = args[1]
        if lab.get(dim % args[0].ndim) is not None:
            tr.fix(lab[dim % args[0].ndim][0], f"'{name}' writes into fixed channels")
        tr.set(out, lab)
        return
    if name == "__setitem__" and _rows_write(tr, args):
        return
    for t in _tensors((args, kwargs)):
        lab = tr.get(t)
        if lab:
            tr.fix_labels(lab, f"'{name}' writes into part of a tensor")
            tr.warn(f"'{name}' writes into a tensor that carries channels; they stay unpruned")
    if isinstance(out, torch.Tensor) and out is not args[0]:
        tr.set(out, {})


# ----- reductions and ops that mix along one dim --------------------------------------
REDUCE = (
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "norm",
    "logsumexp",
    "prod",
    "all",
    "any",
    "argmax",
    "argmin",
    "nansum",
    "nanmean",
    "median",
    "nanmedian",
    "mode",
    "count_nonzero",
    "std_mean",
    "var_mean",
    "aminmax",
)


def _dims_arg(args, kwargs, pos: int):
    if "dim" in kwargs:
        return kwargs["dim"]
    if "axis" in kwargs:
        return kwargs["axis"]
    if len(args) > pos and not isinstance(args[pos], torch.Tensor):
        return args[pos]
    return None


@register_rule(*REDUCE)
def _reduce(tr, name, func, args, kwargs, out):
    x = args[0]
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return _binary("add")(tr, name, func, args, kwargs, out)
    lab = tr.get(x)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not lab:
        for o in outs:
            tr.set(o, {})
        return
    pos = 2 if name == "norm" else 1
    dims = _dims_arg(args, kwargs, pos)
    if name == "norm" and isinstance(dims, str):
        dims = None
    keep = kwargs.get("keepdim", args[pos + 1] if len(args) > pos + 1 and isinstance(args[pos + 1], bool) else False)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        red = set(range(x.ndim))
    else:
        red = {d % x.ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    res: Labels = {}
    for d, (ids, z) in lab.items():
        if d in red:
            tr.fix(ids, f"'{name}' reduces over channels")
            continue
        nd = d if keep else d - sum(1 for r in red if r < d)
        res[nd] = (
            ids,
            z
            and name in ("sum", "mean", "amax", "amin", "max", "min", "nansum", "nanmean", "logsumexp")
            and name != "logsumexp",
        )
    for o in outs:
        if o.is_floating_point():
            tr.set(o, res)
        else:
            tr.set(o, {})


MIX = {
    "softmax": (1, None),
    "log_softmax": (1, None),
    "softmin": (1, None),
    "_softmax": (1, None),
    "cumsum": (1, None),
    "cumprod": (1, None),
    "cummax": (1, None),
    "cummin": (1, None),
    "logcumsumexp": (1, None),
    "normalize": (2, 1),
    "sort": (1, -1),
    "argsort": (1, -1),
    "topk": (2, -1),
    "kthvalue": (2, -1),
    "local_response_norm": (None, 1),
    "glu": (1, -1),
    "renorm": (2, None),
    "cross": (2, None),
}


@register_rule(*MIX)
def _mix(tr, name, func, args, kwargs, out):
    x = args[0]
    lab = tr.get(x)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    pos, default = MIX[name]
    dim = kwargs.get("dim", args[pos] if pos is not None and len(args) > pos else default)
    if not isinstance(dim, int):
        dim = default if default is not None else -1
    dim %= x.ndim
    res = dict(lab)
    if dim in res:
        tr.fix(res.pop(dim)[0], f"'{name}' mixes values across channels")
    for o in outs:
        tr.set(o, {d: (i, z and name == "normalize") for d, (i, z) in res.items()} if o.ndim == x.ndim else {})


SPATIAL = (
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "lp_pool1d",
    "lp_pool2d",
    "lp_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d_with_indices",
    "interpolate",
    "upsample",
    "upsample_nearest",
    "upsample_bilinear",
    "fractional_max_pool2d",
    "grid_sample",
    "affine_grid",
    "_adaptive_avg_pool2d",
    "max_unpool2d",
    "adaptive_max_pool1d_with_indices",
)


@register_rule(*SPATIAL)
def _spatial(tr, name, func, args, kwargs, out):
    x = args[0]
    lab = tr.get(x)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample"):
        nsp = x.ndim - 2
    else:
        nsp = int(name.split("pool")[1][0]) if "pool" in name and name.split("pool")[1][:1].isdigit() else x.ndim - 2
    res: Labels = {}
    for d, (ids, z) in lab.items():
        if d >= x.ndim - nsp:
            tr.fix(ids, f"'{name}' pools over channels")
        else:
            res[d] = (ids, z and "lp_pool" not in name)
    for t in _tensors(args[1:]):
        tr.fix_labels(tr.get(t), f"'{name}' uses channels as coordinates")
    for o in outs:
        tr.set(o, res if o.ndim == x.ndim else {})


@register_rule("roi_align", "roi_pool")
def _roi(tr, name, func, args, kwargs, out):
    """torchvision's region pooling: every output channel is its input channel sampled at the
    boxes (bilinear or max over zeros stays zero); the boxes are coordinates."""
    x = args[0]
    lab = tr.get(x)
    res: Labels = {}
    for d, (ids, z) in lab.items():
        if d == 1 and x.ndim == 4:
            res[1] = (ids, z)
        else:
            tr.fix(ids, f"'{name}' samples over this dim")
    for t in _tensors(args[1:]) + _tensors(list(kwargs.values())):
        tr.fix_labels(tr.get(t), f"'{name}' uses channels as coordinates")
    for o in _tensors(out):
        tr.set(o, res if o.ndim == 4 else {})


@register_rule(
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "randn",
    "rand",
    "tensor",
    "as_tensor",
    "eye",
    "linspace",
    "randint",
    "size",
    "dim",
    "numel",
    "item",
    "tolist",
    "stride",
    "is_contiguous",
    "data_ptr",
    "element_size",
    "is_floating_point",
    "__len__",
    "__bool__",
    "__hash__",
    "__format__",
    "__repr__",
    "__int__",
    "__float__",
    "__index__",
    "storage_offset",
    "get_device",
    "nelement",
    "is_complex",
    "numpy",
    "__array__",
    "untyped_storage",
    "_is_view",
    "is_set_to",
    "dim_order",
    "__reduce_ex__",
    "__deepcopy__",
    "register_hook",
    "retain_grad",
    "backward",
    "argwhere",
    "nonzero",
    "meshgrid",
    "bincount",
    "histc",
    "unique",
    "one_hot",
    "searchsorted",
    "bucketize",
    "cdist",
    "_has_compatible_shallow_copy_type",
    "__contains__",
    "__iter__",
    "__dlpack__",
    "equal",
    "allclose",
    "broadcast_tensors",
    "result_type",
    "can_cast",
    "promote_types",
    "is_nonzero",
    "__nonzero__",
)
def _no_channels(tr, name, func, args, kwargs, out):
    for o in _tensors(out):
        tr.set(o, {})
