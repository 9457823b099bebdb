"""Moving nested batches between devices, and finding where a model lives.

Example:
    >>> import torch
    >>> to_device({"x": torch.ones(1), "n": 3}, torch.device("cpu"))["n"]
    3
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

__all__ = ["to_device", "model_device"]


def to_device(batch: Any, device: torch.device | None, non_blocking: bool = False) -> Any:
    """Every tensor of a nested batch moved to ``device`` (``None``: unchanged)."""
    if device is None:
        return batch
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t, batch)


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter (or buffer); ``default`` (CPU) when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")
