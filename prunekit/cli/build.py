"""Build what a config names: the model (factory + checkpoint), the data loaders, the metric.

Every failure a user can fix becomes a :class:`prunekit.cli.job.ConfigError` that says what
to change: a factory that cannot be imported, a checkpoint that does not match the model,
a data set root that does not exist.

Example:
    >>> from prunekit.cli.job import ModelConfig
    >>> build_model(ModelConfig(factory="prunekit.models.demo:DemoNet", kwargs={"width": 4})).fc.in_features
    8
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from prunekit.cli.job import TORCHVISION_DATASETS, Config, ConfigError, DataConfig, ModelConfig
from prunekit.utils.refs import resolve

__all__ = [
    "import_object",
    "build_model",
    "load_checkpoint",
    "Loaders",
    "build_loaders",
    "build_eval_fn",
    "example_inputs",
    "digits_tensors",
    "torchvision_datasets",
]


def import_object(ref: str, what: str, search: Iterable[str | Path] = ()) -> Any:
    """``'package.module:name'`` -> the object; ``search`` directories go on ``sys.path``."""
    return resolve(
        ref,
        what,
        search,
        error=ConfigError,
        where=" (the config file's directory and the current directory are searched too)",
    )


def build_model(cfg: ModelConfig, search: Iterable[str | Path] = ()) -> nn.Module:
    """``factory(**kwargs)``, with the checkpoint's weights if one is named; in eval mode."""
    if cfg.factory is None:
        raise ConfigError(
            "the config names no model: set model.factory to 'package.module:callable', "
            "e.g. 'torchvision.models:resnet18'"
        )
    factory = import_object(cfg.factory, "model factory", search)
    if not callable(factory):
        raise ConfigError(f"model.factory {cfg.factory!r} is a {type(factory).__name__}, not a callable")
    try:
        model = factory(**cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.factory {cfg.factory!r} does not accept model.kwargs {cfg.kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {cfg.factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint, cfg.factory)
    return model.eval()


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from prunekit.utils.files import load_safetensors, torch_load

    fix = "save a state dict (torch.save(model.state_dict(), path)) or a .safetensors file, or fix model.checkpoint"
    if path.suffix == ".safetensors":
        return load_safetensors(path, "checkpoint", fix)
    obj = torch_load(path, "checkpoint", fix, map_location="cpu")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"the checkpoint {path} holds no state dict (a mapping of tensor names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model: nn.Module, path: str | Path, factory: str = "the factory") -> nn.Module:
    """Load a state dict into ``model``, explaining any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint {path} does not exist")
    sd = _state_dict(path)
    own = model.state_dict()
    for k in own:  # a BatchNorm's step counter, not a weight: checkpoints often leave it out
        if k not in sd and k.endswith("num_batches_tracked"):
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        raise ConfigError(
            f"the checkpoint {path} does not match the model built by {factory}: tensors "
            + "; ".join(parts)
            + ". Check model.kwargs (the architecture) or the checkpoint file"
        )
    model.load_state_dict(sd)
    return model


# ----- data ------------------------------------------------------------------------------
def digits_tensors(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> dict:
    """scikit-learn's 8x8 digits as normalised tensors, split into train / val / test."""
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    except ImportError as exc:
        raise ConfigError("the digits data set needs scikit-learn: pip install 'prunekit[demo]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # about zero mean, unit variance
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(len(x) * test_fraction), int(len(x) * val_fraction)
    te, va, tr = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


_TV = {  # name -> (torchvision class, mean, std)
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
}


def torchvision_datasets(name: str, root: str | Path | None, download: bool = False, train_plain: bool = False):
    """``(train, test)`` torchvision data sets with the usual transforms (augmentation for CIFAR-10).

    ``train_plain``: also the training images with the test transform (no augmentation), for a
    validation split held out of them: ``(train, test, train_plain)``.
    """
    if name not in TORCHVISION_DATASETS:
        raise ConfigError(f"unknown data set {name!r}; choose one of {list(TORCHVISION_DATASETS)}")
    if root is None:
        raise ConfigError(f"data set {name} needs a root directory: set data.root (or --data-dir)")
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"the data set root {root} does not exist: create it and allow downloading "
            f"(data.download: true, needs a network), or point data.root at the directory "
            f"that holds the {name} files"
        )
    try:
        import torchvision
        from torchvision import transforms as T
    except ImportError as exc:
        raise ConfigError(f"data set {name} needs torchvision: pip install torchvision") from exc
    cls_name, mean, std = _TV[name]
    cls = getattr(torchvision.datasets, cls_name)
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if name == "cifar10" else []) + norm)
    try:
        train = cls(str(root), train=True, download=download, transform=train_tf)
        test = cls(str(root), train=False, download=download, transform=T.Compose(norm))
        plain = cls(str(root), train=True, download=False, transform=T.Compose(norm)) if train_plain else None
    except RuntimeError as exc:
        raise ConfigError(
            f"{name} is not in {root} ({exc}). Set data.download: true (or --download) where a "
            f"network is available, or copy the {name} files there"
        ) from exc
    except OSError as exc:  # download attempted without a network
        raise ConfigError(f"could not download {name} into {root}: {exc}. Copy the files there by hand") from exc
    return (train, test, plain) if train_plain else (train, test)


