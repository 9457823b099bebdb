"""Channel groups: sets of (tensor, dim, indices) that must be pruned together.

A *unit* is one channel as the whole model sees it: every index of every coupled tensor
dimension that must go when it goes (both sides of a residual add, the BatchNorm that
follows a conv, the ``H*W`` input columns of a linear layer after a flatten, ...).
A *group* is a set of coupled tensor dimensions with their units; pruning a group means
removing some of its units from every member at once.

Example:
    >>> import torch, torch.nn as nn
    >>> from prunekit.graph.trace import trace
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    >>> groups = build_groups(trace(m, torch.randn(1, 3, 8, 8)))
    >>> [g.n_units for g in groups if g.prunable]
    [8]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from prunekit.graph.labels import connected_components
from prunekit.graph.trace import Tracer

__all__ = ["ChannelGroup", "Member", "build_groups"]


@dataclass
class Member:
    """One coupled tensor dimension of a group.

    Attributes:
        name: Qualified tensor name (``"layer1.0.conv1.weight"``).
        dim: The pruned dimension of that tensor.
        size: Its length before pruning.
        unit: For every index along ``dim``, the group unit it belongs to.
    """

    name: str
    dim: int
    size: int
    unit: torch.Tensor

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""


@dataclass
class ChannelGroup:
    """Coupled dims and their units. ``fixed[u]`` marks units that must stay."""

    id: int
    members: list[Member]
    fixed: torch.Tensor
    reasons: list[str] = field(default_factory=list)
    norm: bool = False  # a LayerNorm/GroupNorm normalises over these channels
    #: channel counts stay multiples of this whatever ``round_to`` says (kernel alignment, e.g.
    #: the 16-byte strides of ``grouped_mm`` expert weights)
    align: int = 1

    @property
    def n_units(self) -> int:
        return int(self.fixed.numel())

    @property
    def n_prunable(self) -> int:
        return int((~self.fixed).sum())

    @property
    def prunable(self) -> bool:
        return self.n_prunable > 0 and self.n_units > 1

    def round_step(self, round_to: int) -> int:
        """How many units to keep in steps of, so channel counts stay multiples of ``round_to``.

        A unit may span several channels (an attention head: ``head_dim`` of them); the
        member with the most channels per unit sets the step, so 12 heads of 64 channels
        may keep any number of heads under ``round_to=8`` while plain channels keep 8, 16, ...
        """
        if round_to <= 1:
            return 1
        per_unit = max((m.size // self.n_units for m in self.members if m.size % self.n_units == 0), default=1)
        return round_to // math.gcd(round_to, per_unit)

    def keep_step(self, round_to: int) -> int:
        """Units kept come in multiples of this: ``round_to`` (:meth:`round_step`) and ``align`` together."""
        return math.lcm(self.round_step(round_to), self._align_step())

    def _align_step(self) -> int:
        """Units to keep in steps of, so that every member's channel count is a multiple of ``align``."""
        if self.align <= 1:
            return 1
        per_unit = min((m.size // self.n_units for m in self.members if m.size % self.n_units == 0), default=1)
        return self.align // math.gcd(self.align, max(per_unit, 1))

    def select(self, ratio: float, scores: torch.Tensor, round_to: int = 1) -> torch.Tensor:
        """Units to remove: the ``floor(ratio * n_units)`` lowest-scored prunable ones.

        At least one index of every member always stays; with ``round_to``, where that would leave a
        member a width off the multiple (its last unit kept, nothing else to remove instead), a whole
        step fewer units go.
        """
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}; 0.5 removes half the channels")
        k = min(int(math.floor(ratio * self.n_units + 1e-9)), self.n_prunable, self.n_units - 1)
        step = self.keep_step(round_to)
        if step > 1:  # keep a multiple of step units (never below step)
            keep = max(step, int(math.ceil((self.n_units - k) / step)) * step)
            k = max(0, min(k, self.n_units - keep))
        while k > 0:
            chosen, whole = self._lowest(k, scores, step)
            if whole or step == 1:
                return chosen
            k -= step
        return torch.empty(0, dtype=torch.long)

    def _lowest(self, k: int, scores: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """The ``k`` lowest-scored prunable units (segments rounded to ``step``), every member keeping one;
        and whether the count held (False: a member's last unit stayed and no other unit could go instead)."""
        s = scores.clone().double()
        s[self.fixed] = math.inf
        order = torch.argsort(s, stable=True)
        chosen = order[:k]
        if step > 1:
            chosen = self._round_segments(chosen, s, step)
        count = chosen.numel()
        spare = order[k:][torch.isfinite(s[order[k:]])].tolist()
        for m in self.members:  # at least one channel of every member survives
            gone = torch.isin(m.unit, chosen)
            if bool(gone.all()):
                mine = chosen[torch.isin(chosen, m.unit)]
                keep = mine[torch.argmax(s[mine])]
                chosen = chosen[chosen != keep]
                while spare:  # remove the next-lowest unit instead, so the count (round_to) holds
                    u = spare.pop(0)
                    trial = torch.cat([chosen, torch.tensor([u])])
                    hit = [o for o in self.members if bool((o.unit == u).any())]
                    if all(not bool(torch.isin(o.unit, trial).all()) for o in hit):
                        chosen = trial
                        break
        return chosen.sort().values, chosen.numel() == count

    def segments(self) -> list[torch.Tensor]:
        """The units grouped by which members hold them (one segment unless members hold different units).

        A concatenation's consumer spans the units of several producers, which then share one group; each
        producer's units form a segment, and every member's units are a union of whole segments.
        """
        holds = torch.zeros(len(self.members), self.n_units, dtype=torch.bool)
        for i, m in enumerate(self.members):
            holds[i, m.unit[m.unit >= 0].long()] = True
        _, inverse = torch.unique(holds.T, dim=0, return_inverse=True)
        return [torch.nonzero(inverse == j).flatten() for j in range(int(inverse.max()) + 1)]

    def _round_segments(self, chosen: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        """Move ``chosen`` so every segment keeps a multiple of ``step`` units (nearest count, at least ``step``;
        a segment of ``step`` units or fewer keeps them all): then every member's width is a multiple too."""
        segments = self.segments()
        if len(segments) < 2:
            return chosen
        gone = torch.zeros(self.n_units, dtype=torch.bool)
        gone[chosen] = True
        for seg in segments:
            n, kept = seg.numel(), int((~gone[seg]).sum())
            if kept == n:
                continue
            down, up = max(step, kept // step * step), min(n, -(-kept // step) * step)
            free = seg[~gone[seg] & torch.isfinite(scores[seg])]  # could still go
            want = up if n <= step or kept - down > up - kept or kept - down > free.numel() else down
            if want > kept:  # bring back the best removed units of this segment
                back = seg[gone[seg]]
                gone[back[torch.argsort(scores[back], descending=True, stable=True)[: want - kept]]] = False
            elif want < kept:  # remove the next-lowest units of this segment
                gone[free[torch.argsort(scores[free], stable=True)[: kept - want]]] = True
        return torch.nonzero(gone).flatten()

    def pruned_indices(self, units: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """Per member, the tensor indices removed when ``units`` go."""
        out = {}
        for m in self.members:
            idx = torch.nonzero(torch.isin(m.unit, units)).flatten()
            if idx.numel():
                out[(m.name, m.dim)] = idx
        return out

    def describe(self, units: torch.Tensor | None = None, limit: int = 12) -> str:
        head = f"Group {self.id}: {self.n_units} channels, {self.n_prunable} prunable" + (
            "" if self.prunable else " (not prunable)"
        )
        lines = [head]
        for m in self.members[:limit]:
            role = {0: "out", 1: "in"}.get(m.dim, f"dim{m.dim}") if m.name.endswith("weight") else f"dim{m.dim}"
            line = f"  {m.name:<48} [{role}] {m.size}"
            if units is not None:
                idx = torch.nonzero(torch.isin(m.unit, units)).flatten().tolist()
                shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
                line += f"  -> {m.size - len(idx)}  loses [{shown}]"
            lines.append(line)
        if len(self.members) > limit:
            lines.append(f"  ... and {len(self.members) - limit} more coupled tensors")
        for r in self.reasons[:3]:
            lines.append(f"  kept: {r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


def build_groups(tr: Tracer) -> list[ChannelGroup]:
    """Turn the tracer's recorded couplings into channel groups (sorted by first use)."""
    book = tr.book
    spaces = list(book.spaces.values())
    if not spaces:
        return []
    roots = book.roots()
    fixed = book.fixed_roots()
    ns = len(spaces)
    space_of = torch.cat([torch.full((s.size,), i) for i, s in enumerate(spaces)])
    # spaces sharing a unit are one group: link every space to the first space of each of its
    # units' roots, then join those (few, deduplicated) space pairs
    first = torch.full((book.n,), ns, dtype=torch.long).scatter_reduce(0, roots, space_of, "amin")
    pairs = torch.unique(space_of * ns + first[roots])
    comp = connected_components(ns, pairs // ns, pairs % ns)
    reason_of, reason_text = fixed
    norm_names = tr.norm_weights
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(comp.tolist()):
        groups.setdefault(c, []).append(i)
    out = []
    for gid, idxs in enumerate(groups.values()):
        rs = [roots[spaces[i].offset : spaces[i].offset + spaces[i].size] for i in idxs]
        units = torch.cat(rs).unique()
        members = [
            Member(spaces[i].name, spaces[i].dim, spaces[i].size, torch.searchsorted(units, r))
            for i, r in zip(idxs, rs)
        ]
        why = reason_of[units]
        is_fixed = why >= 0
        reasons = [reason_text[k] for k in why[is_fixed].unique().tolist()]
        norm = any(m.name in norm_names for m in members)
        out.append(ChannelGroup(gid, members, is_fixed, reasons, norm))
    return out
