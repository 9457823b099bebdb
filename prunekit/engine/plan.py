"""The pruning plan: which indices of which tensor dims are removed. A small JSON artifact.

Example:
    >>> plan = PruningPlan({"conv.weight": {0: [1, 3]}}, {"conv.weight": [4, 3, 3, 3]})
    >>> PruningPlan.from_dict(plan.to_dict()) == plan
    True
    >>> plan.kept("conv.weight", 0)
    [0, 2]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunekit.utils.files import atomic_write

__all__ = ["PruningPlan"]

FORMAT = "prunekit-plan"
VERSION = 1


@dataclass
class PruningPlan:
    """Removed indices per tensor and dim, plus the original shapes they refer to.

    Attributes:
        pruned: ``{tensor_name: {dim: [sorted removed indices]}}``.
        shapes: ``{tensor_name: original shape}`` for every tensor in ``pruned``.
        meta: Free-form information (ratio, criterion, groups ...).
    """

    pruned: dict[str, dict[int, list[int]]]
    shapes: dict[str, list[int]]
    meta: dict = field(default_factory=dict)

    def kept(self, name: str, dim: int) -> list[int]:
        gone = set(self.pruned.get(name, {}).get(dim, []))
        return [i for i in range(self.shapes[name][dim]) if i not in gone]

    def keep_index(self, name: str, dim: int) -> torch.Tensor:
        return torch.tensor(self.kept(name, dim), dtype=torch.long)

    def new_shape(self, name: str) -> list[int]:
        shape = list(self.shapes[name])
        for d, idx in self.pruned.get(name, {}).items():
            shape[d] -= len(idx)
        return shape

    def contains(self, other: PruningPlan) -> bool:
        """Whether every index ``other`` removes is removed here too (a later step keeps earlier cuts)."""
        return all(set(idx) <= set(self.pruned.get(name, {}).get(d, []))
                   for name, dims in other.pruned.items() for d, idx in dims.items())

    def merge(self, other: PruningPlan) -> PruningPlan:
        """Union of two plans over the same original model."""
        pruned = {k: {d: list(v) for d, v in dims.items()} for k, dims in self.pruned.items()}
        for k, dims in other.pruned.items():
            for d, idx in dims.items():
                cur = set(pruned.setdefault(k, {}).get(d, []))
                pruned[k][d] = sorted(cur | set(idx))
        return PruningPlan(pruned, {**self.shapes, **other.shapes}, {**self.meta, **other.meta})

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "shapes": self.shapes,
                "pruned": {k: {str(d): v for d, v in dims.items()} for k, dims in self.pruned.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a prunekit plan (format={data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version", 0) > VERSION:
            raise ValueError(f"plan version {data['version']} is newer than this prunekit ({VERSION})")
        pruned = {k: {int(d): list(v) for d, v in dims.items()} for k, dims in data["pruned"].items()}
        return cls(pruned, {k: list(v) for k, v in data["shapes"].items()}, data.get("meta", {}))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))
