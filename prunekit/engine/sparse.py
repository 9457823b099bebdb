"""Sparse models: pruned channels held at exactly zero, shapes unchanged, ready to train.

:func:`apply_plan` zeroes every pruned slice (producer rows and consumer columns alike),
masks the gradients of those slices, re-zeroes them after every optimizer step, and makes
LayerNorm/GroupNorm layers that normalise over pruned channels use the kept ones only, so
the sparse model computes exactly what the slim model will. A deep copy or a pickle of a sparse
model (an EMA, a training checkpoint) carries the plan; the copy's masks attach on first use
(:func:`bound_state`).

Example:
    >>> import torch, torch.nn as nn
    >>> from prunekit.engine.plan import PruningPlan
    >>> m = nn.Linear(4, 3)
    >>> _ = apply_plan(m, PruningPlan({"weight": {0: [1]}, "bias": {0: [1]}},
    ...                              {"weight": [3, 4], "bias": [3]}))
    >>> float(m.weight[1].abs().sum())
    0.0
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode

from prunekit.engine import depth, experts
from prunekit.engine.calibration import add_biases
from prunekit.engine.plan import PruningPlan
from prunekit.utils import artifacts
from prunekit.utils.files import atomic_write, load_weights

__all__ = [
    "apply_plan",
    "remove_masks",
    "get_plan",
    "is_sparse",
    "reapply_masks",
    "from_slim",
    "bound_state",
    "save_sparse",
    "load_sparse",
]

_ATTR = "_prunekit_sparse"
_PLAN_KEY = "prunekit_sparse_plan"  # how a copied or unpickled sparse model holds its plan
_LIVE: weakref.WeakSet = weakref.WeakSet()


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, leaf, None)
    if not isinstance(t, torch.Tensor):
        raise KeyError(f"model has no parameter or buffer named {name!r}")
    return t


class _MaskedNorms(TorchFunctionMode):
    """Computes LayerNorm/GroupNorm statistics over kept channels only."""

    def __init__(self, keep: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("layer_norm", "group_norm", "rms_norm"):
            w = kwargs.get("weight", args[2] if len(args) > 2 else None)
            keep = self.keep.get(id(w)) if w is not None else None
            if keep is not None:
                return _masked_norm(name, args, kwargs, keep)
        return func(*args, **kwargs)


def _masked_norm(name: str, args, kwargs, keep: torch.Tensor) -> torch.Tensor:
    x = args[0]
    keep = keep.to(x.device)
    params = {
        0: "input",
        1: "normalized_shape" if name != "group_norm" else "num_groups",
        2: "weight",
        3: "bias" if name != "rms_norm" else "eps",
        4: "eps",
    }
    p = {params[i]: a for i, a in enumerate(args)}
    p.update(kwargs)
    w = p.get("weight")
    b = p.get("bias")
    eps = p.get("eps", 1e-5)
    if name == "group_norm":
        xs = x.index_select(1, keep)
        y = F.group_norm(
            xs, p["num_groups"], w.index_select(0, keep), None if b is None else b.index_select(0, keep), eps
        )
        return x.new_zeros(x.shape).index_copy(1, keep, y)
    xs = x.index_select(-1, keep)
    if name == "rms_norm":
        y = F.rms_norm(xs, (keep.numel(),), w.index_select(0, keep), eps)
    else:
        y = F.layer_norm(
            xs, (keep.numel(),), w.index_select(0, keep), None if b is None else b.index_select(0, keep), eps
        )
    return x.new_zeros(x.shape).index_copy(x.ndim - 1, keep, y)


class SparseState:
    """The masks of one sparse model and the hooks that keep them applied."""

    def __init__(self, model: nn.Module, plan: PruningPlan) -> None:
        self.model_ref = weakref.ref(model)
        self.plan = plan
        self.handles: list = []
        self.mode: _MaskedNorms | None = None
        self._depth = 0  # nested module calls that entered the masked-norm mode

    def entries(self):
        model = self.model_ref()
        if model is None:
            return
        for name, dims in self.plan.pruned.items():
            t = get_tensor(model, name)
            for d, idx in dims.items():
                yield name, t, d, torch.as_tensor(idx, dtype=torch.long, device=t.device)

    @torch.no_grad()
    def reapply(self) -> None:
        for name, t, d, idx in self.entries():
            t.index_fill_(d, idx, 1.0 if name.endswith("running_var") else 0.0)

    def attach(self) -> None:
        model = self.model_ref()
        self.reapply()
        masks: dict[int, list] = {}
        for _, t, d, idx in self.entries():
            if isinstance(t, nn.Parameter) and t.requires_grad:
                masks.setdefault(id(t), [t]).append((d, idx))
        for t, *dims in masks.values():

            def hook(g, dims=tuple(dims)):
                for d, idx in dims:
                    g = g.index_fill(d, idx.to(g.device), 0.0)
                return g

            self.handles.append(t.register_hook(hook))
        norm_keep = {}
        for name in self.plan.meta.get("norm_weights", []):
            if name in self.plan.pruned and 0 in self.plan.pruned[name]:
                norm_keep[id(get_tensor(model, name))] = self.plan.keep_index(name, 0)
        if norm_keep:
            self.mode = _MaskedNorms(norm_keep)
            # the whole model, and every module that owns a masked norm weight: a submodule
            # called on its own (a detector's head, a backbone used as a feature extractor)
            # normalises like the whole model does
            owners = [
                m for m in model.modules() if any(id(p) in norm_keep for p in m._parameters.values() if p is not None)
            ]
            for m in dict.fromkeys([model, *owners]):
                _NORM_OWNERS[m] = self
                self.handles.append(m.register_forward_pre_hook(_norm_enter))
                self.handles.append(m.register_forward_hook(_norm_exit, always_call=True))
        # removed blocks return their input, removed experts get no tokens (same shapes)
        self.handles += depth.bypass_hooks(model, self.plan.meta.get("blocks", []))
        self.handles += experts.router_mask_hooks(model, self.plan.meta.get("routers", {}))
        _LIVE.add(self)

    def enter_norms(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self.mode.__enter__()

    def exit_norms(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.mode.__exit__(None, None, None)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m, state in list(_NORM_OWNERS.items()):
            if state is self:
                del _NORM_OWNERS[m]
        _LIVE.discard(self)

    def __reduce__(self):
        """Deep copies and pickles of a sparse model carry only the plan, as a plain dict (no hooks, no
        reference to the original model, no prunekit class: a pickled checkpoint loads without prunekit);
        :func:`bound_state` attaches it to the copy the first time prunekit touches the copy."""
        return (dict, ({_PLAN_KEY: self.plan.to_dict()},))


#: module -> the state whose masked norms it runs. The module hooks are plain functions that look the
#: state up here, so a deep copy or a pickle of the model copies inert hooks (its modules are not here).
_NORM_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_enter(mod: nn.Module, args) -> None:
    state = _NORM_OWNERS.get(mod)
    if state is not None:
        state.enter_norms()


def _norm_exit(mod: nn.Module, args, out) -> None:
    state = _NORM_OWNERS.get(mod)
    if state is not None:
        state.exit_norms()


def _after_step(optimizer, args, kwargs) -> None:
    for state in list(_LIVE):
        state.reapply()


register_optimizer_step_post_hook(_after_step)


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Make ``model`` sparse in place according to ``plan`` (replacing earlier masks).

    Args:
        model: The model the plan was made for (same tensor names and shapes).
        plan: Indices to hold at zero.

    Returns:
        The same model, now sparse.
    """
    for name, shape in plan.shapes.items():
        t = get_tensor(model, name)
        if list(t.shape) != list(shape):
            raise ValueError(
                f"plan does not match the model: {name} has shape {list(t.shape)}, "
                f"the plan expects {shape}; was the plan made for another model?"
            )
    old = bound_state(model)
    if old is not None:
        old.detach()
        plan = old.plan.merge(plan)
    state = SparseState(model, plan)
    state.attach()
    object.__setattr__(model, _ATTR, state)
    return model


