"""Every verb's options: one dataclass per verb, each validating itself on construction.

The workflow verbs accept these (``ana(..., config=AnaConfig(...))`` and so on) and the CLI's
YAML job (:mod:`prunekit.cli.job`) is made of them, so a default lives in exactly one place.
Errors are :class:`ConfigError` (a ``ValueError``) naming the option, the value and the fix.

Example:
    >>> AnaConfig(ratios=[0.25, 0.5]).ratios
    [0.25, 0.5]
    >>> PruneConfig(removal_ratio=1.5)
    Traceback (most recent call last):
    ...
    prunekit.workflow.options.ConfigError: prune.removal_ratio must be a fraction in [0, 1), got 1.5
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConfigError", "check_keys", "check_fraction", "check_int", "check_ref", "AnaConfig", "PruneConfig",
           "IterativeConfig", "FinetuneConfig", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class ConfigError(ValueError):
    """A configuration problem the user can fix (the message says how)."""


def check_keys(data: Any, cls: type, where: str) -> None:
    """Raise :class:`ConfigError` for keys of ``data`` that ``cls`` (a dataclass) lacks."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' must be a mapping of options, got {type(data).__name__}: {data!r:.60}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            name = f"{where}.{key}" if where != "config" else str(key)
            raise ConfigError(f"unknown key '{name}' in the config{hint}; valid keys: {', '.join(valid)}")


