"""The command line: ``prunekit --version``, every verb's help, and ``prunekit demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prunekit
from prunekit.cli.main import main
from prunekit.models.demo import DemoNet


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunekit {prunekit.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    assert main(["nope"]) == 2


@pytest.mark.parametrize("verb", ["ana", "groups", "prune", "finetune", "run", "report", "demo"])
def test_every_verb_explains_itself(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: prunekit {verb}" in out and len(out) > 300, out


def test_demo_digits(capsys, tmp_path):
    pytest.importorskip("sklearn")
    ws, out_dir = tmp_path / "ws", tmp_path / "slim"
    argv = [
        "demo",
        "--epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--width",
        "4",
        "--blocks",
        "1",
        "--steps",
        "2",
        "--target",
        "0.3",
        "--max-drop",
        "0.5",
        "--workspace",
        str(ws),
        "--output",
        str(out_dir),
        "--no-progress",
    ]
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("test accuracy", "MACs / image", "parameters", "CPU latency", "file size"):
        assert row in out, f"the demo table lacks {row!r}:\n{out}"
    for f in (
        "final/model.safetensors",
        "final/spec.json",
        "summary.json",
        "demo.json",
        "report.html",
        "sensitivity.json",
        "iterative.json",
    ):
        assert (ws / f).exists(), f"the demo did not write {f}"
    slim = prunekit.load_slim(DemoNet(in_channels=1, width=4, blocks=1), out_dir).eval()
    assert slim(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert slim.fc.in_features < 8, "the demo did not prune the last stage"
    # a second run resumes: nothing is trained again
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "resuming" in again and "step 1: prune" not in again, again


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--target", "1.5"],
        ["demo", "--criterion", "nope"],
        ["demo", "--steps", "0"],
        ["demo", "--dataset", "svhn"],
    ],
)
def test_demo_bad_arguments(argv, capsys):
    assert main(argv) == 2


def _fake_mnist(root, n_train: int = 64, n_test: int = 32) -> None:
    """A tiny MNIST in torchvision's raw format (idx files): the label is drawn as a bright square."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 * c : 2 * c + 8, 4:12] = 255
        head_images, head_labels = struct.pack(">IIII", 0x803, n, 28, 28), struct.pack(">II", 0x801, n)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(head_images + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(head_labels + labels.numpy().tobytes())


def test_demo_on_a_torchvision_dataset(tmp_path, capsys):
    """The --dataset path (torchvision loaders, validation split, 28x28 inputs) on a tiny fake MNIST, with the
    taylor criterion (its gradients on the training batches; the demo used to refuse it)."""
    pytest.importorskip("torchvision")
    _fake_mnist(tmp_path / "data")
    rc = main(
        [
            "demo",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "data"),
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--steps",
            "1",
            "--target",
            "0.3",
            "--max-drop",
            "0.9",
            "--width",
            "4",
            "--blocks",
            "1",
            "--threads",
            "1",
            "--criterion",
            "taylor",
            "--workspace",
            str(tmp_path / "ws"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    plan = prunekit.PruningPlan.load(next((tmp_path / "ws" / "steps").glob("*/model/plan.json")))
    assert plan.meta["criterion"] == "taylor", plan.meta
    assert "mnist (58 train, 6 validation, 32 test)" in out and "test accuracy" in out, out
    assert (tmp_path / "ws" / "final" / "spec.json").exists()


def test_demo_missing_data_dir(tmp_path, capsys):
    rc = main(
        ["demo", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--workspace", str(tmp_path / "ws")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "download" in err, err


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("prunekit ")
