"""Least-squares reconstruction after pruning (:mod:`prunekit.engine.reconstruct`).

The exact cases prune a channel that is a copy of a kept one: the refit must then give the
dense output back (ridge 0, float64 tolerance 1e-6 relative). The others check that the refit
lowers the error to the dense model, that slim == sparse still holds (``assert_equivalent``:
1e-5 absolute + 1e-5 x max|sparse|), and the one-line errors.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import assert_equivalent, run
from prunekit.engine.plan import PruningPlan
from prunekit.engine.reconstruct import reconstruct
from prunekit.engine.sparse import apply_plan
from prunekit.workflow.evaluation import make_eval_fn
from prunekit.workflow.finetune import FinetuneConfig
from prunekit.workflow.iterative import IterativePruner
from prunekit.workflow.options import AnaConfig, ConfigError, IterativeConfig, PruneConfig
from tinyjob import loaders, trained

QUIET = lambda m: None  # noqa: E731


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` layout: weight ``(in, out)``, ``y = x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def mlp_with_copy(second: nn.Module) -> nn.Sequential:
    """Linear(5, 6) -> ReLU -> ``second``; hidden unit 4 is an exact copy of unit 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), second).double().eval()
    with torch.no_grad():
        model[0].weight[4] = model[0].weight[1]
        model[0].bias[4] = model[0].bias[1]
    return model


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
def test_a_pruned_copy_of_a_kept_channel_is_reconstructed_exactly(kind):
    torch.manual_seed(1)
    second = nn.Linear(6, 3) if kind == "linear" else Conv1D(3, 6)
    dense = mlp_with_copy(second)
    w2 = "2.weight"
    in_dim = 1 if kind == "linear" else 0
    plan = PruningPlan(
        {"0.weight": {0: [4]}, "0.bias": {0: [4]}, w2: {in_dim: [4]}},
        {"0.weight": [6, 5], "0.bias": [6], w2: list(second.weight.shape)},
    )
    model = apply_plan(copy.deepcopy(dense), plan)
    calib = [torch.randn(40, 5, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(50, 5, dtype=torch.float64)
    assert relative_gap(model(x), dense(x)) > 0.01  # pruning the copy changed the output
    report = reconstruct(dense, model, plan, calib, ridge=0.0)
    assert report.layers == [w2] and report.samples[w2] == 120
    assert relative_gap(model(x), dense(x)) < 1e-6  # its weight moved to the kept copy
    assert report.error_before[w2] > 0.01 and report.error_after[w2] < 1e-6
    assert float(model[2].weight.detach().select(in_dim, 4).abs().max()) == 0.0  # the pruned column stays zero


def conv_with_copy(conv: type[nn.Module]) -> nn.Module:
    """conv(3->6) -> BN -> ReLU -> conv(6->4, stride 2, padding 1): channel 5 copies channel 2."""
    torch.manual_seed(0)
    dim = 2 if conv is nn.Conv2d else 1
    bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    model = nn.Sequential(conv(3, 6, 3, padding=1), bn(6), nn.ReLU(), conv(6, 4, 3, stride=2, padding=1, bias=True))
    model = model.double().eval()
    with torch.no_grad():
        for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
            t[5] = t[2]
        model[1].running_mean[5] = model[1].running_mean[2]
        model[1].running_var[5] = model[1].running_var[2]
    return model


@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv1d])
def test_convolutions_are_unfolded_and_reconstructed_exactly(conv):
    dense = conv_with_copy(conv)
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    shapes = {n: list(dense.get_parameter(n).shape if "running" not in n else dense.get_buffer(n).shape) for n in names}
    plan = PruningPlan(
        {**{n: {0: [5]} for n in names}, "3.weight": {1: [5]}},
        {**shapes, "3.weight": list(dense[3].weight.shape)},
    )
    model = apply_plan(copy.deepcopy(dense), plan)
    size = (9, 7) if conv is nn.Conv2d else (11,)
    calib = [torch.randn(8, 3, *size, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(5, 3, *size, dtype=torch.float64)
    assert relative_gap(model(x), dense(x)) > 0.01
    report = reconstruct(dense, model, plan, calib, ridge=0.0)
    assert report.layers == ["3.weight"]
    assert relative_gap(model(x), dense(x)) < 1e-6
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), f"reconstructed {conv.__name__}")


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def test_prune_reconstructs_every_layer_after_pruned_channels_and_slim_equals_sparse():
    """``prune(reconstruct=True)``: later layers are refit in execution order, the output comes
    closer to the dense model's than without the refit, slim == sparse, the plan says what changed."""
    dense = convnet()
    x = torch.randn(2, 3, 12, 12)
    calib = [torch.randn(16, 3, 12, 12) for _ in range(4)]
    held_out = torch.randn(32, 3, 12, 12)
    plain = copy.deepcopy(dense)
    prunekit.prune(plain, x, removal_ratio=0.4, log=QUIET)
    model = copy.deepcopy(dense)
    notes = []
    res = prunekit.prune(model, x, removal_ratio=0.4, reconstruct=True, calibration=calib, log=notes.append)
    assert res.plan.meta["reconstructed"] == ["3.weight", "6.weight", "10.weight"]
    assert any(n.startswith("reconstruction: 3 layers refit") for n in notes), notes
    want = run(dense, held_out)
    assert relative_gap(run(model, held_out), want) < 0.7 * relative_gap(run(plain, held_out), want)
    assert_equivalent(run(model, held_out), run(prunekit.to_slim(model), held_out), "reconstructed convnet")
    assert_equivalent(run(model, held_out), run(res.model, held_out), "prune's result is the refit model")