def bound_state(model: nn.Module) -> SparseState | None:
    """The sparse state of ``model`` with its masks attached to ``model`` itself (None: not sparse).

    A deep copy (an EMA, a ``best`` snapshot) or an unpickled checkpoint of a sparse model holds
    only its plan; this attaches it (zeroes, gradient masks, optimizer-step hook) to the copy.

    Example:
        >>> import copy, torch.nn as nn
        >>> m = apply_plan(nn.Linear(4, 3), PruningPlan({"weight": {0: [1]}}, {"weight": [3, 4]}))
        >>> twin = copy.deepcopy(m)
        >>> bound_state(twin).model_ref() is twin
        True
    """
    state = getattr(model, _ATTR, None)
    if isinstance(state, dict) and _PLAN_KEY in state:
        object.__delattr__(model, _ATTR)
        apply_plan(model, PruningPlan.from_dict(state[_PLAN_KEY]))
        state = getattr(model, _ATTR)
    return state


def is_sparse(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def get_plan(model: nn.Module) -> PruningPlan:
    state = bound_state(model)
    if state is None:
        raise ValueError("this model is not sparse: prune it first (Pruner.prune(..., mode='sparse'))")
    return state.plan


def reapply_masks(model: nn.Module) -> None:
    """Zero the pruned slices again (e.g. after loading weights by hand)."""
    state = bound_state(model)
    if state is not None:
        state.reapply()


def remove_masks(model: nn.Module) -> PruningPlan | None:
    """Detach masks and hooks (weights keep their zeros). Returns the plan."""
    state = bound_state(model)
    if state is None:
        return None
    state.detach()
    object.__delattr__(model, _ATTR)
    return state.plan


def save_sparse(model: nn.Module, directory: str | Path) -> Path:
    """Save a sparse model as ``model.safetensors`` + ``plan.json`` in ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    tmp.replace(directory / artifacts.WEIGHTS)
    get_plan(model).save(directory / artifacts.PLAN)
    atomic_write(directory / "README.txt", "prunekit sparse model: load with prunekit.load_sparse(model, dir)\n")
    return directory


def load_sparse(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load weights and masks saved by :func:`save_sparse` into a freshly built ``model``."""
    directory = Path(directory)
    if not (directory / artifacts.PLAN).exists():
        raise FileNotFoundError(f"{directory} has no plan.json; save it with prunekit.save_sparse")
    fix = "save the sparse model again (prunekit.save_sparse, or the prunekit verb that wrote it)"
    plan = PruningPlan.load(directory / artifacts.PLAN, fix)
    add_biases(model, plan.meta.get("added_biases", {}))  # made by bias compensation
    load_weights(model, directory / artifacts.WEIGHTS, "sparse model weights", fix)
    return apply_plan(model, plan)


@torch.no_grad()
def from_slim(model: nn.Module, slim_model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Make ``model`` the sparse model whose slim model is ``slim_model``; the inverse of ``to_slim``.

    ``model`` is an instance of the original architecture (its values are overwritten),
    ``slim_model`` the slim model of ``plan`` (for instance trained as such). Every tensor of
    ``slim_model`` is copied into ``model``: the kept channels at their original indices, the
    pruned ones zero; then ``plan`` is applied, so ``to_slim(model)`` has ``slim_model``'s
    values exactly.

    Example:
        >>> m = nn.Linear(4, 3)
        >>> plan = PruningPlan({"weight": {0: [1]}, "bias": {0: [1]}}, {"weight": [3, 4], "bias": [3]})
        >>> slim = nn.Linear(4, 2)
        >>> _ = from_slim(m, slim, plan)
        >>> bool((m.weight[[0, 2]] == slim.weight).all()), float(m.weight[1].detach().abs().sum())
        (True, 0.0)
    """
    if is_sparse(model):
        raise ValueError("from_slim fills a model of the original architecture; this one is already sparse")
    source = slim_model.state_dict()
    for name, t in model.state_dict().items():
        if name not in source:
            raise ValueError(f"the slim model has no tensor {name!r}: it is not a slim model of this architecture")
        value = source[name].to(t.device)
        for d in sorted(plan.pruned.get(name, {})):
            shape = list(value.shape)
            shape[d] = plan.shapes[name][d]
            value = value.new_zeros(shape).index_copy_(d, plan.keep_index(name, d).to(t.device), value)
        if list(value.shape) != list(t.shape):
            raise ValueError(
                f"{name}: the slim model's tensor has shape {list(source[name].shape)}, which the plan "
                f"does not expand to the original {list(t.shape)}; was the plan made for this model?"
            )
        t.copy_(value)
    return apply_plan(model, plan)
