"""Configuration of a pruning job: dataclasses that validate themselves, read from YAML.

A config names the model (``package.module:factory`` plus an optional checkpoint), the data
(a torchvision data set or ``module:function`` returning loaders), the metric and each
stage's options. Unknown keys are errors that list the valid ones; the resolved config is
saved in the workspace as ``config.yaml``.

Example:
    >>> cfg = Config.from_dict({"model": {"factory": "prunekit.models.demo:DemoNet"},
    ...                         "data": {"dataset": "digits"}, "run": {"target": 0.5, "steps": 2}})
    >>> cfg.run.schedule_ratios()
    [0.25, 0.5]
    >>> Config.from_dict({"modle": {}})
    Traceback (most recent call last):
    ...
    prunekit.workflow.options.ConfigError: unknown key 'modle' in the config (did you mean 'model'?); valid keys: ...
"""

from __future__ import annotations

import difflib
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.workflow.options import (
    AnaConfig,
    ConfigError,
    FinetuneConfig,
    IterativeConfig,
    PruneConfig,
    check_int,
    check_keys,
    check_ref,
)

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "DataConfig",
    "AnaConfig",
    "PruneConfig",
    "IterativeConfig",
    "check_keys",
    "load_config",
    "apply_overrides",
    "TORCHVISION_DATASETS",
    "BUILTIN_DATASETS",
]

#: Data sets the CLI can load by name (torchvision ones need ``torchvision`` and a root;
#: ``imagefolder`` reads your own image folders, see :mod:`prunekit.cli.images`).
TORCHVISION_DATASETS = ("cifar10", "mnist", "fashion-mnist")
BUILTIN_DATASETS = ("digits", "imagefolder") + TORCHVISION_DATASETS
#: ImageNet statistics (also those of the pretrained CIFAR ResNets' inputs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERSION = 1


@dataclass
class ModelConfig:
    """The model: ``factory(**kwargs)`` builds it, ``checkpoint`` holds its trained weights.

    Attributes:
        factory: ``'package.module:callable'``, e.g. ``'torchvision.models:resnet18'``.
        kwargs: Keyword arguments for the factory.
        checkpoint: A ``.safetensors`` file or a ``torch.save``'d state dict (optionally
            under ``'state_dict'`` or ``'model'``). ``None``: the factory's own weights.
        input_shape: Example input shape for tracing, e.g. ``[1, 3, 32, 32]`` (default: one
            sample of the evaluation data).
    """

    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None
    input_shape: list[int] | None = None

    def __post_init__(self) -> None:
        check_ref("model.factory", self.factory)
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"model.kwargs must be a mapping, got {self.kwargs!r}")
        if self.input_shape is not None and (
            not isinstance(self.input_shape, (list, tuple))
            or not all(isinstance(d, int) and d > 0 for d in self.input_shape)
        ):
            raise ConfigError(f"model.input_shape must be a list of positive ints, got {self.input_shape!r}")


