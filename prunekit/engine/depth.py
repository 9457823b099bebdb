"""Depth pruning: find residual blocks, score them, and remove whole blocks.

A *block* is an element of an ``nn.Sequential`` or ``nn.ModuleList`` that keeps the shape of
its input and whose removal leaves the identity:

- ``"residual"``: with every parameter of the block at zero, the block returns its input
  exactly (``x + f(x)`` where the parameters enter only through ``f``): torchvision ResNet
  ``BasicBlock`` / ``Bottleneck`` without downsampling (``relu(x + 0) = x`` on the
  non-negative input), ViT ``EncoderBlock``, Swin blocks, pre-norm transformer layers
  (Hugging Face LLaMA, GPT-2, ViT ...). Checked numerically on the example inputs.
- ``"layer"``: one of the ``config.num_hidden_layers`` layers of a Hugging Face model that is
  not residual in that sense (post-norm BERT layers: ``LN(x + f(x))``); dropping it is the
  usual layer dropping.

The sparse model keeps the block and returns its input instead of its output (a forward
hook; same shapes, trainable); the slim model loses it: a ``ModuleList`` is shortened (later
layers renumbered, ``layer_idx`` attributes and ``num_hidden_layers`` / ``layer_types`` of
the config follow), an ``nn.Sequential`` element becomes ``nn.Identity``. Plans list removed
blocks (original names) under ``meta["blocks"]``; slim specs under ``"blocks"``.

:func:`block_influence` is the cheap calibration score of ShortGPT ("block influence"):
``1 - cos(input, output)`` of each block, averaged over tokens (or pixels); low means the
block barely changes its input.

Example:
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> [b.name for b in find_blocks(model, x)]
    ['layer1.0', 'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.engine.calibration import run_calibration
from prunekit.engine.equivalence import max_error
from prunekit.graph.trace import call_model

__all__ = [
    "Block",
    "find_blocks",
    "block_influence",
    "bypassed",
    "bypass_hooks",
    "remove_blocks",
    "check_blocks",
    "IDENTITY_TOL",
]

#: largest relative error of ``block(x) - x`` with zeroed parameters for a "residual" block
IDENTITY_TOL = 1e-6
#: per-layer config lists of Hugging Face models that follow removed layers
_LAYER_LISTS = ("layer_types",)


@dataclass(frozen=True)
class Block:
    """A removable block.

    Attributes:
        name: Module name (``"layer1.1"``, ``"model.layers.3"``).
        container: Name of the ``nn.Sequential`` / ``nn.ModuleList`` holding it.
        key: Its key in the container (``"1"``, ``"encoder_layer_3"``).
        kind: ``"residual"`` or ``"layer"`` (see the module docstring).
        params: Number of parameters it holds.
    """

    name: str
    container: str
    key: str
    kind: str
    params: int


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: Any = None
    calls: int = 0


def _main(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The block's stream input: the first positional tensor, else ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states", kwargs.get("input"))
    return x if isinstance(x, torch.Tensor) else None


def _main_out(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _candidates(model: nn.Module) -> Iterator[tuple[str, str, str, nn.Module]]:
    for cname, cont in model.named_modules():
        if isinstance(cont, (nn.Sequential, nn.ModuleList)):
            for key, child in cont.named_children():
                yield (f"{cname}.{key}" if cname else key), cname, key, child


@contextlib.contextmanager
def _recording(mods: dict[str, nn.Module], calls: dict[str, _Call]) -> Iterator[None]:
    handles = []
    for name, mod in mods.items():

        def pre(m, args, kwargs, name=name):
            rec = calls.setdefault(name, _Call(args, kwargs))
            rec.calls += 1

        def post(m, args, kwargs, out, name=name):
            calls[name].output = out

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _zero_branch_is_identity(mod: nn.Module, rec: _Call) -> bool:
    """Does ``mod`` return its input exactly when every parameter is zero?"""
    params = [p for p in mod.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.zero_()
        out = _main_out(mod(*rec.args, **rec.kwargs))
    except Exception:  # noqa: BLE001 - a block that cannot run with zero weights is no residual block
        return False
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    x = _main(rec.args, rec.kwargs)
    return out is not None and bool(x.abs().max() > 0) and max_error(x, out) <= IDENTITY_TOL


def _layer_lists(model: nn.Module) -> dict[str, int]:
    """``{container name: n}`` of ModuleLists holding a Hugging Face config's ``num_hidden_layers``."""
    counts = {
        getattr(m.config, "num_hidden_layers", None) for m in model.modules() if getattr(m, "config", None) is not None
    }
    return {n: len(m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) in counts}


