"""Channel ids, their coupling (union-find) and the reasons some are fixed.

Every prunable dimension of a parameter or buffer is a *space*: a contiguous range of
global channel ids, one per index along that dimension. Tracing records which ids must
be removed together (``union``) and which may never be removed (``fix``). After
tracing, :func:`connected_components` turns the recorded pairs into *units*: sets of
ids that are pruned as one.

Example:
    >>> book = LabelBook()
    >>> a = book.space("conv.weight", 0, 4)
    >>> b = book.space("bn.weight", 0, 4)
    >>> book.union(a, b)
    >>> roots = book.roots()
    >>> bool((roots[a] == roots[b]).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LabelBook", "Space", "connected_components"]


@dataclass(frozen=True)
class Space:
    """One dimension of one named tensor (parameter or buffer) of the model.

    Attributes:
        name: Qualified tensor name, e.g. ``"layer1.0.conv1.weight"``.
        dim: The dimension of that tensor the ids index.
        size: Length of that dimension.
        offset: First global id of the space.
    """

    name: str
    dim: int
    size: int
    offset: int

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.size)


def connected_components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root id of every id ``0..n-1`` after joining each pair ``(a[i], b[i])``.

    Vectorised hook-and-jump; the root of a component is its smallest id.
    """
    parent = torch.arange(n)
    if a.numel() == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        low = torch.minimum(pa, pb)
        new = parent.clone()
        new.scatter_reduce_(0, pa, low, reduce="amin")
        new.scatter_reduce_(0, pb, low, reduce="amin")
        while True:  # pointer jumping until every id points at a root
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, parent):
            return parent
        parent = new


class LabelBook:
    """Allocates channel ids and records couplings and fixed ids while tracing."""

    def __init__(self) -> None:
        self.spaces: dict[tuple[str, int], Space] = {}
        self.n = 0
        self._a: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []
        self._fixed: list[tuple[torch.Tensor, str]] = []
        self._roots: torch.Tensor | None = None

    def space(self, name: str, dim: int, size: int) -> torch.Tensor:
        """Ids of ``name``'s dimension ``dim``, allocating the space on first use."""
        key = (name, dim)
        sp = self.spaces.get(key)
        if sp is None:
            sp = Space(name, dim, size, self.n)
            self.spaces[key] = sp
            self.n += size
            self._roots = None
        return sp.ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Couple ids ``a[i]`` and ``b[i]`` (pairs with a negative id are skipped)."""
        if a.numel() != b.numel():
            raise RuntimeError(f"internal: union of {tuple(a.shape)} and {tuple(b.shape)}")
        if a.numel():  # filtered once, in roots(): tracing records thousands of unions
            self._a.append(a.reshape(-1))
            self._b.append(b.reshape(-1))
            self._roots = None

    def fix(self, ids: torch.Tensor, reason: str) -> None:
        """Mark ``ids`` (and everything coupled to them) as never prunable."""
        ids = ids.reshape(-1).long()
        ids = ids[ids >= 0]
        if ids.numel():
            self._fixed.append((ids.unique(), reason))

    def roots(self) -> torch.Tensor:
        """Component root for every id."""
        if self._roots is None:
            a = torch.cat([t.long() for t in self._a]) if self._a else torch.empty(0, dtype=torch.long)
            b = torch.cat([t.long() for t in self._b]) if self._b else torch.empty(0, dtype=torch.long)
            keep = (a >= 0) & (b >= 0) & (a != b)
            a, b = a[keep], b[keep]
            self._a, self._b = [a], [b]
            self._roots = connected_components(self.n, a, b)
        return self._roots

    def fixed_roots(self) -> tuple[torch.Tensor, list[str]]:
        """``(reason_index, reasons)``: per root id, the index of the first reason it was
        fixed for, or -1 where it is free."""
        roots = self.roots()
        reason_of = torch.full((self.n,), -1, dtype=torch.long)
        reasons: list[str] = []
        index: dict[str, int] = {}
        for ids, reason in self._fixed:
            r = roots[ids]
            free = reason_of[r] < 0
            if bool(free.any()):
                k = index.setdefault(reason, len(reasons))
                if k == len(reasons):
                    reasons.append(reason)
                reason_of[r[free]] = k
        return reason_of, reasons
