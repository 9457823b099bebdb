"""The ``prune`` verb: MACs targets reached (measured), threshold mode, constraints, errors.

Most tests use synthetic sensitivity curves (a fixed, different steepness per group) so the
allocation is exercised on torchvision models without running an analysis; one test runs
the whole ``ana`` -> ``prune`` path through a workspace.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torchvision

import prunekit
from helpers import assert_equivalent, randomize_batchnorm, run
from prunekit.graph.trace import single_thread
from prunekit.models.demo import DemoNet
from prunekit.workflow.ana import Sensitivity, group_label
from prunekit.workflow.evaluation import make_bn_calibration, make_eval_fn

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is faster than two, and far faster on a busy machine."""
    with single_thread():
        yield


def demo(seed: int = 0, width: int = 16):
    torch.manual_seed(seed)
    return randomize_batchnorm(DemoNet(1, 10, width=width, blocks=2)).eval(), torch.randn(2, 1, 8, 8)


def tv(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=10).eval(), torch.randn(1, 3, 32, 32)


MODELS = {"demonet": demo, "resnet18": lambda: tv("resnet18"), "mobilenet_v2": lambda: tv("mobilenet_v2")}


def synthetic(model: nn.Module, x, seed: int = 0) -> Sensitivity:
    """Accuracy-like curves 1 - a_g * r**2 with a steepness a_g per group in [0.05, 2]."""
    pruner = prunekit.Pruner(model, x)
    g = torch.Generator().manual_seed(seed)
    curves, labels, sizes = {}, {}, {}
    for grp in pruner.prunable_groups:
        a = 0.05 + 1.95 * float(torch.rand(1, generator=g))
        curves[grp.id] = {r: 1.0 - a * r * r for r in RATIOS}
        labels[grp.id] = group_label(grp)
        sizes[grp.id] = grp.n_units
    return Sensitivity(1.0, False, list(RATIOS), curves, labels, sizes)


def measured_reduction(original: nn.Module, pruned: nn.Module, x) -> float:
    """1 - MACs(slim pruned) / MACs(original), counted independently of ``prune``."""
    slim = pruned if not prunekit.engine.sparse.is_sparse(pruned) else prunekit.to_slim(pruned)
    return 1.0 - prunekit.count(slim, x).macs / prunekit.count(original, x).macs


def three_convs(*widths: int) -> tuple[nn.Module, torch.Tensor]:
    """Three 3x3 convolutions of these widths (ReLU between), pooling and a 10-class head (seed 0), and an input."""
    torch.manual_seed(0)
    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
        c = w
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()
    return model, torch.randn(1, 3, 16, 16)


def quiet(_msg: str) -> None:
    pass


# ----- MACs target -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, R",
    [
        ("demonet", 0.2),
        ("demonet", 0.5),
        ("demonet", 0.8),
        ("resnet18", 0.3),
        ("resnet18", 0.5),
        ("resnet18", 0.7),
        ("mobilenet_v2", 0.3),
        ("mobilenet_v2", 0.6),
    ],
)
def test_macs_target_reached_within_one_point(name, R, tmp_path):
    model, x = MODELS[name]()
    original = copy.deepcopy(model)
    sens = synthetic(model, x)
    res = prunekit.prune(model, x, removal_ratio=R, sensitivity=sens, workspace=tmp_path, mode="slim", log=quiet)
    assert res.method == "sensitivity", f"curves were given, got method {res.method!r} (notes: {res.notes})"
    achieved = measured_reduction(original, res.model, x)
    assert abs(achieved - R) <= 0.01, f"{name}: asked to remove {R:.0%} of the MACs, removed {achieved:.2%}"
    assert achieved == pytest.approx(res.macs_reduction, abs=1e-9), (
        f"the reported reduction {res.macs_reduction:.4f} should be the measured {achieved:.4f}"
    )
    assert len({round(r, 3) for r in res.ratios.values()}) > 1, (
        f"different curves should give different per-group ratios: {res.ratios}"
    )
    run(res.model, x)


