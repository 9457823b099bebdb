"""Every zoo topology: group building, sparse == slim, counts, training, saving and loading."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from helpers import assert_equivalent, assert_identical, float_tensors, loss_of, run, shrunk
from prunekit.engine.sparse import get_tensor
from prunekit.graph.trace import call_model
from zoo import KNOWN_LIMITATIONS, MUST_SHRINK, UNPRUNABLE, ZOO, build, build_limitation

PRUNABLE = [n for n in ZOO if n not in UNPRUNABLE]
RATIO = 0.5


def pruned(name: str):
    """The sparse model of a zoo case at 50%, its pruner, inputs and slim model."""
    model, inputs = build(name)
    pruner = prunekit.Pruner(model, inputs)
    assert pruner.prunable_groups, f"{name}: no prunable group; warnings: {pruner.warnings}; groups:\n" + "\n".join(
        g.describe() for g in pruner.groups
    )
    out = pruner.prune(RATIO, mode="sparse")
    assert out is model, f"{name}: prune(mode='sparse') must prune the model in place"
    slim = prunekit.to_slim(model)
    return model, inputs, pruner, slim


def test_zoo_is_complete():
    missing = [n for n in ZOO if n not in UNPRUNABLE and n not in MUST_SHRINK]
    assert not missing, f"zoo cases without expected shrinking tensors: {missing}"


@pytest.mark.parametrize("name", list(ZOO))
def test_groups(name):
    model, inputs = build(name)
    pruner = prunekit.Pruner(model, inputs)
    assert pruner.groups, f"{name}: no channel groups at all"
    for g in pruner.groups:
        assert g.n_units >= 1 and all(m.unit.numel() == m.size for m in g.members), (
            f"{name}: malformed group {g.describe()}"
        )
        if not g.prunable and g.n_units > 1:
            assert g.reasons, f"{name}: group {g.id} is not prunable but gives no reason:\n{g.describe()}"
    if name in UNPRUNABLE:
        fragment = UNPRUNABLE[name]
        assert not pruner.prunable_groups, (
            f"{name} is meant to be unprunable, got {[g.describe() for g in pruner.prunable_groups]}"
        )
        assert any(fragment in w for w in pruner.warnings), (
            f"{name}: expected a warning containing {fragment!r}, got {pruner.warnings}"
        )
        assert any(fragment in r for g in pruner.groups for r in g.reasons), (
            f"{name}: no group gives the reason {fragment!r}"
        )
        assert fragment in pruner.summary(), f"{name}: summary() does not report the warning"
        before = run(model, inputs)
        plan = pruner.plan(RATIO)
        assert not plan.pruned, f"{name}: an unprunable model got a non-empty plan {plan.pruned}"
        pruner.prune(RATIO)
        slim = pruner.transform()
        assert not shrunk(model, slim), f"{name}: an unprunable model lost channels"
        assert_identical(before, run(slim, inputs), f"{name}: unprunable model changed by pruning")
    else:
        assert pruner.prunable_groups, f"{name}: no prunable group; warnings: {pruner.warnings}"
        assert not pruner.warnings, f"{name}: unexpected warnings {pruner.warnings}"


@pytest.mark.parametrize("name", PRUNABLE)
def test_slim_equals_sparse(name):
    model, inputs, pruner, slim = pruned(name)
    gone = shrunk(model, slim)
    assert gone, f"{name}: pruning {RATIO:.0%} removed no channel from any tensor"
    missing = [t for t in MUST_SHRINK.get(name, ()) if t not in gone]
    assert not missing, f"{name}: {missing} kept every channel; shrunk: {gone}"
    for n, p in model.named_parameters():
        q = slim.get_parameter(n)
        assert q.requires_grad == p.requires_grad, f"{name}: {n}.requires_grad changed to {q.requires_grad}"
    before, after = prunekit.count(model, inputs), prunekit.count(slim, inputs)
    assert after.macs < before.macs, f"{name}: MACs did not drop ({before.macs} -> {after.macs})"
    assert after.params < before.params, f"{name}: params did not drop ({before.params} -> {after.params})"
    assert_equivalent(run(model, inputs), run(slim, inputs), f"{name}: slim vs sparse")
    err = pruner.equivalence_error(slim)
    assert err <= prunekit.TOLERANCE, f"{name}: Pruner.equivalence_error is {err:.3g}"
    checked = pruner.transform()  # raises when slim != sparse
    assert shrunk(model, checked) == gone, f"{name}: transform() and to_slim() disagree"


@pytest.mark.parametrize("name", PRUNABLE)
def test_backward_on_slim(name):
    _, inputs, _, slim = pruned(name)
    slim.train()
    loss = loss_of(call_model(slim, inputs))
    assert torch.isfinite(loss), f"{name}: slim loss is {float(loss)}"
    loss.backward()
    grads = {n: p.grad for n, p in slim.named_parameters() if p.grad is not None}
    assert grads, f"{name}: backward on the slim model produced no gradient"
    for n, g in grads.items():
        p = dict(slim.named_parameters())[n]
        assert g.shape == p.shape, f"{name}: grad of {n} has shape {tuple(g.shape)}, param {tuple(p.shape)}"
        assert torch.isfinite(g).all(), f"{name}: gradient of {n} is not finite"


@pytest.mark.parametrize("name", PRUNABLE)
def test_spec_reload(name, tmp_path):
    _, inputs, _, slim = pruned(name)
    expected = run(slim, inputs)
    prunekit.save_slim(slim, tmp_path / "slim")
    assert (tmp_path / "slim" / "spec.json").exists(), f"{name}: save_slim wrote no spec.json"
    fresh, _ = build(name)
    loaded = prunekit.load_slim(fresh, tmp_path / "slim")
    assert not shrunk(slim, loaded), f"{name}: reloaded model has other shapes than the slim model"
    assert_identical(expected, run(loaded, inputs), f"{name}: slim model reloaded from spec")


def _pruned_slices(model, plan):
    for name, dims in plan.pruned.items():
        t = get_tensor(model, name)
        for d, idx in dims.items():
            yield name, t, d, torch.tensor(idx, dtype=torch.long)


@pytest.mark.parametrize("name", PRUNABLE)
def test_masks_survive_optimizer_step(name):
    model, inputs, pruner, _ = pruned(name)
    plan = prunekit.get_plan(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=1e-2)
    start = [p.detach().clone() for p in trainable]
    model.train()
    for step in range(2):
        opt.zero_grad()
        loss = loss_of(call_model(model, inputs))
        loss.backward()
        for tname, t, d, idx in _pruned_slices(model, plan):
            if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                g = t.grad.index_select(d, idx)
                assert not g.any(), f"{name} step {step}: gradient of pruned slice {tname}[dim {d}] is non-zero"
        opt.step()
        for tname, t, d, idx in _pruned_slices(model, plan):
            v = t.detach().index_select(d, idx)
            want = 1.0 if tname.endswith("running_var") else 0.0
            assert bool((v == want).all()), (
                f"{name} step {step}: pruned slice {tname}[dim {d}] is {v.flatten()[:4].tolist()} "
                f"after an optimizer step, expected exactly {want}"
            )
    assert any(not torch.equal(a, p.detach()) for a, p in zip(start, trainable)), (
        f"{name}: two optimizer steps changed no weight"
    )
    slim = pruner.transform()  # after training the sparse model still equals its slim model
    assert_equivalent(run(model, inputs), run(slim, inputs), f"{name}: slim vs sparse after training")


@pytest.mark.parametrize("name", ["residual_add", "layernorm", "batchnorm_1d_2d_3d"])
def test_copies_and_pickles_of_a_sparse_model_keep_their_own_masks(name):
    """Regression: a deep copy (an EMA) of a sparse model kept a state bound to the *original*
    model, and pickling it (a training checkpoint) failed on the state's weakref and hooks."""
    import copy
    import io
    import pickle

    model, inputs, pruner, _ = pruned(name)
    plan = prunekit.get_plan(model)
    twin = copy.deepcopy(model)
    blob = pickle.dumps(model)
    if name != "layernorm":  # masked LayerNorms leave (inert) prunekit hooks in the copy
        assert b"prunekit.engine" not in blob, "a pickled sparse model must load without prunekit's classes"
    loaded = pickle.loads(blob)
    buf = io.BytesIO()
    torch.save(twin, buf)  # as a trainer's checkpoint does
    for copy_ in (twin, loaded, torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert prunekit.get_plan(copy_).pruned == plan.pruned
        trainable = [p for p in copy_.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        opt.zero_grad()
        loss_of(call_model(copy_.train(), inputs)).backward()
        opt.step()
        for tname, t, d, idx in _pruned_slices(copy_, plan):
            v = t.detach().index_select(d, idx)
            assert bool((v == (1.0 if tname.endswith("running_var") else 0.0)).all()), (
                f"pruned slice {tname}[dim {d}] of a copy changed in training"
            )
        slim = prunekit.to_slim(copy_)
        assert_equivalent(run(copy_, inputs), run(slim, inputs), "slim vs sparse of a copy")
    assert prunekit.get_plan(model) is plan and sparse_state_model(model) is model


def sparse_state_model(model):
    from prunekit.engine.sparse import bound_state

    return bound_state(model).model_ref()


@pytest.mark.parametrize("name", PRUNABLE)
def test_sparse_save_load(name, tmp_path):
    model, inputs, _, _ = pruned(name)
    expected = run(model, inputs)
    prunekit.save_sparse(model, tmp_path / "sparse")
    fresh, _ = build(name, seed=1)  # other random weights: everything must come from the files
    loaded = prunekit.load_sparse(fresh, tmp_path / "sparse")
    assert prunekit.get_plan(loaded).pruned == prunekit.get_plan(model).pruned, f"{name}: the reloaded plan differs"
    out = run(loaded, inputs)
    assert_identical(expected, out, f"{name}: sparse model reloaded")
    assert all(math.isfinite(float(t.abs().max())) for t in float_tensors(out) if t.numel()), (
        f"{name}: reloaded outputs are not finite"
    )


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=r)) for n, (_, r) in KNOWN_LIMITATIONS.items()]
)
def test_known_limitations_slim_equals_sparse(name):
    """Engine limitations: to_slim() gives a model that differs (transform() refuses it, see test_errors)."""
    model, inputs = build_limitation(name)
    pruner = prunekit.Pruner(model, inputs)
    pruner.prune(RATIO)
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, inputs), run(slim, inputs), f"{name}: slim vs sparse")


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_submodule_called_alone_normalises_like_the_whole_model(norm):
    """A sparse model's norm layer computes its statistics over kept channels also when a
    submodule is called on its own (a detector's head, a backbone as a feature extractor)."""
    import torch.nn as nn

    torch.manual_seed(0)
    if norm == "group":
        block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        model = nn.Sequential(nn.Conv2d(3, 8, 1), block, nn.Conv2d(16, 4, 1)).eval()
        x = torch.randn(2, 3, 6, 6)
    else:
        block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU())
        model = nn.Sequential(nn.Linear(5, 8), block, nn.Linear(16, 4)).eval()
        x = torch.randn(2, 7, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pruner = prunekit.Pruner(model, x)
    pruner.prune(0.5)
    slim = pruner.transform()
    with torch.no_grad():
        h_sparse, h_slim = model[0](x), slim[0](x)
        out_sparse, out_slim = model[1](h_sparse), slim[1](h_slim)
        keep = prunekit.get_plan(model).keep_index("1.0.weight", 0)
        dim = 1 if norm == "group" else -1
        assert_equivalent(out_sparse.index_select(dim, keep), out_slim, f"{norm} norm block called alone")
        assert_equivalent(run(model, x), run(slim, x), "whole model")
