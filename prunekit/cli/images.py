"""Image folders for ``data.dataset: imagefolder``: decoded once, augmented on uint8 tensors.

Layout (torchvision's ImageFolder, one folder per class)::

    root/train/<class>/*.jpg   and   root/test/<class>/*.jpg     (a test split of its own)
    root/<class>/*.jpg                                           (split by seed into train and test)

A validation split, ``val_fraction`` of the training images of every class (seeded), is held
out of training: ana, the best-epoch choice and the prune search evaluate on it. The test split
is only reported.

Every image is read once with :class:`torchvision.datasets.ImageFolder` (as RGB; resized and
centre-cropped to ``image_size`` if given) and kept in memory as one ``uint8`` tensor when it
fits (``cache_mb``, and half the free memory); otherwise each access decodes the file again.
Training augmentation (random crop of the zero-padded image, horizontal flip) and the
normalisation run on whole batches in the loader's ``collate_fn``
(:class:`BatchTransform`), so 2 CPU cores spend an epoch on the model, not on the images.

Example:
    >>> splits = image_folder_splits("cifar10", val_fraction=0.1, seed=0)  # doctest: +SKIP
    >>> len(splits.train), len(splits.val), len(splits.test)  # doctest: +SKIP
    (45000, 5000, 10000)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from prunekit.cli.job import ConfigError, DataConfig

__all__ = [
    "DecodedFolder",
    "FolderImages",
    "ImageSplits",
    "BatchTransform",
    "decode_folder",
    "image_folder_splits",
    "image_folder_loaders",
    "split_by_class",
]


@dataclass
class DecodedFolder:
    """One image folder: the ImageFolder, its labels and (when cached) every image decoded.

    Attributes:
        folder: The :class:`torchvision.datasets.ImageFolder` (its transform gives uint8 CHW).
        targets: The class index of every image.
        images: ``(N, 3, H, W)`` uint8, or ``None`` where the images are decoded on access.
    """

    folder: Dataset
    targets: torch.Tensor
    images: torch.Tensor | None

    @property
    def classes(self) -> list[str]:
        return list(self.folder.classes)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i] if self.images is not None else self.folder[i][0]


class FolderImages(Dataset):
    """The images ``indices`` of a :class:`DecodedFolder`: ``(uint8 CHW image, class index)`` items."""

    def __init__(self, source: DecodedFolder, indices: torch.Tensor) -> None:
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.source.image(j), int(self.source.targets[j])

    @property
    def targets(self) -> torch.Tensor:
        return self.source.targets[self.indices]

    def subset(self, n: int, seed: int = 0) -> FolderImages:
        """About ``n`` of these images (rounded per class), the same share of every class (seeded)."""
        if n >= len(self):
            return self
        keep = split_by_class(self.targets, [n / len(self)], seed)[0]
        return FolderImages(self.source, self.indices[keep])


@dataclass
class ImageSplits:
    """Train, validation and test images of an image folder (validation held out of train)."""

    train: FolderImages
    val: FolderImages
    test: FolderImages
    classes: list[str]


class BatchTransform:
    """``collate_fn``: stack uint8 images, augment (training), scale to [0, 1] and normalise.

    Args:
        mean, std: Per-channel normalisation (1 or 3 values).
        crop_padding: Random crop of the image zero-padded by this many pixels on each side
            (0: none), one offset per image.
        flip: Flip each image horizontally with probability 1/2.

    Random numbers come from torch's global generator (the fine-tuning loop seeds it per epoch).

    Example:
        >>> fn = BatchTransform([0.5], [0.5], crop_padding=2, flip=True)
        >>> x, y = fn([(torch.zeros(3, 8, 8, dtype=torch.uint8), 1)] * 4)
        >>> x.shape, x.dtype, y.tolist()
        (torch.Size([4, 3, 8, 8]), torch.float32, [1, 1, 1, 1])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0, flip: bool = False) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_padding, self.flip = crop_padding, flip

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [s[0] for s in samples]
        if len({tuple(im.shape) for im in images}) > 1:
            shapes = sorted({tuple(im.shape[1:]) for im in images})
            raise ConfigError(
                f"the images of a batch have different sizes ({shapes[0]} and {shapes[1]}); set "
                "data.image_size to resize them all"
            )
        x = torch.stack(images)
        if self.crop_padding:
            x = random_crop(x, self.crop_padding)
        if self.flip:
            x = torch.where(torch.rand(len(x)).view(-1, 1, 1, 1) < 0.5, x.flip(3), x)
        x = (x.float().div_(255) - self.mean) / self.std
        return x, torch.tensor([s[1] for s in samples], dtype=torch.long)


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) cropped back to H x W at a random offset after zero padding."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # N, H + 2p, W + 2p, C
    oy, ox = torch.randint(0, 2 * padding + 1, (2, n))
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


