"""Slim models: sparse models with the pruned channels physically removed.

:func:`to_slim` slices every pruned tensor and brings module attributes in line
(``in_channels``, ``groups``, ``num_features``, ``embed_dim``, ``num_heads`` ...) through a
registry of *updaters* keyed by module class. A slim model is saved as safetensors weights
plus a JSON *spec* of the new tensor shapes; :func:`load_slim` rebuilds it from the
original architecture, so no pickled modules are needed.

Example:
    >>> import torch.nn as nn
    >>> from prunekit.engine.plan import PruningPlan
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> plan = PruningPlan({"0.weight": {0: [1]}, "0.bias": {0: [1]}, "1.weight": {1: [1]}},
    ...                    {"0.weight": [3, 4], "0.bias": [3], "1.weight": [2, 3]})
    >>> slim = to_slim(m, plan)
    >>> slim[0].out_features, slim[1].in_features
    (2, 2)
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from prunekit.engine import depth, experts, sparse
from prunekit.engine.calibration import add_biases
from prunekit.engine.plan import PruningPlan
from prunekit.utils import artifacts
from prunekit.utils.files import atomic_write, load_weights, read_json
from prunekit.utils.refs import lazy_attr

_swin = partial(lazy_attr, "prunekit.integrations.swin")  # torchvision Swin, imported on first use

__all__ = ["to_slim", "register_updater", "slim_spec", "apply_spec", "save_slim", "load_slim", "head_split"]

UPDATERS: dict[type, Callable[[nn.Module, dict], None]] = {}
SPEC_FORMAT = "prunekit-slim-spec"


def register_updater(*classes: type):
    """Register ``fn(module, old_shapes)`` that fixes a module's attributes after slicing.

    ``old_shapes`` maps the module's own tensor names (``"weight"``) to shapes before pruning.
    """

    def deco(fn):
        for c in classes:
            UPDATERS[c] = fn
        return fn

    return deco


def _updater(mod: nn.Module):
    for cls in type(mod).__mro__:
        if cls in UPDATERS:
            return UPDATERS[cls]
    return None


@register_updater(nn.modules.conv._ConvNd)
def _conv(mod, old):
    w = mod.weight
    ow = old.get("weight", list(w.shape))
    if not mod.transposed:
        if ow[1] == 1 and mod.groups > 1:  # depthwise: whole groups went
            mult = ow[0] // mod.groups
            mod.groups = w.shape[0] // mult
            mod.in_channels = mod.groups
        else:
            mod.in_channels = w.shape[1] * mod.groups
        mod.out_channels = w.shape[0]
    else:
        if mod.groups > 1 and ow[0] == mod.groups:
            mod.groups = w.shape[0]
        mod.in_channels = w.shape[0]
        mod.out_channels = w.shape[1] * mod.groups


@register_updater(nn.Linear)
def _linear(mod, old):
    mod.out_features, mod.in_features = mod.weight.shape


@register_updater(nn.modules.batchnorm._NormBase)
def _bn(mod, old):
    t = mod.weight if mod.weight is not None else mod.running_mean
    if t is not None:
        mod.num_features = t.shape[0]


@register_updater(nn.LayerNorm)
def _ln(mod, old):
    if mod.weight is not None and len(mod.normalized_shape) == 1:
        mod.normalized_shape = (mod.weight.shape[0],)


if hasattr(nn, "RMSNorm"):
    register_updater(nn.RMSNorm)(_ln)


@register_updater(nn.GroupNorm)
def _gn(mod, old):
    if mod.weight is not None:
        mod.num_channels = mod.weight.shape[0]


@register_updater(nn.PReLU)
def _prelu(mod, old):
    mod.num_parameters = mod.weight.numel()


@register_updater(nn.Embedding, nn.EmbeddingBag)
def _emb(mod, old):
    mod.num_embeddings, mod.embedding_dim = mod.weight.shape


@register_updater(nn.MultiheadAttention)
def _mha(mod, old):
    from prunekit.nn import PrunedMultiheadAttention

    if mod._qkv_same_embed_dim:
        inner = mod.in_proj_weight.shape[0] // 3
        mod.kdim = mod.vdim = mod.in_proj_weight.shape[1]
    else:
        inner = mod.q_proj_weight.shape[0]
        mod.kdim, mod.vdim = mod.k_proj_weight.shape[1], mod.v_proj_weight.shape[1]
    mod.embed_dim = mod.out_proj.weight.shape[0]
    mod.num_heads = inner // mod.head_dim
    _linear(mod.out_proj, {})
    if inner != mod.embed_dim or mod.kdim != mod.embed_dim:
        mod.__class__ = PrunedMultiheadAttention


def _torchvision_vit(mod, old):
    mod.hidden_dim = mod.conv_proj.out_channels


#: updaters for classes we do not import, by "module.QualName"; run on every match after
#: the per-tensor updaters, for attributes derived from child layers. ``old`` holds the
#: shapes before pruning of the module's own tensors (``"weight"``) and of its
#: descendants' (``"qkv.weight"``).
NAMED_UPDATERS: dict[str, Callable[[nn.Module, dict], None]] = {
    "torchvision.models.vision_transformer.VisionTransformer": _torchvision_vit,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _swin("update_swin_attention"),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": _swin("update_swin_attention"),
    "prunekit.integrations.swin.PrunedShiftedWindowAttention": _swin("update_swin_attention"),
    "prunekit.integrations.swin.PrunedShiftedWindowAttentionV2": _swin("update_swin_attention"),
}
#: updaters for every module of a package, by module-path prefix; run children first, after
#: the named updaters (e.g. Hugging Face attention attributes and ``config`` fields).
PACKAGE_UPDATERS: dict[str, Callable[[nn.Module, dict], None]] = {
    "transformers.": lazy_attr("prunekit.integrations.hf", "update_module"),
    "timm.": lazy_attr("prunekit.integrations.timm_models", "update_module"),
    "prunekit.integrations.timm_models.": lazy_attr("prunekit.integrations.timm_models", "update_module"),
    "ultralytics.": lazy_attr("prunekit.integrations.ultralytics", "update_module"),
}

_CONTEXT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("prunekit_slim_context", default=None)


def update_context() -> dict | None:
    """For updaters: ``{"model", "names", "old_shapes", "head_splits", "structure"}`` of the update running
    (``structure``: the removed ``blocks`` and ``added_biases`` of the plan or spec, where there are any)."""
    return _CONTEXT.get()


def head_split(mod: nn.Module) -> str | None:
    """For updaters: ``"heads"`` or ``"head_dim"``, the factor of ``mod``'s (heads, head_dim)
    reshapes that the plan being applied pruned (None when unknown or not split)."""
    ctx = _CONTEXT.get()
    if not ctx:
        return None
    name = ctx["names"].get(id(mod))
    return ctx["head_splits"].get(name if name else "<root>")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), leaf


def _resize(model: nn.Module, name: str, new: torch.Tensor) -> None:
    """Replace tensor ``name`` by ``new``, and every other name of the same (tied) tensor."""
    mod, leaf = _owner(model, name)
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    elif leaf in mod._buffers:
        old = mod._buffers[leaf]
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer")
    for owner in model.modules():
        for store in (owner._parameters, owner._buffers):
            for k, t in store.items():
                if t is old:
                    store[k] = new


def _update_modules(model: nn.Module, names, old_shapes: dict[str, list[int]], meta: dict | None = None) -> None:
    touched: dict[str, dict] = {}
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        touched.setdefault(mod_name, {})[leaf] = old_shapes[name]
    for mod_name in sorted(touched, key=lambda n: -n.count(".")):  # children first
        mod = model.get_submodule(mod_name) if mod_name else model
        fn = _updater(mod)
        if fn is not None:
            fn(mod, touched[mod_name])
    mods = list(model.named_modules())
    token = _CONTEXT.set(
        {
            "head_splits": dict((meta or {}).get("head_splits", {})),
            "names": {id(m): n for n, m in mods},
            "model": model,
            "old_shapes": {n: old_shapes[n] for n in names},
            "structure": {k: (meta or {})[k] for k in ("blocks", "added_biases") if (meta or {}).get(k)},
        }
    )
    try:
        for mod_name, mod in mods:  # parents with attributes derived from children
            fn = NAMED_UPDATERS.get(f"{type(mod).__module__}.{type(mod).__qualname__}")
            if fn is not None:
                fn(mod, _old_below(mod_name, names, old_shapes))
        if any(type(m).__module__.startswith(p) for _, m in mods for p in PACKAGE_UPDATERS):
            for mod_name, mod in reversed(mods):  # children first
                qual = f"{type(mod).__module__}.{type(mod).__qualname__}"
                for prefix, fn in PACKAGE_UPDATERS.items():
                    if qual.startswith(prefix):
                        fn(mod, _old_below(mod_name, names, old_shapes))
    finally:
        _CONTEXT.reset(token)


def _old_below(mod_name: str, names, old_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Old shapes of a module's own tensors (``"weight"``) and its descendants' (``"q.weight"``)."""
    if not mod_name:
        return {n: old_shapes[n] for n in names}
    pre = mod_name + "."
    return {n[len(pre) :]: old_shapes[n] for n in names if n.startswith(pre)}


