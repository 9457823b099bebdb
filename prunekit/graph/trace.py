"""Trace a model on example inputs and record how channels flow between tensors.

The tracer is a :class:`~torch.overrides.TorchFunctionMode`: the model runs for real
(Python control flow, modules called twice, ``torch.no_grad()`` callers all work), and
every torch function call is handed to a *rule* (see :mod:`prunekit.graph.rules` and
:mod:`prunekit.graph.layers`) that reads the channel labels of its inputs and writes
those of its outputs.

A tensor's labels are a dict ``{dim: (ids, zero)}``: along ``dim``, index ``i`` belongs
to channel id ``ids[i]`` (``-1``: no prunable channel); ``zero`` says whether the sparse
model holds pruned channels at exactly zero there. Other dims carry no channels.
Parameters and floating-point buffers get a space per dimension on first use.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> tr = trace(model, torch.randn(1, 3, 8, 8))
    >>> roots = tr.book.roots()
    >>> a = tr.book.spaces[("0.weight", 0)].ids
    >>> b = tr.book.spaces[("2.weight", 1)].ids
    >>> bool((roots[a] == roots[b]).all())
    True
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from prunekit.graph.labels import LabelBook

__all__ = ["Tracer", "trace", "call_model", "register_module_handler", "Labels", "ATTENTION_MODES"]

Labels = dict[int, tuple[torch.Tensor, bool]]
RuleFn = Callable[["Tracer", str, Callable, tuple, dict, Any], None]

#: name -> rule; filled by :mod:`prunekit.graph.rules` and :mod:`prunekit.graph.layers`.
RULES: dict[str, RuleFn] = {}
#: function object -> rule; for user functions with torch-function support.
FUNC_RULES: dict[Callable, RuleFn] = {}
#: module class -> handler(tracer, module, args, kwargs, output)
MODULE_HANDLERS: dict[type, Callable] = {}

_SILENT_PROPS = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "requires_grad",
    "is_cuda",
    "grad",
    "layout",
    "names",
    "is_leaf",
    "grad_fn",
    "itemsize",
    "nbytes",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "output_nr",
    "_version",
    "is_nested",
    "real",
    "imag",
}


def register_rule(*names: str) -> Callable[[RuleFn], RuleFn]:
    """Register a channel rule for torch functions/methods with the given ``__name__``."""

    def deco(fn: RuleFn) -> RuleFn:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def register_module_handler(cls: type, handler: Callable | None = None):
    """Register how channels flow through a custom layer type.

    The layer's ``forward`` then runs untraced, and ``handler(tracer, module, args, kwargs,
    output)`` sets the labels of ``output`` using :meth:`Tracer.get`, :meth:`Tracer.dim_ids`,
    :meth:`Tracer.union`, :meth:`Tracer.fix` and :meth:`Tracer.set`.

    Example:
        >>> class Scale(nn.Module):
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.ones(c))
        ...     def forward(self, x):
        ...         return x * self.w[:, None, None]
        >>> @register_module_handler(Scale)
        ... def _scale(tr, mod, args, kwargs, out):
        ...     ids, zero = tr.get(args[0])[1]
        ...     tr.union(ids, tr.dim_ids(mod.w, 0))
        ...     tr.set(out, {1: (ids, zero)})
    """

    def deco(fn: Callable) -> Callable:
        MODULE_HANDLERS[cls] = fn
        return fn

    return deco(handler) if handler is not None else deco


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with example inputs: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class _NeedRealValues(RuntimeError):
    """A rule could not run on fake tensors; the trace is redone with real ones."""


class Tracer(TorchFunctionMode):
    """Records channel coupling while the model runs. Use :func:`trace`."""

    def __init__(
        self, model: nn.Module, stand_ins: dict[str, torch.Tensor] | None = None, attention: str = "auto"
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.model = model
        #: which factor stays prunable where a reshape splits a width into (heads, head_dim)
        self.attention = attention
        #: module -> "heads" or "head_dim": the factor kept prunable at its width splits
        self.head_splits: dict[str, str] = {}
        #: (module, size) -> ids of the first explicitly sized head_dim split there
        self.head_dims: dict[tuple[str, int], torch.Tensor] = {}
        self.book = LabelBook()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.names: dict[int, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        seen = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            name = seen.setdefault(id(p), name)  # tied weights: one name
            self.tensors.setdefault(name, p)
        for name, b in model.named_buffers(remove_duplicate=False):
            if b is not None and b.is_floating_point():
                name = seen.setdefault(id(b), name)
                self.tensors.setdefault(name, b)
        for name, t in self.tensors.items():
            run = stand_ins[name] if stand_ins is not None else t
            self.names.setdefault(id(run), name)
            self.names.setdefault(id(t), name)  # module handlers may read the real tensor
        self.module_names = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(m), name or "<root>")
        self.module_stack: list[str] = []
        self.warnings: list[str] = []
        self.norm_weights: set[str] = set()  # LayerNorm/GroupNorm weights needing masked stats
        self.layer_norm_weights: set[str] = set()  # LayerNorm/RMSNorm weights (residual streams)
        self.ops = 0
        self.fake = False
        #: running on the meta device: shape-only ops may skip torch's Python meta kernels
        self.meta = False
        self._paused = 0

    # ----- label access -------------------------------------------------------------
    def name_of(self, t: torch.Tensor) -> str | None:
        """Qualified name if ``t`` is a parameter or floating buffer of the model."""
        return self.names.get(id(t))

    def get(self, t: Any) -> Labels:
        """Labels of ``t`` (empty dict when it carries no prunable channels)."""
        if not isinstance(t, torch.Tensor):
            return {}
        lab = self.labels.get(t)
        if lab is not None:
            return lab
        name = self.names.get(id(t))
        if name is None:
            return {}
        return {d: (self.book.space(name, d, s), True) for d, s in enumerate(t.shape) if s > 1}

    def dim_ids(self, t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """Channel ids of ``t`` along ``dim`` (allocating a space for a named tensor)."""
        if t is None:
            return None
        lab = self.labels.get(t)
        if lab is not None:
            ent = lab.get(dim)
            return None if ent is None else ent[0]
        name = self.names.get(id(t))
        if name is None or t.shape[dim] <= 1:
            return None
        return self.book.space(name, dim, t.shape[dim])

    def zero(self, t: torch.Tensor | None, dim: int) -> bool:
        """Whether ``t`` is exactly zero at pruned channels along ``dim``."""
        if t is None:
            return True
        lab = self.labels.get(t)
        if lab is not None:
            ent = lab.get(dim)
            return bool(ent[1]) if ent is not None else False
        return id(t) in self.names

    def set(self, t: Any, labels: Labels) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if labels:
            self.labels[t] = labels
        elif t in self.labels:
            del self.labels[t]

    def union(
        self,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        reason: str = "coupled with channels that cannot be pruned (zero padding, a concat with a fixed tensor, ...)",
    ) -> None:
        """Couple ``a[i]`` with ``b[i]``. Where one side is ``-1`` (a position no prunable
        channel occupies, like the zeros a channel ``pad`` adds), the other side is fixed:
        it lines up with a channel that always stays."""
        if a is None or b is None:
            return
        self.book.union(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        lone = (a < 0) != (b < 0)
        if bool(lone.any()):
            self.fix(torch.where(a < 0, b, a)[lone], reason)

    def fix(self, ids: torch.Tensor | None, reason: str) -> None:
        if ids is not None:
            self.book.fix(ids, f"{reason} (in {self.where()})")

    def fix_labels(self, labels: Labels, reason: str) -> None:
        for ids, _ in labels.values():
            self.fix(ids, reason)

    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<root>"

    def current_module(self) -> nn.Module:
        """The innermost module whose forward is running."""
        name = self.where()
        if name == "<root>":
            return self.model
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return self.model

    def warn(self, msg: str) -> None:
        full = f"{msg} (in module '{self.where()}')"
        if full not in self.warnings:
            self.warnings.append(full)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run torch calls untraced (used when rules evaluate ops on label tensors)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # ----- the mode -----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        out = None
        if self.meta:
            shape_only = _META_SHAPE.get(func)
            if shape_only is not None:
                out = shape_only(args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", None) or str(func)
        if name == "__get__":
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop in _SILENT_PROPS:
                return out
            name = prop
        self.ops += 1
        with _real():
            self._apply_rule(func, name, args, kwargs, out)
        return out

    def _apply_rule(self, func, name, args, kwargs, out) -> None:
        rule = FUNC_RULES.get(func) or RULES.get(name)
        if rule is None:
            base = name.strip("_")
            if base.startswith("i") and f"__{base}__" == name and base[1:] in RULES:
                base = base[1:]  # __iadd__ -> add
            elif base.startswith("r") and base[1:] in RULES and name.startswith("__"):
                base = base[1:]  # __radd__ -> add
            rule = RULES.get(base)
        try:
            if rule is None:
                _unknown(self, name, args, kwargs, out)
            else:
                rule(self, name, func, args, kwargs, out)
        except Exception as exc:  # a rule that fails must never yield a wrong model
            if self.fake:
                raise _NeedRealValues(f"rule for '{name}' needs real values: {exc}") from exc
            self._fix_everything(name, args, kwargs, out, f"rule for '{name}' failed: {exc}")

    def _fix_everything(self, name, args, kwargs, out, reason):
        flat, _ = tree_flatten((args, kwargs))
        hit = False
        for t in flat:
            lab = self.get(t)
            if lab:
                hit = True
                self.fix_labels(lab, reason)
        for t in tree_flatten(out)[0]:
            self.set(t, {})
        if hit:
            self.warn(reason)


def _same_shape(inplace_at: int | None = None, plain: Callable[[tuple, dict], bool] | None = None):
    """Output like the first argument (the argument itself when the call is in-place)."""

    def run(args, kwargs):
        x = arg(args, kwargs, 0, "input")
        if not (isinstance(x, torch.Tensor) and x.is_meta and type(x) is torch.Tensor):
            return None
        if plain is not None and not plain(args, kwargs):
            return None
        if inplace_at is not None and arg(args, kwargs, inplace_at, "inplace", False):
            return x
        return torch.empty_like(x)

    return run


def _meta_linear(args, kwargs):
    x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not (
        isinstance(x, torch.Tensor)
        and isinstance(w, torch.Tensor)
        and x.is_meta
        and w.is_meta
        and x.ndim >= 1
        and w.ndim == 2
        and x.shape[-1] == w.shape[1]
        and x.dtype == w.dtype
        and (b is None or (isinstance(b, torch.Tensor) and b.is_meta and b.shape == w.shape[:1] and b.dtype == x.dtype))
    ):
        return None  # let torch raise its own error, or handle the unusual case
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device="meta")


def arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a torch call, given by keyword or at position ``pos``."""
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


