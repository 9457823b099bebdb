"""The workflow verbs through ``main([...])`` on a tiny synthetic job (tests/tinyjob.py), config errors,
and the HTML report rendered by a real headless browser."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit.cli.job import Config, ConfigError, load_config
from prunekit.cli.main import main
from tinyjob import TinyNet, write_config

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the shared helpers live


@pytest.fixture
def trained_checkpoint(tmp_path):
    from tinyjob import trained

    path = tmp_path / "tiny.pt"
    torch.save(trained().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run_workspace(tmp_path_factory):
    """``prunekit run`` once on the tiny job (shared by the end-to-end and the browser tests)."""
    from tinyjob import trained

    tmp = tmp_path_factory.mktemp("run")
    ckpt = tmp / "tiny.pt"
    torch.save(trained().state_dict(), ckpt)
    cfg = write_config(tmp, model={"checkpoint": str(ckpt)})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", "-c", str(cfg), "--set", "run.max_drop=0.5", "--no-progress"])
    return tmp / "ws", rc, buf.getvalue()


def test_run_end_to_end_then_report(run_workspace, capsys):
    ws, rc, out = run_workspace
    assert rc == 0, out
    assert "slim model in" in out and "accepted" in out, out
    for f in (
        "config.yaml",
        "ana.json",
        "sensitivity.json",
        "iterative.json",
        "summary.json",
        "final/model.safetensors",
        "final/spec.json",
        "steps/step2-try0/model/plan.json",
    ):
        assert (ws / f).exists(), f"run did not write {f}"
    resolved = yaml.safe_load((ws / "config.yaml").read_text())
    assert resolved["run"]["max_drop"] == 0.5, "the --set override is not in the saved config"
    assert resolved["finetune"]["epochs"] == 1
    summary = json.loads((ws / "summary.json").read_text())
    assert summary["final"]["macs_reduction"] >= 0.35, summary["final"]  # TinyNet is too coarse for exactly 0.5
    slim = prunekit.load_slim(TinyNet(), ws / "final").eval()
    assert slim(torch.randn(2, 1, 8, 8)).shape == (2, 4)

    assert main(["report", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "step 2" in out, out
    page = (ws / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3, "the report should embed its plots"
    assert "http://" not in page and "https://" not in page, "the report must be self-contained"


def test_ana_prune_finetune_verbs(tmp_path, trained_checkpoint, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(trained_checkpoint)})
    ws = tmp_path / "ws"
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    assert (ws / "sensitivity.json").exists() and "baseline metric" in capsys.readouterr().out
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "method sensitivity" in out and (ws / "pruned" / "plan.json").exists(), out
    assert main(["finetune", "-c", str(cfg), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "best" in out and (ws / "finetuned" / "model.safetensors").exists(), out
    model = prunekit.load_sparse(TinyNet(), ws / "finetuned")
    first = prunekit.get_plan(model)
    assert first.pruned, "the fine-tuned model lost its plan"
    # repeat: prune the fine-tuned model further; earlier pruned channels stay pruned
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.6", "--start-from", str(ws / "finetuned")]) == 0
    capsys.readouterr()
    second = prunekit.get_plan(prunekit.load_sparse(TinyNet(), ws / "pruned"))
    for name, dims in first.pruned.items():
        for d, idx in dims.items():
            assert set(idx) <= set(second.pruned[name][d]), f"{name}: earlier pruned channels came back"
    assert main(["report", str(ws)]) == 0, capsys.readouterr().err


def test_prune_search_with_bn_calibration(tmp_path, trained_checkpoint, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(trained_checkpoint)})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4", "--search", "3"]) == 2
    assert "run ana first" in capsys.readouterr().err  # search needs the sensitivity results
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4", "--search", "3", "--calibrate-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "search:" in out and "allocations at the target evaluated" in out, out
    resolved = yaml.safe_load((tmp_path / "ws" / "config.yaml").read_text())
    assert resolved["prune"]["search"] == 3 and resolved["prune"]["calibrate_batches"] == 2


def test_prune_without_a_goal_is_explained(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["prune", "-c", str(cfg)]) == 2
    assert "--removal-ratio" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"finetune": {"epoch": 3}},
            "unknown key 'finetune.epoch' in the config (did you mean 'epochs'?); valid keys:",
        ),
        ({"modle": {}}, "unknown key 'modle' in the config (did you mean 'model'?)"),
        ({"model": {"factory": "no_such_module:Net"}}, "cannot import the model factory 'no_such_module:Net'"),
        ({"model": {"factory": "tinyjob:TinyNett"}}, "has no attribute 'TinyNett'; did you mean ['TinyNet']"),
        ({"model": {"factory": "tinyjob"}}, "must name a Python object as 'package.module:name'"),
        (
            {"data": {"loaders": None, "dataset": "cifar10", "root": "/no/such/dir"}},
            "the data set root /no/such/dir does not exist",
        ),
        ({"data": {"loaders": None, "dataset": "imagenet"}}, "unknown data.dataset 'imagenet'"),
        ({"finetune": {"optimizer": "adam"}}, "optimizer must be one of"),
    ],
)
def test_config_errors(tmp_path, capsys, change, message):
    cfg = write_config(tmp_path, **change)
    assert main(["ana", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_checkpoint_that_does_not_match(tmp_path, capsys):
    path = tmp_path / "wide.pt"
    torch.save(TinyNet(width=16).state_dict(), path)
    cfg = write_config(tmp_path, model={"checkpoint": str(path)})
    assert main(["ana", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "does not match the model built by tinyjob:TinyNet" in err and "conv1.weight" in err, err
    cfg = write_config(tmp_path, model={"checkpoint": str(tmp_path / "missing.pt")})
    assert main(["ana", "-c", str(cfg)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_set_overrides_and_unknown_override(tmp_path, capsys):
    cfg = load_config(write_config(tmp_path), {"finetune.epochs": 4, "seed": 3})
    assert cfg.finetune.epochs == 4 and cfg.seed == 3
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(None, {"finetune.epoch": 4})
    assert main(["run", "-c", str(write_config(tmp_path)), "--set", "run.stepz=2"]) == 2
    assert "run.stepz" in capsys.readouterr().err


def test_config_round_trips():
    cfg = Config.from_dict({"model": {"factory": "a.b:c"}, "run": {"target": 0.4, "steps": 2}})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_report_of_a_missing_or_empty_workspace(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no prunekit results" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="chromium is not installed (apt-get install -y chromium to run the browser check of the HTML report)",
)
def test_report_renders_in_a_headless_browser(run_workspace, tmp_path):
    """Chromium loads the page and paints it: the screenshot is not blank, and the DOM has every image."""
    ws = run_workspace[0]
    assert main(["report", str(ws), "-o", str(tmp_path / "report.html")]) == 0
    page = tmp_path / "report.html"
    shot = tmp_path / "shot.png"
    common = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ]
    subprocess.run(
        common + ["--window-size=1000,2400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists() and shot.stat().st_size > 20_000, "chromium did not render the report"
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Before and after" in dom.stdout and dom.stdout.count("<img") >= 3, dom.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(str(shot))
    assert img[..., :3].std() > 0.05, "the screenshot is blank"
