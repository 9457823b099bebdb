"""Shared checks for the engine tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import prunekit
from prunekit.engine.equivalence import TOLERANCE
from prunekit.graph.trace import call_model

ABS_TOL = REL_TOL = TOLERANCE  # the bound written as ABS_TOL + REL_TOL * max|sparse|


def run(model: nn.Module, inputs: Any) -> Any:
    """Outputs of ``model`` in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return call_model(model, inputs)


def float_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def assert_equivalent(sparse_out: Any, slim_out: Any, what: str) -> None:
    """``|slim - sparse| <= ABS_TOL + REL_TOL * max|sparse|`` for every output tensor."""
    err = prunekit.max_error(sparse_out, slim_out)
    assert err != float("inf"), f"{what}: output structures or shapes differ (max_error={err})"
    a, b = tree_flatten(sparse_out)[0], tree_flatten(slim_out)[0]
    assert len(a) == len(b), f"{what}: {len(a)} sparse outputs but {len(b)} slim outputs"
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(x, torch.Tensor):
            assert x == y, f"{what}: non-tensor output {i} differs: {x!r} vs {y!r}"
            continue
        assert x.shape == y.shape, f"{what}: output {i} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.is_floating_point():
            assert torch.equal(x, y), f"{what}: integer output {i} differs"
            continue
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        bound = ABS_TOL + REL_TOL * (float(x.abs().max()) if x.numel() else 0.0)
        assert diff <= bound, (
            f"{what}: output {i} differs by {diff:.3g} > {bound:.3g} "
            f"(|slim - sparse| <= {ABS_TOL} + {REL_TOL} * max|sparse|; max_error={err:.3g})"
        )


def assert_identical(a: Any, b: Any, what: str) -> None:
    ta, tb = tree_flatten(a)[0], tree_flatten(b)[0]
    assert len(ta) == len(tb), f"{what}: {len(ta)} vs {len(tb)} outputs"
    for i, (x, y) in enumerate(zip(ta, tb)):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.shape == y.shape, f"{what}: output {i} shapes differ"
            assert torch.equal(x, y), (
                f"{what}: output {i} differs by {float((x.double() - y.double()).abs().max()):.3g}"
            )
        else:
            assert x == y, f"{what}: non-tensor output {i} differs"


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def shrunk(before: nn.Module, after: nn.Module) -> list[str]:
    """Names of tensors whose shape is smaller in ``after``; fails on any that grew or vanished."""
    a, b = shapes(before), shapes(after)
    assert set(a) == set(b), (
        f"tensor names changed: only before {sorted(set(a) - set(b))}, only after {sorted(set(b) - set(a))}"
    )
    out = []
    for n in a:
        assert len(a[n]) == len(b[n]) and all(y <= x for x, y in zip(a[n], b[n])), (
            f"{n} has shape {b[n]} after pruning, {a[n]} before: tensors may only shrink"
        )
        if b[n] != a[n]:
            out.append(n)
    return out


def loss_of(out: Any) -> torch.Tensor:
    ts = float_tensors(out)
    assert ts, "the model has no floating-point output to take a loss of"
    return sum(t.float().pow(2).mean() for t in ts)


CLASSES = ("cat", "dog", "frog")  # the classes of the tiny image folders


def write_images(folder: Path, per_class: int, size: int = 8, fmt: str = "png", seed: int = 0) -> None:
    """``folder/<class>/<i>.<fmt>``: class ``c`` is mostly channel ``c``, with noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(size, size, 3, generator=g) * 60).to(torch.uint8)
            img[:, :, c] += 150
            Image.fromarray(img.numpy()).save(folder / name / f"{i}.{fmt}")


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    A freshly initialised BatchNorm (weight 1, bias 0, mean 0, var 1) hides mistakes in how
    pruned channels are handled; random values make an equivalence check meaningful.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model