def _fits(p: Any, n: int) -> bool:
    return p is None or (isinstance(p, torch.Tensor) and p.is_meta and tuple(p.shape) == (n,))


def _eval_batch_norm(args, kwargs) -> bool:
    x = arg(args, kwargs, 0, "input")
    c = x.shape[1] if x.ndim > 1 else -1
    return (
        not arg(args, kwargs, 5, "training", False)
        and x.ndim > 1
        and all(
            _fits(arg(args, kwargs, i, k), c)
            for i, k in enumerate(("running_mean", "running_var", "weight", "bias"), 1)
        )
    )


def _layer_norm_fits(args, kwargs) -> bool:
    x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    if not isinstance(shape, (list, tuple, torch.Size)) or len(shape) != 1 or x.ndim < 1:
        return False
    n = x.shape[-1]
    return tuple(shape) == (n,) and _fits(arg(args, kwargs, 2, "weight"), n) and _fits(arg(args, kwargs, 3, "bias"), n)


def _group_norm_fits(args, kwargs) -> bool:
    x, g = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
    c = x.shape[1] if x.ndim > 1 else -1
    return (
        isinstance(g, int)
        and g > 0
        and c > 0
        and c % g == 0
        and _fits(arg(args, kwargs, 2, "weight"), c)
        and _fits(arg(args, kwargs, 3, "bias"), c)
    )


