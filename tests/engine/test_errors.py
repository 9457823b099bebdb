"""Bad input gets a clear error; what the engine cannot prune is kept, never pruned wrongly."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from helpers import assert_equivalent, run, shrunk
from prunekit.graph.trace import MODULE_HANDLERS
from zoo import KNOWN_LIMITATIONS, build_limitation


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 1)
        self.conv4 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv4(F.relu(self.conv3(x)))


def chain(seed: int = 0):
    torch.manual_seed(seed)
    return Chain().eval(), torch.randn(2, 3, 6, 6)


# ----- inputs, ratios, names ------------------------------------------------------------
def test_wrong_example_inputs_name_the_shapes():
    model, _ = chain()
    with pytest.raises(ValueError) as info:
        prunekit.Pruner(model, torch.randn(1, 5, 6, 6))
    msg = str(info.value)
    assert "(1, 5, 6, 6)" in msg, f"the error should name the input shape: {msg}"
    assert "does not run" in msg, f"the error should say the model does not run: {msg}"
    with pytest.raises(ValueError) as info:
        prunekit.Pruner(model, (torch.randn(2, 3, 6, 6), torch.randn(4)))
    msg = str(info.value)
    assert "(2, 3, 6, 6)" in msg and "(4,)" in msg, f"every input shape should be named: {msg}"
    with pytest.raises(TypeError, match="example_inputs"):
        prunekit.Pruner(model, "an image")
    with pytest.raises(TypeError, match="nn.Module"):
        prunekit.Pruner(lambda x: x, torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, 2, float("nan"), "0.5"])
def test_ratio_outside_range(ratio):
    model, x = chain()
    pruner = prunekit.Pruner(model, x)
    for call in (
        lambda: pruner.plan(ratio),
        lambda: pruner.prune(ratio),
        lambda: pruner.plan({pruner.prunable_groups[0].id: ratio}),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert repr(ratio) in str(info.value), f"the error should name the ratio {ratio!r}: {info.value}"
        assert "[0, 1)" in str(info.value), f"the error should give the valid range: {info.value}"
    assert not prunekit.engine.sparse.is_sparse(model), "a rejected ratio must leave the model dense"


def test_unknown_group_id_and_options():
    model, x = chain()
    pruner = prunekit.Pruner(model, x)
    with pytest.raises(ValueError, match=r"no channel group with id 999"):
        pruner.plan({999: 0.5})
    with pytest.raises(ValueError, match="round_to"):
        pruner.plan(0.5, round_to=0)
    with pytest.raises(ValueError, match="mode must be 'sparse' or 'slim'"):
        pruner.prune(0.5, mode="fat")


def test_ignore_missing_module_suggests_names():
    model, x = chain()
    with pytest.raises(ValueError) as info:
        prunekit.Pruner(model, x, excludes=["conv_2"])
    msg = str(info.value)
    assert "'conv_2'" in msg and "conv2" in msg.split("did you mean")[-1], (
        f"the error should name the missing module and suggest conv2: {msg}"
    )
    with pytest.raises(ValueError, match="not part of the model"):
        prunekit.Pruner(model, x, excludes=[nn.Conv2d(3, 8, 1)])
    with pytest.raises(TypeError, match="module names or modules"):
        prunekit.Pruner(model, x, excludes=[3])


def test_unknown_criterion_lists_options():
    model, x = chain()
    with pytest.raises(ValueError) as info:
        prunekit.Pruner(model, x, criterion="l3")
    for name in prunekit.CRITERIA:
        assert name in str(info.value), f"the error should list criterion {name!r}: {info.value}"
    pruner = prunekit.Pruner(model, x)
    with pytest.raises(ValueError) as info:
        pruner.plan(0.5, criterion="magic")
    assert "'magic'" in str(info.value) and all(n in str(info.value) for n in prunekit.CRITERIA), (
        f"plan(criterion=...) should name the bad criterion and the options: {info.value}"
    )


def test_misuse_of_saved_artifacts(tmp_path):
    model, x = chain()
    with pytest.raises(ValueError, match="not sparse"):
        prunekit.to_slim(model)
    pruner = prunekit.Pruner(model, x)
    slim = pruner.prune(0.5, mode="slim")
    prunekit.save_slim(slim, tmp_path / "slim")
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="does not have"):
        prunekit.load_slim(other, tmp_path / "slim")
    with pytest.raises(FileNotFoundError, match="spec.json"):
        prunekit.load_slim(chain()[0], tmp_path)
    with pytest.raises(ValueError, match="already slim"):
        prunekit.to_slim(slim, prunekit.get_plan(model))
    with pytest.raises(ValueError, match="plan does not match the model"):
        prunekit.apply_plan(slim, prunekit.get_plan(model))


# ----- never prune every channel ----------------------------------------------------------
class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(3, 2, 1)
        self.big = nn.Conv2d(3, 14, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(F.relu(torch.cat([self.small(x), self.big(x)], 1)))


@pytest.mark.parametrize("round_to", [1, 4])
def test_pruning_almost_everything_keeps_a_channel(round_to):
    torch.manual_seed(0)
    model, x = TwoBranch().eval(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():  # the small branch scores lowest: all of it would go first
        model.small.weight.mul_(1e-3)
        model.small.bias.zero_()
    pruner = prunekit.Pruner(model, x)
    assert [g.n_units for g in pruner.prunable_groups] == [16], (
        f"expected one group of 16 channels: {pruner.prunable_groups}"
    )
    slim = pruner.prune(0.99, mode="slim", round_to=round_to)
    assert slim.small.out_channels >= 1, "the small branch lost every channel"
    assert slim.big.out_channels >= 1, "the big branch lost every channel"
    kept = slim.small.out_channels + slim.big.out_channels
    assert kept == slim.out.in_channels, f"concat width {kept} != consumer width {slim.out.in_channels}"
    if round_to > 1:
        assert kept % round_to == 0, f"round_to={round_to} but {kept} channels kept"
    else:
        assert kept == 2, f"0.99 of 16 removes 15, but each branch keeps one: 2 expected, got {kept}"
    for n, t in slim.state_dict().items():
        assert all(s >= 1 for s in t.shape), f"{n} has an empty dim {tuple(t.shape)}"
    assert_equivalent(run(model, x), run(slim, x), "slim vs sparse at 99%")


def test_every_group_keeps_a_channel_at_high_ratio():
    model, x = chain()
    pruner = prunekit.Pruner(model, x)
    slim = pruner.prune(0.999, mode="slim")
    for name in ("conv1", "conv2", "conv3"):
        assert getattr(slim, name).out_channels == 1, f"{name} should keep exactly one channel"
    assert_equivalent(run(model, x), run(slim, x), "slim vs sparse at 99.9%")


# ----- ops without a rule, custom layers -----------------------------------------------------
@torch.library.custom_op("prunekit_tests::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _twice_fake(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x):
        return twice(x) + 1


class WithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.mystery = Mystery()
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(self.mystery(self.a(x)))))


def test_custom_op_without_rule_is_kept_with_a_warning():
    torch.manual_seed(0)
    model, x = WithCustomOp().eval(), torch.randn(2, 3, 5, 5)
    pruner = prunekit.Pruner(model, x)
    warned = [w for w in pruner.warnings if "twice" in w]
    assert warned, f"expected a warning naming the op 'twice', got {pruner.warnings}"
    assert "mystery" in warned[0], f"the warning should name the module 'mystery': {warned[0]}"
    assert "mystery" in pruner.summary() and "twice" in pruner.summary(), "summary() should repeat the warning"
    a_group = next(g for g in pruner.groups if any(m.name == "a.weight" and m.dim == 0 for m in g.members))
    assert not a_group.prunable, f"channels through the unknown op must stay: {a_group}"
    assert any("twice" in r for r in a_group.reasons), f"the group should say why: {a_group.reasons}"
    assert pruner.prunable_groups, "the rest of the model (b -> c) should stay prunable"
    slim = pruner.prune(0.5, mode="slim")
    assert slim.a.out_channels == 8 and slim.b.in_channels == 8, "channels through the unknown op were pruned"
    assert slim.b.out_channels == 4, "b -> c should be pruned to half"
    assert_equivalent(run(model, x), run(slim, x), "slim vs sparse with an unknown op")


class ScaleI0(nn.Module):
    """A custom layer whose forward uses an op without a channel rule."""

    def __init__(self, c: int):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.special.i0(x) * self.w[:, None, None]


class WithCustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = ScaleI0(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.scale(self.a(x) * 0.1))


def _handler_calls():
    calls = []

    def handler(tr, mod, args, kwargs, out):
        calls.append((mod, tuple(a.shape for a in args), tuple(out.shape)))
        ids, _ = tr.get(args[0])[1]
        tr.union(ids, tr.dim_ids(mod.w, 0))
        tr.set(out, {1: (ids, True)})  # pruned channels of w are zero, so are the outputs

    return calls, handler


def test_register_module_handler_for_a_custom_layer():
    torch.manual_seed(0)
    model, x = WithCustomLayer().eval(), torch.randn(2, 3, 5, 5)
    before = prunekit.Pruner(model, x)
    assert not before.prunable_groups, "without a handler nothing passes the custom layer"
    assert any("special_i0" in w and "scale" in w for w in before.warnings), (
        f"expected a warning naming special_i0 in module 'scale': {before.warnings}"
    )
    calls, handler = _handler_calls()
    prunekit.register_module_handler(ScaleI0, handler)
    try:
        pruner = prunekit.Pruner(model, x)
        assert calls and calls[0][0] is model.scale, "the handler was not called with the module"
        assert calls[0][1] == ((2, 8, 5, 5),) and calls[0][2] == (2, 8, 5, 5), f"handler got {calls[0]}"
        assert not pruner.warnings, f"the handler should replace the untraced ops: {pruner.warnings}"
        group = next(g for g in pruner.groups if any(m.name == "scale.w" for m in g.members))
        assert group.prunable, f"the custom layer's group should be prunable: {group}"
        assert {m.name for m in group.members} >= {"a.weight", "a.bias", "scale.w", "b.weight"}, (
            f"the handler's coupling is missing: {group}"
        )
        slim = pruner.prune(0.5, mode="slim")
        assert slim.scale.w.shape == (4,) and slim.a.out_channels == 4 and slim.b.in_channels == 4, (
            f"custom layer not pruned: w {tuple(slim.scale.w.shape)}, a {slim.a.out_channels}"
        )
        assert_equivalent(run(model, x), run(slim, x), "slim vs sparse through a custom layer")
    finally:
        MODULE_HANDLERS.pop(ScaleI0, None)
    assert not prunekit.Pruner(WithCustomLayer().eval(), x).prunable_groups, "the handler leaked"


# ----- ignored modules --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["name", "module"])
def test_ignored_modules_untouched(how):
    model, x = chain()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = prunekit.Pruner(model, x, excludes=["conv2"] if how == "name" else [model.conv2])
    for g in pruner.groups:
        if any(m.module == "conv2" for m in g.members):
            assert not g.prunable, f"a group of the ignored conv2 is prunable: {g}"
            assert any("'conv2' is excluded" in r for r in g.reasons), f"no reason given: {g.reasons}"
    slim = pruner.prune(0.5, mode="slim")
    assert torch.equal(slim.conv2.weight, original["conv2.weight"]), "the ignored conv2 weight changed"
    assert torch.equal(slim.conv2.bias, original["conv2.bias"]), "the ignored conv2 bias changed"
    assert torch.equal(model.conv2.weight, original["conv2.weight"]), "the ignored conv2 was zeroed in place"
    assert slim.conv3.out_channels == 8, "conv3 -> conv4 is not ignored and should be pruned"
    assert_equivalent(run(model, x), run(slim, x), "slim vs sparse with an ignored module")


def test_ignoring_a_parent_ignores_its_children():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    ).eval()
    x = torch.randn(1, 3, 4, 4)
    pruner = prunekit.Pruner(model, x, excludes=["0"])
    slim = pruner.prune(0.5, mode="slim")
    assert slim[0][0].out_channels == 8 and slim[0][2].out_channels == 8, "children of an ignored module were pruned"
    assert slim[2].out_channels == 4, "the layer outside the ignored module should be pruned"


# ----- widths the tracer cannot see -------------------------------------------------------
class HardCodedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)
        self.c = nn.Linear(6, 8)
        self.d = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x)).reshape(x.shape[0], 4, 4).reshape(x.shape[0], 16)  # 16 hard-coded
        return self.b(h) + self.d(F.relu(self.c(x)))


class HiddenScale(nn.Module):
    """Attention whose scale is computed from the (prunable) width at run time."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.c = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.out2 = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        return self.out(attn.softmax(-1) @ v) + self.out2(F.relu(self.c(x)))