@contextlib.contextmanager
def _without_masks(model: nn.Module):
    state = sparse.bound_state(model)
    if state is None:
        yield
        return
    state.detach()
    object.__delattr__(model, sparse._ATTR)
    try:
        yield
    finally:
        object.__setattr__(model, sparse._ATTR, state)
        state.attach()


def to_slim(model: nn.Module, plan: PruningPlan | None = None, inplace: bool = False) -> nn.Module:
    """Return the slim model: pruned indices removed, attributes updated.

    Args:
        model: A sparse model (its plan is used) or any model ``plan`` was made for.
        plan: Optional plan; defaults to the sparse model's own.
        inplace: Modify ``model`` itself instead of a copy.
    """
    if plan is None:
        plan = sparse.get_plan(model)
    with _without_masks(model):
        slim = model if inplace else copy.deepcopy(model)
    if inplace:
        sparse.remove_masks(slim)
    with torch.no_grad():
        for name, dims in plan.pruned.items():
            t = sparse.get_tensor(slim, name)
            if list(t.shape) != list(plan.shapes[name]):
                raise ValueError(
                    f"{name} has shape {list(t.shape)} but the plan was made for "
                    f"{plan.shapes[name]}: is this model already slim?"
                )
            new = t.detach()
            for d in sorted(dims):
                new = new.index_select(d, plan.keep_index(name, d).to(t.device))
            _resize(slim, name, new.clone())
    _update_modules(slim, list(plan.pruned), plan.shapes, plan.meta)
    _remove_structure(slim, plan.meta, plan.shapes)
    object.__setattr__(slim, "_prunekit_spec", slim_spec_from_plan(plan))
    return slim