def _no_dtype(args, kwargs) -> bool:
    return arg(args, kwargs, 3, "dtype") is None


#: On the meta device torch computes even a ReLU's output through Python meta kernels
#: (type promotion, stride logic), the bulk of a trace's time. For common ops whose output is
#: shaped, typed and laid out like their input these give the same meta tensor directly;
#: anything unusual (``None``) falls through to the real call.
F = torch.nn.functional
_META_SHAPE: dict[Callable, Callable[[tuple, dict], torch.Tensor | None]] = {
    F.relu: _same_shape(1),
    F.hardtanh: _same_shape(3),
    F.relu6: _same_shape(1),
    F.hardswish: _same_shape(1),
    F.hardsigmoid: _same_shape(1),
    F.silu: _same_shape(1),
    F.mish: _same_shape(1),
    F.elu: _same_shape(2),
    F.leaky_relu: _same_shape(2),
    F.gelu: _same_shape(),
    F.dropout: _same_shape(3),
    torch.sigmoid: _same_shape(),
    torch.tanh: _same_shape(),
    F.batch_norm: _same_shape(plain=_eval_batch_norm),
    F.layer_norm: _same_shape(plain=_layer_norm_fits),
    F.group_norm: _same_shape(plain=_group_norm_fits),
    F.softmax: _same_shape(plain=_no_dtype),
    F.linear: _meta_linear,
}
del F