@pytest.mark.parametrize("budget", ["all", "one_layer"])
def test_cached_dense_targets_give_the_same_refit_with_fewer_dense_passes(budget):
    """The dense outputs are captured for several layers per dense pass: the refit weights are
    the ones of one dense pass per layer and batch (``cache_bytes=0``, 1e-6 relative), with fewer
    passes; a budget that holds one layer's targets at a time cuts the layers into runs."""
    dense = convnet()
    x = torch.randn(2, 3, 12, 12)
    calib = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    plan = prunekit.prune(copy.deepcopy(dense), x, removal_ratio=0.4, log=QUIET).plan
    passes = []
    dense.register_forward_pre_hook(lambda m, a: passes.append(1) if m is dense else None)  # not its copies

    def refit(cache_bytes):
        passes.clear()
        model = apply_plan(copy.deepcopy(dense), plan)
        report = reconstruct(dense, model, plan, calib, cache_bytes=cache_bytes)
        return model, report, len(passes)

    ref, ref_report, ref_passes = refit(0)
    layers = ref_report.layers
    # one pass per batch and layer (the targets are sized from the pruned model's forward)
    assert layers == ["3.weight", "6.weight", "10.weight"] and ref_passes == len(layers) * len(calib)
    first = 16 * 12 * 12 * len(plan.keep_index("3.weight", 0)) * 4 * len(calib)  # conv 3's targets in bytes
    model, report, n = refit(512 * 2**20 if budget == "all" else first)
    assert report.layers == layers
    if budget == "all":
        assert n == len(calib)  # one run of all three layers: one dense pass per batch
    else:
        assert len(calib) < n < ref_passes  # conv 3 alone, then the rest
    for name in layers:
        mod = name.rsplit(".", 1)[0]
        w, w_ref = model.get_submodule(mod).weight, ref.get_submodule(mod).weight
        assert relative_gap(w, w_ref) < 1e-6, name
        assert report.error_after[name] == pytest.approx(ref_report.error_after[name], rel=1e-6)


