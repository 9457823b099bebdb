"""Expert pruning for mixture-of-experts layers: remove whole experts, router rows with them.

A *MoE layer* is a module with a router child (``gate`` or ``router``: a 2-D ``weight`` of
one row per expert) and an ``experts`` child whose parameters hold every expert along dim 0
(the Hugging Face ``transformers`` 5 layout of Mixtral, Qwen2-MoE, ...: ``gate_up_proj``
``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``). Removing expert ``e`` removes row ``e`` of the
router and slice ``e`` of every expert tensor; ``num_experts`` attributes and the config's
expert count follow (:func:`update_moe`).

The sparse model keeps the shapes: the removed experts' weights are zero and their router
logits are held at the lowest float (:func:`router_mask_hooks`), so softmax gives them
probability 0 and top-k never picks them, which is what the slim router computes without their
rows. Plans list the removed experts per router weight under ``meta["routers"]``.

Each expert's MLP width is an ordinary channel group (the ``_grouped_mm`` channel rule of
:mod:`prunekit.graph.layers`).

Example:
    >>> import torch, torch.nn as nn
    >>> find_moe_layers(nn.Linear(2, 2))
    []
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from prunekit.engine.calibration import run_calibration
from prunekit.engine.plan import PruningPlan

__all__ = [
    "MoeLayer",
    "find_moe_layers",
    "expert_usage",
    "expert_plan",
    "router_mask_hooks",
    "update_moe",
    "align_groups",
    "EXPERT_COUNT_FIELDS",
    "EXPERT_WIDTH_FIELDS",
    "EXPERT_ALIGN",
]

_ROUTERS = ("gate", "router")
#: config fields holding the number of experts per layer (Mixtral, Qwen-MoE, DeepSeek)
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
#: channels of stacked expert weights stay multiples of this: ``grouped_mm`` needs 16-byte strides
#: (8 channels of bfloat16 / float16, also 4 of float32)
EXPERT_ALIGN = 8
#: config fields holding an expert's MLP width, most specific first
EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "intermediate_size")


@dataclass(frozen=True)
class MoeLayer:
    """One mixture-of-experts layer.

    Attributes:
        name: The layer's module name.
        router: The router's weight name (one row per expert).
        tensors: Every tensor indexed by expert along dim 0 (router rows and bias included).
        num_experts: Experts in the layer.
        top_k: Experts each token is routed to (``None`` when unknown).
    """

    name: str
    router: str
    tensors: tuple[str, ...]
    num_experts: int
    top_k: int | None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _layer(name: str, mod: nn.Module) -> MoeLayer | None:
    experts = getattr(mod, "experts", None)
    key = next((k for k in _ROUTERS if isinstance(getattr(mod, k, None), nn.Module)), None)
    if not isinstance(experts, nn.Module) or key is None:
        return None
    router = getattr(mod, key)
    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    n = w.shape[0]
    own = [(k, p) for k, p in experts.named_parameters(recurse=False)]
    if not own or any(p.ndim < 2 or p.shape[0] != n for _, p in own):
        return None  # not the stacked layout (e.g. a ModuleList of expert MLPs)
    tensors = [_join(name, key, "weight")]
    if isinstance(getattr(router, "bias", None), torch.Tensor):
        tensors.append(_join(name, key, "bias"))
    tensors += [_join(name, "experts", k) for k, _ in own]
    top_k = next(
        (
            getattr(m, a)
            for m in (router, mod)
            for a in ("top_k", "num_experts_per_tok")
            if isinstance(getattr(m, a, None), int)
        ),
        None,
    )
    return MoeLayer(name, tensors[0], tuple(tensors), n, top_k)


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every mixture-of-experts layer of ``model`` (see the module docstring for the layout)."""
    return [m for m in (_layer(n, mod) for n, mod in model.named_modules()) if m is not None]


def _usage_hook(totals: torch.Tensor):
    def hook(mod, args, out):
        if isinstance(out, tuple) and len(out) >= 3 and not out[-1].is_floating_point():
            scores, idx = out[-2], out[-1]  # (logits, top-k weights, top-k indices)
            totals.index_add_(0, idx.reshape(-1).cpu(), scores.detach().reshape(-1).double().cpu())
        else:
            logits = out[0] if isinstance(out, tuple) else out
            totals.add_(F.softmax(logits.detach().double(), -1).reshape(-1, totals.numel()).sum(0).cpu())

    return hook