def _loader(ds, batch_size: int, shuffle: bool, workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=shuffle and len(ds) > batch_size
    )  # no training batch of one (BatchNorm)


@dataclass
class Loaders:
    """The three splits of a job: ``train`` fine-tunes; ``val`` (held out of the training data) is
    what ana, the best-epoch choice and the prune search see; ``test`` is only reported (``None``
    where the data has none)."""

    train: Iterable
    val: Iterable
    test: Iterable | None = None


def build_loaders(
    cfg: DataConfig, seed: int = 0, search: Iterable[str | Path] = (), log: Callable[[str], None] | None = None
) -> Loaders:
    """The train, validation and test loaders of the data a config names."""
    from torch.utils.data import Subset, TensorDataset

    if cfg.loaders:
        return _custom_loaders(cfg, search)
    if cfg.dataset == "imagefolder":
        from prunekit.cli.images import image_folder_loaders

        return Loaders(*image_folder_loaders(cfg, seed, log))
    if cfg.dataset == "digits":
        d = digits_tensors(seed, cfg.val_fraction, cfg.test_fraction)
        return Loaders(
            *[
                _loader(TensorDataset(*d[k]), cfg.batch_size, k == "train", cfg.num_workers)
                for k in ("train", "val", "test")
            ]
        )
    if cfg.dataset in TORCHVISION_DATASETS:
        from prunekit.cli.images import split_by_class

        train, test, plain = torchvision_datasets(cfg.dataset, cfg.root, cfg.download, train_plain=True)
        val_idx, train_idx = split_by_class(torch.as_tensor(train.targets), [cfg.val_fraction], seed)
        return Loaders(
            _loader(Subset(train, train_idx.tolist()), cfg.batch_size, True, cfg.num_workers),
            _loader(Subset(plain, val_idx.tolist()), cfg.batch_size, False, cfg.num_workers),
            _loader(test, cfg.batch_size, False, cfg.num_workers),
        )
    raise ConfigError(
        "the config names no data: set data.dataset (one of digits, imagefolder, cifar10, mnist, "
        "fashion-mnist) or data.loaders: 'module:function' returning (train_loader, val_loader[, "
        "test_loader])"
    )


def _custom_loaders(cfg: DataConfig, search: Iterable[str | Path]) -> Loaders:
    fn = import_object(cfg.loaders, "data loaders function", search)
    try:
        out = fn(**cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"data.loaders {cfg.loaders!r} does not accept data.kwargs {cfg.kwargs}: {exc}") from exc
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        what = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ConfigError(
            f"data.loaders {cfg.loaders!r} must return (train_loader, val_loader) or (train_loader, "
            f"val_loader, test_loader), got {what}"
        )
    return Loaders(*out)


def build_eval_fn(
    cfg: Config, loader: Iterable, search: Iterable[str | Path] = (), whole: bool = False
) -> tuple[Callable, bool]:
    """``(eval_fn, lower_is_better)`` for the config's metric over ``data.eval_batches`` batches
    (``whole``: over the whole loader, as the test split is evaluated)."""
    from prunekit.workflow.evaluation import make_eval_fn

    metric: Any = cfg.metric
    if metric not in ("accuracy", "loss", "perplexity"):
        metric = import_object(metric, "metric", search)
        if not callable(metric):
            raise ConfigError(f"metric {cfg.metric!r} is not callable as metric(output, target)")
    limit = None if whole else cfg.data.eval_batches
    fn = make_eval_fn(loader, metric, max_batches=limit)
    lower = cfg.lower_is_better if cfg.lower_is_better is not None else bool(fn.lower_is_better)
    from prunekit.workflow import distributed

    if distributed.active():  # torchrun: the batches are split over the processes, the sums reduced
        fn = distributed.shard_eval_fn(loader, lambda batches: make_eval_fn(batches, metric), limit)
    return fn, lower


def example_inputs(cfg: ModelConfig, loader: Iterable) -> torch.Tensor:
    """One example input: ``model.input_shape`` of random values, or the first sample of ``loader``."""
    if cfg.input_shape:
        return torch.randn(*cfg.input_shape, generator=torch.Generator().manual_seed(0))
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, torch.Tensor):
            return x[:1]
        raise ConfigError("the inputs of the evaluation batches are not a single tensor: set model.input_shape")
    raise ConfigError("the evaluation loader is empty")
