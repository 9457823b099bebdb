"""Importance criteria: each one runs, and each picks the channels it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from helpers import assert_equivalent, run
from zoo import build

WEAK = [1, 5]  # channels made unimportant on purpose


class Net(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.bn(self.conv1(x))))


def net(bn: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return Net(bn).eval(), torch.randn(4, 3, 6, 6)


def pruned_channels(pruner: prunekit.Pruner, ratio: float, criterion: str) -> list[int]:
    plan = pruner.plan(ratio, criterion=criterion)
    assert plan.meta["criterion"] == criterion, f"the plan records criterion {plan.meta['criterion']!r}"
    return plan.pruned.get("conv1.weight", {}).get(0, [])


def batches(x: torch.Tensor, n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        (x + 0.1 * torch.randn(x.shape, generator=g), torch.randn(x.shape[0], 4, *x.shape[2:], generator=g))
        for _ in range(n)
    ]


def mse(out, target):
    return F.mse_loss(out, target)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "bn_scale"])
def test_magnitude_criteria_prune_the_weak_channels(criterion):
    model, x = net()
    with torch.no_grad():
        model.conv1.weight[WEAK] = 0.0 if criterion == "taylor" else model.conv1.weight[WEAK] * 1e-3
        model.conv1.bias[WEAK] = 0.0 if criterion == "taylor" else model.conv1.bias[WEAK] * 1e-3
        if criterion != "taylor":
            model.conv2.weight[:, WEAK] *= 1e-3
    pruner = prunekit.Pruner(model, x)
    if criterion == "taylor":
        pruner.accumulate_gradients(batches(x), mse)
    # bn_scale: the model has no norm layer, so it falls back to l2
    assert pruned_channels(pruner, 0.25, criterion) == WEAK, f"{criterion} did not pick the weak channels {WEAK}"


def test_bn_scale_follows_gamma_not_weights():
    model, x = net(bn=True)
    with torch.no_grad():
        model.bn.weight.fill_(1.0)
        model.bn.weight[[2, 6]] = 0.01
        model.conv1.weight[[2, 6]] *= 10  # large filters: l2 would keep them
    pruner = prunekit.Pruner(model, x)
    assert pruned_channels(pruner, 0.25, "bn_scale") == [2, 6], "bn_scale should prune the smallest |gamma|"
    assert not set(pruned_channels(pruner, 0.25, "l2")) & {2, 6}, "l2 should keep the large filters"


def test_fpgm_prunes_filters_near_the_geometric_median():
    model, x = net()
    basis, _ = torch.linalg.qr(torch.randn(27, 3, generator=torch.Generator().manual_seed(3)))
    u, v, w = basis.T
    filters = [6 * u, 14 * u, 10 * u + 4 * v, 10 * u - 4 * v, 10 * u + 4 * w, 10 * u - 4 * w, 10 * u, 10 * u]
    with torch.no_grad():
        model.conv1.weight.copy_(torch.stack(filters).view(8, 3, 3, 3))
        model.conv1.bias.zero_()
        model.conv2.weight.fill_(0.5)
    pruner = prunekit.Pruner(model, x)
    assert pruned_channels(pruner, 0.25, "fpgm") == [6, 7], "fpgm should prune the two filters at the median"
    assert 0 in pruned_channels(pruner, 0.25, "l2"), "l2 should prune the smallest filter"


def test_taylor_needs_gradients_first():
    model, x = net()
    pruner = prunekit.Pruner(model, x, criterion="taylor")
    with pytest.raises(ValueError) as info:
        pruner.prune(0.5)
    assert "read_calibration" in str(info.value), f"the error should say what to call: {info.value}"
    assert not prunekit.engine.sparse.is_sparse(model), "a failed prune must leave the model dense"
    model.train()
    pruner.accumulate_gradients(batches(x), mse)
    assert model.training, "accumulate_gradients must restore the training mode"
    assert all(p.grad is None for p in model.parameters()), "accumulate_gradients must clear .grad"
    assert set(pruner.grads) == {n for n, _ in model.named_parameters()}, "gradients missing"
    assert any(g.abs().sum() > 0 for g in pruner.grads.values()), "all accumulated gradients are zero"
    model.eval()
    slim = pruner.prune(0.5, mode="slim")
    assert slim.conv1.out_channels == 4, "taylor at 50% should keep 4 of 8 channels"


def weak_net():
    """``net()`` whose channels ``WEAK`` of conv1 are zero (weights and bias): no Taylor importance."""
    model, x = net()
    with torch.no_grad():
        model.conv1.weight[WEAK] = 0.0
        model.conv1.bias[WEAK] = 0.0
    return model, x


def test_prune_scores_taylor_on_its_calibration_batches():
    """prune(criterion="taylor") sums the gradients itself; it used to ask for Pruner.accumulate_gradients."""
    model, x = weak_net()
    res = prunekit.prune(
        model, x, removal_ratio=0.25, criterion="taylor", calibration=batches(x), loss_fn=mse, log=lambda m: None
    )
    assert res.plan.meta["criterion"] == "taylor", res.plan.meta
    assert res.plan.pruned["conv1.weight"][0] == WEAK, f"taylor should prune the zero channels {WEAK}"
    slim = prunekit.to_slim(res.model)
    assert_equivalent(run(res.model, x), run(slim, x), "taylor-pruned net")


def test_taylor_default_loss_is_cross_entropy_on_labelled_batches():
    model, x = weak_net()
    per_pixel = torch.randint(0, 4, (4, 6, 6), generator=torch.Generator().manual_seed(2))  # conv2's 4 channels
    res = prunekit.prune(
        model, x, removal_ratio=0.25, criterion="taylor", calibration=[(x, per_pixel)], log=lambda m: None
    )
    assert res.plan.pruned["conv1.weight"][0] == WEAK, "cross-entropy gradients should leave the zero channels last"


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (None, "need calibration batches: pass calibration=<(inputs, target) batches"),
        ("bare", "must be (inputs, target) pairs, but batch 0 is a Tensor"),
        ([], "got no calibration batches"),
    ],
)
def test_taylor_without_labelled_batches_says_what_to_pass(calibration, message):
    model, x = weak_net()
    cal = [x] if calibration == "bare" else calibration
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prunekit.prune(model, x, removal_ratio=0.25, criterion="taylor", calibration=cal, log=lambda m: None)
    assert not prunekit.engine.sparse.is_sparse(model), "a refused prune must leave the model dense"


def test_taylor_accumulates_over_batches():
    model, x = net()
    data = batches(x, 2)
    pruner = prunekit.Pruner(model, x)
    pruner.accumulate_gradients(data[:1], mse)
    one = {n: g.clone() for n, g in pruner.grads.items()}
    pruner.accumulate_gradients(data[1:], mse)
    two = {n: g.clone() for n, g in pruner.grads.items()}
    pruner.accumulate_gradients(data, mse)
    for n in one:
        assert torch.allclose(pruner.grads[n], one[n] + two[n], atol=1e-6), f"gradients of {n} are not summed"


def test_random_is_random_and_reproducible():
    model2, x = net()
    model2.conv1 = nn.Conv2d(3, 16, 3, padding=1)
    model2.conv2 = nn.Conv2d(16, 4, 1)
    pruner = prunekit.Pruner(model2, x)
    picks = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        chosen = pruned_channels(pruner, 0.5, "random")
        assert len(chosen) == 8 and len(set(chosen)) == 8, f"random should pick 8 distinct channels: {chosen}"
        picks.append(chosen)
    assert picks[0] == picks[1], "the same torch seed should give the same random choice"
    assert picks[0] != picks[2], "different seeds should give different random choices"


def test_register_criterion():
    name = "test_last_channels"
    try:

        @prunekit.register_criterion(name, "prefers high indices")
        def _last(t, dim, tname, grads):
            return torch.arange(t.shape[dim], 0, -1, dtype=torch.float)

        model, x = net()
        pruner = prunekit.Pruner(model, x, criterion=name)
        assert pruned_channels(pruner, 0.5, name) == [4, 5, 6, 7], "the registered criterion was not used"
    finally:
        prunekit.CRITERIA.pop(name, None)


@pytest.mark.parametrize("case", ["residual_add", "vit_block", "grouped_conv"])
@pytest.mark.parametrize("criterion", sorted(prunekit.CRITERIA))
def test_every_criterion_prunes_correctly(criterion, case):
    model, inputs = build(case)
    pruner = prunekit.Pruner(model, inputs, criterion=criterion)
    if prunekit.CRITERIA[criterion].needs_grads:
        pruner.accumulate_gradients(
            [(inputs, None)], lambda out, _: sum(o.pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
        )
    if prunekit.CRITERIA[criterion].needs_activations:
        pruner.collect_activations([inputs])
    for g in pruner.prunable_groups:
        s = pruner.scores(g)
        assert s.shape == (g.n_units,), f"{criterion}: {s.shape} scores for {g.n_units} units"
        assert torch.isfinite(s).all(), f"{criterion}: non-finite scores in group {g.id}"
    pruner.prune(0.5)
    slim = pruner.transform()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters()), (
        f"{criterion} on {case}: nothing was pruned"
    )
    assert_equivalent(run(model, inputs), run(slim, inputs), f"{criterion} on {case}: slim vs sparse")
