"""Per-group pruning ratios that reach a MACs target at the smallest predicted metric loss.

MACs are predicted per layer: a layer whose weight's output dim belongs to group ``a`` and
input dim to group ``b`` keeps ``(1 - r_a) * (1 - r_b)`` of its MACs. The prediction only
steers the search; :func:`prunekit.workflow.prune.prune` measures the result and corrects.

Example:
    >>> m = MacsModel([100.0, 50.0], [[0], [0, 1]], total=150.0, n_groups=2)
    >>> m.predict(torch.tensor([0.5, 0.0]))
    75.0
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prunekit.engine.counting import Counts
from prunekit.graph.groups import ChannelGroup

__all__ = ["MacsModel", "equal_loss", "greedy", "uniform", "global_ranking", "perturbed_loss"]


class MacsModel:
    """Bilinear MACs prediction from per-layer MACs and the groups of each layer's dims."""

    def __init__(self, macs: list[float], groups: list[list[int]], total: float, n_groups: int) -> None:
        k = max([len(g) for g in groups] + [1])
        self.macs = torch.tensor(macs, dtype=torch.float64)
        # (L, k) group index per layer, padded with a dummy group n_groups (ratio always 0)
        self.gid = torch.full((len(macs), k), n_groups, dtype=torch.long)
        for i, gs in enumerate(groups):
            self.gid[i, : len(gs)] = torch.tensor(gs, dtype=torch.long)
        self.fixed = float(total) - float(self.macs.sum())
        self.total = float(total)
        self.n = n_groups

    @classmethod
    def from_counts(cls, counts: Counts, groups: list[ChannelGroup]) -> MacsModel:
        where = {}
        for g in groups:
            if g.prunable:
                for m in g.members:
                    where.setdefault(m.module, set()).add(g.id)
        macs, gids = [], []
        for name, (mac, _) in counts.per_module.items():
            if mac > 0:
                macs.append(float(mac))
                gids.append(sorted(where.get(name if name != "<root>" else "", set())))
        return cls(macs, gids, counts.macs, len(groups))

    def _keep(self, ratios: torch.Tensor) -> torch.Tensor:
        r = torch.cat([ratios.double(), torch.zeros(1, dtype=torch.float64)])
        return (1 - r)[self.gid]  # (L, k)

    def predict(self, ratios: torch.Tensor) -> float:
        """Predicted MACs with ``ratios[g]`` of group g's channels removed."""
        return self.fixed + float((self.macs * self._keep(ratios).prod(1)).sum())

    def marginal(self, ratios: torch.Tensor) -> torch.Tensor:
        """d(MACs saved)/d(r_g) for every group at ``ratios``."""
        keep = self._keep(ratios)
        prod = keep.prod(1, keepdim=True)
        others = prod / keep.clamp(min=1e-9)  # product over the layer's other groups
        contrib = (self.macs.unsqueeze(1) * others).reshape(-1)
        out = torch.zeros(self.n + 1, dtype=torch.float64).index_add_(0, self.gid.reshape(-1), contrib)
        return out[: self.n]


def greedy(
    model: MacsModel,
    candidates: list[int],
    loss: Callable[[int, float], float],
    max_ratio: dict[int, float],
    target_macs: float | None = None,
    threshold: float | None = None,
    step: float = 0.02,
) -> dict[int, float]:
    """Raise the group whose next step costs the least predicted loss per MAC saved.

    Stops when the predicted MACs reach ``target_macs`` or the summed predicted loss would
    exceed ``threshold``.
    """
    r = torch.zeros(model.n, dtype=torch.float64)
    done: set[int] = set()
    total_loss = 0.0
    while True:
        if target_macs is not None and model.predict(r) <= target_macs:
            break
        gain = model.marginal(r) * step
        best, best_cost, best_dl = None, math.inf, 0.0
        for g in candidates:
            if g in done:
                continue
            nr = round(float(r[g]) + step, 6)
            if nr > max_ratio.get(g, 0.9) + 1e-9 or gain[g] <= 0:
                done.add(g)
                continue
            dl = loss(g, nr) - loss(g, float(r[g]))
            if not math.isfinite(dl):
                done.add(g)
                continue
            cost = max(dl, 0.0) / float(gain[g])
            if cost < best_cost:
                best, best_cost, best_dl = g, cost, dl
        if best is None:
            break
        if threshold is not None and total_loss + max(best_dl, 0.0) > threshold:
            done.add(best)
            continue
        r[best] = round(float(r[best]) + step, 6)
        total_loss += max(best_dl, 0.0)
    return {g: float(r[g]) for g in candidates if r[g] > 0}