@dataclass
class DataConfig:
    """The data: a named data set, or your own ``module:function`` returning loaders.

    Three splits: *train* (fine-tuning), *validation* (held out of the training images: ana,
    the best-epoch choice and the prune search see only it) and *test* (only reported, never
    used to choose anything).

    Attributes:
        dataset: One of :data:`BUILTIN_DATASETS` (``digits`` comes with scikit-learn;
            ``imagefolder`` reads ``root``).
        root: Directory of a torchvision data set, or of an image folder: ``train/`` and
            ``test/`` subfolders of class folders, or class folders alone (split by ``seed``
            into train and test).
        download: Let torchvision download the data set into ``root`` (needs a network).
        loaders: ``'module:function'``; ``function(**kwargs)`` returns ``(train_loader,
            val_loader)`` or ``(train_loader, val_loader, test_loader)`` of ``(inputs, target)``
            batches.
        kwargs: Keyword arguments for ``loaders``.
        batch_size: Batch size of the built-in data sets. It does not reach a ``loaders``
            function (pass it in ``kwargs``): given next to ``loaders`` it is refused.
        num_workers: DataLoader workers of the built-in data sets (refused next to ``loaders``,
            like ``batch_size``).
        eval_batches: Evaluate on at most this many validation batches in ana and after each
            epoch (``None``: the whole validation loader; the test split is always evaluated whole).
        val_fraction: Share of the training images held out for validation (per class, seeded);
            built-in data sets.
        test_fraction: Share of the images used for testing where the data has no test split
            of its own (``digits``, an image folder without ``train/`` and ``test/``).
        image_size: ``imagefolder``: resize (shorter side) and centre-crop every image to this
            size when decoding; ``None``: keep the size (all images must share one).
        crop_padding: ``imagefolder`` training augmentation: random crop after zero-padding
            this many pixels on each side (0: no crop).
        hflip: ``imagefolder`` training augmentation: random horizontal flip.
        mean, std: ``imagefolder`` normalisation per RGB channel (default: ImageNet's).
        cache_mb: ``imagefolder``: decode the images once and keep them in memory as uint8
            tensors when they take at most this many MB (and fit in free memory); 0: decode
            every image on every access.

    Example:
        >>> DataConfig(dataset="imagefolder", root=".", crop_padding=4).val_fraction
        0.1
    """

    dataset: str | None = None
    root: str | None = None
    download: bool = False
    loaders: str | None = None
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 128
    num_workers: int = 0
    eval_batches: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    image_size: int | None = None
    crop_padding: int = 4
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    cache_mb: int = 4096

    def __post_init__(self) -> None:
        if self.dataset is not None and self.loaders is not None:
            raise ConfigError("give data.dataset (a built-in data set) or data.loaders (module:function), not both")
        if self.dataset is not None and self.dataset not in BUILTIN_DATASETS:
            close = difflib.get_close_matches(str(self.dataset), BUILTIN_DATASETS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown data.dataset {self.dataset!r}{hint}; choose one of {list(BUILTIN_DATASETS)}"
                " or give data.loaders: 'module:function'"
            )
        check_ref("data.loaders", self.loaders)
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"data.kwargs must be a mapping, got {self.kwargs!r}")
        check_int("data.batch_size", self.batch_size, 1)
        check_int("data.num_workers", self.num_workers, 0)
        check_int("data.eval_batches", self.eval_batches, 1, allow_none=True)
        if not isinstance(self.download, bool):
            raise ConfigError(f"data.download must be true or false, got {self.download!r}")
        self._check_images()

    def _check_images(self) -> None:
        """The split and image options (see the class docstring)."""
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1:
                raise ConfigError(f"data.{name} must be a fraction in (0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must be below 1, got {self.val_fraction} + "
                f"{self.test_fraction}"
            )
        check_int("data.image_size", self.image_size, 1, allow_none=True)
        check_int("data.crop_padding", self.crop_padding, 0)
        check_int("data.cache_mb", self.cache_mb, 0)
        if not isinstance(self.hflip, bool):
            raise ConfigError(f"data.hflip must be true or false, got {self.hflip!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if (
                not isinstance(v, (list, tuple))
                or len(v) not in (1, 3)
                or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)
            ):
                raise ConfigError(f"data.{name} must be a list of 1 or 3 numbers (per RGB channel), got {v!r}")
            setattr(self, name, [float(x) for x in v])
        if any(x <= 0 for x in self.std):
            raise ConfigError(f"every data.std value must be positive, got {self.std}")


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "ana": AnaConfig,
    "prune": PruneConfig,
    "finetune": FinetuneConfig,
    "run": IterativeConfig,
}