@pytest.mark.parametrize("fallback", ["uniform", "global"])
def test_without_results_falls_back_and_says_so(fallback, tmp_path):
    model, x = tv("resnet18")
    original = copy.deepcopy(model)
    logs: list[str] = []
    res = prunekit.prune(model, x, removal_ratio=0.5, workspace=tmp_path, fallback=fallback, log=logs.append)
    assert res.method == fallback, f"without ana results the method should be {fallback!r}, got {res.method!r}"
    assert any("no sensitivity results" in m and fallback in m for m in logs), (
        f"the fallback should be reported: {logs}"
    )
    achieved = measured_reduction(original, res.model, x)
    assert abs(achieved - 0.5) <= 0.01, f"{fallback}: removed {achieved:.2%} of the MACs for 50% requested"
    if fallback == "uniform":
        ratios = sorted(res.ratios.values())
        assert ratios[-1] - ratios[0] < 0.02 or ratios[-1] >= 0.89, f"uniform ratios should be equal: {res.ratios}"


def test_sensitivity_guided_protects_the_sensitive_group():
    model, x = demo()
    sens = synthetic(model, x)
    steep = max(sens.curves, key=lambda g: 1 - sens.curves[g][0.5])
    flat = min(sens.curves, key=lambda g: 1 - sens.curves[g][0.5])
    guided = prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.4, sensitivity=sens, log=quiet)
    uniform = prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.4, log=quiet)
    assert guided.ratios.get(steep, 0.0) < guided.ratios.get(flat, 0.0), (
        f"the steepest curve (group {steep}) should lose less than the flattest ({flat}): {guided.ratios}"
    )
    uniform_loss = sum(sens.loss(g, r) for g, r in uniform.ratios.items())
    assert guided.predicted_loss < uniform_loss, (
        f"guided predicted loss {guided.predicted_loss:.4f} should beat uniform's {uniform_loss:.4f}"
    )


# ----- threshold -------------------------------------------------------------------------
def test_threshold_mode():
    model, x = demo()
    sens = synthetic(model, x)
    results = {}
    for t in (0.0, 0.02, 0.1, 0.5):
        res = prunekit.prune(copy.deepcopy(model), x, threshold=t, sensitivity=sens, log=quiet)
        assert res.method == "sensitivity", f"threshold mode uses the curves, got {res.method}"
        assert res.predicted_loss <= t + 1e-9, f"threshold {t}: predicted loss {res.predicted_loss} exceeds it"
        results[t] = res
    assert results[0.0].macs_after == results[0.0].macs_before, (
        "no loss tolerated (every curve costs something) prunes nothing"
    )
    reductions = [results[t].macs_reduction for t in sorted(results)]
    assert reductions == sorted(reductions) and reductions[-1] > 0.2, (
        f"a larger threshold should allow a larger reduction: {reductions}"
    )
    with pytest.raises(ValueError, match="run ana first"):
        prunekit.prune(copy.deepcopy(model), x, threshold=0.1, log=quiet)


def test_threshold_with_round_to_steps_on_the_grid_and_reports_the_plan():
    """Regression: the threshold's allocation was computed in continuous ratios and then rounded, each
    group's count up to a multiple of round_to, so 6 of 16 channels kept 16: with round_to=8 nothing was
    pruned (the pretrained ResNet-20 at threshold 0.05: -13% MACs, and -0% with round_to=8), while
    predicted_loss still reported the unrounded allocation's 0.049. Now the rounded plan takes whole
    steps while the summed predicted loss stays within the threshold, and predicted_loss and ratios are
    those of the channels the plan removes. Without round_to the floor rounding left part of the
    threshold unused (0.038 of 0.05 here); single-unit steps now fill it."""
    model, x = three_convs(16, 16, 16)
    ids = [g.id for g in prunekit.Pruner(model, x).prunable_groups]
    steep = dict(zip(ids, (0.18, 2.0, 2.0)))  # one flat group: half its channels cost 0.045
    sens = Sensitivity(1.0, False, list(RATIOS), {g: {r: 1.0 - a * r * r for r in RATIOS} for g, a in steep.items()})
    for round_to in (1, 8):
        res = prunekit.prune(copy.deepcopy(model), x, threshold=0.05, sensitivity=sens, round_to=round_to, log=quiet)
        removed = {int(g): len(u) for g, u in res.plan.meta["groups"].items()}
        actual = sum(sens.loss(g, n / 16) for g, n in removed.items())
        assert res.predicted_loss == pytest.approx(actual), f"round_to={round_to}: {res.predicted_loss} for {removed}"
        assert res.predicted_loss <= 0.05 + 1e-9
        assert res.macs_reduction > 0.2, f"round_to={round_to}: removed {res.macs_reduction:.3f} of the MACs"
        if round_to == 8:
            assert removed == {ids[0]: 8}, removed
            assert res.ratios == {ids[0]: 0.5}, res.ratios
        else:  # no single unit more fits within the threshold
            assert res.predicted_loss > 0.045, f"{res.predicted_loss} of the 0.05 used ({removed})"
            assert res.ratios == {g: n / 16 for g, n in removed.items()}, (res.ratios, removed)


