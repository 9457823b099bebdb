"""Sparse models: pruned channels held at exactly zero, shapes unchanged, ready to train.

:func:`apply_plan` zeroes every pruned slice (producer rows and consumer columns alike),
masks the gradients of those slices, re-zeroes them after every optimizer step, and makes
LayerNorm/GroupNorm layers that normalise over pruned channels use the kept ones only, so
the sparse model computes exactly what the slim model will.

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

from prunekit.engine.plan import PruningPlan
from prunekit.utils.files import atomic_write

__all__ = ["apply_plan", "remove_masks", "get_plan", "is_sparse", "reapply_masks",
           "save_sparse", "load_sparse"]

_ATTR = "_prunekit_sparse"
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
    params = {0: "input", 1: "normalized_shape" if name != "group_norm" else "num_groups",
              2: "weight", 3: "bias" if name != "rms_norm" else "eps", 4: "eps"}
    p = {params[i]: a for i, a in enumerate(args)}
    p.update(kwargs)
    w = p.get("weight")
    b = p.get("bias")
    eps = p.get("eps", 1e-5)
    if name == "group_norm":
        xs = x.index_select(1, keep)
        y = F.group_norm(xs, p["num_groups"], w.index_select(0, keep),
                         None if b is None else b.index_select(0, keep), eps)
        return x.new_zeros(x.shape).index_copy(1, keep, y)
    xs = x.index_select(-1, keep)
    if name == "rms_norm":
        y = F.rms_norm(xs, (keep.numel(),), w.index_select(0, keep), eps)
    else:
        y = F.layer_norm(xs, (keep.numel(),), w.index_select(0, keep),
                         None if b is None else b.index_select(0, keep), eps)
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
            owners = [m for m in model.modules()
                      if any(id(p) in norm_keep for p in m._parameters.values() if p is not None)]
            for m in dict.fromkeys([model, *owners]):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._exit, always_call=True))
        _LIVE.add(self)

    def _enter(self, mod, args):
        self._depth += 1
        if self._depth == 1:
            self.mode.__enter__()

    def _exit(self, mod, args, out):
        self._depth -= 1
        if self._depth == 0:
            self.mode.__exit__(None, None, None)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        _LIVE.discard(self)


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
            raise ValueError(f"plan does not match the model: {name} has shape {list(t.shape)}, "
                             f"the plan expects {shape}; was the plan made for another model?")
    old = getattr(model, _ATTR, None)
    if old is not None:
        old.detach()
        plan = old.plan.merge(plan)
    state = SparseState(model, plan)
    state.attach()
    object.__setattr__(model, _ATTR, state)
    return model


def is_sparse(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def get_plan(model: nn.Module) -> PruningPlan:
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("this model is not sparse: prune it first (Pruner.prune(..., mode='sparse'))")
    return state.plan


def reapply_masks(model: nn.Module) -> None:
    """Zero the pruned slices again (e.g. after loading weights by hand)."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        state.reapply()


def remove_masks(model: nn.Module) -> PruningPlan | None:
    """Detach masks and hooks (weights keep their zeros). Returns the plan."""
    state = getattr(model, _ATTR, None)
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
    tmp.replace(directory / "model.safetensors")
    get_plan(model).save(directory / "plan.json")
    atomic_write(directory / "README.txt", "prunekit sparse model: load with prunekit.load_sparse(model, dir)\n")
    return directory


def load_sparse(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load weights and masks saved by :func:`save_sparse` into a freshly built ``model``."""
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / "plan.json").exists():
        raise FileNotFoundError(f"{directory} has no plan.json; save it with prunekit.save_sparse")
    plan = PruningPlan.load(directory / "plan.json")
    load_model(model, str(directory / "model.safetensors"))
    return apply_plan(model, plan)
