"""A workflow you can trust (issue 12): validation before long work, no silently wrong results, one-line errors.

Every test drives the documented CLI (``main([...])``) or API on the tiny job of ``tests/tinyjob.py`` and fails
without the fix it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.cli.main import main
from prunekit.workflow.options import FinetuneConfig
from tinyjob import IntWidthNet, TinyNet, trained, write_config

VERBS_THAT_COMPUTE = ["ana", "groups", "prune", "finetune", "run", "transform", "bench", "demo"]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(trained().state_dict(), path)
    return path


def _err_line(capsys, verb: str) -> str:
    """The single stderr line of a failed verb (asserted to be exactly one ``prunekit VERB: error:`` line)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"prunekit {verb}: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def _int_width_checkpoint(tmp_path: Path) -> Path:
    model = IntWidthNet()
    model.load_state_dict(trained().state_dict())
    path = tmp_path / "int.pt"
    torch.save(model.state_dict(), path)
    return path


# ----- validation before long work -----------------------------------------------------------------------
def test_a_width_in_a_python_int_is_frozen_before_ana_and_run_finishes(tmp_path, capsys):
    """Before: ana passed, then run crashed in step 1 (mat1 and mat2 shapes cannot be multiplied)."""
    cfg = write_config(
        tmp_path,
        model={"factory": "tinyjob:IntWidthNet", "checkpoint": str(_int_width_checkpoint(tmp_path))},
        run={"schedule": [0.3], "max_drop": 0.9},
    )
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "validation froze group" in out and "(conv3, 16 channels)" in out and "the slim model fails" in out, out
    assert main(["run", "-c", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    slim = prunekit.load_slim(IntWidthNet(), tmp_path / "ws" / "final")
    assert slim(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert slim.conv3.out_channels == 16 and slim.conv1.out_channels < 8, "only the frozen group should stay"


def test_api_ana_and_prune_validate_and_report(tmp_path):
    logs: list[str] = []
    model = IntWidthNet().eval()
    x = torch.randn(1, 1, 8, 8)
    prunekit.ana(model, x, lambda m: 1.0, workspace=tmp_path, ratios=(0.5,), progress=False, log=logs.append)
    assert any(m.startswith("validation froze group 1 (conv3") for m in logs), logs
    res = prunekit.prune(model, x, removal_ratio=0.3, log=logs.append)
    assert prunekit.to_slim(res.model)(x).shape == (1, 4), "prune returned a model whose slim model fails"


class NoRule(nn.Module):
    """An op without a channel rule (``torch.special.i0``) between two convs: its channels stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.special.i0(self.a(x)) + self.b(self.a(x)))


def test_ops_without_a_channel_rule_are_reported_with_their_module(tmp_path):
    logs: list[str] = []
    prunekit.ana(
        NoRule().eval(),
        torch.randn(1, 1, 4, 4),
        lambda m: 1.0,
        workspace=tmp_path,
        ratios=(0.5,),
        progress=False,
        log=logs.append,
    )
    warnings = [m for m in logs if m.startswith("warning:")]
    assert warnings and "special_i0" in warnings[0] and "module" in warnings[0], logs


def test_finetune_refuses_a_sparse_model_whose_slim_model_fails_before_training():
    model = IntWidthNet().eval()
    x = torch.randn(1, 1, 8, 8)
    pruner = prunekit.Pruner(model, x)  # not validated: conv3's group is prunable here
    pruner.prune(0.5)
    epochs: list[int] = []
    with pytest.raises(ValueError, match="would not give a working slim model"):
        prunekit.workflow.finetune.finetune(
            model,
            None,
            None,
            FinetuneConfig(epochs=2, progress=False),
            train_fn=lambda m, e: epochs.append(e),
            example_inputs=x,
            log=lambda m: None,
        )
    assert epochs == [], "no epoch may be spent on a model that cannot become slim"


# ----- prunekit groups: the dry run ----------------------------------------------------------------------------
def test_groups_dry_run_lists_groups_and_widths_and_changes_nothing(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    ws = tmp_path / "ws"
    before = {p: p.stat().st_mtime_ns for p in ws.rglob("*")}
    assert main(["groups", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "why channels stay" in out and "model output channels are kept" in out, out
    assert "conv1 (+" in out and "method sensitivity (ana's results in the workspace)" in out, out
    assert "8 -> " in out and "out channels" in out, f"the per-layer widths are missing:\n{out}"
    assert {p: p.stat().st_mtime_ns for p in ws.rglob("*")} == before, "groups changed the workspace"
    (tmp_path / "other").mkdir()
    fresh = write_config(tmp_path / "other", model={"checkpoint": str(ckpt)})
    assert main(["groups", "-c", str(fresh)]) == 0
    assert not (tmp_path / "other" / "ws").exists(), "groups created a workspace"


# ----- no silently wrong results ---------------------------------------------------------------------------------
@pytest.mark.parametrize("null", ["null", "~", ""])
def test_set_null_is_honoured(tmp_path, null):
    from prunekit.cli.job import load_config, parse_set

    cfg = write_config(tmp_path, data={"eval_batches": 1}, run={"max_drop": 0.5})
    got = load_config(cfg, parse_set([f"data.eval_batches={null}", f"run.max_drop={null}"]))
    assert got.data.eval_batches is None and got.run.max_drop is None, "--set key=null was dropped"


def test_transform_takes_the_input_shape_from_the_workspace_or_refuses(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    capsys.readouterr()
    argv = ["transform", str(tmp_path / "ws" / "pruned"), "--factory", "tinyjob:TinyNet", "--formats", "safetensors"]
    assert main([*argv, "-o", str(tmp_path / "slim")]) == 0
    cap = capsys.readouterr()
    assert "input (1, 1, 8, 8)" in cap.out and "input shape 1x8x8 from" in cap.out, cap  # not 3x224x224
    model = TinyNet()
    prunekit.Pruner(model, torch.randn(1, 1, 8, 8)).prune(0.5)
    prunekit.save_sparse(model, tmp_path / "bare")  # no recorded input, no workspace config
    assert main(["transform", str(tmp_path / "bare"), "--factory", "tinyjob:TinyNet", "-o", str(tmp_path / "x")]) == 2
    assert "give --input-shape" in _err_line(capsys, "transform")


def test_prune_refuses_sensitivity_results_of_another_model(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    other = tmp_path / "other.pt"
    torch.save(trained(seed=1).state_dict(), other)
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4", "--set", f"model.checkpoint={other}"]) == 2
    assert "measured on other weights" in _err_line(capsys, "prune")
    assert (
        main(
            [
                "prune",
                "-c",
                str(cfg),
                "--removal-ratio",
                "0.4",
                "--set",
                "model.kwargs={width: 16}",
                "--set",
                "model.checkpoint=null",
            ]
        )
        == 2
    )
    assert "measured on another model" in _err_line(capsys, "prune")
    with pytest.raises(ValueError, match="measured on other weights"):
        prunekit.prune(
            trained(seed=1), torch.randn(1, 1, 8, 8), removal_ratio=0.4, workspace=tmp_path / "ws", log=lambda m: None
        )


def test_run_keeps_a_stale_analysis_aside(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)}, run={"schedule": [0.2], "max_drop": 0.9})
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    old = json.loads((tmp_path / "ws" / "ana.json").read_text())
    other = tmp_path / "other.pt"
    torch.save(trained(seed=1).state_dict(), other)
    assert main(["run", "-c", str(cfg), "--no-progress", "--set", f"model.checkpoint={other}"]) == 0
    assert "the old one is kept in" in capsys.readouterr().out
    kept = tmp_path / "ws" / "previous" / "ana-1" / "ana.json"
    assert kept.exists() and json.loads(kept.read_text()) == old, "the old analysis was discarded"


def test_a_failing_command_leaves_config_yaml_alone(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.3"]) == 0
    saved = (tmp_path / "ws" / "config.yaml").read_text()
    # fails inside prune (search needs ana), after the point where config.yaml used to be rewritten
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.5", "--search", "2"]) == 2
    assert "run ana first" in _err_line(capsys, "prune")
    assert (tmp_path / "ws" / "config.yaml").read_text() == saved, "a failed command rewrote config.yaml"


def test_prune_start_from_prints_the_merged_numbers(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    ws = tmp_path / "ws"
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    assert main(["finetune", "-c", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.1", "--start-from", str(ws / "finetuned")]) == 0
    out = capsys.readouterr().out
    x = torch.randn(1, 1, 8, 8)
    saved = prunekit.load_sparse(TinyNet(), ws / "pruned")
    true = 1 - prunekit.count(prunekit.to_slim(saved), x).macs / prunekit.count(TinyNet(), x).macs
    assert true > 0.3 and f"(-{true:.1%})" in out, f"printed numbers are not the saved model's ({true:.1%}):\n{out}"
    meta = json.loads((ws / "plan.json").read_text())["meta"]
    assert 1 - meta["macs_after"] / meta["macs_before"] == pytest.approx(true), "plan.json holds unmerged counts"


def test_run_that_prunes_nothing_exits_non_zero(tmp_path, ckpt, capsys):
    cfg = write_config(
        tmp_path, model={"checkpoint": str(ckpt)}, run={"schedule": [0.8], "max_drop": 0.0, "max_retries": 0}
    )
    assert main(["run", "-c", str(cfg), "--no-progress"]) == 1
    assert "nothing was pruned" in capsys.readouterr().err


# ----- one-line errors -------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    ws = tmp_path / "ws"
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    capsys.readouterr()
    _truncate(ws / "pruned" / "model.safetensors")
    assert main(["finetune", "-c", str(cfg)]) == 2
    line = _err_line(capsys, "finetune")
    assert str(ws / "pruned" / "model.safetensors") in line and "truncated or corrupt" in line, line
    assert "does not fit" not in line, "a damaged file is not a model mismatch"
    argv = ["transform", str(ws / "pruned"), "--factory", "tinyjob:TinyNet", "-o", str(tmp_path / "s")]
    assert main(argv) == 2 and "truncated or corrupt" in _err_line(capsys, "transform")
    _truncate(ws / "plan.json")
    assert main(["prune", "-c", str(cfg), "--spec", str(ws / "plan.json")]) == 2
    line = _err_line(capsys, "prune")
    assert str(ws / "plan.json") in line and "run 'prunekit prune' again" in line, line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["ana", "-c", str(cfg), "--set", f"model.checkpoint={bad}"]) == 2
    assert str(bad) in _err_line(capsys, "ana")


def test_workspace_json_errors_name_the_file_and_the_fix(tmp_path):
    from prunekit.utils.files import ArtifactError
    from prunekit.workflow.workspace import Workspace

    ws = Workspace(tmp_path)
    ws.path("iterative.json").write_text('{"format": "prunekit-iter')
    with pytest.raises(ArtifactError) as info:
        ws.read_json("iterative.json")
    assert str(tmp_path / "iterative.json") in str(info.value) and "delete it and run again" in str(info.value)


@pytest.mark.parametrize(
    "device, message", [("tpu", "unknown device (--device) 'tpu'"), ("cuda:7", "'cuda:7'"), ("meta", "holds no values")]
)
def test_unusable_devices_are_refused_before_any_work(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    cfg = write_config(tmp_path)
    assert main(["ana", "-c", str(cfg), "--device", device]) == 2
    assert message in _err_line(capsys, "ana")
    assert not (tmp_path / "ws").exists(), "work started before the device was checked"


def test_finetune_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is available")
    cfg = write_config(tmp_path, finetune={"device": "cuda"})
    assert main(["run", "-c", str(cfg)]) == 2
    assert "finetune.device 'cuda': no CUDA GPU is usable here" in _err_line(capsys, "run")
    from prunekit.utils.devices import DeviceError

    with pytest.raises(DeviceError, match="finetune.device 'tpu'"):
        prunekit.workflow.finetune.finetune(TinyNet(), [], None, FinetuneConfig(epochs=1, device="tpu"))


@pytest.mark.parametrize("verb", VERBS_THAT_COMPUTE)
def test_every_verb_that_computes_has_a_device_flag(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert "--device" in capsys.readouterr().out


def test_relative_paths_in_a_config_are_relative_to_its_folder(tmp_path, ckpt, monkeypatch, capsys):
    from prunekit.cli.job import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "tiny.pt").write_bytes(ckpt.read_bytes())
    cfg = write_config(folder, model={"checkpoint": "tiny.pt"}, data={"root": "data"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = load_config(cfg)
    assert got.model.checkpoint == str(folder / "tiny.pt") and got.data.root == str(folder / "data"), got
    assert load_config(cfg, {"model.checkpoint": "x.pt"}).model.checkpoint == "x.pt", "--set stays as given"
    cfg = write_config(folder, model={"checkpoint": "tiny.pt"})
    assert main(["groups", "-c", str(cfg)]) == 0, capsys.readouterr().err


def test_batch_size_next_to_loaders_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"batch_size": 64})
    assert main(["ana", "-c", str(cfg)]) == 2
    assert "data.batch_size does not apply to data.loaders" in _err_line(capsys, "ana")
    from prunekit.cli.job import dump_config, load_config

    saved = tmp_path / "again.yaml"
    saved.write_text(dump_config(load_config(write_config(tmp_path))))
    load_config(saved)  # the workspace's config.yaml loads back


# ----- small things --------------------------------------------------------------------------------------------------
def test_load_slim_returns_eval_mode(tmp_path):
    model = TinyNet().train()
    pruner = prunekit.Pruner(model, torch.randn(1, 1, 8, 8))
    prunekit.save_slim(pruner.prune(0.5, mode="slim"), tmp_path / "slim")
    assert prunekit.load_slim(TinyNet().train(), tmp_path / "slim").training is False


def test_report_after_ana_prune_finetune_shows_the_fine_tuning(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)}, finetune={"epochs": 2})
    for argv in (["ana", "--no-progress"], ["prune", "--removal-ratio", "0.4"], ["finetune"]):
        assert main([argv[0], "-c", str(cfg), *argv[1:]]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    assert "metric after pruning (no fine-tuning)" in out and "metric after fine-tuning (2 epochs" in out, out
    assert "fine-tuning (prunekit finetune)" in out and "MACs / sample" in out, out
    page = (tmp_path / "ws" / "report.html").read_text()
    assert "<h2>Fine-tuning</h2>" in page and "Before and after" in page


def test_no_progress_ana_prints_a_line_per_group(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)})
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ana: group")]
    assert len(lines) == 2 and "30% ->" in lines[0] and "1/2" in lines[0], lines


def test_without_a_terminal_progress_is_one_line_per_epoch(tmp_path, ckpt, capsys):
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)}, finetune={"epochs": 2, "progress": True})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0
    assert main(["finetune", "-c", str(cfg)]) == 0
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "\r" not in cap.out, "a progress bar streamed \\r updates into a log"
    assert [line.split(":")[0] for line in cap.out.splitlines() if line.startswith("finetune epoch")] == [
        "finetune epoch 1/2",
        "finetune epoch 2/2",
    ], cap.out


# ----- one guard for every verb -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["ana", "-c", "/no/such.yaml"],
        ["groups", "-c", "/no/such.yaml"],
        ["prune", "-c", "/no/such.yaml"],
        ["finetune", "-c", "/no/such.yaml"],
        ["run", "-c", "/no/such.yaml"],
        ["report", "/no/such/ws"],
        ["transform", "/no/such/dir", "--factory", "tinyjob:TinyNet", "-o", "/tmp/x"],
        ["bench", "--factory", "tinyjob:TinyNet"],
        ["demo", "--target", "1.5"],
        ["ana", "--threads", "0"],
    ],
)
def test_every_verb_reports_errors_the_same_way(argv, capsys):
    assert main(argv) == 2
    _err_line(capsys, argv[0])


def test_debug_environment_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DEBUG", "1")
    from prunekit.cli.job import ConfigError

    with pytest.raises(ConfigError):
        main(["ana", "-c", str(tmp_path / "none.yaml")])
    monkeypatch.delenv("PRUNEKIT_DEBUG")
    assert os.environ.get("PRUNEKIT_DEBUG") is None