def test_reconstruction_runs_every_forward_without_autograd():
    """No forward of the dense or the pruned model records a graph (a regression: ``_refit``
    once lost its ``no_grad`` and every pass built one, slower and larger for nothing)."""
    dense = convnet()
    x = torch.randn(2, 3, 12, 12)
    plan = prunekit.prune(copy.deepcopy(dense), x, removal_ratio=0.4, log=QUIET).plan
    model = apply_plan(copy.deepcopy(dense), plan)
    grad_modes = []
    for m in (dense, model):
        m.register_forward_pre_hook(lambda mod, a: grad_modes.append(torch.is_grad_enabled()))
    report = reconstruct(dense, model, plan, [torch.randn(8, 3, 12, 12)] * 2, cache_bytes=0)
    assert report.layers and grad_modes and not any(grad_modes)


def test_layers_it_cannot_refit_are_named_with_the_reason():
    """A ``Conv3d`` consumer is left as it was, and the report names it with the reason."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv3d(2, 6, 1), nn.ReLU(), nn.Conv3d(6, 3, 1), nn.Flatten(), nn.Linear(3 * 8, 4)).eval()
    plan = PruningPlan(
        {"0.weight": {0: [1]}, "0.bias": {0: [1]}, "2.weight": {1: [1]}},
        {"0.weight": [6, 2, 1, 1, 1], "0.bias": [6], "2.weight": [3, 6, 1, 1, 1]},
    )
    model = apply_plan(copy.deepcopy(dense), plan)
    before = model[2].weight.detach().clone()
    report = reconstruct(dense, model, plan, [torch.randn(4, 2, 2, 2, 2)])
    assert report.layers == [] and "Conv3d is not supported" in report.skipped["2.weight"]
    assert torch.equal(model[2].weight, before)
    assert "left as they were (2.weight)" in report.summary()


def test_reconstruct_refuses_bad_input_in_one_line():
    model = convnet()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match=r"reconstruct=True needs calibration batches: pass calibration="):
        prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.3, reconstruct=True, log=QUIET)
    with pytest.raises(ValueError, match=r"compensate=True and reconstruct=True: .* choose one"):
        prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.3, reconstruct=True, compensate=True, calibration=[x])
    with pytest.raises(ValueError, match=r"reconstruct must be true or false, got 'yes'"):
        prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.3, reconstruct="yes", calibration=[x], log=QUIET)
    with pytest.raises(ConfigError, match=r"prune.compensate and prune.reconstruct are both true"):
        PruneConfig(compensate=True, reconstruct=True)
    with pytest.raises(ValueError, match=r"reconstruction needs calibration batches"):
        reconstruct(model, copy.deepcopy(model), PruningPlan({}, {}), [])
    with pytest.raises(ValueError, match=r"ridge must be a number >= 0, got -1"):
        reconstruct(model, copy.deepcopy(model), PruningPlan({}, {}), [x], ridge=-1)
    with pytest.raises(ValueError, match=r"cache_bytes must be an int >= 0 \(bytes\), got 1.5"):
        reconstruct(model, copy.deepcopy(model), PruningPlan({}, {}), [x], cache_bytes=1.5)


@pytest.mark.parametrize("finetune_on", ["slim", "sparse"])
def test_the_iterative_run_reconstructs_in_every_step_and_resumes_identically(tmp_path, finetune_on):
    train, evald = loaders()
    x = torch.zeros(1, 1, 8, 8)

    def go(ws, prune_cfg, calibrate_batches=2):
        return IterativePruner(
            trained(),
            x,
            make_eval_fn(evald),
            train,
            workspace=ws,
            config=IterativeConfig(schedule=[0.3, 0.5], finetune_on=finetune_on, calibrate_batches=calibrate_batches),
            ana=AnaConfig(ratios=[0.3, 0.6]),
            finetune=FinetuneConfig(epochs=1, lr=0.02, progress=False),
            prune=prune_cfg,
            log=QUIET,
        ).run()

    res = go(tmp_path / "rec", PruneConfig(reconstruct=True))
    refits = [n for a in res.attempts for n in a["notes"] if n.startswith("reconstruction: ")]
    assert len(refits) == 2 and all("layers refit" in n for n in refits), [a["notes"] for a in res.attempts]
    again = go(tmp_path / "rec", PruneConfig(reconstruct=True))  # finished: loads the same result
    probe = torch.randn(6, 1, 8, 8)
    assert torch.equal(run(res.model, probe), run(again.model, probe))
    fresh = go(tmp_path / "rec2", PruneConfig(reconstruct=True))  # the same seeds: the same model
    assert torch.allclose(run(res.model, probe), run(fresh.model, probe), atol=1e-6)
    with pytest.raises(ConfigError, match=r"prune.reconstruct refits every step on run.calibrate_batches"):
        go(tmp_path / "none", PruneConfig(reconstruct=True), calibrate_batches=0)


def test_cli_prune_reconstructs_on_the_calibration_batches(tmp_path, capsys):
    from prunekit.cli.main import main
    from tinyjob import TinyNet, write_config

    cfg = write_config(tmp_path, prune={"reconstruct": True})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 2
    err = capsys.readouterr().err
    assert "prune.reconstruct read calibration batches" in err and "--calibrate-batches" in err, err
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4", "--calibrate-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction: " in out and "layers refit" in out, out
    plan = prunekit.PruningPlan.load(tmp_path / "ws" / "pruned" / "plan.json")
    assert plan.meta["reconstructed"], plan.meta
    model = prunekit.load_sparse(TinyNet(), tmp_path / "ws" / "pruned")
    x = torch.randn(3, 1, 8, 8)
    assert_equivalent(run(model, x), run(prunekit.to_slim(model), x), "CLI reconstructed TinyNet")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_gpt2_conv1d_projections_are_refit_and_slim_equals_sparse():
    """Hugging Face GPT-2: heads and MLP channels pruned, both ``c_proj`` (``Conv1D``) of every layer refit."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    dense = T.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 64, (2, 8))
    calib = [torch.randint(0, 64, (8, 8)) for _ in range(4)]
    held_out = torch.randint(0, 64, (6, 8))
    kw = {"removal_ratio": 0.3, "excludes": ["transformer.wte", "transformer.wpe"], "log": QUIET}
    plain = copy.deepcopy(dense)
    prunekit.prune(plain, x, **kw)
    model = copy.deepcopy(dense)
    res = prunekit.prune(model, x, reconstruct=True, calibration=calib, **kw)
    refit = [f"transformer.h.{i}.{m}.c_proj.weight" for i in (0, 1) for m in ("attn", "mlp")]
    assert res.plan.meta["reconstructed"] == refit
    want = run(dense, held_out).logits
    assert relative_gap(run(model, held_out).logits, want) < relative_gap(run(plain, held_out).logits, want)
    assert_equivalent(run(model, held_out).logits, run(prunekit.to_slim(model), held_out).logits, "reconstructed gpt2")