@pytest.mark.parametrize("curves", [False, True])
def test_ratios_are_what_the_plan_removes(curves):
    """With removal_ratio, ``ratios`` (and ``plan.meta["ratios"]``) reported the allocation's continuous
    ratios (0.30 of a 16-channel group, of which the plan removes 4 = 0.25), not what was pruned. They
    are now the plan's fractions; the allocation's are kept as ``plan.meta["requested_ratios"]``."""
    model, x = three_convs(16, 24, 16)
    ids = [g.id for g in prunekit.Pruner(model, x).prunable_groups]
    sens = None
    if curves:
        steep = dict(zip(ids, (0.3, 1.0, 2.0)))
        curve = {g: {r: 1.0 - a * r * r for r in RATIOS} for g, a in steep.items()}
        sens = Sensitivity(1.0, False, list(RATIOS), curve)
    res = prunekit.prune(model, x, removal_ratio=0.3, sensitivity=sens, fallback="uniform", log=quiet)
    units = {g.id: g.n_units for g in prunekit.Pruner(three_convs(16, 24, 16)[0], x).groups}
    removed = {int(g): len(u) / units[int(g)] for g, u in res.plan.meta["groups"].items()}
    assert removed, "nothing was pruned"
    assert {g: r for g, r in res.ratios.items() if r > 0} == removed, (res.ratios, removed)
    assert {int(g): r for g, r in res.plan.meta["ratios"].items() if r > 0} == removed
    requested = {int(g): r for g, r in res.plan.meta["requested_ratios"].items()}
    assert requested and set(requested) <= set(res.ratios), (requested, res.ratios)
    assert any(abs(requested[g] - res.ratios[g]) > 1e-6 for g in requested), (
        f"the test needs an allocation that rounding changes: {requested}"
    )


def test_keep_pruned_meets_the_goal_with_the_earlier_channels():
    """A second step on the original architecture (``keep_pruned``: the first step's plan) whose curves
    favour other groups: the earlier channels were merged in after the allocation, so the result
    overshot (-66.5% MACs for -50%) and ``ratios`` left them out. Every candidate is now measured
    with them."""
    model, x = three_convs(16, 24, 16)
    original = copy.deepcopy(model)
    ids = [g.id for g in prunekit.Pruner(model, x).prunable_groups]

    def curves(*steep):
        return Sensitivity(
            1.0, False, list(RATIOS), {g: {r: 1.0 - a * r * r for r in RATIOS} for g, a in zip(ids, steep)}
        )

    first = prunekit.prune(model, x, removal_ratio=0.3, sensitivity=curves(0.2, 3.0, 3.0), log=quiet)
    prunekit.engine.sparse.remove_masks(model)  # a fine-tuned step: the original shapes, zeros where pruned
    res = prunekit.prune(
        model, x, removal_ratio=0.5, sensitivity=curves(3.0, 0.2, 0.3), keep_pruned=first.plan, log=quiet
    )
    assert res.plan.contains(first.plan), "earlier pruned channels came back"
    assert measured_reduction(original, model, x) == pytest.approx(0.5, abs=0.011), res.notes
    assert res.macs_reduction == pytest.approx(measured_reduction(original, model, x))
    units = {g: len(u) for g, u in res.plan.meta["groups"].items()}
    assert units[ids[0]] >= len(first.plan.meta["groups"][ids[0]]), units
    assert {g: r for g, r in res.ratios.items() if r > 0} == {
        g: n / prunekit.Pruner(original, x).groups[g].n_units for g, n in units.items()
    }