def _remove_structure(model: nn.Module, meta: dict, old_shapes: dict[str, list[int]]) -> None:
    """After slicing: expert counts follow the router rows, removed blocks go (see :mod:`prunekit.engine.depth`)."""
    experts.update_moe(model, old_shapes)
    depth.remove_blocks(model, meta.get("blocks", []))


def slim_spec_from_plan(plan: PruningPlan) -> dict:
    spec = {
        "format": SPEC_FORMAT,
        "version": 1,
        "shapes": {n: plan.new_shape(n) for n in plan.pruned},
        "original_shapes": {n: plan.shapes[n] for n in plan.pruned},
    }
    if plan.meta.get("head_splits"):
        spec["head_splits"] = plan.meta["head_splits"]
    for key in ("blocks", "added_biases"):  # removed blocks, biases created by compensation
        if plan.meta.get(key):
            spec[key] = plan.meta[key]
    return spec


def slim_spec(model: nn.Module) -> dict:
    """The spec (new tensor shapes) of a slim model made by :func:`to_slim`."""
    spec = getattr(model, "_prunekit_spec", None)
    if spec is None:
        raise ValueError("this model was not made by prunekit.to_slim; no spec to save")
    return spec


def apply_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Resize a freshly built original model to the slim shapes in ``spec`` (weights empty)."""
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a prunekit slim spec (format={spec.get('format')!r})")
    old = {}
    add_biases(model, spec.get("added_biases", {}))
    for name, shape in spec["shapes"].items():
        try:
            t = sparse.get_tensor(model, name)
        except (KeyError, AttributeError) as exc:
            raise ValueError(
                f"spec names {name!r}, which this model does not have: "
                "build the same architecture the slim model came from"
            ) from exc
        want = spec["original_shapes"][name]
        if list(t.shape) != list(want):
            raise ValueError(
                f"{name} has shape {list(t.shape)}, the spec expects the original "
                f"shape {want}: wrong architecture or configuration"
            )
        old[name] = list(t.shape)
        _resize(model, name, torch.empty(shape, dtype=t.dtype, device=t.device))
    _update_modules(model, list(spec["shapes"]), old, spec)
    _remove_structure(model, spec, old)
    object.__setattr__(model, "_prunekit_spec", spec)
    return model


def save_slim(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``spec.json`` (no pickles) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = slim_spec(model)
    tmp = directory / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    tmp.replace(directory / artifacts.WEIGHTS)
    atomic_write(directory / artifacts.SPEC, json.dumps(spec, indent=1))
    return directory


def load_slim(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a slim model, in eval mode: ``model`` is a fresh instance of the original architecture.

    Example:
        >>> slim = load_slim(torchvision.models.resnet18(), "resnet18-slim")  # doctest: +SKIP
        >>> slim.training  # doctest: +SKIP
        False
    """
    directory = Path(directory)
    if not (directory / artifacts.SPEC).exists():
        raise FileNotFoundError(f"{directory} has no spec.json; save it with prunekit.save_slim")
    fix = "save the slim model again (prunekit.save_slim, or the prunekit verb that wrote it)"
    apply_spec(model, read_json(directory / artifacts.SPEC, "slim model spec", fix))
    load_weights(model, directory / artifacts.WEIGHTS, "slim model weights", fix)
    return model.eval()
