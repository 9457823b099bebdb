"""MACs and parameter counts, per layer and in total, with torch's own FLOP counter.

Example:
    >>> import torch, torch.nn as nn
    >>> c = count(nn.Linear(4, 3), torch.randn(2, 4))
    >>> c.macs, c.params
    (24, 15)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from prunekit.graph.trace import call_model

__all__ = ["Counts", "count"]


@dataclass
class Counts:
    """MACs (multiply-accumulates, = FLOPs / 2) and parameters.

    Attributes:
        macs: Total MACs of one forward on the example inputs.
        params: Total parameter count (shared parameters once).
        per_module: ``{module_name: (macs, params)}``: MACs of the ops a module runs itself
            (its children are listed separately) and the parameters it owns.
    """

    macs: int
    params: int
    per_module: dict[str, tuple[int, int]] = field(default_factory=dict)


def _register_cpu_attention() -> None:
    """torch's counter knows the CUDA attention kernels; teach it the CPU one."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry or op.default in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention()


class _NoFastPath(TorchFunctionMode):
    """Any active torch-function mode makes ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` skip their fused fast path, whose FLOPs the counter
    cannot see; this one changes nothing else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _frozen(tensors) -> Iterator[None]:
    """Parameters that require no grad while counting. Under ``no_grad`` a view of a parameter
    (``self.cls_token.expand(b, -1, -1)``, CaiT) still says ``requires_grad`` but has no grad
    function, and the module tracker inside the FLOP counter asserts on such module inputs;
    with nothing requiring grad it registers no backward hooks at all."""
    flipped = [t for t in tensors if t.requires_grad]
    for t in flipped:
        t.requires_grad_(False)
    try:
        yield
    finally:
        for t in flipped:
            t.requires_grad_(True)


def count(model: nn.Module, example_inputs: Any, meta: bool = True) -> Counts:
    """Count MACs (matmul, conv, attention ... via ``torch.utils.flop_counter``) and params.

    With ``meta=True`` the model runs on the meta device (shapes only: instant even for
    huge models); models whose forward needs real values are then run for real.
    """
    from prunekit.graph.trace import meta_call, meta_stand_ins, shadow_model, single_thread

    was = model.training
    model.eval()
    try:
        mode = None
        if meta:
            try:
                with single_thread(), torch.no_grad():
                    shadow = shadow_model(model, meta=True).eval()  # caches filled on meta stay out of the model
                    stand_ins = meta_stand_ins(shadow)
                    mode = FlopCounterMode(display=False, depth=None)
                    with _frozen(stand_ins.values()), mode, _NoFastPath():
                        meta_call(shadow, stand_ins, example_inputs)
            except Exception:  # noqa: BLE001 - data-dependent forward: count for real
                mode = None
        if mode is None:
            mode = FlopCounterMode(display=False, depth=None)
            with torch.no_grad(), _frozen(model.parameters()), mode, _NoFastPath():
                call_model(model, example_inputs)
    finally:
        model.train(was)
    flops = mode.get_flop_counts()
    root = next(iter(flops), "Global")
    prefix = type(model).__name__

    def total_of(name: str) -> int:
        key = f"{prefix}.{name}" if name else root
        return sum(flops.get(key, {}).values()) // 2

    per = {}
    for name, mod in model.named_modules():
        own_params = sum(p.numel() for p in mod.parameters(recurse=False))
        # MACs of ops called in this module's own forward (children counted separately)
        own = total_of(name) - sum(total_of(f"{name}.{c}" if name else c) for c, _ in mod.named_children())
        if own_params or own > 0:
            per[name or "<root>"] = (max(own, 0), own_params)
    total = sum(mode.get_flop_counts().get("Global", {}).values()) // 2
    params = sum(p.numel() for p in model.parameters())
    return Counts(total, params, per)