@torch.no_grad()
def expert_usage(
    model: nn.Module, layers: Iterable[MoeLayer], batches: Iterable[Any], max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """Total routing weight each expert receives over ``batches`` (``{router weight: (E,)}``).

    The router's top-k weights where it returns ``(logits, weights, indices)``, else the
    softmax of its logits. Low usage: the expert matters least.
    """
    layers = list(layers)
    totals = {m.router: torch.zeros(m.num_experts, dtype=torch.float64) for m in layers}
    handles = [
        model.get_submodule(m.router.rpartition(".")[0]).register_forward_hook(_usage_hook(totals[m.router]))
        for m in layers
    ]
    try:
        run_calibration(model, batches, max_batches)
    finally:
        for h in handles:
            h.remove()
    return totals


def expert_plan(
    model: nn.Module, layers: Iterable[MoeLayer], remove: int, scores: dict[str, torch.Tensor]
) -> PruningPlan:
    """A plan removing the ``remove`` lowest-scored experts of every layer.

    Raises:
        ValueError: fewer than ``top_k`` (or one) experts would be left.
    """
    pruned: dict[str, dict[int, list[int]]] = {}
    shapes: dict[str, list[int]] = {}
    routers: dict[str, list[int]] = {}
    tensors = dict(model.named_parameters())
    for m in layers:
        keep = m.num_experts - remove
        if keep < max(1, m.top_k or 1):
            raise ValueError(
                f"remove_experts={remove} leaves {keep} of the {m.num_experts} experts of {m.name}, "
                f"fewer than the {m.top_k or 1} each token is routed to; remove at most "
                f"{m.num_experts - max(1, m.top_k or 1)}"
            )
        gone = sorted(torch.argsort(scores[m.router].double(), stable=True)[:remove].tolist())
        routers[m.router] = gone
        for t in m.tensors:
            pruned[t] = {0: gone}
            shapes[t] = list(tensors[t].shape)
    return PruningPlan(pruned, shapes, {"routers": routers})


def align_groups(groups: Iterable, model: nn.Module) -> None:
    """Set ``align`` of every channel group that cuts a stacked expert weight (dims other than the experts')."""
    names = {t for m in find_moe_layers(model) for t in m.tensors[1:] if ".experts." in t}
    if not names:
        return
    for g in groups:
        if any(mem.name in names and mem.dim > 0 for mem in g.members):
            g.align = max(g.align, EXPERT_ALIGN)


class _MaskedRouter(TorchFunctionMode):
    """Holds the logits of removed experts at the lowest float in ``linear`` calls of the router weight."""

    def __init__(self, weight: torch.Tensor, removed: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.removed = weight, removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        if func is F.linear and w is self.weight:
            out = out.index_fill(-1, self.removed.to(out.device), torch.finfo(out.dtype).min)
        return out


def router_mask_hooks(model: nn.Module, routers: dict[str, list[int]]) -> list:
    """The sparse form of removed experts: hooks on each router module; returns the handles."""
    handles = []
    for wname, removed in routers.items():
        mod_name, _, leaf = wname.rpartition(".")
        mod = model.get_submodule(mod_name)
        state: dict[str, _MaskedRouter] = {}

        def enter(m, args, leaf=leaf, removed=removed, state=state):
            state["mode"] = _MaskedRouter(getattr(m, leaf), torch.as_tensor(removed, dtype=torch.long))
            state["mode"].__enter__()

        def leave(m, args, out, state=state):
            mode = state.pop("mode", None)
            if mode is not None:
                mode.__exit__(None, None, None)

        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(leave, always_call=True))
    return handles


def _expert_width(mod: nn.Module) -> int | None:
    down = getattr(mod, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.ndim != 3:
        return None
    return down.shape[1] if getattr(mod, "is_transposed", False) else down.shape[2]


def update_moe(model: nn.Module, old_shapes: dict[str, list[int]]) -> None:
    """After slicing: ``num_experts`` / ``hidden_dim`` / ``intermediate_dim`` attributes from the tensors, and the
    config's expert count and expert width where every layer agrees (``old_shapes``: the
    original shapes of the sliced tensors)."""
    layers = find_moe_layers(model)
    if not layers:
        return
    counts, widths, old_counts, old_widths = set(), set(), set(), set()
    for m in layers:
        layer = model.get_submodule(m.name)
        experts = layer.experts
        router = model.get_submodule(m.router.rpartition(".")[0])
        n, hidden = router.weight.shape
        for obj in (router, experts):
            if isinstance(getattr(obj, "num_experts", None), int):
                obj.num_experts = n
            if isinstance(getattr(obj, "hidden_dim", None), int):  # the router reshapes to it
                obj.hidden_dim = hidden
        counts.add(n)
        old_counts.add(old_shapes.get(m.router, [n])[0])
        width = _expert_width(experts)
        if width is not None:
            if isinstance(getattr(experts, "intermediate_dim", None), int):
                experts.intermediate_dim = width
            widths.add(width)
            old = old_shapes.get(_join(m.name, "experts", "down_proj"))
            old_widths.add(width if old is None else (old[1] if getattr(experts, "is_transposed", False) else old[2]))
    _update_config(model, counts, old_counts, EXPERT_COUNT_FIELDS)
    _update_config(model, widths, old_widths, EXPERT_WIDTH_FIELDS)


def _update_config(model: nn.Module, new: set, old: set, fields: tuple[str, ...]) -> None:
    if len(new) != 1 or len(old) != 1:
        return  # per-layer values: the config cannot state them (reload through the slim spec)
    (value,), (was,) = new, old
    if value == was:
        return
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    for cfg in configs.values():
        field = next((f for f in fields if getattr(cfg, f, None) == was), None)
        if field is not None:
            setattr(cfg, field, value)