def _hidden(name):
    if name in KNOWN_LIMITATIONS:
        return build_limitation(name)
    torch.manual_seed(0)
    cls = {"hard_coded_reshape": HardCodedReshape, "hidden_scale": HiddenScale}[name]
    return cls().eval(), torch.randn(2, 5, 6) if cls is HiddenScale else torch.randn(2, 6)


@pytest.mark.parametrize(
    "name, error",
    [
        ("hard_coded_reshape", "fails on the example inputs"),
        ("hidden_scale", "differs from the sparse model"),
        *[(n, "differs from the sparse model") for n in KNOWN_LIMITATIONS],
    ],
)
def test_validate_freezes_what_tracing_cannot_see(name, error):
    model, x = _hidden(name)
    pruner = prunekit.Pruner(model, x)
    pruner.prune(0.5)
    with pytest.raises(RuntimeError) as info:
        pruner.transform()
    assert error in str(info.value) and "validate()" in str(info.value), (
        f"transform() should refuse a wrong slim model and point to validate(): {info.value}"
    )
    model, x = _hidden(name)
    pruner = prunekit.Pruner(model, x)
    frozen = pruner.validate(0.5)
    assert frozen, "validate() found nothing to freeze"
    for g in frozen:
        assert not g.prunable and g.reasons[0].startswith("validation:"), f"frozen group without reason: {g}"
    assert pruner.prunable_groups, "validate() froze every group"
    slim = pruner.prune(0.5, mode="slim")  # raises if slim != sparse
    assert shrunk(model, slim), "after validate() the other groups should still be pruned"
    assert_equivalent(run(model, x), run(slim, x), f"{name}: slim vs sparse after validate()")