def _unknown(tr: Tracer, name, args, kwargs, out) -> None:
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not outs:
        return
    tr._fix_everything(name, args, kwargs, out, f"op '{name}' has no channel rule; its channels are left unpruned")


def _real():
    """Run label bookkeeping on real tensors even while the model runs on fake ones."""
    return unset_fake_temporarily()


def _fake_inputs(mode: FakeTensorMode, example_inputs: Any) -> Any:
    return tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, example_inputs)


def _module_hooks(tr: Tracer):
    def pre(mod, args):
        tr.module_stack.append(tr.module_names.get(id(mod), type(mod).__name__))

    def post(mod, args, out):
        if tr.module_stack:
            tr.module_stack.pop()

    return pre, post


@contextlib.contextmanager
def _custom_handlers(tr: Tracer, model: nn.Module) -> Iterator[None]:
    """Replace ``forward`` of layers with a registered handler by an untraced call."""
    patched = []
    for mod in model.modules():
        handler = next((h for c, h in MODULE_HANDLERS.items() if isinstance(mod, c)), None)
        if handler is None:
            continue
        orig = mod.forward

        def fwd(*a, __orig=orig, __h=handler, __m=mod, **kw):
            with tr.paused():
                out = __orig(*a, **kw)
            with _real():
                __h(tr, tr.originals.get(id(__m), __m), a, kw, out)
            return out

        mod.forward = fwd
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


MODES = ("meta", "fake", "real")
#: Where a reshape splits a channel dim into several (``(..., heads, head_dim)``), which factor
#: stays prunable (the others are tied): ``"auto"`` the one given as ``-1`` (inferred, so the
#: reshape still fits the slim model), else the innermost; ``"heads"`` the factor just outside
#: the innermost (whole attention heads go); ``"head_dim"`` always the innermost.
ATTENTION_MODES = ("auto", "heads", "head_dim")