def test_a_layer_called_with_a_keyword_input_is_refit():
    """The refit reads the layer's input whether the parent passes it by position or by keyword."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(input=torch.relu(self.a(x)))

    torch.manual_seed(0)
    dense = Net().eval()
    plan = PruningPlan(
        {"a.weight": {0: [2]}, "a.bias": {0: [2]}, "b.weight": {1: [2]}},
        {"a.weight": [6, 4], "a.bias": [6], "b.weight": [2, 6]},
    )
    model = apply_plan(copy.deepcopy(dense), plan)
    report = reconstruct(dense, model, plan, [torch.randn(32, 4)])
    assert report.layers == ["b.weight"] and report.error_after["b.weight"] < report.error_before["b.weight"]


def test_a_layer_the_forward_does_not_call_is_named_not_silently_left():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    dense = Net().eval()
    plan = PruningPlan(
        {"a.weight": {0: [2]}, "a.bias": {0: [2]}, "b.weight": {1: [2]}, "unused.weight": {1: [2]}},
        {"a.weight": [6, 4], "a.bias": [6], "b.weight": [2, 6], "unused.weight": [2, 6]},
    )
    model = apply_plan(copy.deepcopy(dense), plan)
    report = reconstruct(dense, model, plan, [torch.randn(32, 4)])
    assert report.layers == ["b.weight"]
    assert report.skipped == {"unused.weight": "not called in the forward of the calibration batches"}