def find_blocks(model: nn.Module, example_inputs: Any) -> list[Block]:
    """The removable blocks of ``model`` (innermost first found; see the module docstring).

    Runs the model once on ``example_inputs`` (eval mode, no grad) and re-runs each candidate
    with zeroed parameters. Blocks called more than once (shared) are left out.

    Example:
        >>> import torch.nn as nn
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> net = nn.Sequential(nn.Linear(4, 4), Res(), Res(), nn.Linear(4, 2))
        >>> [(b.name, b.kind) for b in find_blocks(net, torch.randn(2, 4))]
        [('1', 'residual'), ('2', 'residual')]
    """
    cands = {
        name: (cname, key, mod) for name, cname, key, mod in _candidates(model) if any(True for _ in mod.parameters())
    }
    calls: dict[str, _Call] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _recording({n: c[2] for n, c in cands.items()}, calls):
            call_model(model, example_inputs)
        lists = _layer_lists(model)
        found = []
        for name, (cname, key, mod) in cands.items():
            rec = calls.get(name)
            if rec is None or rec.calls != 1:
                continue
            x, y = _main(rec.args, rec.kwargs), _main_out(rec.output)
            if x is None or y is None or x.shape != y.shape or not x.is_floating_point():
                continue
            kind = "residual" if _zero_branch_is_identity(mod, rec) else ("layer" if cname in lists else None)
            if kind is not None:
                found.append(Block(name, cname, key, kind, sum(p.numel() for p in mod.parameters())))
    finally:
        model.train(was)
    names = [b.name for b in found]  # innermost: drop a block holding another one
    return [b for b in found if not any(o.startswith(b.name + ".") for o in names)]


def _token_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine per token ``(B, T, C)`` / per pixel ``(B, C, H, W)`` / per sample otherwise."""
    x, y = x.detach().double(), y.detach().double()
    if x.ndim == 3:
        return F.cosine_similarity(x, y, dim=-1).reshape(-1)
    if x.ndim == 4:
        return F.cosine_similarity(x, y, dim=1).reshape(-1)
    return F.cosine_similarity(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1), dim=1)


@torch.no_grad()
def block_influence(
    model: nn.Module, blocks: Iterable[Block | str], batches: Iterable[Any], max_batches: int | None = None
) -> dict[str, float]:
    """ShortGPT's block influence, ``1 - mean cos(input, output)``, of each block over ``batches``.

    Args:
        model: The model.
        blocks: Blocks (or their names) from :func:`find_blocks`.
        batches: ``(inputs, target)`` pairs or bare inputs.
        max_batches: Use at most this many.

    Returns:
        ``{block name: influence}``; the lowest are the cheapest to remove.
    """
    names = [b.name if isinstance(b, Block) else b for b in blocks]
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:

        def post(m, args, kwargs, out, name=name):
            x, y = _main(args, kwargs), _main_out(out)
            if x is not None and y is not None and x.shape == y.shape:
                c = _token_cos(x, y)
                sums[name] += float((1 - c).sum())
                counts[name] += c.numel()

        handles.append(model.get_submodule(name).register_forward_hook(post, with_kwargs=True))
    try:
        run_calibration(model, batches, max_batches)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in names}


def _bypass(m, args, kwargs, out):
    x = _main(args, kwargs)
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    return x


def bypass_hooks(model: nn.Module, names: Iterable[str]) -> list:
    """Make each named block return its input (the sparse form of removing it); returns the hook handles."""
    return [model.get_submodule(n).register_forward_hook(_bypass, with_kwargs=True) for n in names]


@contextlib.contextmanager
def bypassed(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Within the block, the named blocks return their input (e.g. to evaluate a model without them)."""
    handles = bypass_hooks(model, names)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def check_blocks(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``names`` checked: each is a child of an ``nn.Sequential`` / ``nn.ModuleList`` of ``model``."""
    out = []
    for name in names:
        cname, _, key = name.rpartition(".")
        try:
            cont = model.get_submodule(cname) if cname else model
        except AttributeError:
            cont = None
        if not isinstance(cont, (nn.Sequential, nn.ModuleList)) or key not in cont._modules:
            raise ValueError(
                f"block {name!r} is not an element of an nn.Sequential or nn.ModuleList of this model; "
                "use the names prunekit.engine.depth.find_blocks(model, inputs) returns"
            )
        out.append(name)
    return sorted(set(out), key=out.index)


def _renumber(layers: list[nn.Module]) -> None:
    for i, layer in enumerate(layers):
        for m in layer.modules():
            for attr in ("layer_idx", "layer_id"):
                if isinstance(getattr(m, attr, None), int) and not isinstance(getattr(m, attr), bool):
                    setattr(m, attr, i)


def _update_configs(model: nn.Module, old: int, removed: list[int]) -> None:
    """``num_hidden_layers`` and per-layer lists of every config that counted ``old`` layers."""
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    for cfg in configs.values():
        if getattr(cfg, "num_hidden_layers", None) != old:
            continue
        cfg.num_hidden_layers = old - len(removed)
        for field in _LAYER_LISTS:
            values = getattr(cfg, field, None)
            if isinstance(values, list) and len(values) == old:
                setattr(cfg, field, [v for i, v in enumerate(values) if i not in removed])


def remove_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Remove the named blocks in place (the slim form): ``ModuleList`` elements are deleted
    (later ones renumbered, configs follow), ``nn.Sequential`` elements become ``nn.Identity``.

    Names are those of the original model; removing is done per container, all at once.
    """
    by_container: dict[str, list[str]] = {}
    for name in check_blocks(model, names):
        cname, _, key = name.rpartition(".")
        by_container.setdefault(cname, []).append(key)
    for cname, keys in by_container.items():
        cont = model.get_submodule(cname) if cname else model
        if isinstance(cont, nn.ModuleList):
            old = len(cont)
            order = list(cont._modules)
            removed = sorted(order.index(k) for k in keys)
            kept = [m for k, m in cont._modules.items() if k not in keys]
            cont._modules.clear()
            cont._modules.update((str(i), m) for i, m in enumerate(kept))
            _renumber(kept)
            _update_configs(model, old, removed)
        else:
            for k in keys:
                cont._modules[k] = nn.Identity()
    return model