@pytest.mark.parametrize("threshold", [0.05, 1.2])
def test_threshold_with_keep_pruned_counts_the_earlier_channels(threshold):
    """Threshold mode spent the whole threshold on new channels and merged the earlier ones on top: a
    predicted loss of 1.34 for a threshold of 1.2 (the earlier channels alone cost 0.956 here), and
    more pruning at 0.05. The earlier channels' loss is now spent first."""
    model, x = three_convs(16, 24, 16)
    ids = [g.id for g in prunekit.Pruner(model, x).prunable_groups]

    def curves(*steep):
        return Sensitivity(
            1.0, False, list(RATIOS), {g: {r: 1.0 - a * r * r for r in RATIOS} for g, a in zip(ids, steep)}
        )

    first = prunekit.prune(model, x, removal_ratio=0.3, sensitivity=curves(0.2, 3.0, 3.0), log=quiet)
    prunekit.engine.sparse.remove_masks(model)
    later = curves(3.0, 0.2, 0.3)
    spent = sum(later.loss(g, r) for g, r in first.ratios.items())
    res = prunekit.prune(model, x, threshold=threshold, sensitivity=later, keep_pruned=first.plan, log=quiet)
    assert res.plan.contains(first.plan)
    removed = {int(g): len(u) for g, u in res.plan.meta["groups"].items()}
    units = {g.id: g.n_units for g in prunekit.Pruner(three_convs(16, 24, 16)[0], x).groups}
    actual = sum(later.loss(g, n / units[g]) for g, n in removed.items())
    assert res.predicted_loss == pytest.approx(actual)
    if threshold < spent:
        assert res.plan.key() == first.plan.key(), f"pruned more beyond a spent threshold: {removed}"
        assert any("alone have a predicted loss" in n for n in res.notes), res.notes
    else:
        assert spent < actual <= threshold + 1e-9, f"predicted {actual} for threshold {threshold} ({removed})"


# ----- constraints -----------------------------------------------------------------------
@pytest.mark.parametrize("name, round_to", [("resnet18", 8), ("demonet", 4)])
def test_round_to_is_honoured(name, round_to, tmp_path):
    model, x = MODELS[name]()
    original = copy.deepcopy(model)
    pruner = prunekit.Pruner(model, x)
    sizes = {g.id: g.n_units for g in pruner.groups}
    res = prunekit.prune(
        model, x, removal_ratio=0.5, sensitivity=synthetic(model, x), round_to=round_to, workspace=tmp_path, log=quiet
    )
    removed = {int(g): len(u) for g, u in res.plan.meta["groups"].items()}
    assert removed, "something should be pruned"
    for g, k in removed.items():
        assert (sizes[g] - k) % round_to == 0, (
            f"group {g} keeps {sizes[g] - k} of {sizes[g]} channels, not a multiple of {round_to}"
        )
    achieved = measured_reduction(original, res.model, x)
    assert abs(achieved - 0.5) <= 0.02, f"round_to={round_to}: removed {achieved:.2%} of the MACs for 50%"
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert json.dumps(saved).count(f'"round_to": {round_to}'), "plan.json should record round_to"


