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

import torch

from prunekit.utils.files import FIX, atomic_write, read_json, reading

__all__ = ["PruningPlan", "STRUCTURE_KEYS"]

FORMAT = "prunekit-plan"
VERSION = 1


#: ``meta`` entries that are part of what a plan removes or adds, merged as unions: removed
#: blocks (:mod:`prunekit.engine.depth`), removed experts per router
#: (:mod:`prunekit.engine.experts`), biases created by compensation (:mod:`prunekit.engine.calibration`)
STRUCTURE_KEYS = ("blocks", "routers", "added_biases")


def _merge_meta(a: dict, b: dict) -> dict:
    out = {**a, **b}
    if a.get("blocks") or b.get("blocks"):
        out["blocks"] = list(dict.fromkeys([*a.get("blocks", []), *b.get("blocks", [])]))
    for key in ("routers", "added_biases"):
        if a.get(key) or b.get(key):
            out[key] = {**a.get(key, {}), **b.get(key, {})}
    if a.get("routers") and b.get("routers"):
        out["routers"] = {
            k: sorted(set(a["routers"].get(k, [])) | set(b["routers"].get(k, [])))
            for k in {**a["routers"], **b["routers"]}
        }
    return out


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

    def key(self) -> tuple:
        """A hashable form of :attr:`pruned`: equal for plans that remove the same channels."""
        return tuple(
            sorted((n, tuple(sorted((d, tuple(i)) for d, i in dims.items()))) for n, dims in self.pruned.items())
        )

    def contains(self, other: PruningPlan) -> bool:
        """Whether every index ``other`` removes is removed here too (a later step keeps earlier cuts)."""
        return all(
            set(idx) <= set(self.pruned.get(name, {}).get(d, []))
            for name, dims in other.pruned.items()
            for d, idx in dims.items()
        )

    def compose(self, later: PruningPlan) -> PruningPlan:
        """The plan over the original model that removes what ``self`` removes, then what ``later`` does.

        ``later`` was made for the slim model of ``self`` (its indices count the channels
        ``self`` kept, its shapes are the slim shapes); the result's indices and shapes refer
        to the original model, so ``to_slim(original, a.compose(b))`` is the slim model of the
        two steps. ``meta`` is ``self``'s updated by ``later``'s, without ``later``'s
        ``groups`` (they count the slim model's units).

        Example:
            >>> a = PruningPlan({"w": {0: [1]}}, {"w": [4, 2]})
            >>> b = PruningPlan({"w": {0: [1]}, "v": {0: [0]}}, {"w": [3, 2], "v": [2]})
            >>> c = a.compose(b)
            >>> c.pruned, c.shapes
            ({'w': {0: [1, 2]}, 'v': {0: [0]}}, {'w': [4, 2], 'v': [2]})
        """
        for plan in (self, later):
            if plan.meta.get("blocks") or plan.meta.get("routers"):  # renumbered layers / experts
                raise ValueError(
                    "plans that remove whole blocks or experts cannot be composed (the slim model "
                    "renumbers its layers and experts); prune the original model with both removals"
                )
        pruned = {k: {d: list(v) for d, v in dims.items()} for k, dims in self.pruned.items()}
        shapes = {k: list(v) for k, v in self.shapes.items()}
        for name, dims in later.pruned.items():
            if name in self.shapes and list(later.shapes[name]) != self.new_shape(name):
                raise ValueError(
                    f"{name}: the later plan was made for shape {later.shapes[name]}, but the slim "
                    f"model of the first plan has {self.new_shape(name)}; compose plans in order"
                )
            shapes.setdefault(name, list(later.shapes[name]))
            for d, idx in dims.items():
                kept = self.kept(name, d) if name in self.shapes else list(range(shapes[name][d]))
                dims_out = pruned.setdefault(name, {})
                dims_out[d] = sorted(set(dims_out.get(d, [])) | {kept[i] for i in idx})
        meta = {**self.meta, **{k: v for k, v in later.meta.items() if k != "groups"}}
        return PruningPlan(pruned, shapes, meta)

    def merge(self, other: PruningPlan) -> PruningPlan:
        """Union of two plans over the same original model."""
        pruned = {k: {d: list(v) for d, v in dims.items()} for k, dims in self.pruned.items()}
        for k, dims in other.pruned.items():
            for d, idx in dims.items():
                cur = set(pruned.setdefault(k, {}).get(d, []))
                pruned[k][d] = sorted(cur | set(idx))
        return PruningPlan(pruned, {**self.shapes, **other.shapes}, _merge_meta(self.meta, other.meta))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "shapes": self.shapes,
            "pruned": {k: {str(d): v for d, v in dims.items()} for k, dims in self.pruned.items()},
        }

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
    def load(cls, path: str | os.PathLike, fix: str = FIX) -> PruningPlan:
        """Read a ``plan.json``; a truncated or foreign file is an :class:`ArtifactError` naming it and ``fix``."""
        data = read_json(path, "pruning plan", fix)
        with reading(path, "pruning plan", fix, errors=(KeyError, TypeError, AttributeError, ValueError)):
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not a plan")
            return cls.from_dict(data)