def equal_loss(
    model: MacsModel,
    candidates: list[int],
    loss: Callable[[int, float], float],
    max_ratio: dict[int, float],
    target_macs: float,
    grid: float = 0.01,
) -> dict[int, float]:
    """Every group pruned as far as its own curve allows at one common loss level ``tau``.

    ``tau`` is found by bisection to reach the MACs target. Unlike :func:`greedy`, which
    adds up per-group losses as if they were independent and so pushes the cheapest groups
    to extreme ratios, this spreads the damage: no group is pruned past the loss any other
    group is allowed, which is what survives the interaction between groups best.
    """
    steps = {}
    for g in candidates:
        cap = max_ratio.get(g, 0.9)
        rs = [round(i * grid, 6) for i in range(int(cap / grid + 1e-9) + 1)]
        ls, worst = [], 0.0
        for r in rs:
            worst = max(worst, loss(g, r))  # monotone: more pruning never predicts less loss
            ls.append(worst)
        steps[g] = (torch.tensor(rs, dtype=torch.float64), torch.tensor(ls, dtype=torch.float64))

    def ratios(tau: float) -> torch.Tensor:
        r = torch.zeros(model.n, dtype=torch.float64)
        for g, (rs, ls) in steps.items():
            ok = torch.nonzero(ls <= tau).flatten()
            r[g] = rs[int(ok[-1])] if ok.numel() else 0.0
        return r

    finite = [float(ls[torch.isfinite(ls)].max()) for _, ls in steps.values() if torch.isfinite(ls).any()]
    lo, hi = 0.0, max(finite, default=0.0) + 1e-6
    for _ in range(50):
        mid = (lo + hi) / 2
        if model.predict(ratios(mid)) > target_macs:
            lo = mid
        else:
            hi = mid
    # Flat curves make several groups move at the same tau, so MACs jump; blend the last
    # allocation short of the target with the first one past it to land on the target.
    r_lo, r_hi = ratios(lo), ratios(hi)
    a, b = 0.0, 1.0
    for _ in range(40):
        mid = (a + b) / 2
        if model.predict(r_lo + mid * (r_hi - r_lo)) > target_macs:
            a = mid
        else:
            b = mid
    r = r_lo + b * (r_hi - r_lo)
    return {g: float(r[g]) for g in candidates if r[g] > 0}


def uniform(
    model: MacsModel, candidates: list[int], max_ratio: dict[int, float], target_macs: float
) -> dict[int, float]:
    """One ratio for every group (capped per group), found by bisection."""

    def ratios(x):
        r = torch.zeros(model.n, dtype=torch.float64)
        for g in candidates:
            r[g] = min(x, max_ratio.get(g, 0.9))
        return r

    return _bisect(model, candidates, ratios, 0.0, 1.0, target_macs)


def _bisect(
    model: MacsModel,
    candidates: list[int],
    ratios: Callable[[float], torch.Tensor],
    lo: float,
    hi: float,
    target_macs: float,
    steps: int = 50,
) -> dict[int, float]:
    """Smallest knob value in [lo, hi] whose ratios bring predicted MACs to the target."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if model.predict(ratios(mid)) > target_macs:
            lo = mid
        else:
            hi = mid
    r = ratios(hi)
    return {g: float(r[g]) for g in candidates if r[g] > 0}


def global_ranking(
    model: MacsModel,
    candidates: list[int],
    scores: dict[int, torch.Tensor],
    max_ratio: dict[int, float],
    target_macs: float,
) -> dict[int, float]:
    """Prune the globally least important units: one score threshold for all groups.

    Scores are per-group mean-normalised criterion scores, so they compare across groups.
    """

    def ratios(tau):
        r = torch.zeros(model.n, dtype=torch.float64)
        for g in candidates:
            s = scores[g]
            r[g] = min(float((s < tau).double().mean()), max_ratio.get(g, 0.9))
        return r

    allv = torch.cat([scores[g] for g in candidates]) if candidates else torch.zeros(1)
    return _bisect(model, candidates, ratios, float(allv.min()) - 1e-9, float(allv.max()) + 1e-9, target_macs)


def perturbed_loss(
    loss: Callable[[int, float], float], candidates: list[int], generator: torch.Generator, spread: float = 0.5
) -> Callable[[int, float], float]:
    """``loss`` with every group's curve scaled by its own random factor ``exp(spread * z)``.

    :func:`equal_loss` on the scaled curves gives an allocation that still follows the
    sensitivity analysis (sensitive groups stay less pruned) but trusts each curve only up to
    that factor: the single-group curves miss how groups interact, and a few such variants,
    each evaluated, find allocations the curves alone rank wrongly.
    """
    z = torch.randn(len(candidates), generator=generator, dtype=torch.float64)
    scale = {g: math.exp(spread * float(v)) for g, v in zip(candidates, z)}
    return lambda g, r: loss(g, r) * scale.get(g, 1.0)