class _ConcatNeck(torch.nn.Module):
    """Two producers concatenated into two consumers (as YOLO's neck): one group, two segments."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 32, 1)
        self.b = torch.nn.Conv2d(3, 24, 1)
        self.c = torch.nn.Conv2d(56, 4, 1)
        self.d = torch.nn.Conv2d(24, 4, 1)

    def forward(self, x):
        a, b = self.a(x), torch.relu(self.b(x))
        return self.c(torch.cat([a * 10, b], 1)) + self.d(b)  # a's channels score far higher (L2)


def test_round_to_holds_for_every_producer_of_a_concatenation():
    """Regression: round_to counted the channels a group keeps in total, so a concatenation's producers
    kept widths such as 27 and 5 (not multiples of 8: slow NCHWc kernels in ONNX Runtime)."""
    torch.manual_seed(0)
    model, x = _ConcatNeck().eval(), torch.randn(1, 3, 4, 4)
    pruner = prunekit.Pruner(model, x)
    group = next(g for g in pruner.prunable_groups if any(m.name == "a.weight" for m in g.members))
    assert len(group.segments()) == 2 and group.n_units == 56
    for ratio in (0.2, 0.3, 0.5, 0.7):
        plan = pruner.plan(ratio, round_to=8)
        slim = prunekit.to_slim(model, plan)
        widths = (slim.a.out_channels, slim.b.out_channels)
        assert all(w % 8 == 0 and w >= 8 for w in widths), f"ratio {ratio}: producer widths {widths}"
        assert slim.c.in_channels == sum(widths)
        assert abs((56 - sum(widths)) - ratio * 56) <= 8, f"ratio {ratio}: removed {56 - sum(widths)} of 56"
    assert (slim.a.out_channels, slim.b.out_channels) != (32, 24)


def test_round_to_steps_reach_the_macs_goal():
    """Regression: each group's count rounded up to a multiple of round_to left a uniform allocation at
    -21% MACs for a requested -30% (48/64/32 channels in steps of 8), and the ana-guided one of the
    pretrained CIFAR ResNet-20 at -20% for -50% with round_to=16: the rounded plan now takes one more
    step of the cheapest group at a time until the goal is reached."""
    model, x = three_convs(48, 64, 32)
    res = prunekit.prune(model, x, removal_ratio=0.3, round_to=8, fallback="uniform", mode="slim", log=quiet)
    widths = [m.out_channels for m in res.model if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    assert abs(res.macs_reduction - 0.3) <= 0.01, f"removed {res.macs_reduction:.3f} of the MACs for 0.3 ({widths})"
    assert abs(measured_reduction(model, res.model, x) - res.macs_reduction) < 1e-9


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_steps_stop_at_a_group_that_can_give_no_more(round_to, monkeypatch):
    """Regressions on an option-A CIFAR ResNet, whose residual stream spans 16 prunable channels of the
    first stage and the zero-padded ones after it. With round_to=8 the rounding steps looped forever: the
    stream's next step asked for more channels than its members can lose (every member keeps one), the
    plan came out the same and the same step was chosen again (the pretrained ResNet-20 at -50% hung
    inside prune); a step that changes nothing now sets its group aside. With round_to=16 the stream lost
    15 of its 16 channels (widths 1, 17, 49 and -64% MACs for -50%): every member keeping one channel broke
    the multiple; now a whole step fewer goes, and the shortfall is a note."""
    from prunekit.engine.pruner import Pruner
    from prunekit.models.cifar_resnet import cifar_resnet

    plans = {"n": 0}
    plan = Pruner.plan

    def counted(self, *args, **kwargs):
        plans["n"] += 1
        if plans["n"] > 300:
            raise RuntimeError("prune made over 300 plans: the rounding steps do not end")
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(Pruner, "plan", counted)
    torch.manual_seed(0)
    model, x = cifar_resnet(depth=14).eval(), torch.randn(1, 3, 32, 32)
    res = prunekit.prune(model, x, removal_ratio=0.5, round_to=round_to, fallback="uniform", mode="slim", log=quiet)
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % round_to == 0 for w in widths), widths
    assert res.macs_reduction <= 0.51, f"removed {res.macs_reduction:.3f} of the MACs for 0.5 ({widths})"
    if round_to == 8:
        assert res.macs_reduction >= 0.49, f"removed {res.macs_reduction:.3f} of the MACs for 0.5 ({widths})"
    else:  # 16 of 16, 32, 64 channels: -50% is out of reach, and the result says so
        assert any("reached a MACs reduction of" in n for n in res.notes), res.notes
    assert abs(measured_reduction(model, res.model, x) - res.macs_reduction) < 1e-9


def test_round_to_counts_channels_not_heads():
    """A head is head_dim channels: round_to=16 with head_dim 8 keeps an even number of heads,
    and round_to=8 any number (every head count is a multiple of 8 channels)."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=6, hidden_dim=48, mlp_dim=32, num_classes=4
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    for round_to, step in ((8, 1), (16, 2), (4, 1)):
        pruner = prunekit.Pruner(vit, x, residual=False)
        heads = [g for g in pruner.prunable_groups if g.n_units == 6]
        assert heads, [g.describe() for g in pruner.prunable_groups]
        assert heads[0].round_step(round_to) == step
        mlp = [g for g in pruner.prunable_groups if g.n_units == 32]
        assert mlp and mlp[0].round_step(round_to) == round_to
        plan = pruner.plan(0.5, round_to=round_to)
        kept = {int(g): heads[0].n_units - len(u) for g, u in plan.meta["groups"].items() if int(g) == heads[0].id}
        assert kept and kept[heads[0].id] % step == 0 and kept[heads[0].id] * 8 % round_to == 0, kept
        assert kept[heads[0].id] == (3 if step == 1 else 4), kept


