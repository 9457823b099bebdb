"""The engine's front door: trace a model, list its channel groups, prune them.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
    ...                       nn.Conv2d(16, 8, 3)).eval()
    >>> x = torch.randn(1, 3, 16, 16)
    >>> pruner = Pruner(model, x)
    >>> _ = pruner.prune(0.5)            # sparse: shapes kept, half the channels at zero
    >>> slim = pruner.transform()        # slim: channels removed
    >>> slim[0].out_channels
    8
    >>> bool(torch.allclose(slim(x), model(x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import difflib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from prunekit.engine import experts, slim, sparse
from prunekit.engine.criteria import CRITERIA, group_scores
from prunekit.engine.equivalence import TOLERANCE, check_equivalence, equivalence_error, max_error
from prunekit.engine.plan import PruningPlan
from prunekit.engine.prepare import prepare
from prunekit.graph.groups import ChannelGroup, build_groups
from prunekit.graph.trace import ATTENTION_MODES, Tracer, call_model, run_on_meta, single_thread, trace
from prunekit.utils.deprecation import UNSET, renamed
from prunekit.utils.devices import model_device, to_device

__all__ = ["Pruner"]


def _check_inputs(model: nn.Module, example_inputs: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError(
            "example_inputs must be a tensor, a tuple/list of positional arguments or "
            f"a dict of keyword arguments, got {type(example_inputs).__name__}"
        )


class Pruner:
    """Channel groups of ``model`` and the verbs to prune them.

    Args:
        model: Any ``nn.Module`` that runs forward on ``example_inputs``.
        example_inputs: A tensor, a tuple of positional args, or a dict of keyword args.
        excludes: Module names (or modules) whose tensors must keep every channel (the same word
            as :func:`prunekit.prune` / :func:`prunekit.ana`; ``ignore=`` is its deprecated alias).
        criterion: Default importance criterion (see :data:`prunekit.engine.criteria.CRITERIA`).
        attention: Where a reshape splits a width into ``(heads, head_dim)``: ``"heads"``
            prunes whole heads (each head's slices of q, k, v and the output projection
            together; grouped-query attention removes a key/value head with its query heads),
            ``"head_dim"`` prunes the same positions of every head, ``"auto"`` (default) keeps
            the factor that the reshape infers (``view(b, n, -1, head_dim)``: heads), else the
            innermost. ``nn.MultiheadAttention`` always loses whole heads.
        residual: ``False`` keeps the width of every LayerNorm/RMSNorm-normalised channel
            group (a transformer's residual stream: embeddings, norms and the projections
            into it), so only heads and MLP widths are pruned.

    Attributes:
        groups: All channel groups; ``[g for g in groups if g.prunable]`` can be pruned.
        warnings: Ops without a channel rule (their channels stay), with the module.
        build_seconds: Wall time of tracing plus group building.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        excludes: Iterable[str | nn.Module] = (),
        criterion: str = "l2",
        attention: str = "auto",
        residual: bool = True,
        ignore: Iterable[str | nn.Module] = UNSET,
    ) -> None:
        excludes = renamed("Pruner", "ignore", ignore, "excludes", excludes)
        _check_inputs(model, example_inputs)
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
        self.model = model
        self.example_inputs = example_inputs
        self.criterion = criterion
        self.grads: dict[str, torch.Tensor] = {}
        #: ``{weight name: InputStats}`` from :meth:`collect_activations` (activation criteria, compensation)
        self.activations: dict = {}
        excluded = self._resolve_excludes(excludes)
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        #: modules switched to prunable drop-in subclasses (see :mod:`prunekit.engine.prepare`)
        self.prepared = prepare(model)
        t0 = time.perf_counter()
        try:
            self.tracer: Tracer = trace(model, example_inputs, attention=attention)
        except Exception as exc:
            shapes = [tuple(t.shape) for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor)]
            raise ValueError(
                f"the model does not run on the example inputs (tensor shapes {shapes}): "
                f"{type(exc).__name__}: {exc}. Pass the inputs a forward call takes: a tensor, a "
                "tuple of positional arguments, or a dict of keyword arguments."
            ) from exc
        for name in excluded:
            for (tname, _), sp in self.tracer.book.spaces.items():
                if tname == name or tname.startswith(name + "."):
                    self.tracer.book.fix(sp.ids, f"module '{name}' is excluded by the user")
        if not residual:
            for (tname, _), sp in self.tracer.book.spaces.items():
                if tname in self.tracer.layer_norm_weights:
                    self.tracer.book.fix(sp.ids, "residual=False: LayerNorm/RMSNorm-normalised widths stay")
        with single_thread():
            self.groups: list[ChannelGroup] = build_groups(self.tracer)
        experts.align_groups(self.groups, model)  # stacked expert weights keep 16-byte strides
        self.build_seconds = time.perf_counter() - t0
        self.warnings = list(self.tracer.warnings)

    def _resolve_excludes(self, excludes) -> list[str]:
        names = {n for n, _ in self.model.named_modules()}
        by_id = {id(m): n for n, m in self.model.named_modules()}
        out = []
        for item in excludes:
            if isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"excluded module {type(item).__name__} is not part of the model")
                out.append(by_id[id(item)])
            elif isinstance(item, str):
                if item not in names:
                    close = difflib.get_close_matches(item, names, n=3)
                    hint = f"; did you mean {close}?" if close else "; see model.named_modules()"
                    raise ValueError(f"excluded module {item!r} does not exist in the model{hint}")
                out.append(item)
            else:
                raise TypeError(f"excludes takes module names or modules, got {type(item).__name__}")
        return out

    # ----- information -----------------------------------------------------------------
    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def summary(self) -> str:
        pr = self.prunable_groups
        lines = [
            f"{len(self.groups)} channel groups, {len(pr)} prunable, "
            f"built in {self.build_seconds:.2f} s ({self.tracer.mode} trace)"
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def freeze(self, group: ChannelGroup | int, reason: str = "frozen by the user") -> None:
        """Leave a group alone: none of its channels will be pruned."""
        gid = group.id if isinstance(group, ChannelGroup) else group
        if not isinstance(gid, int) or not 0 <= gid < len(self.groups):
            raise ValueError(f"no channel group {group!r}; valid ids are 0..{len(self.groups) - 1}")
        g = self.groups[gid]
        g.fixed[:] = True
        g.reasons.insert(0, reason)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.tracer.tensors

    def scores(self, group: ChannelGroup, criterion: str | None = None) -> torch.Tensor:
        """Importance of each unit of ``group`` (lower is pruned first)."""
        return group_scores(group, self._tensors(), criterion or self.criterion, self.grads, self.activations)

    def collect_activations(self, batches: Iterable[Any], max_batches: int | None = None) -> dict:
        """Record the input statistics of every linear/conv layer over calibration ``batches``
        (for the ``activation`` and ``fluctuation`` criteria and bias compensation).

        Args:
            batches: ``(inputs, target)`` pairs or bare model inputs (tensor, tuple, dict).
            max_batches: Use at most this many.

        Returns:
            ``{weight name: InputStats}``, also kept in :attr:`activations`.

        Example:
            >>> import torch, torch.nn as nn
            >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> p = Pruner(m, torch.randn(2, 4))
            >>> _ = p.collect_activations([torch.randn(16, 4)])
            >>> plan = p.plan(0.5, criterion="fluctuation")
        """
        from prunekit.engine.calibration import collect_input_stats

        self.activations = collect_input_stats(self.model, batches, max_batches)
        return self.activations

    def accumulate_gradients(self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        """Sum gradients over a few batches for the ``taylor`` criterion.

        Args:
            batches: Iterable of ``(inputs, target)``.
            loss_fn: ``loss_fn(model_output, target) -> scalar``.
        """
        named = dict(self.model.named_parameters())
        self.grads = {n: torch.zeros_like(p) for n, p in named.items()}
        dev = model_device(self.model)
        was = self.model.training
        self.model.eval()
        try:
            for inputs, target in batches:
                self.model.zero_grad(set_to_none=True)
                loss = loss_fn(call_model(self.model, to_device(inputs, dev)), to_device(target, dev))
                loss.backward()
                for n, p in named.items():
                    if p.grad is not None:
                        self.grads[n] += p.grad.detach()
        finally:
            self.model.train(was)
            self.model.zero_grad(set_to_none=True)

    def read_calibration(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        criterion: str | None = None,
    ) -> None:
        """Measure on calibration ``batches`` what ``criterion`` (default: the pruner's) scores from.

        The ``activation`` / ``fluctuation`` criteria read input statistics
        (:meth:`collect_activations`), ``taylor`` the gradients of ``loss_fn`` (default
        cross-entropy) summed over the batches (:meth:`accumulate_gradients`); the others read
        nothing.

        Args:
            batches: ``(inputs, target)`` pairs (``taylor`` needs the targets) or bare model inputs.
            loss_fn: ``loss_fn(model_output, target) -> scalar`` for ``taylor``.
            criterion: The criterion to prepare.

        Raises:
            ValueError: ``taylor`` got batches without targets, or no batches.

        Example:
            >>> import torch, torch.nn as nn
            >>> p = Pruner(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4))
            >>> p.read_calibration([(torch.randn(16, 4), torch.randint(0, 3, (16,)))], criterion="taylor")
            >>> plan = p.plan(0.5, criterion="taylor")
        """
        name = criterion or self.criterion
        crit = CRITERIA[name]
        if crit.needs_activations:
            self.collect_activations(batches)
        if crit.needs_grads:
            self.accumulate_gradients(_labelled(batches, name), loss_fn or nn.functional.cross_entropy)

    # ----- planning and pruning --------------------------------------------------------
    def plan(
        self,
        channel_ratio: float | dict[int, float] = UNSET,
        *,
        criterion: str | None = None,
        round_to: int = 1,
        groups: Iterable[ChannelGroup] | None = None,
        ratio: float | dict[int, float] = UNSET,
    ) -> PruningPlan:
        """Choose the channels to remove.

        Args:
            channel_ratio: Fraction of each prunable group's *channels* to remove, in ``[0, 1)``;
                or ``{group_id: fraction}``. (:func:`prunekit.prune`'s ``removal_ratio`` is a
                fraction of the MACs instead.) ``ratio=`` is its deprecated alias.
            criterion: Importance criterion (default: the pruner's).
            round_to: Keep channel counts a multiple of this (hardware-friendly widths).
            groups: Restrict to these groups.
        """
        ratio = _channel_ratio("Pruner.plan", ratio, channel_ratio)
        ratios = ratio if isinstance(ratio, dict) else None
        if ratios is None:
            _check_ratio(ratio)
        else:
            valid = {g.id for g in self.groups}
            for gid, r in ratios.items():
                if gid not in valid:
                    raise ValueError(f"no channel group with id {gid}; valid ids are 0..{len(self.groups) - 1}")
                _check_ratio(r)
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        pruned: dict[str, dict[int, list[int]]] = {}
        chosen = {}
        for g in groups if groups is not None else self.groups:
            r = ratios.get(g.id, 0.0) if ratios is not None else ratio
            if not g.prunable or r <= 0:
                continue
            units = g.select(r, self.scores(g, criterion), round_to)
            if units.numel() == 0:
                continue
            chosen[g.id] = units.tolist()
            for (name, dim), idx in g.pruned_indices(units).items():
                pruned.setdefault(name, {})[dim] = idx.tolist()
        shapes = {n: list(self._tensors()[n].shape) for n in pruned}
        meta = {
            "criterion": criterion or self.criterion,
            "groups": chosen,
            "norm_weights": sorted(self.tracer.norm_weights),
        }
        if self.tracer.head_splits:  # which factor of each (heads, head_dim) split was pruned
            meta["head_splits"] = dict(self.tracer.head_splits)
        return PruningPlan(pruned, shapes, meta)

    def prune(
        self,
        channel_ratio: float | dict[int, float] | PruningPlan = UNSET,
        *,
        mode: str = "sparse",
        criterion: str | None = None,
        round_to: int = 1,
        ratio: float | dict[int, float] | PruningPlan = UNSET,
    ) -> nn.Module:
        """Prune the model in place (``mode='sparse'``) or return a slim copy (``'slim'``).

        Args:
            channel_ratio: Fraction of every prunable group's channels to remove (not of the
                MACs: that is :func:`prunekit.prune`'s ``removal_ratio``), ``{group_id: fraction}``
                or a :class:`PruningPlan`. ``ratio=`` is its deprecated alias.
            mode: ``'sparse'`` (in place, same shapes) or ``'slim'`` (a smaller copy).
            criterion: Importance criterion (default: the pruner's).
            round_to: Keep channel counts a multiple of this.
        """
        ratio = _channel_ratio("Pruner.prune", ratio, channel_ratio)
        if mode not in ("sparse", "slim"):
            raise ValueError(f"mode must be 'sparse' or 'slim', got {mode!r}")
        plan = ratio if isinstance(ratio, PruningPlan) else self.plan(ratio, criterion=criterion, round_to=round_to)
        sparse.apply_plan(self.model, plan)
        if mode == "slim":
            return self.transform()
        return self.model

    def transform(self, check: bool = True) -> nn.Module:
        """The slim model of the (sparse) model; checks slim == sparse on the example inputs.

        Raises:
            EquivalenceError: the slim model fails or differs (see :mod:`prunekit.engine.equivalence`).
        """
        slim_model = slim.to_slim(self.model)
        if check:
            check_equivalence(self.model, slim_model, self.example_inputs)
        return slim_model

    def equivalence_error(self, slim_model: nn.Module) -> float:
        """Relative max difference between sparse and slim outputs on the example inputs."""
        return equivalence_error(self.model, slim_model, self.example_inputs)

    def validate(self, ratio: float = 0.5, tol: float = TOLERANCE) -> list[ChannelGroup]:
        """Prune copies and freeze every group whose slim model does not match its sparse model.

        Catches what tracing cannot see, such as a width stored in a plain attribute
        (``x.reshape(n, self.hidden_dim, -1)``) that no updater knows. A cheap structural pass
        on the meta device comes first (only shape errors count there: a tensor the model
        cached as a plain attribute, such as a detector's anchors, may sit on another device,
        which says nothing about a group), then a numeric pass on real tensors bisects the
        remaining groups. Warns (:class:`UserWarning`, also in :attr:`warnings`) when every
        prunable group ends up frozen. Returns the frozen groups.

        Example:
            >>> import torch, torch.nn as nn
            >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            >>> Pruner(m, torch.randn(1, 3, 8, 8)).validate()
            []
        """
        prunable = self.prunable_groups
        bad: dict[int, _Verdict] = {}
        for meta in (True, False):  # structural pass on the meta device, then the numeric pass
            cands = [g for g in prunable if g.id not in bad]
            if cands:
                self._bisect(cands, lambda sub, m=meta: self._check_subset(sub, ratio, tol, m), bad)
        frozen = [g for g in prunable if g.id in bad]
        for g in frozen:
            g.fixed[:] = True
            g.reasons.insert(0, f"validation: {bad[g.id].why}")
        if prunable and len(frozen) == len(prunable):
            self._warn_all_frozen(frozen, bad)
        return frozen

    @staticmethod
    def _bisect(
        subset: list[ChannelGroup], check: Callable[[list[ChannelGroup]], _Verdict], bad: dict[int, _Verdict]
    ) -> None:
        """Record in ``bad`` every group of ``subset`` that fails ``check`` on its own (bisection)."""
        verdict = check(subset)
        if verdict.ok:
            return
        if len(subset) == 1:
            bad[subset[0].id] = verdict
            return
        mid = len(subset) // 2
        Pruner._bisect(subset[:mid], check, bad)
        Pruner._bisect(subset[mid:], check, bad)

    def _check_subset(self, subset: list[ChannelGroup], ratio: float, tol: float, meta: bool) -> _Verdict:
        """Does the slim model with ``subset`` pruned at ``ratio`` run (meta) / match its sparse model?"""
        plan = self.plan(ratio, groups=subset, criterion="l2")  # any channels do; l2 needs no data
        if not plan.pruned:
            return _Verdict(True)
        if meta:  # structure only: does the slim model run at all? (no arithmetic)
            try:
                run_on_meta(slim.to_slim(self.model, plan), self.example_inputs)
            except Exception as exc:  # noqa: BLE001
                if is_shape_error(exc):
                    return _Verdict(False, f"the slim model fails: {type(exc).__name__}: {str(exc)[:200]}")
            return _Verdict(True)  # ran, or meta cannot run it for another reason: the numeric pass decides
        with slim._without_masks(self.model):
            model = copy.deepcopy(self.model)
        sparse.apply_plan(model, plan)
        try:
            with torch.no_grad():
                model.eval()
                a = call_model(model, self.example_inputs)
                b = call_model(slim.to_slim(model, inplace=True), self.example_inputs)
            err = max_error(a, b)
            return _Verdict(err <= tol, f"slim and sparse outputs differ by {err:.3g}")
        except Exception as exc:  # noqa: BLE001
            return _Verdict(False, f"the slim model fails: {type(exc).__name__}: {str(exc)[:200]}")

    def _warn_all_frozen(self, frozen: list[ChannelGroup], bad: dict[int, _Verdict]) -> None:
        reasons = list(dict.fromkeys(bad[g.id].why for g in frozen))
        msg = (
            f"validation froze all {len(frozen)} prunable channel groups, nothing can be pruned; "
            f"first reasons: {'; '.join(reasons[:3])}. If these are not real width mismatches, "
            "report them; Pruner.freeze() / excludes= keep chosen groups instead"
        )
        self.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


@dataclass
class _Verdict:
    """One validation check: did the slim model pass, and why not."""

    ok: bool
    why: str = ""


def is_device_error(exc: BaseException) -> bool:
    """``exc`` complains that tensors sit on different devices (meta vs cpu, cuda vs cpu).

    Example:
        >>> is_device_error(RuntimeError("Tensor on device meta is not on the expected device cpu!"))
        True
    """
    msg = str(exc)
    return "device" in msg and any(k in msg for k in ("meta", "cpu", "cuda", "same device", "expected device"))


def is_shape_error(exc: BaseException) -> bool:
    """``exc`` is a shape/size mismatch (the kind a wrongly sliced slim model raises), not a device mismatch.

    Example:
        >>> is_shape_error(RuntimeError("shape '[1, 8, 4]' is invalid for input of size 24"))
        True
        >>> is_shape_error(RuntimeError("Tensor on device meta is not on the expected device cpu!"))
        False
    """
    msg = str(exc)
    return (
        isinstance(exc, (RuntimeError, ValueError, IndexError))
        and not is_device_error(exc)
        and any(k in msg for k in ("shape", "size", "dimension", "expected", "Expected", "mismatch", "invalid"))
    )


def _check_ratio(r: float) -> None:
    if not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
        raise ValueError(
            f"ratio must be in [0, 1), got {r!r}: it is the fraction of channels to "
            "remove (0.5 removes half); at least one channel always stays"
        )


def _channel_ratio(where: str, ratio: Any, channel_ratio: Any) -> Any:
    """``channel_ratio``, or the deprecated ``ratio=`` (one of them is required)."""
    value = renamed(where, "ratio", ratio, "channel_ratio", channel_ratio, default=UNSET)
    if value is UNSET:
        raise TypeError(f"{where}() needs channel_ratio: the fraction of every group's channels to remove")
    return value


def _labelled(batches: Iterable[Any], criterion: str) -> list[tuple[Any, Any]]:
    """``batches`` as ``(inputs, target)`` pairs; a clear error for any other batch or none at all."""
    pairs = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"criterion {criterion!r} sums the gradients of a loss: its calibration batches must be "
                f"(inputs, target) pairs, but batch {i} is a {type(batch).__name__}; pass labelled batches "
                "(e.g. a training DataLoader) or choose a criterion that needs no targets ('activation', 'l2')"
            )
        pairs.append(tuple(batch))
    if not pairs:
        raise ValueError(f"criterion {criterion!r} got no calibration batches: pass a few labelled training batches")
    return pairs
