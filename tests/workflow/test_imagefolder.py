"""``data.dataset: imagefolder``: train/val/test splits (the test split only reported), caching of the decoded
images, augmentation on tensors, errors; on tiny image folders written here as PNG and JPEG."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import CLASSES, write_images
from prunekit.cli.build import Loaders, build_loaders
from prunekit.cli.images import BatchTransform, image_folder_splits, random_crop, split_by_class
from prunekit.cli.job import Config, ConfigError, DataConfig
from prunekit.cli.main import main


@pytest.fixture
def folder(tmp_path) -> Path:
    write_images(tmp_path / "data" / "train", 10)
    write_images(tmp_path / "data" / "test", 4, fmt="jpg", seed=1)
    return tmp_path / "data"


def data_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), **{"batch_size": 8, **kw})


def labels(loader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


def test_train_val_test_splits_are_disjoint_and_seeded(folder):
    splits = image_folder_splits(folder, val_fraction=0.2, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 12)
    assert splits.classes == list(CLASSES)
    assert splits.train.source is splits.val.source, "validation is not held out of the training images"
    assert not set(splits.train.indices.tolist()) & set(splits.val.indices.tolist()), "val overlaps train"
    assert sorted(splits.val.targets.tolist()) == [0, 0, 1, 1, 2, 2], "the validation split is not per class"
    again, other = (
        image_folder_splits(folder, val_fraction=0.2, seed=0),
        image_folder_splits(folder, val_fraction=0.2, seed=1),
    )
    assert torch.equal(again.val.indices, splits.val.indices), "the split is not reproducible"
    assert not torch.equal(other.val.indices, splits.val.indices), "the seed does not change the split"
    assert splits.test.source is not splits.train.source, "the test split must come from test/"


def test_one_folder_is_split_into_train_val_and_test(tmp_path):
    write_images(tmp_path / "flat", 10)
    s = image_folder_splits(tmp_path / "flat", val_fraction=0.2, test_fraction=0.3, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (15, 6, 9)
    parts = [set(p.indices.tolist()) for p in (s.train, s.val, s.test)]
    assert set.union(*parts) == set(range(30)) and sum(map(len, parts)) == 30, "splits overlap or lose images"


def test_decoded_once_and_cached_in_memory(folder):
    cached = build_loaders(data_cfg(folder))
    assert isinstance(cached, Loaders) and cached.train.dataset.source.images is not None, "not cached"
    assert cached.train.dataset.source.images.dtype == torch.uint8
    lazy = build_loaders(data_cfg(folder, cache_mb=0))
    assert lazy.train.dataset.source.images is None, "cache_mb=0 must decode on access"
    for a, b in zip(cached.val, lazy.val):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "cached and decoded images differ"
    shutil.rmtree(folder)  # every image is in memory: nothing is read again
    assert len(labels(cached.train)) == 24 and len(labels(cached.test)) == 12


def test_normalisation_and_augmentation(folder):
    cfg = data_cfg(folder, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], crop_padding=2)
    data = build_loaders(cfg)
    x, _ = next(iter(data.val))
    raw = torch.stack([data.val.dataset[i][0] for i in range(len(x))])
    assert torch.allclose(x, (raw.float() / 255 - 0.5) / 0.25), "validation images must not be augmented"
    torch.manual_seed(0)
    a = torch.cat([b[0] for b in data.train])
    torch.manual_seed(0)
    b = torch.cat([b[0] for b in data.train])
    torch.manual_seed(1)
    c = torch.cat([b[0] for b in data.train])
    assert torch.equal(a, b), "augmentation is not reproducible under torch.manual_seed"
    assert not torch.equal(a, c), "augmentation does not vary"
    assert a.shape[1:] == (3, 8, 8)


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    torch.manual_seed(0)
    for _ in range(5):
        out = random_crop(x, 2)
        for n in range(2):
            windows = [
                (i, j) for i in range(5) for j in range(5) if torch.equal(out[n], padded[n, :, i : i + 5, j : j + 5])
            ]
            assert windows, "a crop is not a window of the zero-padded image"
    flip = BatchTransform([0.0], [1.0], flip=True)
    torch.manual_seed(0)
    flipped = flip([(x[0], 0)] * 16)[0]
    outs = {torch.equal(f, x[0].float() / 255) for f in flipped} | {
        torch.equal(f, x[0].flip(2).float() / 255) for f in flipped
    }
    assert outs == {True, False}, "the flip neither keeps nor mirrors each image"


def test_image_size_resizes_and_mixed_sizes_are_explained(tmp_path):
    write_images(tmp_path / "mixed", 3, size=8)
    Image.new("RGB", (12, 10), (0, 200, 0)).save(tmp_path / "mixed" / "dog" / "big.png")
    with pytest.raises(ConfigError, match="different sizes .*set data.image_size"):
        image_folder_splits(tmp_path / "mixed")
    s = image_folder_splits(tmp_path / "mixed", image_size=6, val_fraction=0.3)
    assert s.train.source.images.shape[1:] == (3, 6, 6)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "is not a directory"),
        ("train_only", "has a train/ folder but no test/"),
        ("empty_class", "cannot read the image folder"),
    ],
)
def test_folder_errors(tmp_path, layout, message):
    root = tmp_path / "r"
    if layout == "train_only":
        write_images(root / "train", 2)
    elif layout == "empty_class":
        (root / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=message):
        build_loaders(data_cfg(root))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"val_fraction": 0}, "data.val_fraction must be a fraction in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
        ({"mean": [0.5, 0.5]}, "data.mean must be a list of 1 or 3"),
        ({"std": [0.0]}, "every data.std value must be positive"),
        ({"crop_padding": -1}, "data.crop_padding must be an int"),
        ({"datset": "imagefolder"}, "did you mean 'dataset'"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"dataset": "imagefolder", "root": ".", **change}})


def test_first_evaluation_batches_mix_the_classes(folder):
    """An evaluation bounded to its first batches (data.eval_batches) must not see one class only."""
    data = build_loaders(data_cfg(folder, val_fraction=0.5, batch_size=4))  # 5 val and 4 test images per class
    for loader in (data.val, data.test):
        _, y = next(iter(loader))
        assert len(set(y.tolist())) > 1, f"the first batch holds one class only: {y.tolist()}"


def test_split_by_class_shares():
    t = torch.tensor([0] * 10 + [1] * 20)
    a, b, rest = split_by_class(t, [0.1, 0.2], seed=3)
    assert (t[a] == 0).sum() == 1 and (t[a] == 1).sum() == 2
    assert (t[b] == 0).sum() == 2 and (t[b] == 1).sum() == 4 and len(rest) == 21


def test_cli_selects_on_validation_and_reports_test(folder, tmp_path):
    """ana's baseline is the validation accuracy; prune prints the test accuracy as a separate, reported number."""
    import yaml

    from prunekit.workflow.evaluation import accuracy

    torch.manual_seed(0)
    from prunekit.models.cifar_resnet import cifar_resnet

    ckpt = tmp_path / "net.pt"
    torch.save(cifar_resnet(8, num_classes=3, width=4).state_dict(), ckpt)
    cfg = {
        "workspace": str(tmp_path / "ws"),
        "seed": 0,
        "model": {
            "factory": "prunekit.models.cifar_resnet:cifar_resnet",
            "kwargs": {"depth": 8, "num_classes": 3, "width": 4},
            "checkpoint": str(ckpt),
        },
        "data": {"dataset": "imagefolder", "root": str(folder), "batch_size": 8, "val_fraction": 0.2},
        "ana": {"ratios": [0.5]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["ana", "-c", str(path), "--no-progress"]) == 0
        assert main(["prune", "-c", str(path), "--removal-ratio", "0.3"]) == 0
    model = cifar_resnet(8, num_classes=3, width=4)
    model.load_state_dict(torch.load(ckpt))
    data = build_loaders(Config.from_dict(cfg).data, seed=0)
    sens = json.loads((tmp_path / "ws" / "sensitivity.json").read_text())
    assert sens["baseline"] == pytest.approx(accuracy(model, data.val)), "ana did not evaluate the validation split"
    assert "test accuracy" in out.getvalue() and "reported only" in out.getvalue(), out.getvalue()
