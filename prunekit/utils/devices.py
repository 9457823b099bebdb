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

__all__ = ["to_device", "model_device", "check_device", "DeviceError"]


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


class DeviceError(ValueError):
    """A device name torch does not know, or one this machine does not have."""


def check_device(name: str | torch.device | None, what: str = "device") -> torch.device | None:
    """``torch.device(name)`` after checking it exists here (``None`` stays ``None``: where the model is).

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("tpu")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        DeviceError: unknown device 'tpu' ...
    """
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(
            f"unknown {what} {name!r}: use cpu, cuda, cuda:N or mps (or leave it unset: where the model is)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{what} {name!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False: "
                "no GPU, no driver, or a CPU-only torch build); use cpu, or leave it unset"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{what} {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered 0..{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"{what} {name!r}: Apple's MPS is not available here; use cpu, or leave it unset")
    elif dev.type == "meta":
        raise DeviceError(f"{what} 'meta' holds no values and cannot train or evaluate; use cpu or cuda")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # noqa: BLE001  (xpu, hpu, ...: whatever the backend says)
            raise DeviceError(
                f"{what} {name!r} is not usable here ({type(exc).__name__}); use cpu, or leave it unset"
            ) from None
    return dev