def split_by_class(targets: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Positions of ``targets`` split into ``len(fractions) + 1`` parts, each class in those shares.

    Part ``k`` takes ``round(fractions[k] * n_c)`` of the ``n_c`` images of every class (a seeded
    permutation), the last part the rest. Every part comes back in a seeded random order, so
    that its first batches (an evaluation bounded by ``data.eval_batches``) mix the classes.

    Example:
        >>> [sorted(p.tolist()) for p in split_by_class(torch.tensor([0, 0, 0, 0, 1, 1]), [0.5], seed=0)]
        [[0, 1, 4], [2, 3, 5]]
    """
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for k, f in enumerate(fractions):
            m = round(f * len(idx))
            parts[k].append(idx[start : start + m])
            start += m
        parts[-1].append(idx[start:])
    out = [torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts]
    return [p[torch.randperm(len(p), generator=g)] for p in out]


def _folder(path: Path, image_size: int | None) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    steps: list[Callable] = [T.Resize(image_size), T.CenterCrop(image_size)] if image_size else []
    steps.append(T.PILToTensor())
    try:
        return datasets.ImageFolder(str(path), transform=T.Compose(steps))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"cannot read the image folder {path}: {exc}. It needs one subfolder per class "
            "holding the images (.jpg, .png, ...)"
        ) from exc


def _free_bytes() -> int | None:
    """Memory available to this process (Linux: MemAvailable, which counts reclaimable page cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def decode_folder(
    path: str | Path,
    image_size: int | None = None,
    cache_mb: int = 4096,
    workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> DecodedFolder:
    """Read an ImageFolder; decode every image into one uint8 tensor if it fits in ``cache_mb``.

    Args:
        path: A folder of class folders.
        image_size: Resize and centre-crop to this size (``None``: the images' own, one size).
        cache_mb: The largest cache in MB (it must also fit in half the free memory); 0: none.
        workers: DataLoader processes that decode.
        log: Where to say what was decided.
    """
    folder = _folder(Path(path), image_size)
    targets = torch.tensor(folder.targets, dtype=torch.long)
    first = folder[0][0]
    need = len(folder) * first.numel()
    free = _free_bytes()
    if cache_mb == 0 or need > cache_mb * 2**20 or (free is not None and need > free // 2):
        if log and cache_mb:
            log(
                f"{path}: {len(folder)} images need {need / 2**20:.0f} MB decoded, more than data.cache_mb="
                f"{cache_mb} or half the free memory; decoding them on every access"
            )
        return DecodedFolder(folder, targets, None)
    t0 = time.perf_counter()
    images = torch.empty((len(folder), *first.shape), dtype=torch.uint8)
    loader = DataLoader(folder, batch_size=256, num_workers=workers, collate_fn=_stack_same_size)
    start = 0
    for batch in loader:
        images[start : start + len(batch)] = batch
        start += len(batch)
    if log:
        log(
            f"{path}: decoded {len(folder)} images ({need / 2**20:.0f} MB in memory) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return DecodedFolder(folder, targets, images)


def _stack_same_size(samples: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    shapes = {tuple(s[0].shape) for s in samples}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise ConfigError(
            f"the images have different sizes ({a[1]}x{a[2]} and {b[1]}x{b[2]}); set data.image_size "
            "to resize and centre-crop them all to one size"
        )
    return torch.stack([s[0] for s in samples])


def image_folder_splits(
    root: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
    cache_mb: int = 4096,
    workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> ImageSplits:
    """Train / validation / test images of ``root`` (``train/`` + ``test/``, or class folders split by seed).

    The validation images are ``val_fraction`` of each class of the training images; without a
    ``test/`` folder, ``test_fraction`` of each class is the test split first.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"data.root {str(root)!r} is not a directory: point it at a folder holding train/ and "
            "test/ (each with one folder per class), or the class folders themselves"
        )
    opts = {"image_size": image_size, "cache_mb": cache_mb, "workers": workers, "log": log}
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        raise ConfigError(
            f"{root} has a {'train' if has_train else 'test'}/ folder but no "
            f"{'test' if has_train else 'train'}/ one: give both, or only the class folders (split "
            "by data.seed with data.test_fraction)"
        )
    if has_train:
        train_src, test_src = decode_folder(root / "train", **opts), decode_folder(root / "test", **opts)
        if train_src.classes != test_src.classes:
            raise ConfigError(
                f"{root}/train and {root}/test hold different classes: {train_src.classes} vs {test_src.classes}"
            )
        val_idx, train_idx = split_by_class(train_src.targets, [val_fraction], seed)
        test = FolderImages(test_src, split_by_class(test_src.targets, [], seed)[0])  # the classes mixed
    else:
        train_src = decode_folder(root, **opts)
        test_idx, val_idx, train_idx = split_by_class(train_src.targets, [test_fraction, val_fraction], seed)
        test = FolderImages(train_src, test_idx)
    splits = ImageSplits(FolderImages(train_src, train_idx), FolderImages(train_src, val_idx), test, train_src.classes)
    for name in ("train", "val", "test"):
        if not len(getattr(splits, name)):
            raise ConfigError(
                f"the {name} split of {root} is empty ({len(train_src.targets)} training images, "
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}); add images "
                "or change the fractions"
            )
    return splits


def image_folder_loaders(
    cfg: DataConfig, seed: int = 0, log: Callable[[str], None] | None = None
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """``(train, val, test)`` loaders of ``cfg.root``; training batches augmented, all normalised."""
    if cfg.root is None:
        raise ConfigError(
            "data.dataset: imagefolder needs data.root, a folder with train/ and test/ (or the class folders alone)"
        )
    splits = image_folder_splits(
        cfg.root,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        image_size=cfg.image_size,
        cache_mb=cfg.cache_mb,
        workers=cfg.num_workers,
        log=log,
    )
    return make_loaders(splits, cfg)


def make_loaders(splits: ImageSplits, cfg: DataConfig) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Loaders of ``splits`` with ``cfg``'s batch size, workers, augmentation and normalisation."""
    plain = BatchTransform(cfg.mean, cfg.std)
    train_tf = BatchTransform(cfg.mean, cfg.std, cfg.crop_padding, cfg.hflip)
    train = DataLoader(
        splits.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=train_tf,
        drop_last=len(splits.train) > cfg.batch_size,
    )
    evals = [
        DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, collate_fn=plain)
        for ds in (splits.val, splits.test)
    ]
    return train, evals[0], evals[1]