class CachedGrid(nn.Module):
    """Caches a tensor as a plain attribute in its first forward (as a detector caches anchors) and
    reuses it while the input shape stays: a meta-device run then mixes meta and cpu tensors."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.grid = torch.empty(0)
        self.shape = None

    def forward(self, x):
        y = self.head(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        if self.shape != y.shape:
            self.grid = torch.arange(y.shape[-1], dtype=y.dtype).expand(y.shape[-2:])
            self.shape = y.shape
        return y + self.grid


def test_validate_ignores_device_mismatch_of_cached_tensors():
    """Regression: after one forward, the structural pass met the cached grid (cpu) on the meta
    device, counted ``Tensor on device meta is not on the expected device cpu!`` as a shape error
    ("expected") and froze every group, silently."""
    from prunekit.engine.pruner import is_device_error, is_shape_error

    torch.manual_seed(0)
    model, x = CachedGrid().eval(), torch.randn(2, 3, 8, 8)
    model(x)  # the first forward caches self.grid on the cpu
    pruner = prunekit.Pruner(model, x)
    n = len(pruner.prunable_groups)
    assert n == 2, pruner.summary()
    frozen = pruner.validate(0.5)
    assert frozen == [], f"validate() froze {[g.reasons[0] for g in frozen]}"
    assert len(pruner.prunable_groups) == n
    slim = pruner.prune(0.5, mode="slim")
    assert shrunk(model, slim)
    exc = RuntimeError("Tensor on device meta is not on the expected device cpu!")
    assert is_device_error(exc) and not is_shape_error(exc)
    assert is_shape_error(RuntimeError("Expected weight of size [8, 16, 3, 3], got input of 12 channels"))


class OnlyHardCoded(nn.Module):
    """One prunable group, and its width is hard-coded in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)).reshape(x.shape[0], 4, 4).reshape(x.shape[0], 16))