def test_at_least_one_channel_kept():
    model, x = demo(width=4)
    res = prunekit.prune(model, x, removal_ratio=0.9, max_ratio=0.99, fallback="uniform", mode="slim", log=quiet)
    for name, m in res.model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            w = m.weight
            assert min(w.shape[:2] if w.dim() > 1 else w.shape) >= 1, f"{name} lost every channel: {tuple(w.shape)}"
    out = run(res.model, x)
    assert out.shape == (2, 10), f"the slim model still classifies: {tuple(out.shape)}"


def test_max_ratio_per_group_is_a_cap(tmp_path):
    model, x = demo()
    sens = synthetic(model, x)
    flat = min(sens.curves, key=lambda g: 1 - sens.curves[g][0.5])
    res = prunekit.prune(model, x, removal_ratio=0.4, sensitivity=sens, max_ratio={flat: 0.25}, log=quiet)
    assert res.ratios.get(flat, 0.0) <= 0.25 + 1e-9, f"group {flat} capped at 0.25 got {res.ratios.get(flat)}"
    assert abs(res.macs_reduction - 0.4) <= 0.01, f"the target is still reached: {res.macs_reduction:.3f}"


def test_excluded_layers_untouched_even_with_results_from_ana(tmp_path):
    """ana ran without excludes; prune excludes a layer: the curves still guide, the layer stays."""
    torch.manual_seed(0)
    model = randomize_batchnorm(DemoNet(1, 10, width=16, blocks=2)).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    prunekit.ana(
        model,
        x[:2],
        make_eval_fn([(x, y)], "loss"),
        workspace=tmp_path,
        ratios=(0.3, 0.6, 0.9),
        lower_is_better=True,
        progress=False,
        log=quiet,
    )
    before = {n: t.clone() for n, t in model.state_dict().items()}
    excluded = "stage1.1.conv2"  # its input and output channels: the stage-1 residual group stays whole
    logs: list[str] = []
    res = prunekit.prune(model, x[:2], removal_ratio=0.3, workspace=tmp_path, excludes=[excluded], log=logs.append)
    assert res.method == "sensitivity", f"the workspace's ana results should be used: {res.method}, {logs}"
    touched = [n for n in res.plan.pruned if n.startswith(excluded + ".")]
    assert not touched, f"the excluded layer must keep every channel; the plan prunes {touched}"
    for n in ("weight",):
        t = prunekit.engine.sparse.get_tensor(model, f"{excluded}.{n}")
        assert torch.equal(t, before[f"{excluded}.{n}"]), f"{excluded}.{n} changed"
    assert abs(res.macs_reduction - 0.3) <= 0.01, f"removed {res.macs_reduction:.2%} for 30%"


