"""The command line: ``prunekit --version`` and ``prunekit demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.demo_model import DemoNet


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunekit {prunekit.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    assert main(["prune"]) == 2  # later verbs are not registered yet


def test_demo_random(capsys, tmp_path):
    out_dir = tmp_path / "slim"
    rc = main(["demo", "--data", "random", "--image-size", "3x16x16", "--width", "8", "--blocks", "1",
               "--output", str(out_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "MACs / image" in out and "parameters" in out
    assert "channel groups" in out
    assert "max |slim - sparse|" in out and ": OK" in out
    # the saved slim model loads into a fresh DemoNet and runs
    slim = prunekit.load_slim(DemoNet(in_channels=3, width=8, blocks=1), out_dir).eval()
    assert slim.fc.in_features == 8  # 16 channels at 50%
    assert slim(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_demo_digits(capsys):
    pytest.importorskip("sklearn")
    rc = main(["demo", "--data", "digits", "--epochs", "1", "--finetune-epochs", "1", "--width", "8",
               "--blocks", "1", "--ratio", "0.25"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "test accuracy" in out and "fine-tuning epochs" in out


@pytest.mark.parametrize("argv", [["demo", "--ratio", "1.5"], ["demo", "--criterion", "nope"],
                                  ["demo", "--image-size", "3x32"]])
def test_demo_bad_arguments(argv, capsys):
    assert main(argv) == 2


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "prunekit", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("prunekit ")