def test_validate_that_freezes_everything_warns():
    torch.manual_seed(0)
    model, x = OnlyHardCoded().eval(), torch.randn(2, 6)
    pruner = prunekit.Pruner(model, x)
    with pytest.warns(UserWarning, match=r"validation froze all \d+ prunable channel groups") as rec:
        frozen = pruner.validate(0.5)
    assert frozen and not pruner.prunable_groups
    assert "first reasons: validation" not in str(rec[0].message)  # the reasons themselves, not prefixes
    assert "the slim model fails" in str(rec[0].message) and pruner.warnings[-1] == str(rec[0].message)


def test_transform_enforces_the_stated_tolerance(monkeypatch):
    """``|d| <= TOLERANCE * (1 + M)``; max_error is ``|d| / (1 + M)``: 1.5x the bound is refused."""
    model, x = chain()
    pruner = prunekit.Pruner(model, x)
    pruner.prune(0.5)
    too_big = 1.5 * prunekit.TOLERANCE
    monkeypatch.setattr(prunekit.engine.equivalence, "equivalence_error", lambda *a: too_big)
    with pytest.raises(RuntimeError, match=re.escape(f"{too_big:.3g}")):
        pruner.transform()


# ----- renamed arguments: the old names work for one release, with a warning ----------------
def test_ignore_is_a_deprecated_alias_of_excludes():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(DeprecationWarning, match=r"Pruner\(ignore=\.\.\.\) is deprecated: use excludes="):
        old = prunekit.Pruner(model, x, ignore=["2"])
    new = prunekit.Pruner(model, x, excludes=["2"])
    assert [g.prunable for g in old.groups] == [g.prunable for g in new.groups]
    assert sum(g.prunable for g in new.groups) < sum(g.prunable for g in prunekit.Pruner(model, x).groups)
    with pytest.raises(TypeError, match="both ignore= and excludes="):
        prunekit.Pruner(model, x, ignore=["2"], excludes=["0"])


def test_ratio_is_a_deprecated_alias_of_channel_ratio():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    pruner = prunekit.Pruner(model, x)
    with pytest.warns(DeprecationWarning, match=r"Pruner.plan\(ratio=\.\.\.\) is deprecated: use channel_ratio="):
        old = pruner.plan(ratio=0.5)
    assert old.pruned == pruner.plan(channel_ratio=0.5).pruned == pruner.plan(0.5).pruned
    with pytest.raises(TypeError, match="needs channel_ratio"):
        pruner.plan()
    with pytest.warns(DeprecationWarning, match="Pruner.prune"):
        pruner.prune(ratio=0.5)
    assert model[0].weight.shape[0] == 8 and (model[0].weight.flatten(1).abs().sum(1) == 0).sum() == 4