def check_fraction(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
        raise ConfigError(f"{name} must be a fraction in [0, 1), got {v!r}")


def check_int(name: str, v: Any, minimum: int = 0, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {v!r}")


def check_ref(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, str) or v.count(":") != 1 or not all(v.split(":")):
        raise ConfigError(f"{name} must name a Python object as 'package.module:name', got {v!r}")


@dataclass
class AnaConfig:
    """Sensitivity analysis (see :func:`prunekit.workflow.ana.ana`)."""

    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    collapse: float | None = 0.5
    forced: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, (list, tuple)) or not self.ratios or not all(
                isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"ana.ratios must be a non-empty list of fractions in (0, 1), got {self.ratios!r}")
        self.ratios = [float(r) for r in self.ratios]
        if self.collapse is not None and (isinstance(self.collapse, bool) or
                                          not isinstance(self.collapse, numbers.Real) or self.collapse <= 0):
            raise ConfigError(f"ana.collapse must be a positive number or null, got {self.collapse!r}")


@dataclass
class PruneConfig:
    """One pruning (see :func:`prunekit.workflow.prune.prune`); ``run`` sets the ratio per step."""

    removal_ratio: float | None = None
    threshold: float | None = None
    max_ratio: float = 0.9
    round_to: int = 1
    fallback: str = "uniform"
    tolerance: float = 0.01
    #: ``prunekit prune`` only: evaluate this many variants of the allocation, keep the best
    search: int = 0
    #: ``prunekit prune`` only: re-estimate BatchNorm statistics on this many training batches
    #: (each search candidate before it is evaluated, and the result); 0: never
    calibrate_batches: int = 0

    def __post_init__(self) -> None:
        check_int("prune.search", self.search, 0)
        check_int("prune.calibrate_batches", self.calibrate_batches, 0)
        check_fraction("prune.removal_ratio", self.removal_ratio)
        check_fraction("prune.max_ratio", self.max_ratio, allow_none=False)
        if self.threshold is not None and (isinstance(self.threshold, bool) or
                                           not isinstance(self.threshold, numbers.Real) or self.threshold < 0):
            raise ConfigError(f"prune.threshold must be a non-negative number, got {self.threshold!r}")
        if self.removal_ratio is not None and self.threshold is not None:
            raise ConfigError("give prune.removal_ratio or prune.threshold, not both")
        check_int("prune.round_to", self.round_to, 1)
        if self.fallback not in ("uniform", "global"):
            raise ConfigError(f"prune.fallback must be 'uniform' or 'global', got {self.fallback!r}")
        check_fraction("prune.tolerance", self.tolerance, allow_none=False)

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`prunekit.workflow.prune.prune` other than the goal."""
        return {"max_ratio": self.max_ratio, "round_to": self.round_to, "fallback": self.fallback,
                "tolerance": self.tolerance}


@dataclass
class IterativeConfig:
    """The iterative loop (see :class:`prunekit.workflow.iterative.IterativePruner`).

    Attributes:
        target: Final fraction of MACs to remove; the steps approach it evenly.
        steps: Number of prune -> fine-tune steps.
        schedule: Explicit increasing removal ratios, one per step (overrides ``target`` and
            ``steps``).
        max_drop: Largest tolerated drop of the metric below the baseline after a step's
            fine-tuning, in the metric's units (0.01: one point of accuracy). ``None``: any.
        max_retries: Retries of a step that misses ``max_drop``, each with a smaller increment.
        retry_factor: Each retry multiplies the step's increment by this.
    """

    target: float | None = 0.5
    steps: int = 3
    schedule: list[float] | None = None
    max_drop: float | None = None
    max_retries: int = 2
    retry_factor: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("run.target", self.target)
        check_int("run.steps", self.steps, 1)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise ConfigError(f"run.schedule must be a non-empty list of removal ratios, got {self.schedule!r}")
            for r in self.schedule:
                check_fraction("every run.schedule value", r, allow_none=False)
            self.schedule = [float(r) for r in self.schedule]
            if any(b <= a for a, b in zip(self.schedule, self.schedule[1:])) or self.schedule[0] <= 0:
                raise ConfigError(f"run.schedule must increase strictly from above 0, got {self.schedule}")
        elif self.target is None or self.target <= 0:
            raise ConfigError("give run.target (final MACs removal ratio, e.g. 0.5) or run.schedule")
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or
                                          not isinstance(self.max_drop, numbers.Real) or self.max_drop < 0):
            raise ConfigError(f"run.max_drop must be a non-negative number or null, got {self.max_drop!r}")
        check_int("run.max_retries", self.max_retries, 0)
        if isinstance(self.retry_factor, bool) or not isinstance(self.retry_factor, numbers.Real) \
                or not 0 < self.retry_factor < 1:
            raise ConfigError(f"run.retry_factor must be in (0, 1), got {self.retry_factor!r}")

    def schedule_ratios(self) -> list[float]:
        """The removal ratio of each step."""
        if self.schedule is not None:
            return list(self.schedule)
        return [round(self.target * (k + 1) / self.steps, 6) for k in range(self.steps)]



def _positive(name: str, v: Any, integer: bool = False, zero: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(v, bool) or not isinstance(v, kind) or (v < 0 if zero else v <= 0) or \
            (not integer and math.isnan(v)):
        what = "int" if integer else "number"
        raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} {what}, got {v!r}")


@dataclass
class FinetuneConfig:
    """Options of the built-in fine-tuning loop (all validated on construction).

    Attributes:
        epochs: Training epochs.
        optimizer: ``'sgd'`` (with ``momentum``, Nesterov) or ``'adamw'``.
        lr: Peak learning rate (after warm-up).
        momentum: SGD momentum.
        weight_decay: Weight decay (decoupled for AdamW).
        schedule: ``'cosine'`` (to 0 at the end), ``'step'`` (times ``gamma`` every
            ``step_epochs``) or ``'constant'``.
        step_epochs, gamma: Step decay period and factor.
        warmup_epochs: Linear warm-up from ``lr / 10``, in epochs (fractions allowed).
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        amp: Mixed precision: ``None`` uses it where the device supports it well (CUDA), off
            on CPU; ``True`` forces autocast (bfloat16 on CPU).
        lr_trial: Candidate learning rates to try for ``trial_batches`` batches each before
            training; the best (by ``eval_fn``) is used. Empty: use ``lr``.
        trial_batches: Training batches per candidate in the learning-rate trial.
        max_batches: Cap on training batches per epoch (``None``: the whole loader).
        restore_best: Load the best epoch's weights at the end (else keep the last).
        seed: Base seed; epoch ``e`` runs with ``torch.manual_seed(seed + e)``.
        device: Where to train (``None``: where the model is).
        progress: Show tqdm progress bars with ETA.
    """

    epochs: int = 5
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool | None = None
    lr_trial: list[float] = field(default_factory=list)
    trial_batches: int = 20
    max_batches: int | None = None
    restore_best: bool = True
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, integer=True, zero=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _positive("lr", self.lr)
        _positive("momentum", self.momentum, zero=True)
        _positive("weight_decay", self.weight_decay, zero=True)
        _positive("step_epochs", self.step_epochs, integer=True)
        _positive("gamma", self.gamma)
        _positive("warmup_epochs", self.warmup_epochs, zero=True)
        _positive("trial_batches", self.trial_batches, integer=True)
        if self.max_batches is not None:
            _positive("max_batches", self.max_batches, integer=True)
        if isinstance(self.label_smoothing, bool) or not isinstance(self.label_smoothing, numbers.Real) \
                or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.amp not in (None, True, False):
            raise ValueError(f"amp must be true, false or null (automatic), got {self.amp!r}")
        if isinstance(self.lr_trial, (int, float)):
            raise ValueError(f"lr_trial must be a list of learning rates, got {self.lr_trial!r}")
        self.lr_trial = [float(v) for v in self.lr_trial]
        for v in self.lr_trial:
            _positive("every lr_trial value", v)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        check_keys(data, cls, "finetune")
        return cls(**data)
