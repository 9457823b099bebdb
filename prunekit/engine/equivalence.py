"""Slim == sparse: the one tolerance, the error measure and the checked transform.

A slim model must compute what its sparse model computes, within float32 rounding::

    |slim(x) - sparse(x)| <= TOLERANCE * (1 + max|sparse(x)|)      TOLERANCE = 1e-4

:func:`max_error` is the left side divided by ``1 + max|sparse(x)|``, so the check is
``max_error(sparse_out, slim_out) <= TOLERANCE``. Every caller (the pruner, the iterative
loop, ``prunekit transform``, export checks) uses :func:`checked_slim` or these two names.

Example:
    >>> import torch
    >>> max_error(torch.ones(3), torch.ones(3) + 1e-6) <= TOLERANCE
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from prunekit.graph.trace import call_model

__all__ = ["TOLERANCE", "EquivalenceError", "max_error", "equivalence_error", "check_equivalence", "checked_slim"]

#: The slim == sparse bound (float32), relative to ``1 + max|sparse output|``.
TOLERANCE = 1e-4


class EquivalenceError(RuntimeError):
    """The slim model fails to run or differs from the sparse model."""


def max_error(a: Any, b: Any) -> float:
    """Largest ``|a - b| / (1 + max|a|)`` over all tensors of two output structures.

    Different structures or shapes give ``inf``; integer tensors count as 0 or ``inf``.
    """
    ta = [t for t in tree_flatten(a)[0] if isinstance(t, torch.Tensor)]
    tb = [t for t in tree_flatten(b)[0] if isinstance(t, torch.Tensor)]
    if len(ta) != len(tb):
        return math.inf
    return max((_tensor_error(x, y) for x, y in zip(ta, tb)), default=0.0)


def _tensor_error(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape != y.shape:
        return math.inf
    if not x.is_floating_point():
        return 0.0 if torch.equal(x, y) else math.inf
    if not x.numel():
        return 0.0
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).abs().max()) / (1.0 + float(x.abs().max()))


def equivalence_error(sparse_model: nn.Module, slim_model: nn.Module, inputs: Any) -> float:
    """:func:`max_error` of the two models' outputs on ``inputs``, both in eval mode, no grad.

    Raises:
        EquivalenceError: the slim model does not run on ``inputs``.
    """
    was = sparse_model.training
    sparse_model.eval()
    slim_model.eval()
    try:
        with torch.no_grad():
            want = call_model(sparse_model, inputs)
            try:
                got = call_model(slim_model, inputs)
            except Exception as exc:  # e.g. a width hard-coded in forward (x.reshape(n, 4, 4))
                raise EquivalenceError(
                    f"the slim model fails on the example inputs ({type(exc).__name__}: {exc}); "
                    "run Pruner.validate() to find and freeze the groups responsible"
                ) from exc
    finally:
        sparse_model.train(was)
    return max_error(want, got)


def check_equivalence(sparse_model: nn.Module, slim_model: nn.Module, inputs: Any, tol: float = TOLERANCE) -> float:
    """:func:`equivalence_error`, raising :class:`EquivalenceError` above ``tol``; returns the error."""
    err = equivalence_error(sparse_model, slim_model, inputs)
    if not err <= tol:
        raise EquivalenceError(
            f"the slim model differs from the sparse model (relative error {err:.3g} > {tol:g}); "
            "run Pruner.validate() to find and freeze the groups responsible"
        )
    return err


def checked_slim(sparse_model: nn.Module, inputs: Any, tol: float = TOLERANCE) -> tuple[nn.Module, float]:
    """The slim model of ``sparse_model`` (masks removed, channels dropped) and its checked error.

    Example:
        >>> import torch, torch.nn as nn
        >>> from prunekit import Pruner
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(2, 4)
        >>> _ = Pruner(m, x).prune(0.5)
        >>> slim, err = checked_slim(m, x)
        >>> slim[0].out_features, err <= TOLERANCE
        (4, True)
    """
    from prunekit.engine.slim import to_slim  # slim imports plan/sparse; keep this module light

    slim_model = to_slim(sparse_model).eval()
    return slim_model, check_equivalence(sparse_model, slim_model, inputs, tol)
