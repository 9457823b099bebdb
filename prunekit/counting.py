"""MACs and parameter counts, per layer and in total, with torch's own FLOP counter.

Example:
    >>> import torch, torch.nn as nn
    >>> c = count(nn.Linear(4, 3), torch.randn(2, 4))
    >>> c.macs, c.params
    (24, 15)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.graph.trace import call_model

__all__ = ["Counts", "count"]


@dataclass
class Counts:
    """MACs (multiply-accumulates, = FLOPs / 2) and parameters.

    Attributes:
        macs: Total MACs of one forward on the example inputs.
        params: Total parameter count (shared parameters once).
        per_module: ``{module_name: (macs, params)}`` for leaf modules with either.
    """

    macs: int
    params: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)


def count(model: nn.Module, example_inputs: Any) -> Counts:
    """Count MACs (matmul, conv, attention ... via ``torch.utils.flop_counter``) and params."""
    was = model.training
    model.eval()
    try:
        mode = FlopCounterMode(display=False, depth=None)
        with torch.no_grad(), mode:
            call_model(model, example_inputs)
    finally:
        model.train(was)
    flops = mode.get_flop_counts()
    root = next(iter(flops), "Global")
    per = {}
    for name, mod in model.named_modules():
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        key = f"{type(model).__name__}.{name}" if name else root
        f = sum(flops.get(key, {}).values()) // 2 if len(list(mod.children())) == 0 else 0
        if own or f:
            per[name or "<root>"] = (f, own)
    total = sum(mode.get_flop_counts().get("Global", {}).values()) // 2
    params = sum(p.numel() for p in model.parameters())
    return Counts(total, params, per)
