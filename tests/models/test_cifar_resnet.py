"""The CIFAR ResNets (option-A shortcut): factories, state-dict keys of the published weights, shortcut shapes,
loading a checkpoint through the config, and pruning one end to end through ``prunekit run`` (sparse == slim)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml

import prunekit
from helpers import write_images
from prunekit.cli.build import build_model
from prunekit.cli.job import ModelConfig
from prunekit.cli.main import main
from prunekit.engine.equivalence import TOLERANCE
from prunekit.engine.sparse import is_sparse
from prunekit.models.cifar_resnet import PadShortcut, cifar_resnet, cifar_resnet20, cifar_resnet56


def readme_keys(blocks: int) -> set[str]:
    """The keys listed in the shared data README: conv1, bn1, layer{1,2,3}.{i}.conv{1,2} / bn{1,2}, linear."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "linear.weight", "linear.bias"} | {f"bn1.{b}" for b in bn}
    for layer in (1, 2, 3):
        for i in range(blocks):
            for k in (1, 2):
                keys.add(f"layer{layer}.{i}.conv{k}.weight")
                keys |= {f"layer{layer}.{i}.bn{k}.{b}" for b in bn}
    return keys


@pytest.mark.parametrize("factory, blocks", [(cifar_resnet20, 3), (cifar_resnet56, 9)])
def test_keys_and_sizes_match_the_published_weights(factory, blocks):
    model = factory()
    assert set(model.state_dict()) == readme_keys(blocks)
    assert sum(p.numel() for p in model.parameters()) == (269722 if blocks == 3 else 853018)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads_both_sides():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]), "the input channels must sit in the middle"
    assert not out[:, :8].any() and not out[:, 24:].any(), "planes // 4 zero channels on each side"
    model = cifar_resnet(depth=14, width=4, num_classes=3)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [2, 2, 2]
    assert isinstance(model.layer2[0].shortcut, PadShortcut) and isinstance(model.layer3[0].shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert model.linear.in_features == 16 and model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    assert not any("shortcut" in k for k in model.state_dict()), "option-A shortcuts have no weights"
    for depth in (21, 4, "20"):
        with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
            cifar_resnet(depth=depth)


def test_config_loads_weights_without_batchnorm_counters(tmp_path):
    """The published safetensors files hold no num_batches_tracked; the config's checkpoint still loads."""
    from safetensors.torch import save_file

    src = cifar_resnet20(width=4)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = build_model(
        ModelConfig(
            factory="prunekit.models.cifar_resnet:cifar_resnet20",
            kwargs={"width": 4},
            checkpoint=str(tmp_path / "w.safetensors"),
        )
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


KWARGS = {"depth": 8, "num_classes": 3, "width": 8}


def run_job(tmp_path, **finetune) -> tuple[int, str]:
    """``prunekit run`` on an option-A ResNet-8 and a tiny generated image folder (PNG train, JPEG test)."""
    write_images(tmp_path / "data" / "train", 12)
    write_images(tmp_path / "data" / "test", 3, fmt="jpg", seed=1)
    torch.manual_seed(0)
    torch.save(cifar_resnet(**KWARGS).state_dict(), tmp_path / "net.pt")
    cfg = {
        "workspace": str(tmp_path / "ws"),
        "model": {
            "factory": "prunekit.models.cifar_resnet:cifar_resnet",
            "kwargs": KWARGS,
            "checkpoint": str(tmp_path / "net.pt"),
        },
        "data": {"dataset": "imagefolder", "root": str(tmp_path / "data"), "batch_size": 8, "val_fraction": 0.25},
        "ana": {"ratios": [0.3, 0.6]},
        "finetune": {"epochs": 1, "lr": 0.02, "progress": False, **finetune},
        "run": {"schedule": [0.3, 0.5]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", "-c", str(tmp_path / "c.yaml"), "--no-progress"])
    return rc, out.getvalue()


def test_option_a_resnet_prunes_end_to_end_through_prunekit_run(tmp_path, monkeypatch):
    """``prunekit run`` prunes the option-A ResNet (its residual stream too) to a slim model equal to the sparse
    one, reports the test split apart, and distils every step from the unpruned model (finetune.distill_weight)."""
    import prunekit.workflow.finetune as ft_module
    import prunekit.workflow.iterative as it_module

    teachers = []
    original = ft_module.finetune

    def spy(*args, **kwargs):
        teachers.append(kwargs.get("teacher"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ft_module, "finetune", spy)
    monkeypatch.setattr(it_module, "finetune", spy)
    rc, out = run_job(tmp_path, distill_weight=0.5, distill_temperature=2.0)
    assert rc == 0, out
    assert "test accuracy (reported only" in out, out
    summary = json.loads((tmp_path / "ws" / "summary.json").read_text())
    final = summary["final"]
    assert final["equivalence_error"] <= TOLERANCE, final
    assert final["macs_reduction"] >= 0.3, final
    assert final["test_metric"] is not None and summary["baseline"]["test_metric"] is not None
    layers = {r["name"]: r for r in summary["layers"]}
    # the residual stream (conv1 -> layer1 -> padded shortcut -> layer2 ...) prunes too, not only inner widths
    assert layers["conv1"]["out_after"] < layers["conv1"]["out_before"], layers["conv1"]
    slim = prunekit.load_slim(cifar_resnet(**KWARGS), tmp_path / "ws" / "final").eval()
    assert slim(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    base = cifar_resnet(**KWARGS)
    base.load_state_dict(torch.load(tmp_path / "net.pt"))
    assert len(teachers) == 2 and all(t is not None and not is_sparse(t) for t in teachers), teachers
    for t in teachers:
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in t.state_dict().items()), "not the baseline"
