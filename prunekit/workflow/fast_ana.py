"""The fast sensitivity analysis: the same curves as :func:`prunekit.workflow.ana.ana` for far fewer images.

It applies when the evaluator was built by :func:`prunekit.workflow.evaluation.make_eval_fn`
(its :class:`~prunekit.workflow.evaluation.EvalSpec` lets ana run the forward itself); an
opaque ``eval_fn`` is evaluated in full, as before. Four things make a point cheaper:

1. **Reuse of the unpruned activations before the group** (``prefix``). One recorded forward
   on the example inputs (every op's inputs and outputs, every module's call span) says
   which modules finish before the first op that reads one of the group's tensors and which
   of their outputs the rest of the forward reads. Those outputs are cached per batch (one
   partial forward, from the previous group's cache, when the groups go in forward order)
   and the modules return them instead of running. Where a module's internals escape it, it
   runs more than once, or a cached output is changed in place before the cut, the modules
   inside it are considered instead; a group whose first layer comes first gets no prefix.
2. **Several variants in one forward** (``variants``): each ratio's channels are masked on
   its own slice of a repeated batch (the outputs of the convolutions, linear layers and
   BatchNorms that produce them, the inputs of those that consume them), which equals the
   sparse model. Groups with other member layers or a normalisation over their channels are
   evaluated one variant at a time.
3. **Early stopping** (``early_stop``): a point is evaluated batch by batch; its metric drop
   is paired with the baseline on the same images, and the evaluation stops once a
   confidence bound (normal, with a Wilson floor for accuracy) puts the relative loss past
   ``collapse`` or pins it down to ``tolerance`` (or ``rel_tolerance`` of itself). The value
   is then the baseline minus the estimated drop, kept inside the metric's range
   (:func:`metric_range`: an accuracy stays in [0, 1]).
4. **Adaptive ratios** (``adaptive``): every ``stride``-th ratio first, then bisection where
   the relative loss changes by more than ``2 * interp_tolerance`` between evaluated ratios;
   the rest is interpolated (within ``interp_tolerance`` on a monotone curve).

The first fast forward of every group is checked against the plain sparse model; a group
that differs (beyond :data:`prunekit.engine.equivalence.TOLERANCE`) falls back to the plain
forward. Every point records how it was obtained (``how``: ``full``, ``early_stop``,
``interpolated``, ``collapsed``), on how many images and batches.

Example:
    >>> import torch, torch.nn as nn
    >>> from prunekit.workflow.evaluation import make_eval_fn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    >>> x = torch.randn(2, 1, 8, 8); _ = model(x)
    >>> rec = record_forward(model, x)
    >>> plan_prefix(rec, model, ["2.weight"]).stubs  # conv 0 and the ReLU finish before conv 2 reads its weight
    ['0', '1']
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from prunekit.engine import sparse
from prunekit.engine.equivalence import TOLERANCE, max_error
from prunekit.engine.plan import PruningPlan
from prunekit.graph.trace import call_model
from prunekit.workflow.evaluation import EvalSpec, batch_size
from prunekit.workflow.options import FastAnaConfig

__all__ = [
    "FastAnalysis",
    "ForwardRecord",
    "Prefix",
    "record_forward",
    "plan_prefix",
    "PairedStats",
    "CurvePlanner",
    "sparse_variant",
    "EVALUATED",
    "metric_range",
]

#: ``how`` values of points whose metric was measured (on all batches, or until a stop rule)
EVALUATED = ("full", "early_stop")
#: samples of a group's first fast forward checked against the plain sparse model
VERIFY_SAMPLES = 16


# ----- one recorded forward ----------------------------------------------------------------
@dataclass
class Call:
    """One call of a module: ops ``start <= i < end`` ran inside it."""

    start: int
    end: int = -1
    outs: list[int] = field(default_factory=list)  # ids of the output's tensor leaves, in tree order


@dataclass
class ForwardRecord:
    """Every op of one forward (inputs, outputs, in-place changes) and every module call."""

    ins: list[set[int]] = field(default_factory=list)
    outs: list[list[int]] = field(default_factory=list)
    mutated: dict[int, list[int]] = field(default_factory=dict)  # tensor id -> ops that changed it in place
    calls: dict[int, list[Call]] = field(default_factory=dict)  # id(module) -> its calls
    final: set[int] = field(default_factory=set)  # ids of the model output's tensors
    keep: list = field(default_factory=list)  # every tensor seen, alive so ids stay unique

    def uses(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, ids in enumerate(self.ins):
            for t in ids:
                out.setdefault(t, []).append(i)
        return out

    def born(self) -> dict[int, int]:
        """Tensor id -> the op that created it (tensors that only flow in are absent)."""
        seen: set[int] = set()
        out: dict[int, int] = {}
        for i, (ins, outs) in enumerate(zip(self.ins, self.outs)):
            seen |= ins
            for t in outs:
                if t not in seen:
                    out.setdefault(t, i)
            seen |= set(outs)
        return out


class _Recorder(TorchFunctionMode):
    def __init__(self, rec: ForwardRecord) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        versions = [t._version for t in ins]
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        i = len(self.rec.ins)
        self.rec.ins.append({id(t) for t in ins})
        self.rec.outs.append([id(t) for t in outs])
        for t, v in zip(ins, versions):
            if t._version != v:
                self.rec.mutated.setdefault(id(t), []).append(i)
        self.rec.keep.extend(ins + outs)
        return out


@torch.no_grad()
def record_forward(model: nn.Module, inputs: Any) -> ForwardRecord:
    """Run ``model`` once on ``inputs`` (in eval mode) and record its ops and module calls."""
    rec = ForwardRecord()
    stack: list[Call] = []

    def pre(mod, args):
        call = Call(len(rec.ins))
        rec.calls.setdefault(id(mod), []).append(call)
        stack.append(call)

    def post(mod, args, out):
        call = stack.pop()
        call.end = len(rec.ins)
        leaves = tree_flatten(out)[0]
        call.outs = [id(t) if isinstance(t, torch.Tensor) else -1 for t in leaves]
        rec.keep.extend(t for t in leaves if isinstance(t, torch.Tensor))

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    was = model.training
    model.eval()
    try:
        with _Recorder(rec):
            out = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    rec.final = {id(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
    rec.keep.append(out)
    return rec


# ----- which modules a group's forward can skip -------------------------------------------
@dataclass
class Prefix:
    """The modules that return cached outputs for one group, and what to keep of each.

    Attributes:
        cut: The module around the first op that reads a pruned tensor (it runs).
        start: That module call's first op in the record.
        stubs: Modules that finish before it and return their cached output.
        needed: ``{stub: [keep leaf i]}``: the output leaves the rest of the forward reads.
        clone: ``{stub: [leaf i changed in place later]}``: cached as it left the module and
            returned as a copy each time (the ops that change it run again).
        skipped: Fraction of the model's MACs those modules hold.
    """

    cut: str
    start: int
    stubs: list[str]
    needed: dict[str, list[bool]]
    clone: dict[str, list[bool]]
    skipped: float = 0.0


def _first_read(rec: ForwardRecord, model: nn.Module, names: Sequence[str]) -> int | None:
    ids = {id(sparse.get_tensor(model, n)) for n in names}
    return next((i for i, ins in enumerate(rec.ins) if ins & ids), None)


def _cut_module(rec: ForwardRecord, model: nn.Module, op: int) -> tuple[str, Call]:
    """The innermost module call whose span holds op ``op``."""
    spans = [
        (c.start, c.start - c.end, name.count(".") if name else -1, name, c)
        for name, mod in model.named_modules()
        for c in rec.calls.get(id(mod), ())
        if c.start <= op < c.end
    ]
    _, _, _, name, call = max(spans, key=lambda t: t[:3])
    return name, call


def _leaks(rec: ForwardRecord, call: Call, born: dict[int, int], last_use: dict[int, int]) -> bool:
    """Whether a tensor made inside ``call`` (other than its output) is read after it."""
    outs = set(call.outs)
    return any(
        call.start <= b < call.end and t not in outs and last_use.get(t, -1) >= call.end for t, b in born.items()
    )


def _choose_stubs(rec: ForwardRecord, model: nn.Module, start: int) -> list[tuple[str, Call]]:
    born = rec.born()
    last_use = {t: max(idx) for t, idx in rec.uses().items()}
    for t in rec.final:
        last_use[t] = len(rec.ins)
    chosen: list[tuple[str, Call]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for cname, child in mod.named_children():
            name = f"{prefix}.{cname}" if prefix else cname
            calls = rec.calls.get(id(child), [])
            if not calls or min(c.start for c in calls) >= start:
                continue
            if len(calls) == 1 and calls[0].end <= start and not _leaks(rec, calls[0], born, last_use):
                chosen.append((name, calls[0]))
            else:
                walk(name, child)

    walk("", model)
    return chosen


def plan_prefix(
    rec: ForwardRecord, model: nn.Module, names: Sequence[str], macs: dict[str, int] | None = None
) -> Prefix | str:
    """The :class:`Prefix` for a group whose tensors are ``names``, or why there is none.

    Args:
        rec: :func:`record_forward` of ``model``.
        model: The model.
        names: The group's tensor names (``"layer1.0.conv1.weight"``, ...).
        macs: ``{module: own MACs}`` (:func:`prunekit.engine.counting.count`'s ``per_module``)
            to fill :attr:`Prefix.skipped`.
    """
    op = _first_read(rec, model, names)
    if op is None:
        return "no op of the recorded forward reads the group's tensors"
    cut, call = _cut_module(rec, model, op)
    stubs = _choose_stubs(rec, model, call.start)
    if not stubs:
        return f"nothing runs before {cut or 'the model'} that could be reused"
    spans = sorted((c.start, c.end) for _, c in stubs)

    def running(i: int) -> bool:
        return not any(a <= i < b for a, b in spans)

    uses = rec.uses()
    needed, clone = {}, {}
    for name, c in stubs:
        keep = [t >= 0 and (t in rec.final or any(i >= c.end and running(i) for i in uses.get(t, ()))) for t in c.outs]
        changed = [[i for i in rec.mutated.get(t, []) if i >= c.end] if k else [] for t, k in zip(c.outs, keep)]
        if any(not running(i) for ch in changed for i in ch):
            return f"the output of {name} is changed in place by a module that is skipped before {cut or 'the model'}"
        # changed in place later by ops that run: cached as it left the module, returned as a copy
        needed[name], clone[name] = keep, [bool(ch) for ch in changed]
    skipped = 0.0
    if macs:
        total = sum(macs.values()) or 1
        inside = [n for n, _ in stubs]
        skipped = sum(v for m, v in macs.items() if any(m == s or m.startswith(s + ".") for s in inside)) / total
    return Prefix(cut, call.start, [n for n, _ in stubs], needed, clone, skipped)


# ----- cached activations ------------------------------------------------------------------
class _Stop(Exception):
    """Raised at the cut: the captured forward need not go on."""


@dataclass
class PrefixCache:
    """The needed outputs of a prefix's stubs, per batch: ``outputs[stub][b] = (treespec, leaves)``."""

    prefix: Prefix
    outputs: dict[str, list[tuple[Any, list]]]
    nbytes: int


def _storage_bytes(leaves: list, seen: set[int]) -> int:
    total = 0
    for t in leaves:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


@torch.no_grad()
def capture(
    model: nn.Module, prefix: Prefix, batches: Sequence[Any], budget: int, source: PrefixCache | None = None
) -> PrefixCache | None:
    """Run the unpruned forward of every batch up to ``prefix.cut`` and keep the stubs' needed
    outputs (from ``source``'s cache where given); ``None`` when they exceed ``budget`` bytes."""
    mods = dict(model.named_modules())
    out: dict[str, list] = {s: [] for s in prefix.stubs}
    seen: set[int] = set()
    used = 0

    def keep(name):
        def hook(mod, args, output):
            spec_leaves, spec = tree_flatten(output)
            leaves = [
                (t.detach().clone() if c else t.detach())
                if isinstance(t, torch.Tensor) and k
                else (None if isinstance(t, torch.Tensor) else t)
                for t, k, c in zip(spec_leaves, prefix.needed[name], prefix.clone[name])
            ]
            out[name].append((spec, leaves))

        return hook

    def stop(mod, args):
        raise _Stop

    handles = [mods[s].register_forward_hook(keep(s)) for s in prefix.stubs]
    handles.append(mods[prefix.cut].register_forward_pre_hook(stop) if prefix.cut else None)
    try:
        for b, inputs in enumerate(batches):
            with stubbed(model, source, b) if source is not None else contextlib.nullcontext():
                try:
                    call_model(model, inputs)
                except _Stop:
                    pass
            used += sum(_storage_bytes(out[s][-1][1], seen) for s in prefix.stubs if len(out[s]) > b)
            if any(len(out[s]) != b + 1 for s in prefix.stubs):
                return None  # a stub did not run once on this batch: the record does not hold
            if used > budget:
                return None
    finally:
        for h in handles:
            if h is not None:
                h.remove()
    return PrefixCache(prefix, out, used)


class Collector:
    """Keeps, during forwards that run anyway (the baseline's), every prefix's needed outputs at once.

    One module may be a stub of several prefixes: it keeps the union of their needed leaves.
    Call :meth:`batch_done` after each batch; once the kept tensors would exceed ``budget``
    bytes over all batches, it stops keeping anything (:meth:`caches` is then empty).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)).eval()
        >>> x = torch.randn(1, 1, 8, 8)
        >>> p = plan_prefix(record_forward(m, x), m, ["1.weight"])
        >>> with Collector(m, [p], 1 << 20, 1) as c:
        ...     _ = m(x); c.batch_done()
        >>> list(c.caches())
        ['1']
    """

    def __init__(self, model: nn.Module, prefixes: Sequence[Prefix], budget: int, n_batches: int) -> None:
        self.model, self.prefixes, self.budget, self.n_batches = model, list(prefixes), budget, n_batches
        self.needed: dict[str, list[bool]] = {}
        self.clone: dict[str, list[bool]] = {}
        for p in self.prefixes:
            for s in p.stubs:
                old_n, old_c = self.needed.get(s), self.clone.get(s)
                self.needed[s] = p.needed[s] if old_n is None else [a or b for a, b in zip(old_n, p.needed[s])]
                self.clone[s] = p.clone[s] if old_c is None else [a or b for a, b in zip(old_c, p.clone[s])]
        self.outputs: dict[str, list] = {s: [] for s in self.needed}
        self.seen: set[int] = set()
        self.used = 0
        self.handles: list = []
        self.ok = bool(self.needed)

    def __enter__(self) -> Collector:
        mods = dict(self.model.named_modules())
        for name in self.needed:
            self.handles.append(mods[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, name: str):
        def hook(mod, args, output):
            leaves, spec = tree_flatten(output)
            kept = [
                (t.detach().clone() if c else t.detach())
                if isinstance(t, torch.Tensor) and k
                else (None if isinstance(t, torch.Tensor) else t)
                for t, k, c in zip(leaves, self.needed[name], self.clone[name])
            ]
            self.outputs[name].append((spec, kept))

        return hook

    def batch_done(self) -> None:
        if not self.ok:
            return
        b = len(next(iter(self.outputs.values())))
        if any(len(v) != b for v in self.outputs.values()):
            self.ok = False  # a stub did not run exactly once: the record does not hold for this batch
        else:
            self.used += sum(_storage_bytes(v[-1][1], self.seen) for v in self.outputs.values())
            self.ok = self.used * self.n_batches / b <= self.budget
        if not self.ok:
            self._remove()
            self.outputs.clear()

    def caches(self) -> dict[str, PrefixCache]:
        """``{cut: cache}`` for every prefix (empty if the budget or the record did not hold)."""
        if not self.ok:
            return {}
        return {p.cut: PrefixCache(p, {s: self.outputs[s] for s in p.stubs}, self.used) for p in self.prefixes}


def _repeat(t: Any, n: int, size: int) -> Any:
    if n == 1 or not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 0 or t.shape[0] != size:
        raise _Unbatchable(f"a tensor of shape {tuple(t.shape)} has no batch dimension of {size}")
    return torch.cat([t] * n)


@contextlib.contextmanager
def stubbed(model: nn.Module, cache: PrefixCache, b: int, repeat: int = 1, size: int = 0) -> Iterator[None]:
    """The prefix's stubs return batch ``b``'s cached outputs (repeated ``repeat`` times)."""
    mods = dict(model.named_modules())
    values = {}
    for name in cache.prefix.stubs:
        spec, leaves = cache.outputs[name][b]
        clone = cache.prefix.clone[name]
        vals = [
            _repeat(t, repeat, size) if repeat > 1 else (t.clone() if c and t is not None else t)
            for t, c in zip(leaves, clone)
        ]
        values[name] = tree_unflatten(vals, spec)
    saved = {}
    try:
        for name, value in values.items():
            saved[name] = mods[name].__dict__.get("forward")
            mods[name].forward = (lambda v: lambda *a, **k: v)(value)  # type: ignore[method-assign]
        yield
    finally:
        for name, fwd in saved.items():
            del mods[name].forward
            if fwd is not None:
                mods[name].forward = fwd


# ----- several variants in one forward -----------------------------------------------------
class _Unbatchable(RuntimeError):
    """The forward does not keep variants on their own batch slices."""


class _Mismatch(RuntimeError):
    """The fast forward differs from the plain sparse one."""


_CHANNEL = {nn.Linear: -1}


def _mask_roles(model: nn.Module, group) -> dict[str, dict[str, int]] | str:
    """``{module: {"out"|"in": channel dim}}`` for every member's module, or why not batchable."""
    if group.norm:
        return "a normalisation layer averages over its channels"
    roles: dict[str, dict[str, int]] = {}
    for m in group.members:
        mod = model.get_submodule(m.module) if m.module else model
        leaf = m.name.rsplit(".", 1)[-1]
        cdim = -1 if isinstance(mod, nn.Linear) else 1
        conv = isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed
        bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        if (
            (conv or isinstance(mod, nn.Linear))
            and leaf in ("weight", "bias")
            and m.dim == 0
            or bn
            and leaf in ("weight", "bias", "running_mean", "running_var")
            and m.dim == 0
        ):
            role = "out"
        elif (conv and mod.groups == 1 or isinstance(mod, nn.Linear)) and leaf == "weight" and m.dim == 1:
            role = "in"
        else:
            return f"{m.name} (dim {m.dim}) of a {type(mod).__name__} cannot be masked per sample"
        roles.setdefault(m.module, {})[role] = cdim
    return roles


def _mask(t: torch.Tensor, keep: torch.Tensor, cdim: int, size: int) -> torch.Tensor:
    """``t`` (variants x size, ...) times ``keep`` (variants, channels) along ``cdim``."""
    n = keep.shape[0]
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != n * size:
        raise _Unbatchable(
            f"a masked layer saw a tensor of shape {tuple(getattr(t, 'shape', ()))}, not {n} x {size} samples"
        )
    shape = [n] + [1] * t.dim()
    shape[1 + cdim % t.dim()] = keep.shape[1]
    return (t.reshape(n, size, *t.shape[1:]) * keep.reshape(shape).to(t.dtype)).reshape(t.shape)


@contextlib.contextmanager
def variant_masks(
    model: nn.Module, roles: dict[str, dict[str, int]], plans: Sequence[PruningPlan], size: int
) -> Iterator[None]:
    """Each plan's channels masked on its own slice of a batch of ``len(plans) x size`` samples."""
    handles = []
    for name, what in roles.items():
        mod = model.get_submodule(name) if name else model
        keep = {}
        for role, cdim in what.items():
            dim = 0 if role == "out" else 1
            width = mod.weight.shape[dim] if getattr(mod, "weight", None) is not None else mod.num_features
            k = torch.ones(len(plans), width, device=_device(mod))
            for v, plan in enumerate(plans):
                for tname, dims in plan.pruned.items():
                    if tname.rsplit(".", 1)[0] == name and (dim in dims if role == "in" else 0 in dims):
                        k[v, torch.as_tensor(dims[dim if role == "in" else 0], dtype=torch.long)] = 0.0
            keep[role] = (k, cdim)
        if "in" in keep:
            k, c = keep["in"]
            handles.append(mod.register_forward_pre_hook(lambda m, a, k=k, c=c: (_mask(a[0], k, c, size), *a[1:])))
        if "out" in keep:
            k, c = keep["out"]
            handles.append(mod.register_forward_hook(lambda m, a, o, k=k, c=c: _mask(o, k, c, size)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _device(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def sparse_variant(model: nn.Module, plan: PruningPlan, prior: PruningPlan | None) -> Iterator[None]:
    """``model`` pruned by ``plan`` (on top of its own masks ``prior``) inside, as it was after."""
    saved = {name: sparse.get_tensor(model, name).detach().clone() for name in plan.pruned}
    sparse.apply_plan(model, plan)
    try:
        yield
    finally:
        sparse.remove_masks(model)
        with torch.no_grad():
            for name, t in saved.items():
                sparse.get_tensor(model, name).copy_(t)
        if prior is not None:
            sparse.apply_plan(model, prior)


# ----- sequential statistics ---------------------------------------------------------------
class PairedStats:
    """The drop of a variant's metric against the baseline on the same samples, batch by batch.

    With per-sample values (the built-in metrics) the drop's standard error comes from the
    per-sample differences (for accuracy, no less than a Wilson floor: no flip in ``n``
    images still leaves ``z^2 / n`` of doubt); otherwise from the per-batch differences
    (at least 3 batches). ``drop`` is positive when the variant is worse.

    Example:
        >>> s = PairedStats(z=1.96, binary=True, lower_is_better=False)
        >>> s.add(torch.ones(100, dtype=torch.float64), torch.ones(100, dtype=torch.float64), 1.0, 1.0, 100)
        >>> round(s.drop, 3), round(s.halfwidth, 3)
        (0.0, 0.038)
    """

    def __init__(self, z: float, binary: bool, lower_is_better: bool) -> None:
        self.z, self.binary, self.sign = z, binary, (-1.0 if lower_is_better else 1.0)
        self.n = 0
        self.samples = 0  # of them with per-sample values
        self.sum_d = 0.0
        self.sum_d2 = 0.0
        self.batch_d: list[tuple[int, float]] = []
        self.value_sum = 0.0  # the variant's batch means times batch sizes (eval_fn's own formula)

    def add(self, base: torch.Tensor | None, value: torch.Tensor | None, base_mean: float, mean: float, k: int) -> None:
        """One batch of ``k`` samples: per-sample values (or ``None``) and the batch means."""
        if base is not None and value is not None and self.samples == self.n:
            d = self.sign * (base - value)
            self.sum_d += float(d.sum())
            self.sum_d2 += float((d * d).sum())
            self.samples += k
        self.batch_d.append((k, self.sign * (base_mean - mean)))
        self.value_sum += mean * k
        self.n += k

    @property
    def batches(self) -> int:
        return len(self.batch_d)

    @property
    def drop(self) -> float:
        """The estimated drop (positive: the variant is worse), in the metric's units."""
        return sum(k * d for k, d in self.batch_d) / max(self.n, 1)

    @property
    def halfwidth(self) -> float:
        """Half the width of the confidence interval of :attr:`drop`."""
        if self.n == 0:
            return math.inf
        if self.samples == self.n:
            mean = self.sum_d / self.n
            var = max(self.sum_d2 / self.n - mean * mean, 0.0)
            if self.binary:
                var = max(var, self.z**2 / (self.n + self.z**2))
            return self.z * math.sqrt(var / self.n)
        m = len(self.batch_d)
        if m < 3:
            return math.inf
        mean = self.drop
        var = sum(k * k * (d - mean) ** 2 for k, d in self.batch_d) / self.n**2 * m / (m - 1)
        return self.z * math.sqrt(var)


# ----- which ratios to evaluate ------------------------------------------------------------
class CurvePlanner:
    """Coarse grid, then bisection where the curve bends; the rest interpolated or collapsed.

    ``rel[i]`` is the relative loss at ``ratios[i]`` of the points evaluated so far. A gap
    between two evaluated ratios is bisected when linear interpolation could be off by more
    than ``interp_tolerance`` there: the curvature at its ends (second differences, with the
    unpruned model at ratio 0, loss 0) times ``width**2 / 8``, never more than half the
    change across the gap (the most a monotone curve can be off).

    Example:
        >>> p = CurvePlanner([0.1, 0.2, 0.3, 0.4, 0.5], stride=2, interp_tolerance=0.01, collapse=0.5)
        >>> p.next({})
        [0, 2, 4]
        >>> p.next({0: 0.0, 2: 0.01, 4: 0.3})  # flat, then steep: the bend is between 0.3 and 0.5
        [3]
    """

    def __init__(self, ratios: Sequence[float], stride: int, interp_tolerance: float, collapse: float | None) -> None:
        self.ratios, self.n, self.tol, self.collapse = list(ratios), len(ratios), interp_tolerance, collapse
        self.grid = sorted(set(range(0, self.n, max(1, stride))) | {self.n - 1})

    def collapsed_at(self, rel: dict[int, float]) -> int:
        """The first evaluated index past ``collapse`` (``n`` if none)."""
        if self.collapse is None:
            return self.n
        return min((i for i, v in rel.items() if v > self.collapse), default=self.n)

    def next(self, rel: dict[int, float]) -> list[int]:
        """The indices to evaluate next, ascending (empty: the curve is done)."""
        c = self.collapsed_at(rel)
        coarse = [i for i in self.grid if i <= c and i not in rel]
        if coarse:
            return coarse
        done = sorted(i for i in rel if i <= c)
        xs = [0.0] + [self.ratios[i] for i in done]
        ys = [0.0] + [rel[i] for i in done]
        bend = [0.0] * len(xs)  # |second derivative| at each evaluated point
        for k in range(1, len(xs) - 1):
            left = (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])
            right = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
            bend[k] = abs(2 * (right - left) / (xs[k + 1] - xs[k - 1]))
        out = []
        for k, (i, j) in enumerate(zip(done, done[1:]), start=1):
            width = xs[k + 1] - xs[k]
            err = min(max(bend[k], bend[k + 1]) * width**2 / 8, abs(ys[k + 1] - ys[k]) / 2)
            if j - i >= 2 and err > self.tol:
                out.append((i + j) // 2)
        return out

    def fill(self, values: dict[int, float], rel: dict[int, float]) -> dict[int, tuple[float, str]]:
        """Values (and ``how``) for the indices not evaluated, or past the collapse."""
        c = self.collapsed_at(rel)
        out = {}
        done = sorted(values)
        for i in range(self.n):
            if i > c:
                out[i] = (values[c], "collapsed")
            elif i not in values:
                lo = max((j for j in done if j < i), default=None)
                hi = min((j for j in done if j > i), default=None)
                if lo is None or hi is None:
                    out[i] = (values[lo if hi is None else hi], "interpolated")
                else:
                    t = (self.ratios[i] - self.ratios[lo]) / (self.ratios[hi] - self.ratios[lo])
                    out[i] = (values[lo] + (values[hi] - values[lo]) * t, "interpolated")
        return out


# ----- the analysis ------------------------------------------------------------------------
@dataclass
class PointResult:
    """One point's value and how it was obtained.

    Attributes:
        value: The metric (measured, estimated from a paired subset, or interpolated).
        how: ``full`` (every batch), ``early_stop``, ``interpolated`` or ``collapsed``.
        images: Images the point's own evaluation put through the model.
        batches: Batches it used.
        stop: Why it stopped early: ``precise`` or ``collapsed`` (``None`` otherwise).
        halfwidth: The confidence bound's half-width on the relative loss when it stopped.
    """

    value: float
    how: str
    images: int = 0
    batches: int = 0
    stop: str | None = None
    halfwidth: float | None = None

    def info(self) -> dict:
        out = {"how": self.how, "images": self.images, "batches": self.batches}
        if self.stop is not None:
            out["stop"] = self.stop
        if self.halfwidth is not None and math.isfinite(self.halfwidth):
            out["halfwidth"] = round(self.halfwidth, 6)
        return out


@dataclass
class _Batch:
    inputs: Any
    target: Any
    size: int
    base: torch.Tensor | None  # per-sample baseline values
    base_mean: float


@dataclass
class _Mode:
    """How one group's points are evaluated."""

    cache: PrefixCache | None = None
    roles: dict[str, dict[str, int]] | None = None  # batched variants: masked layers
    variants: int = 1
    verified: bool = False


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class FastAnalysis:
    """The evaluation batches, their baseline values and the recorded forward, shared by all groups.

    Build it with :meth:`create`; :meth:`analyse` evaluates one group's curve. ``cost``
    counts what the analysis put through the model besides the points themselves (the
    baseline, the cache captures, the checks).
    """

    def __init__(
        self,
        model: nn.Module,
        pruner,
        spec: EvalSpec,
        cfg: FastAnaConfig,
        lower_is_better: bool,
        collapse: float | None,
        prior: PruningPlan | None,
        log: Callable[[str], None],
    ) -> None:
        self.model, self.pruner, self.spec, self.cfg = model, pruner, spec, cfg
        self.lower, self.collapse, self.prior, self.log = lower_is_better, collapse, prior, log
        self.sign = -1.0 if lower_is_better else 1.0
        self.z = statistics.NormalDist().inv_cdf(0.5 + cfg.confidence / 2)
        self.batches: list[_Batch] = []
        self.baseline = math.nan
        self.record: ForwardRecord | None = None
        self.macs: dict[str, int] = {}
        self.prefixes: dict[int, Prefix | str] = {}
        self.current: PrefixCache | None = None
        self.caches: dict[str, PrefixCache] = {}  # kept during the baseline pass, by cut
        self.budget = int(cfg.cache_mb * 2**20)
        self.cost = self._no_cost()

    @staticmethod
    def _no_cost() -> dict:
        return {
            "images": 0,
            "image_equivalents": 0.0,
            "baseline_images": 0,
            "capture_images": 0,
            "verify_images": 0,
            "prefix_groups": 0,
            "batched_groups": 0,
            "fallbacks": {},
        }

    def take_cost(self) -> dict:
        """What was put through the model since the last call (and start counting again)."""
        out, self.cost = self.cost, self._no_cost()
        return out

    @classmethod
    def create(
        cls,
        model: nn.Module,
        example_inputs: Any,
        eval_fn: Callable,
        args: Sequence,
        pruner,
        cfg: FastAnaConfig,
        lower_is_better: bool,
        collapse: float | None,
        prior: PruningPlan | None,
        log: Callable[[str], None],
    ) -> FastAnalysis | str:
        """The analysis, with its baseline measured, or why the fast analysis does not apply."""
        spec = getattr(eval_fn, "evaluation", None)
        if not cfg.enabled:
            return "the fast analysis is off (fast=False)"
        if not isinstance(spec, EvalSpec):
            return "eval_fn was not built by make_eval_fn: ana cannot run its forward, so every point runs it in full"
        if args:
            return "eval_fn gets extra arguments (args): every point runs it in full"
        fast = cls(model, pruner, spec, cfg, lower_is_better, collapse, prior, log)
        with _evaluating(model):
            reason = fast._load_batches()
            if reason:
                return reason
            fast._record(example_inputs)
            fast._measure_baseline()
        return fast

    # ----- setup ---------------------------------------------------------------------------
    def _load_batches(self) -> str | None:
        used = 0
        for inputs, target in self.spec.batches(_device(self.model)):
            used += _nbytes((inputs, target))
            if used > self.budget:
                return (
                    f"the evaluation batches need more than ana.fast.cache_mb={self.cfg.cache_mb} MiB: "
                    "every point is evaluated in full (raise cache_mb or evaluate fewer batches)"
                )
            self.batches += [_Batch(i, t, batch_size(t), None, math.nan) for i, t in self._split(inputs, target)]
        if not self.batches:
            raise ValueError("the loader yielded no batches; nothing to evaluate")
        self.budget -= used
        return None

    def _split(self, inputs: Any, target: Any) -> list[tuple[Any, Any]]:
        """A batch as chunks of ``cfg.chunk`` samples (built-in metrics, every tensor batch-first), else whole."""
        k, size = self.cfg.chunk, batch_size(target)
        leaves = [t for t in tree_flatten((inputs, target))[0] if isinstance(t, torch.Tensor)]
        if not k or size <= k or not self.spec.samplewise or any(t.dim() == 0 or t.shape[0] != size for t in leaves):
            return [(inputs, target)]
        cut = lambda tree, a: tree_map(lambda t: t[a : a + k] if isinstance(t, torch.Tensor) else t, tree)  # noqa: E731
        return [(cut(inputs, a), cut(target, a)) for a in range(0, size, k)]

    def _measure_baseline(self) -> None:
        """The baseline metric, per sample, and (where they fit the budget) every group's cached activations."""
        total, n = 0.0, 0
        prefixes = [p for p in (self.prefix(g) for g in self.pruner.prunable_groups) if isinstance(p, Prefix)]
        with Collector(self.model, prefixes, self.budget, len(self.batches)) as collector:
            for b in self.batches:
                out = call_model(self.model, b.inputs)
                collector.batch_done()
                total, n = self._baseline_batch(b, out, total, n)
        self.caches = collector.caches()
        if self.caches:
            self.budget -= collector.used
        self.baseline = total / max(n, 1)
        self.cost["baseline_images"] += n
        self.cost["images"] += n
        self.cost["image_equivalents"] += n

    def _baseline_batch(self, b: _Batch, out: Any, total: float, n: int) -> tuple[float, int]:
        b.base_mean = self.spec.batch_value(out, b.target)
        per = self.spec.per_sample(out, b.target)
        b.base = per if per is not None and per.shape[0] == b.size else None
        return total + b.base_mean * b.size, n + b.size

    def _record(self, example_inputs: Any) -> None:
        if not self.cfg.prefix:
            return
        from prunekit.engine.counting import count

        try:
            self.record = record_forward(self.model, example_inputs)
            self.macs = {k: v[0] for k, v in count(self.model, example_inputs).per_module.items()}
        except Exception as exc:  # noqa: BLE001 - no prefix reuse, the rest still applies
            self.log(
                f"fast ana: the forward could not be recorded ({type(exc).__name__}: {exc}); "
                "every point runs the whole forward"
            )
            self.record = None

    def prefix(self, group) -> Prefix | str:
        if group.id not in self.prefixes:
            self.prefixes[group.id] = (
                "prefix reuse is off"
                if self.record is None
                else plan_prefix(self.record, self.model, [m.name for m in group.members], self.macs)
            )
        return self.prefixes[group.id]

    def order(self, groups: Sequence) -> list:
        """The groups in the order of their first layer in the forward (the caches grow forward)."""

        def start(g):
            p = self.prefix(g)
            return p.start if isinstance(p, Prefix) else -1

        return sorted(groups, key=start)

    # ----- one group -----------------------------------------------------------------------
    def rel(self, value: float) -> float:
        """Relative loss of a metric value (as :meth:`Sensitivity.loss` counts it)."""
        scale = abs(self.baseline) if self.baseline != 0 else 1.0
        return max(0.0, self.sign * (self.baseline - value) / scale)

    def analyse(
        self,
        group,
        ratios: Sequence[float],
        known: dict[int, tuple[float, dict]],
        emit: Callable[[int, PointResult], None],
    ) -> None:
        """Evaluate ``group``'s curve at ``ratios``; ``known`` holds the points saved before
        (``{index: (value, info)}``); ``emit(index, result)`` saves one point."""
        stride = self.cfg.stride if self.cfg.adaptive else 1
        planner = CurvePlanner(ratios, stride, self.cfg.interp_tolerance, self.collapse)
        values = {i: v for i, (v, info) in known.items() if info.get("how", "full") in EVALUATED}
        rel = {i: self.rel(v) for i, v in values.items()}
        mode = None
        with _evaluating(self.model):
            while todo := planner.next(rel):
                mode = mode or self._mode(group)
                for i, res in self._evaluate(group, mode, [(i, ratios[i]) for i in todo]):
                    values[i], rel[i] = res.value, self.rel(res.value)
                    known[i] = (res.value, res.info())
                    emit(i, res)
        for i, (v, how) in planner.fill(values, rel).items():
            old = known.get(i, (None, {}))
            if old[0] != v or old[1].get("how") != how:
                emit(i, PointResult(v, how, old[1].get("images", 0), old[1].get("batches", 0)))

    def _mode(self, group) -> _Mode:
        mode = _Mode(variants=self.cfg.variants or (1 if _device(self.model).type == "cpu" else 8))
        p = self.prefix(group)
        if isinstance(p, Prefix):
            mode.cache = self._cache_for(p)
            if mode.cache is None:
                self._fallback(group, "its cached activations exceed ana.fast.cache_mb")
        elif self.record is not None:
            self._fallback(group, f"no prefix reuse: {p}")
        if mode.variants > 1:
            roles = _mask_roles(self.model, group)
            if isinstance(roles, str):
                self._fallback(group, f"one variant per forward: {roles}")
                mode.variants = 1
            else:
                mode.roles = roles
        self.cost["prefix_groups"] += mode.cache is not None
        self.cost["batched_groups"] += mode.roles is not None
        return mode

    def _fallback(self, group, why: str) -> None:
        self.cost["fallbacks"][str(group.id)] = why

    def _cache_for(self, p: Prefix) -> PrefixCache | None:
        if p.cut in self.caches:
            return self.caches[p.cut]
        cur = self.current
        if cur is not None and cur.prefix.cut == p.cut and cur.prefix.stubs == p.stubs:
            return cur
        source = cur if cur is not None and cur.prefix.start <= p.start else None
        budget = self.budget - (source.nbytes if source is not None else 0)
        new = capture(self.model, p, [b.inputs for b in self.batches], budget, source)
        n = sum(b.size for b in self.batches)
        self.cost["capture_images"] += n
        self.cost["images"] += n
        self.cost["image_equivalents"] += n * max(p.skipped - (source.prefix.skipped if source else 0.0), 0.0)
        if new is not None:
            self.current = new
        return new

    def _evaluate(self, group, mode: _Mode, items: list[tuple[int, float]]) -> Iterator[tuple[int, PointResult]]:
        """Points in ascending ratio, up to the first that collapses."""
        pos = 0
        while pos < len(items):
            chunk = items[pos : pos + mode.variants]
            try:
                results = self._run_chunk(group, mode, chunk)
            except Exception as exc:  # noqa: BLE001 - the plain forward decides (it raises if the model does)
                if mode.cache is None and mode.roles is None:
                    raise
                why = (
                    str(exc)
                    if isinstance(exc, (_Mismatch, _Unbatchable))
                    else f"the fast forward failed ({type(exc).__name__}: {exc})"
                )
                self._fallback(group, f"plain forward: {why}")
                self.log(f"fast ana: group {group.id}: {why}; evaluating it with the plain forward")
                self.cost["prefix_groups"] -= mode.cache is not None
                self.cost["batched_groups"] -= mode.roles is not None
                mode.cache, mode.roles, mode.variants, mode.verified = None, None, 1, True
                continue
            pos += len(chunk)
            for j, res in enumerate(results):
                yield chunk[j][0], res
                if self.collapse is not None and self.rel(res.value) > self.collapse:
                    return

    def _run_chunk(self, group, mode: _Mode, chunk: list[tuple[int, float]]) -> list[PointResult]:
        plans = [self.pruner.plan({group.id: r}) for _, r in chunk]
        stats = [PairedStats(self.z, self.spec.binary, self.lower) for _ in chunk]
        done: dict[int, PointResult] = {}
        active = list(range(len(chunk)))
        with sparse_variant(self.model, plans[0], self.prior) if mode.roles is None else contextlib.nullcontext():
            for b, batch in enumerate(self.batches):
                outs = self._forward(mode, [plans[p] for p in active], b)
                if not mode.verified:
                    self._verify(mode, plans[active[0]], b, outs[0])
                for p, out in zip(active, outs):
                    stats[p].add(
                        batch.base,
                        self.spec.per_sample(out, batch.target),
                        batch.base_mean,
                        self.spec.batch_value(out, batch.target),
                        batch.size,
                    )
                    res = self._stop(stats[p], last=b == len(self.batches) - 1)
                    if res is not None:
                        done[p] = res
                active = [p for p in active if p not in done]
                if not active:
                    break
        return [done[p] for p in range(len(chunk))]

    def _forward(self, mode: _Mode, plans: list[PruningPlan], b: int) -> list[Any]:
        batch = self.batches[b]
        n = len(plans) if mode.roles is not None else 1
        inputs = tree_map(lambda t: _repeat(t, n, batch.size), batch.inputs) if n > 1 else batch.inputs
        with contextlib.ExitStack() as stack:
            if mode.cache is not None:
                stack.enter_context(stubbed(self.model, mode.cache, b, n, batch.size))
            if mode.roles is not None:
                stack.enter_context(variant_masks(self.model, mode.roles, plans, batch.size))
            out = call_model(self.model, inputs)
        self.cost["images"] += n * batch.size
        skipped = mode.cache.prefix.skipped if mode.cache is not None else 0.0
        self.cost["image_equivalents"] += n * batch.size * (1.0 - skipped)
        if n == 1:
            return [out]
        return [tree_map(lambda t, v=v: _slice(t, v, n, batch.size), out) for v in range(n)]

    def _verify(self, mode: _Mode, plan: PruningPlan, b: int, fast_out: Any) -> None:
        """The first fast forward of a group against the plain sparse one (on batch ``b``)."""
        mode.verified = True
        if not self.cfg.verify or (mode.cache is None and mode.roles is None):
            return
        batch = self.batches[b]
        inputs, size = batch.inputs, batch.size
        k = min(size, VERIFY_SAMPLES)
        head_in, head_out = _head(inputs, k, size), _head(fast_out, k, size)
        if k < size and head_in is not None and head_out is not None:  # the first samples tell (eval mode)
            inputs, fast_out, size = head_in, head_out, k
        with sparse_variant(self.model, plan, self.prior) if mode.roles is not None else contextlib.nullcontext():
            plain = call_model(self.model, inputs)
        self.cost["verify_images"] += size
        self.cost["images"] += size
        self.cost["image_equivalents"] += size
        err = max_error(plain, fast_out)
        if not err <= TOLERANCE:
            raise _Mismatch(f"the fast forward differs from the plain sparse one (error {err:.2g} > {TOLERANCE:g})")

    def _stop(self, s: PairedStats, last: bool) -> PointResult | None:
        """The point's result once a stop rule holds (or the batches are used up), else ``None``."""
        scale = abs(self.baseline) if self.baseline != 0 else 1.0
        h, d = s.halfwidth / scale, s.drop / scale
        if last:
            return PointResult(s.value_sum / s.n, "full", s.n, s.batches)
        if not self.cfg.early_stop or s.n < self.cfg.min_images:
            return None
        if self.collapse is not None and d - h > self.collapse:
            why = "collapsed"
        elif h <= max(self.cfg.tolerance, self.cfg.rel_tolerance * max(d, 0.0)):
            why = "precise"
        else:
            return None
        return PointResult(self.estimate(s), "early_stop", s.n, s.batches, why, h)

    def estimate(self, s: PairedStats) -> float:
        """An early-stopped point's value: the baseline (all batches) minus the paired drop (the
        batches used), kept inside the metric's range (:func:`metric_range`).

        The paired drop is measured on a subset whose own baseline differs from the whole one, so
        ``baseline - drop`` can leave the range (an accuracy below 0 for a collapsed group
        evaluated on images the unpruned model gets right more often than on average).
        """
        lo, hi = metric_range(self.spec)
        return min(max(self.baseline - self.sign * s.drop, lo), hi)


def metric_range(spec: EvalSpec) -> tuple[float, float]:
    """The values a metric can take: ``[0, 1]`` for top-1 accuracy, ``[0, inf)`` for the built-in
    cross-entropy loss, unbounded for a callable metric.

    Example:
        >>> from prunekit.workflow.evaluation import make_eval_fn
        >>> metric_range(make_eval_fn([], "accuracy").evaluation)
        (0.0, 1.0)
    """
    if spec.binary:
        return 0.0, 1.0
    if spec.samplewise and spec.name == "loss":
        return 0.0, math.inf
    return -math.inf, math.inf


def _head(tree: Any, k: int, size: int) -> Any:
    """The first ``k`` samples of every tensor in ``tree``, or ``None`` if one has no batch dimension of ``size``."""
    leaves = [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 or t.shape[0] != size for t in leaves):
        return None
    return tree_map(lambda t: t[:k] if isinstance(t, torch.Tensor) else t, tree)


def _slice(t: Any, v: int, n: int, size: int) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 0 or t.shape[0] != n * size:
        raise _Unbatchable(f"the model output of shape {tuple(t.shape)} does not hold {n} x {size} samples")
    return t[v * size : (v + 1) * size]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