@dataclass
class Config:
    """The whole job. ``excludes`` and ``criterion`` are shared by ana and prune.

    Attributes:
        workspace: Directory of every artifact.
        metric: ``'accuracy'``, ``'loss'``, ``'perplexity'`` (causal language models over token
            batches) or ``'module:function'`` (``metric(output, target)``).
        lower_is_better: For a custom metric that is a loss.
        excludes: Module names whose channels are never pruned.
        criterion: Importance criterion (see ``prunekit.engine.criteria.CRITERIA``).
        seed: Seed of everything random.
        device: Where every verb computes (``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``None``: the CPU);
            ``finetune.device``, if set, overrides it for fine-tuning. Checked before any work.
    """

    workspace: str = "prunekit-workspace"
    metric: str = "accuracy"
    lower_is_better: bool | None = None
    excludes: list[str] = field(default_factory=list)
    criterion: str = "l2"
    seed: int = 0
    device: str | None = None
    version: int = VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ana: AnaConfig = field(default_factory=AnaConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: IterativeConfig = field(default_factory=IterativeConfig)

    def __post_init__(self) -> None:
        from prunekit.engine.criteria import CRITERIA

        _check_builtin_only(self.data)
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section(cls, value, name))
            elif not isinstance(value, cls):
                raise ConfigError(f"'{name}' must be a mapping of options, got {type(value).__name__}")
        if not isinstance(self.workspace, str) or not self.workspace:
            raise ConfigError(f"workspace must be a directory name, got {self.workspace!r}")
        if self.metric not in ("accuracy", "loss", "perplexity"):
            check_ref(
                "metric (one of 'accuracy', 'loss', 'perplexity' or 'module:function')", self.metric, allow_none=False
            )
        if not isinstance(self.excludes, (list, tuple)) or not all(isinstance(e, str) for e in self.excludes):
            raise ConfigError(f"excludes must be a list of module names, got {self.excludes!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose one of {sorted(CRITERIA)}")
        check_int("seed", self.seed, 0)
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ConfigError(f"device must be a device name such as cpu or cuda, got {self.device!r}")
        if self.version != VERSION:
            raise ConfigError(f"config version {self.version!r} is not supported (this prunekit reads {VERSION})")

    @classmethod
    def from_dict(cls, data: dict | None) -> Config:
        data = dict(data or {})
        check_keys(data, cls, "config")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def _section(cls: type, data: dict, where: str):
    check_keys(data, cls, where)
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``{'finetune.epochs': 3}``) in a config dict; checks the keys exist."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) > 2:
            raise ConfigError(f"cannot set {key!r}: keys are 'option' or 'section.option'")
        if len(parts) == 1:
            check_keys({parts[0]: None}, Config, "config")
            out[parts[0]] = value
            continue
        section, option = parts
        if section not in _SECTIONS:
            check_keys({section: None}, Config, "config")
            raise ConfigError(f"'{section}' is not a section; sections are {', '.join(_SECTIONS)}")
        check_keys({option: None}, _SECTIONS[section], section)
        sec = out.get(section) or {}
        out[section] = {**sec, option: value}
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``['finetune.epochs=3']`` -> ``{'finetune.epochs': 3}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE such as finetune.epochs=3, got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply dotted-key overrides.

    Relative paths in the file (:data:`PATH_KEYS`: ``model.checkpoint``, ``data.root``) are relative
    to the file's folder, like the ``module:callable`` references; override values stay as given
    (relative to the current directory). A ``None`` override (``--set key=null``) sets ``None``.
    """
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (model, data, ...), got {type(data).__name__}")
        data = _resolve_paths(data, p.resolve().parent)
    data = apply_overrides(data, dict(overrides or {}))  # a null value (--set k=null, k=~) sets None
    return Config.from_dict(data)


#: ``(section, option)`` of the config's paths: relative ones are relative to the config file's folder
#: (command-line values, ``--set``, and ``workspace`` are relative to the current directory)
PATH_KEYS = (("model", "checkpoint"), ("data", "root"))
#: data options of the built-in data sets that a ``data.loaders`` function does not get
BUILTIN_ONLY = ("batch_size", "num_workers")


def _resolve_paths(data: dict, folder: Path) -> dict:
    """``data`` with every relative path of :data:`PATH_KEYS` made absolute against ``folder``."""
    out = dict(data)
    for section, key in PATH_KEYS:
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key]:
            path = Path(sec[key]).expanduser()
            out[section] = {**sec, key: str(path if path.is_absolute() else (folder / path).resolve())}
    return out


def _check_builtin_only(data: Any) -> None:
    """``data.batch_size`` / ``num_workers`` next to ``data.loaders`` would be silently ignored: refuse them."""
    if isinstance(data, dict) and data.get("loaders"):
        for key in BUILTIN_ONLY:
            if key in data:
                raise ConfigError(
                    f"data.{key} does not apply to data.loaders (your function builds its own "
                    f"loaders): pass it to the function in data.kwargs (e.g. kwargs: {{{key}: "
                    f"{data[key]}}}) or remove data.{key}"
                )


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` in the workspace holds; it loads back as a config)."""
    import yaml

    data = cfg.to_dict()
    if data["data"].get("loaders"):
        for key in BUILTIN_ONLY:
            data["data"].pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)