def trace(model: nn.Module, example_inputs: Any, mode: str | None = None, attention: str = "auto") -> Tracer:
    """Run ``model`` on ``example_inputs`` in eval mode and record its channel coupling.

    Only shapes matter to the channel rules, so by default the model first runs with its
    weights and inputs on the ``meta`` device (no arithmetic: fast even for huge models),
    then on fake tensors, and for real only when its forward needs real values
    (data-dependent control flow). ``mode`` forces one of ``"meta"``, ``"fake"``, ``"real"``.
    ``attention`` chooses between head and head-dimension pruning (see :data:`ATTENTION_MODES`).
    Model outputs keep all their channels. The model's train/eval mode is restored.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "real":
            return _trace(model, example_inputs, mode, attention)
        with single_thread():
            return _trace(model, example_inputs, mode, attention)
    for m in MODES[:-1]:
        try:
            with single_thread():
                return _trace(model, example_inputs, m, attention)
        except Exception:  # noqa: BLE001, S112 - needs real values: try the next mode
            continue
    return _trace(model, example_inputs, "real", attention)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Channel bookkeeping is many tiny ops: one thread is faster, and much faster on a
    busy machine, where waking a thread pool for each op costs milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _meta(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_like(t, device="meta")
    return nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m


def meta_stand_ins(model: nn.Module) -> dict[str, torch.Tensor]:
    by_id: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        if t is not None:
            out[name] = by_id.setdefault(id(t), _meta(t))
    return out


def meta_call(model: nn.Module, stand_ins: dict, example_inputs: Any) -> Any:
    inputs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_inputs)
    args, kwargs = (
        ((), inputs)
        if isinstance(inputs, dict)
        else (tuple(inputs), {})
        if isinstance(inputs, (tuple, list))
        else ((inputs,), {})
    )
    return functional_call(model, stand_ins, args, kwargs, tie_weights=False, strict=False)


def run_on_meta(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` with weights and inputs on the meta device: shapes only, no arithmetic.

    It runs on a :func:`shadow_model` (``meta=True``): tensors the model cached in plain attributes
    are meta there too, and what the run caches stays out of ``model``.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            shadow = shadow_model(model, meta=True)
            return meta_call(shadow, meta_stand_ins(shadow), example_inputs)
    finally:
        model.train(was)


def shadow_model(model: nn.Module, meta: bool = False) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer: a meta or fake run
    may leave meta/fake tensors in Python-level caches (anchor grids, masks), which must not
    end up in the user's model.

    ``meta=True``: floating-point tensors held in plain attributes (a detector's cached anchors
    and strides, rotary tables) become meta tensors of the same shape in the copy, so a run on
    the meta device does not mix devices. Integer and bool ones (indices, masks that decide
    control flow) stay real.
    """
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    if any(isinstance(m, torch.jit.ScriptModule) or hasattr(type(m), "__deepcopy__") for m in model.modules()):
        return copy.deepcopy(model, memo)  # modules that copy themselves their own way
    shells = {}
    for mod in model.modules():  # every module first, so attributes that point at one find its copy
        shell = object.__new__(type(mod))
        shells[id(mod)] = (mod, shell)
        memo[id(mod)] = shell
    for mod, shell in shells.values():
        state = {}
        for k, v in mod.__dict__.items():
            if k == "_modules":
                state[k] = {n: None if c is None else memo[id(c)] for n, c in v.items()}
            elif k in ("_parameters", "_buffers"):
                state[k] = dict(v)  # the same tensors; functional_call swaps them in the copy only
            elif v is None or isinstance(v, _IMMUTABLE):
                state[k] = v
            elif meta and type(v) is torch.Tensor and v.is_floating_point():
                state[k] = torch.empty_like(v, device="meta")
            elif isinstance(v, dict) and not v and type(v) in (dict, collections.OrderedDict):
                state[k] = type(v)()  # the many empty hook dicts
            else:
                state[k] = copy.deepcopy(v, memo)
        shell.__dict__.update(state)
    return memo[id(model)]


_IMMUTABLE = (bool, int, float, str, bytes, complex, torch.dtype, torch.device, torch.Size)


def _trace(model: nn.Module, example_inputs: Any, mode: str, attention: str = "auto") -> Tracer:
    from prunekit.graph import layers, rules  # noqa: F401  (fill the registries)

    originals = None
    if mode != "real":
        shadow = shadow_model(model, meta=mode == "meta")
        originals = {id(c): o for c, o in zip(shadow.modules(), model.modules())}
        model = shadow

    stand_ins = meta_stand_ins(model) if mode == "meta" else None
    tr = Tracer(model, stand_ins, attention)
    tr.originals = originals or {}  # shadow module id -> the user's module (handlers get the latter)
    was_training = {m: m.training for m in model.modules()}
    pre, post = _module_hooks(tr)
    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        model.eval()
        tr.fake = mode != "real"
        tr.meta = mode == "meta"
        if mode == "meta":
            with torch.no_grad(), _custom_handlers(tr, model), tr:
                out = meta_call(model, stand_ins, example_inputs)
        elif mode == "fake":
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            inputs = _fake_inputs(fake_mode, example_inputs)
            with torch.no_grad(), _custom_handlers(tr, model), fake_mode, tr:
                out = call_model(model, inputs)
        else:
            with torch.no_grad(), _custom_handlers(tr, model), tr:
                out = call_model(model, example_inputs)
        for t in tree_flatten(out)[0]:
            lab = tr.get(t)
            for ids, _ in lab.values():
                tr.book.fix(ids, "model output channels are kept")
    finally:
        h1.remove()
        h2.remove()
        for m, flag in was_training.items():
            m.training = flag
    tr.output = out
    tr.mode = mode
    return tr
