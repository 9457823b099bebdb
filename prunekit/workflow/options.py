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

__all__ = [
    "ConfigError",
    "check_keys",
    "check_fraction",
    "check_int",
    "check_ref",
    "AnaConfig",
    "FastAnaConfig",
    "PruneConfig",
    "IterativeConfig",
    "FinetuneConfig",
    "OPTIMIZERS",
    "SCHEDULES",
    "FINETUNE_ON",
    "TEACHERS",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
#: what the iterative loop fine-tunes after each prune step (see :class:`IterativeConfig`)
FINETUNE_ON = ("slim", "sparse")
#: ``run.teacher``: whom each step distils from (with ``finetune.distill_weight`` above 0)
TEACHERS = ("original", "previous")


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


def with_config(func: Any, config: Any, passed: dict) -> dict:
    """``passed`` (a verb's keyword arguments) with ``config``'s fields that the verb takes.

    A field left at its default leaves the keyword as passed; a keyword given explicitly as well,
    with another value than the config's, is refused: one value per option.

    Example:
        >>> def verb(*, round_to=1, tolerance=0.01, config=None): ...
        >>> with_config(verb, PruneConfig(round_to=8), {"round_to": 1, "tolerance": 0.01})
        {'round_to': 8, 'tolerance': 0.01}
    """
    import inspect

    params = inspect.signature(func).parameters
    out = dict(passed)
    for f in dataclasses.fields(config):
        if f.name not in params or f.name not in passed:
            continue
        mine, theirs, default = passed[f.name], getattr(config, f.name), params[f.name].default
        unset = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if theirs is unset or theirs == unset:  # the config leaves it: the keyword (or its default) holds
            continue
        if mine is not default and mine != default and mine != theirs:
            raise TypeError(
                f"{func.__name__}() got {f.name}={mine!r} and config.{f.name}={theirs!r}; give the option once"
            )
        out[f.name] = theirs
    return out


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
class FastAnaConfig:
    """The fast sensitivity analysis (see :mod:`prunekit.workflow.fast_ana`); ``ana.fast`` in a job.

    It applies when the evaluator was built by :func:`prunekit.workflow.evaluation.make_eval_fn`
    (then ana runs the forward itself); an opaque ``eval_fn`` is evaluated in full.

    Attributes:
        enabled: Use the fast analysis where it applies (``False``: every point in full).
        prefix: Evaluate a group's variants from the cached unpruned activations before the
            group's first layer (where the forward is a sequence of modules up to there).
        variants: Pruned variants per forward, each on its own slice of a batch: ``0``
            chooses (1 on the CPU, 8 on an accelerator).
        early_stop: Stop a point's evaluation once its loss is known well enough or is
            clearly past ``collapse`` (a confidence bound on the paired metric drop).
        confidence: Two-sided confidence of that bound, in (0, 1).
        tolerance: Accept a point once the bound's half-width is at most this relative loss
            (0.02: 2% of the baseline metric, 1.7 points of an 85% accuracy) ...
        rel_tolerance: ... or at most this fraction of the point's own loss.
        min_images: Never stop a point before this many images.
        chunk: Images per forward (the evaluation batches re-split, for the built-in
            metrics), so a point can stop every ``chunk`` images; ``0`` keeps the loader's batches.
        adaptive: Evaluate every ``stride``-th ratio, then bisect only where the curve changes
            by more than ``2 * interp_tolerance`` between evaluated ratios; the others are
            interpolated (marked as estimated).
        stride: The coarse grid's step, in ratios (1: every ratio).
        interp_tolerance: Largest error (relative loss) accepted for an interpolated point on
            a monotone curve.
        cache_mb: Memory for the cached activations and the evaluation batches, in MiB.
        verify: Check each group's first fast forward against the plain sparse model (falls
            back to the plain forward for that group when they differ).

    Example:
        >>> FastAnaConfig(tolerance=0.02).stride
        2
    """

    enabled: bool = True
    prefix: bool = True
    variants: int = 0
    early_stop: bool = True
    confidence: float = 0.9
    tolerance: float = 0.02
    rel_tolerance: float = 0.25
    min_images: int = 128
    chunk: int = 64
    adaptive: bool = True
    stride: int = 2
    interp_tolerance: float = 0.02
    cache_mb: int = 2048
    verify: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "prefix", "early_stop", "adaptive", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ana.fast.{name} must be true or false, got {getattr(self, name)!r}")
        for name, minimum in (("variants", 0), ("min_images", 1), ("chunk", 0), ("stride", 1), ("cache_mb", 0)):
            check_int(f"ana.fast.{name}", getattr(self, name), minimum)
        if not _number(self.confidence) or not 0 < self.confidence < 1:
            raise ConfigError(f"ana.fast.confidence must be in (0, 1), got {self.confidence!r}")
        for name in ("tolerance", "rel_tolerance", "interp_tolerance"):
            v = getattr(self, name)
            if not _number(v) or v < 0:
                raise ConfigError(f"ana.fast.{name} must be a non-negative number, got {v!r}")


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


@dataclass
class AnaConfig:
    """Sensitivity analysis (see :func:`prunekit.workflow.ana.ana`).

    ``fast`` is a :class:`FastAnaConfig` (or its fields as a mapping, or ``false`` for the full
    analysis); ``workers`` processes share the groups on this machine.
    """

    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    collapse: float | None = 0.5
    forced: bool = False
    fast: FastAnaConfig | bool = field(default_factory=FastAnaConfig)
    workers: int = 1

    def __post_init__(self) -> None:
        if (
            not isinstance(self.ratios, (list, tuple))
            or not self.ratios
            or not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r < 1 for r in self.ratios)
        ):
            raise ConfigError(f"ana.ratios must be a non-empty list of fractions in (0, 1), got {self.ratios!r}")
        self.ratios = [float(r) for r in self.ratios]
        if self.collapse is not None and (
            isinstance(self.collapse, bool) or not isinstance(self.collapse, numbers.Real) or self.collapse <= 0
        ):
            raise ConfigError(f"ana.collapse must be a positive number or null, got {self.collapse!r}")
        if isinstance(self.fast, dict):
            check_keys(self.fast, FastAnaConfig, "ana.fast")
            self.fast = FastAnaConfig(**self.fast)
        elif isinstance(self.fast, bool):
            self.fast = FastAnaConfig(enabled=self.fast)
        elif not isinstance(self.fast, FastAnaConfig):
            raise ConfigError(f"ana.fast must be true, false or a mapping of FastAnaConfig options, got {self.fast!r}")
        check_int("ana.workers", self.workers, 1)


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
    #: (each search candidate before it is evaluated, and the result); 0: never. The same
    #: batches are the calibration data of one-shot pruning (the ``activation`` /
    #: ``fluctuation`` criteria, ``taylor``'s gradients, ``compensate``, ``reconstruct``,
    #: ``remove_blocks``, ``remove_experts``)
    calibrate_batches: int = 0
    #: ``prunekit prune`` only: fold removed channels' mean contributions into the next layers' biases
    compensate: bool = False
    #: refit the layers after the pruned channels to the unpruned outputs by least squares
    #: (``prunekit prune`` on ``calibrate_batches`` batches; ``prunekit run``: every step, on
    #: ``run.calibrate_batches`` batches)
    reconstruct: bool = False
    #: ``prunekit prune`` only: remove this many whole residual blocks / transformer layers
    remove_blocks: int = 0
    #: ``prunekit prune`` only: which blocks go, ``'influence'`` (calibration) or ``'metric'`` (evaluated)
    block_criterion: str = "influence"
    #: ``prunekit prune`` only: remove this many experts of every mixture-of-experts layer
    remove_experts: int = 0

    def __post_init__(self) -> None:
        check_int("prune.search", self.search, 0)
        check_int("prune.calibrate_batches", self.calibrate_batches, 0)
        check_int("prune.remove_blocks", self.remove_blocks, 0)
        check_int("prune.remove_experts", self.remove_experts, 0)
        for name in ("compensate", "reconstruct"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"prune.{name} must be true or false, got {getattr(self, name)!r}")
        if self.compensate and self.reconstruct:
            raise ConfigError(
                "prune.compensate and prune.reconstruct are both true: the least-squares refit already sets "
                "the biases; set one of them"
            )
        if self.block_criterion not in ("influence", "metric"):
            raise ConfigError(f"prune.block_criterion must be 'influence' or 'metric', got {self.block_criterion!r}")
        check_fraction("prune.removal_ratio", self.removal_ratio)
        check_fraction("prune.max_ratio", self.max_ratio, allow_none=False)
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or self.threshold < 0
        ):
            raise ConfigError(f"prune.threshold must be a non-negative number, got {self.threshold!r}")
        if self.removal_ratio is not None and self.threshold is not None:
            raise ConfigError("give prune.removal_ratio or prune.threshold, not both")
        check_int("prune.round_to", self.round_to, 1)
        if self.fallback not in ("uniform", "global"):
            raise ConfigError(f"prune.fallback must be 'uniform' or 'global', got {self.fallback!r}")
        check_fraction("prune.tolerance", self.tolerance, allow_none=False)

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`prunekit.workflow.prune.prune` other than the goal."""
        return {
            "max_ratio": self.max_ratio,
            "round_to": self.round_to,
            "fallback": self.fallback,
            "tolerance": self.tolerance,
        }

    def oneshot_kwargs(self) -> dict:
        """The one-shot and structure options of :func:`prunekit.workflow.prune.prune` (``prunekit prune``)."""
        return {
            "compensate": self.compensate,
            "reconstruct": self.reconstruct,
            "remove_blocks": self.remove_blocks,
            "block_criterion": self.block_criterion,
            "remove_experts": self.remove_experts,
        }

    def needs_calibration(self, criterion: str) -> bool:
        """Whether these options (with ``criterion``) read calibration batches."""
        from prunekit.engine.criteria import CRITERIA

        crit = CRITERIA.get(criterion)
        return bool(
            self.compensate
            or self.reconstruct
            or self.remove_experts
            or (crit is not None and crit.reads_data)
            or (self.remove_blocks and self.block_criterion == "influence")
        )


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
        finetune_on: ``'slim'`` (default): every step transforms to the slim model, fine-tunes
            it and prunes the next step on it, so an epoch costs what the pruned model costs.
            ``'sparse'``: fine-tune the sparse model (original shapes, pruned channels held at
            zero; every epoch costs what the unpruned model costs). Same result up to float
            rounding; the workspace keeps plans over the original model either way.
        total_epochs: The whole run's fine-tuning budget, split over the steps (the later
            steps get the remainder), so runs compare at an equal budget; ``None``: every step
            fine-tunes ``finetune.epochs``. A retry fine-tunes its step's share again.
        epoch_split: With ``total_epochs``, the steps' shares as weights, one per step (``[1, 2, 7]``
            of 10 epochs: 1, 2 and 7, most of the budget to the final architecture); ``None``: even.
        calibrate_batches: Re-estimate the BatchNorm statistics on this many training batches
            after every prune step, before fine-tuning (needs a train loader); 0: never. The same
            number of (seeded) training batches is what ``prune.reconstruct`` refits on and what a
            criterion that reads data scores from (``activation`` / ``fluctuation`` statistics,
            ``taylor``'s gradients), in ana and every step.
        reanalyse: Run ana again before every step after the first, on the slim model the step
            starts from (``finetune_on: slim`` only); ``False``: the first analysis, its curves
            read from the channels each group has left.
        teacher: With ``finetune.distill_weight`` above 0, whom every step distils from:
            ``'original'`` (default), the unpruned model; ``'previous'``, the fine-tuned model of
            the last accepted step (the first step, with none yet, fine-tunes without
            distillation), a teacher one step wider than the student and already fitted to the
            training data. Use it when the training data differ from what the unpruned model
            was trained on, so that it scores below what the fine-tuned steps reach (its soft
            targets would pull the student down).
    """

    target: float | None = 0.5
    steps: int = 3
    schedule: list[float] | None = None
    max_drop: float | None = None
    max_retries: int = 2
    retry_factor: float = 0.5
    finetune_on: str = "slim"
    total_epochs: int | None = None
    epoch_split: list[float] | None = None
    calibrate_batches: int = 20
    reanalyse: bool = False
    teacher: str = "original"

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
        if self.max_drop is not None and (
            isinstance(self.max_drop, bool) or not isinstance(self.max_drop, numbers.Real) or self.max_drop < 0
        ):
            raise ConfigError(f"run.max_drop must be a non-negative number or null, got {self.max_drop!r}")
        check_int("run.max_retries", self.max_retries, 0)
        if (
            isinstance(self.retry_factor, bool)
            or not isinstance(self.retry_factor, numbers.Real)
            or not 0 < self.retry_factor < 1
        ):
            raise ConfigError(f"run.retry_factor must be in (0, 1), got {self.retry_factor!r}")
        if self.finetune_on not in FINETUNE_ON:
            raise ConfigError(f"run.finetune_on must be one of {', '.join(FINETUNE_ON)}, got {self.finetune_on!r}")
        check_int("run.total_epochs", self.total_epochs, 0, allow_none=True)
        self._check_split()
        check_int("run.calibrate_batches", self.calibrate_batches, 0)
        if not isinstance(self.reanalyse, bool):
            raise ConfigError(f"run.reanalyse must be true or false, got {self.reanalyse!r}")
        if self.teacher not in TEACHERS:
            raise ConfigError(
                f"run.teacher must be one of {', '.join(TEACHERS)} (whom each step distils from), got {self.teacher!r}"
            )
        if self.reanalyse and self.finetune_on != "slim":
            raise ConfigError(
                "run.reanalyse analyses each step's slim model: it needs run.finetune_on: slim, "
                f"got {self.finetune_on!r}"
            )

    def _check_split(self) -> None:
        """``epoch_split``: one non-negative weight per step, not all 0, and a ``total_epochs`` to split."""
        if self.epoch_split is None:
            return
        n = len(self.schedule_ratios())
        split = self.epoch_split
        if not isinstance(split, (list, tuple)) or len(split) != n:
            raise ConfigError(f"run.epoch_split must be a list of {n} weights, one per step, got {split!r}")
        if any(isinstance(w, bool) or not isinstance(w, numbers.Real) or not w >= 0 for w in split) or not sum(split):
            raise ConfigError(f"run.epoch_split must hold non-negative numbers, not all 0, got {split!r}")
        if self.total_epochs is None:
            raise ConfigError(
                f"run.epoch_split={split!r} splits run.total_epochs, which is not set: set it (e.g. 10) "
                "or drop the split"
            )
        self.epoch_split = [float(w) for w in split]

    def schedule_ratios(self) -> list[float]:
        """The removal ratio of each step."""
        if self.schedule is not None:
            return list(self.schedule)
        return [round(self.target * (k + 1) / self.steps, 6) for k in range(self.steps)]

    def epochs_per_step(self, epochs: int) -> list[int]:
        """Fine-tuning epochs of each step: ``total_epochs`` split evenly (the remainder to the
        last steps) or by ``epoch_split`` (largest remainders, ties to the later steps), or
        ``epochs`` for every step when ``total_epochs`` is not set.

        Example:
            >>> IterativeConfig(steps=3, total_epochs=10).epochs_per_step(5)
            [3, 3, 4]
            >>> IterativeConfig(steps=3, total_epochs=10, epoch_split=[1, 1, 3]).epochs_per_step(5)
            [2, 2, 6]
        """
        n = len(self.schedule_ratios())
        if self.total_epochs is None:
            return [epochs] * n
        weights = self.epoch_split or [1.0] * n
        shares = [self.total_epochs * w / sum(weights) for w in weights]
        out = [math.floor(s + 1e-9) for s in shares]
        by_remainder = sorted(range(n), key=lambda k: (shares[k] - out[k], k), reverse=True)
        for k in by_remainder[: self.total_epochs - sum(out)]:
            out[k] += 1
        return out


def _positive(name: str, v: Any, integer: bool = False, zero: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(v, bool) or not isinstance(v, kind) or (v < 0 if zero else v <= 0) or (not integer and math.isnan(v)):
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
        distill_weight: Knowledge distillation from the unpruned model (the CLI passes it as
            the teacher): the loss is ``(1 - w) * loss + w * distillation loss``, ``w`` in [0, 1];
            0: off.
        distill_temperature: Softmax temperature of the soft targets (the KL term is scaled
            by its square).
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
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
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
        if (
            isinstance(self.label_smoothing, bool)
            or not isinstance(self.label_smoothing, numbers.Real)
            or not 0 <= self.label_smoothing < 1
        ):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if (
            isinstance(self.distill_weight, bool)
            or not isinstance(self.distill_weight, numbers.Real)
            or not 0 <= self.distill_weight <= 1
        ):
            raise ValueError(f"distill_weight must be in [0, 1] (0: no distillation), got {self.distill_weight!r}")
        _positive("distill_temperature", self.distill_temperature)
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
