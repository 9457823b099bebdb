"""Before tracing: switch known layers to drop-in subclasses whose forward can be pruned.

Some library layers compute exactly what we need but in a form the channel rules cannot
prune: torchvision's Swin attention derives its head width from the input width, and Hugging
Face RMSNorms compute their statistics by hand (so a sparse model could not normalise over
the kept channels only). :func:`prepare` switches such modules, in place, to subclasses with
the same parameters, state-dict names and outputs. :class:`prunekit.Pruner` calls it.

Example:
    >>> import torch.nn as nn
    >>> prepare(nn.Sequential(nn.Linear(2, 2)))
    []
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn as nn

from prunekit.utils.refs import lazy_attr

_swin = partial(lazy_attr, "prunekit.integrations.swin")  # torchvision Swin, imported on first use

__all__ = ["prepare", "PREPARERS", "PACKAGE_PREPARERS"]


#: "module.QualName" -> fn(module) that switches it in place; returns whether it did.
PREPARERS: dict[str, Callable[[nn.Module], bool]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _swin("prepare_swin_attention"),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": _swin("prepare_swin_attention"),
}
#: module-path prefix -> fn(module), tried on every module of that package.
PACKAGE_PREPARERS: dict[str, Callable[[nn.Module], bool]] = {
    "transformers.": lazy_attr("prunekit.integrations.hf", "prepare_module"),
    "timm.": lazy_attr("prunekit.integrations.timm_models", "prepare_module"),
}


def prepare(model: nn.Module) -> list[str]:
    """Switch the modules of ``model`` that have a prunable equivalent; returns their names."""
    done = []
    for name, mod in model.named_modules():
        qual = f"{type(mod).__module__}.{type(mod).__qualname__}"
        fns = [PREPARERS[qual]] if qual in PREPARERS else []
        fns += [fn for prefix, fn in PACKAGE_PREPARERS.items() if qual.startswith(prefix)]
        if any(fn(mod) for fn in fns):
            done.append(name)
    return done