def test_unreachable_target_is_reported():
    """Two groups of 3 channels cannot remove 30% of the MACs within a point: prune says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    logs: list[str] = []
    res = prunekit.prune(model, x, removal_ratio=0.3, log=logs.append)
    assert abs(res.macs_reduction - 0.3) > 0.01, f"this target should be out of reach: {res.macs_reduction:.3f}"
    assert any("reached a MACs reduction" in m for m in logs), f"a missed target should be reported: {logs}"
    assert abs(res.macs_reduction - 0.3) < 0.15, f"the closest attempt should be kept: {res.macs_reduction:.3f}"


# ----- modes, spec, plan -----------------------------------------------------------------
def test_sparse_and_slim_agree_and_plan_round_trips(tmp_path):
    model, x = demo()
    sens = synthetic(model, x)
    sparse_model = copy.deepcopy(model)
    a = prunekit.prune(sparse_model, x, removal_ratio=0.5, sensitivity=sens, workspace=tmp_path, log=quiet)
    assert a.model is sparse_model and prunekit.engine.sparse.is_sparse(a.model), "sparse mode prunes in place"
    assert all(
        t.shape == model.state_dict()[n].shape for n, t in a.model.state_dict().items() if n in model.state_dict()
    ), "sparse mode keeps shapes"
    b = prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.5, sensitivity=sens, mode="slim", log=quiet)
    assert_equivalent(run(a.model, x), run(b.model, x), "sparse vs slim result of prune")
    plan_path = tmp_path / "plan.json"
    meta = json.loads(plan_path.read_text())
    assert "sensitivity" in json.dumps(meta) and str(a.macs_after) in json.dumps(meta), (
        "plan.json should record the method and the measured MACs"
    )
    c = prunekit.prune(copy.deepcopy(model), x, spec=plan_path, mode="slim", log=quiet)
    assert c.method == "spec" and c.macs_after == a.macs_after, (
        f"applying the saved plan should reproduce it: {c.macs_after} vs {a.macs_after} MACs"
    )
    assert_equivalent(run(b.model, x), run(c.model, x), "slim from prune vs slim from its saved plan")


def test_spec_by_group_and_layer_name():
    model, x = demo()
    pruner = prunekit.Pruner(model, x)
    g = pruner.prunable_groups[-1]
    res = prunekit.prune(copy.deepcopy(model), x, spec={group_label(g): 0.5}, log=quiet)
    assert res.ratios == {g.id: 0.5}, f"a spec by layer name prunes that group only: {res.ratios}"
    with pytest.raises(ValueError, match="neither a group id nor"):
        prunekit.prune(copy.deepcopy(model), x, spec={"stage9.conv": 0.5}, log=quiet)


# ----- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("R", [1.0, 1.5, -0.1, float("nan"), "0.5", True])
def test_removal_ratio_outside_range(R):
    model, x = demo()
    with pytest.raises(ValueError, match=r"removal_ratio must be a number in \[0, 1\)"):
        prunekit.prune(model, x, removal_ratio=R, log=quiet)
    assert not prunekit.engine.sparse.is_sparse(model), "a rejected call must not touch the model"


def test_unknown_module_in_excludes():
    model, x = demo()
    with pytest.raises(ValueError, match=r"'stage2\.0\.convv2' does not exist.*did you mean"):
        prunekit.prune(model, x, removal_ratio=0.5, excludes=["stage2.0.convv2"], log=quiet)


def test_other_bad_arguments():
    model, x = demo()
    with pytest.raises(ValueError, match="exactly one of"):
        prunekit.prune(model, x, removal_ratio=0.5, threshold=0.1, log=quiet)
    with pytest.raises(ValueError, match="exactly one of"):
        prunekit.prune(model, x, log=quiet)
    with pytest.raises(ValueError, match="mode must be"):
        prunekit.prune(model, x, removal_ratio=0.5, mode="thin", log=quiet)
    with pytest.raises(ValueError, match="fallback must be"):
        prunekit.prune(model, x, removal_ratio=0.5, fallback="random", log=quiet)
    with pytest.raises(ValueError, match="threshold must be a non-negative"):
        prunekit.prune(model, x, threshold=-1.0, log=quiet)
    res = prunekit.prune(model, x, removal_ratio=0.0, log=quiet)
    assert res.macs_after == res.macs_before, "removal_ratio=0 prunes nothing"


# ----- search: evaluated variants of the allocation -------------------------------------
def test_search_keeps_the_best_evaluated_allocation_at_the_target():
    model, x = demo()
    sens = synthetic(model, x)
    reference = copy.deepcopy(model)
    seen = []

    def eval_fn(m, probe):
        out = float(m(probe).detach().square().mean())  # any number that depends on the allocation
        seen.append(out)
        return out

    probe = torch.randn(4, 1, 8, 8)
    calls = []
    res = prunekit.prune(
        model,
        x,
        removal_ratio=0.5,
        sensitivity=sens,
        search=5,
        eval_fn=eval_fn,
        eval_args=(probe,),
        calibrate=calls.append,
        log=quiet,
    )
    assert abs(res.macs_reduction - 0.5) <= 0.01
    assert 2 <= len(seen) <= 6 and len(calls) == len(seen) + 1  # every candidate, and the result, calibrated
    assert any("search:" in n for n in res.notes)
    with torch.no_grad():
        assert eval_fn(res.model, probe) == pytest.approx(max(seen[:-1]), rel=1e-5)
    plain = prunekit.prune(copy.deepcopy(reference), x, removal_ratio=0.5, sensitivity=sens, log=quiet)
    assert eval_fn(res.model, probe) >= eval_fn(plain.model, probe) - 1e-6  # never worse than computed


def test_search_restores_the_model_between_candidates():
    model, x = demo()
    sens = synthetic(model, x)
    before = copy.deepcopy(model.state_dict())
    states = []

    def eval_fn(m):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return float(torch.rand(1))

    bn = make_bn_calibration([torch.randn(8, 1, 8, 8)])
    prunekit.prune(
        model, x, removal_ratio=0.3, sensitivity=sens, search=3, eval_fn=eval_fn, calibrate=bn, mode="slim", log=quiet
    )
    assert len(states) >= 2
    for k, v in model.state_dict().items():  # slim mode: the user's model is only masked, never changed
        if "running" not in k and "num_batches" not in k:
            zero = v == 0
            assert torch.equal(v[~zero], before[k][~zero]), k


def test_search_errors():
    model, x = demo()
    sens = synthetic(model, x)
    with pytest.raises(ValueError, match="search needs eval_fn"):
        prunekit.prune(model, x, removal_ratio=0.3, sensitivity=sens, search=2, log=quiet)
    with pytest.raises(ValueError, match="search must be"):
        prunekit.prune(model, x, removal_ratio=0.3, sensitivity=sens, search=-1, eval_fn=len, log=quiet)
    with pytest.raises(ValueError, match="sensitivity results"):
        prunekit.prune(model, x, removal_ratio=0.3, search=2, eval_fn=lambda m: 1.0, log=quiet)
    with pytest.raises(TypeError, match="calibrate must be callable"):
        prunekit.prune(model, x, removal_ratio=0.3, calibrate="bn", log=quiet)


def test_bn_calibration_reestimates_statistics_only():
    model, _ = demo()
    w = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    xs = torch.randn(16, 1, 8, 8) * 3 + 1
    make_bn_calibration([(xs, torch.zeros(16))])(model)
    assert not model.training
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        model.train()
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        ref(xs)
    ref_bn = next(m for m in ref.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.allclose(bn.running_mean, ref_bn.running_mean) and bn.momentum == 0.1
    assert all(torch.equal(v, w[k]) for k, v in model.state_dict().items() if k in w)
    with pytest.raises(TypeError, match="iterable of batches"):
        make_bn_calibration(torch.randn(3))


def test_prune_accepts_its_config():
    """``prune(..., config=PruneConfig(...))`` equals the keywords; an option given twice differently is refused."""
    from prunekit.workflow.options import PruneConfig

    (a, x), (b, _) = demo(), demo()
    by_config = prunekit.prune(a, x, config=PruneConfig(removal_ratio=0.4, round_to=2), log=quiet)
    by_keywords = prunekit.prune(b, x, removal_ratio=0.4, round_to=2, log=quiet)
    assert by_config.plan.pruned == by_keywords.plan.pruned and by_config.plan.meta["round_to"] == 2
    assert by_config.plan.meta["removal_ratio"] == 0.4 and by_config.macs_reduction > 0.3
    # a field the config leaves at its default leaves the keyword alone
    both = prunekit.prune(demo()[0], x, removal_ratio=0.4, config=PruneConfig(round_to=2), log=quiet)
    assert both.plan.pruned == by_keywords.plan.pruned
    with pytest.raises(TypeError, match=r"round_to=4 and config.round_to=2; give the option once"):
        prunekit.prune(demo()[0], x, round_to=4, config=PruneConfig(removal_ratio=0.4, round_to=2), log=quiet)
