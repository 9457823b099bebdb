"""Sensitivity analysis (``ana``): resumable, cached, invalidated on change, split over ranks.

The model is a small DemoNet (4 prunable groups) on random 1x8x8 inputs; the metric is the
cross-entropy against the unpruned model's own predictions (continuous and deterministic),
built with :func:`prunekit.make_eval_fn`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunekit
from helpers import randomize_batchnorm
from prunekit.graph.trace import single_thread
from prunekit.models.demo import DemoNet
from prunekit.workflow.ana import Sensitivity
from prunekit.workflow.evaluation import make_eval_fn

RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a busy machine."""
    with single_thread():
        yield


def demo(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_batchnorm(DemoNet(1, 10, width=8, blocks=1)).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    return model, x[:2], loader


class Counting:
    """An eval_fn that counts the calls that returned, and interrupts the run after ``stop_after`` of them."""

    def __init__(self, loader, stop_after: int | None = None):
        self.inner = make_eval_fn(loader, "loss")
        self.lower_is_better = True
        self.calls = 0
        self.stop_after = stop_after

    def __call__(self, model):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt(f"interrupted after {self.calls} evaluations")
        value = self.inner(model)
        self.calls += 1
        return value


def run_ana(model, x, eval_fn, ws, **kw):
    kw.setdefault("ratios", RATIOS)
    kw.setdefault("progress", False)
    kw.setdefault("lower_is_better", True)
    kw.setdefault("collapse", None)
    logs: list[str] = []
    sens = prunekit.ana(model, x, eval_fn, workspace=ws, log=logs.append, **kw)
    return sens, logs


def n_points(model, x, ratios=RATIOS, excludes=()) -> int:
    return len(prunekit.Pruner(model, x, excludes=excludes).prunable_groups) * len(ratios)


def assert_same(a: Sensitivity, b: Sensitivity, what: str) -> None:
    assert a.baseline == pytest.approx(b.baseline, rel=1e-9, abs=1e-12), (
        f"{what}: baselines differ ({a.baseline} vs {b.baseline})"
    )
    assert set(a.curves) == set(b.curves), f"{what}: analysed groups differ: {sorted(a.curves)} vs {sorted(b.curves)}"
    for g in a.curves:
        assert set(a.curves[g]) == set(b.curves[g]), f"{what}: group {g} has ratios {a.curves[g]} vs {b.curves[g]}"
        for r in a.curves[g]:
            assert a.curves[g][r] == pytest.approx(b.curves[g][r], rel=1e-6, abs=1e-9), (
                f"{what}: group {g} at ratio {r}: {a.curves[g][r]} vs {b.curves[g][r]}"
            )
    assert a.labels == b.labels and a.sizes == b.sizes, f"{what}: labels or sizes differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process analysis of ``demo()``, and its number of eval calls."""
    model, x, loader = demo()
    fn = Counting(loader)
    sens, _ = run_ana(model, x, fn, tmp_path_factory.mktemp("reference"))
    return sens, fn.calls


# ----- resume, cache ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 6])
def test_interrupted_analysis_resumes_without_recomputing(tmp_path, reference, k):
    model, x, loader = demo()
    total = n_points(model, x)
    assert total == 12, f"the demo model should have 4 prunable groups x 3 ratios, got {total} points"
    ref, ref_calls = reference
    assert ref_calls == total + 1, (
        f"an uninterrupted run evaluates every point and the baseline once, got {ref_calls} calls for {total} points"
    )

    ws = tmp_path / "ws"
    first = Counting(loader, stop_after=k)
    with pytest.raises(KeyboardInterrupt):
        run_ana(model, x, first, ws)
    assert first.calls == k, f"the interrupted run should have made {k} calls, made {first.calls}"
    if k > 0:
        saved = json.loads((ws / "ana.json").read_text())
        assert len(saved["points"]) == k - 1, (
            f"every evaluated point must be on disk at once: {len(saved['points'])} saved after {k - 1} points"
        )
    second = Counting(loader)
    resumed, logs = run_ana(model, x, second, ws)
    assert first.calls + second.calls == total + 1, (
        f"resuming recomputed points: {first.calls} + {second.calls} evaluations for {total} points and one baseline"
    )
    assert_same(resumed, ref, "resumed vs uninterrupted")
    if k > 1:
        assert any("reusing" in m for m in logs), f"resuming should say it reuses points; logs: {logs}"
    # the model is restored after every point
    fresh, _, _ = demo()
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), f"ana changed {n} of the model"


def test_resume_keeps_a_collapsed_curve_collapsed(tmp_path, reference):
    model, x, loader = demo()
    full, _ = reference
    g0 = min(full.curves)
    first_loss = full._rel(full.curves[g0][RATIOS[0]])
    assert first_loss > 0, f"group {g0} should lose something at {RATIOS[0]}: {full.curves[g0]}"
    collapse = first_loss / 2  # group g0 collapses at its first ratio
    ref_fn = Counting(loader)
    ref, _ = run_ana(model, x, ref_fn, tmp_path / "ref", collapse=collapse)
    assert ref_fn.calls < n_points(model, x) + 1, "collapse should have skipped some evaluations"
    assert ref.curves[g0][RATIOS[-1]] == ref.curves[g0][RATIOS[0]], (
        f"the remaining ratios of a collapsed curve record the collapsed value: {ref.curves[g0]}"
    )

    ws = tmp_path / "ws"
    first = Counting(loader, stop_after=2)  # baseline + g0's first (collapsing) point
    with pytest.raises(KeyboardInterrupt):
        run_ana(model, x, first, ws, collapse=collapse)
    second = Counting(loader)
    resumed, _ = run_ana(model, x, second, ws, collapse=collapse)
    assert first.calls + second.calls == ref_fn.calls, (
        f"resuming evaluated {first.calls + second.calls} points, an uninterrupted run {ref_fn.calls}"
    )
    assert_same(resumed, ref, "resumed vs uninterrupted (with collapse)")

    # stopped right after the collapsing point was saved, before the rest of its curve was filled in
    cut = tmp_path / "cut"
    run_ana(model, x, Counting(loader), cut, collapse=collapse)
    data = json.loads((cut / "ana.json").read_text())
    fillers = [f"{g0}/{r}" for r in RATIOS[1:]]
    assert set(fillers) <= set(data["collapsed"]), f"{fillers} should be recorded as collapsed: {data['collapsed']}"
    for key in fillers:
        del data["points"][key]
    data["collapsed"] = [k for k in data["collapsed"] if k not in fillers]
    (cut / "ana.json").write_text(json.dumps(data))
    third = Counting(loader)
    again, _ = run_ana(model, x, third, cut, collapse=collapse)
    assert third.calls == 0, f"the rest of a collapsed curve needs no evaluation on resume, made {third.calls} calls"
    assert_same(again, ref, "resumed after the collapse point vs uninterrupted")


def test_second_call_reuses_results_unless_forced(tmp_path):
    model, x, loader = demo()
    first = Counting(loader)
    a, _ = run_ana(model, x, first, tmp_path)
    again = Counting(loader)
    b, logs = run_ana(model, x, again, tmp_path)
    assert again.calls == 0, f"a second call should evaluate nothing, made {again.calls} calls"
    assert any("reusing 12" in m for m in logs), f"the reuse should be reported: {logs}"
    assert_same(a, b, "cached vs computed")
    reordered = Counting(loader)
    run_ana(model, x, reordered, tmp_path, ratios=tuple(reversed(RATIOS)))
    assert reordered.calls == 0, "the same ratios in another order are the same analysis"
    forced = Counting(loader)
    c, _ = run_ana(model, x, forced, tmp_path, forced=True)
    assert forced.calls == first.calls, (
        f"forced=True should recompute all {first.calls} evaluations, made {forced.calls}"
    )
    assert_same(a, c, "forced vs first")


def _perturb(model):
    with torch.no_grad():
        model.stem[0].weight.mul_(1.01)


@pytest.mark.parametrize(
    "change, phrase",
    [
        ("weights", "the model's weights"),
        ("excludes", "the excludes"),
        ("ratios", "the ratios"),
    ],
)
def test_cache_invalidated_when_model_excludes_or_ratios_change(tmp_path, change, phrase):
    model, x, loader = demo()
    run_ana(model, x, Counting(loader), tmp_path)
    kw: dict = {}
    if change == "weights":
        _perturb(model)
    elif change == "excludes":
        kw["excludes"] = ["stage2.0.conv2"]
    else:
        kw["ratios"] = (0.3, 0.6)
    again = Counting(loader)
    sens, logs = run_ana(model, x, again, tmp_path, **kw)
    expected = n_points(model, x, kw.get("ratios", RATIOS), kw.get("excludes", ())) + 1
    assert again.calls == expected, (
        f"after changing {change}, every point should be recomputed: {again.calls} evaluations, expected {expected}"
    )
    stale = [m for m in logs if "stale" in m]
    assert stale and phrase in stale[0], f"changing {change} should be reported as stale ({phrase!r}); logs: {logs}"
    assert sens.ratios == sorted(kw.get("ratios", RATIOS)), f"the new ratios should be used, got {sens.ratios}"


# ----- several processes -----------------------------------------------------------------
def test_ranks_merge_into_the_same_workspace(tmp_path, reference):
    model, x, loader = demo()
    single, _ = reference
    ws = tmp_path / "split"
    r0 = Counting(loader, stop_after=3)  # rank 0 is interrupted before its first merge ...
    with pytest.raises(KeyboardInterrupt):
        run_ana(model, x, r0, ws, rank=0, world_size=2)
    assert not (ws / "ana.json").exists(), "no merged file is expected before a rank finishes"
    r0b = Counting(loader)
    part, _ = run_ana(model, x, r0b, ws, rank=0, world_size=2)  # ... and resumes from its own file
    groups = [g.id for g in prunekit.Pruner(model, x).prunable_groups]
    mine = groups[0::2]
    assert r0.calls + r0b.calls == 1 + len(mine) * len(RATIOS), (
        f"rank 0 owns groups {mine}: expected {1 + len(mine) * len(RATIOS)} evaluations over its two runs, "
        f"got {r0.calls} + {r0b.calls}"
    )
    assert sorted(part.curves) == mine, f"after rank 0 alone, only its groups {mine} are known: {sorted(part.curves)}"
    r1 = Counting(loader)
    merged, _ = run_ana(model, x, r1, ws, rank=1, world_size=2)
    assert r1.calls == len(groups[1::2]) * len(RATIOS), (
        f"rank 1 should evaluate only its groups {groups[1::2]} (baseline reused), made {r1.calls} calls"
    )
    assert (ws / "ana.rank0.json").exists() and (ws / "ana.rank1.json").exists(), "each rank writes its own file"
    assert_same(merged, single, "two ranks merged vs one process")
    # a later single-process call finds everything
    again = Counting(loader)
    cached, _ = run_ana(model, x, again, ws)
    assert again.calls == 0, f"the merged workspace should serve a single-process call, made {again.calls} calls"
    assert_same(cached, single, "merged workspace reread")


def test_rank_out_of_range(tmp_path):
    model, x, loader = demo()
    with pytest.raises(ValueError, match="rank must be in"):
        run_ana(model, x, Counting(loader), tmp_path, rank=2, world_size=2)


# ----- cost bounds, outputs --------------------------------------------------------------
def test_collapse_stops_a_curve_early(tmp_path):
    model, x, loader = demo()
    fn = Counting(loader)
    sens, _ = run_ana(model, x, fn, tmp_path, collapse=0.0)
    total = n_points(model, x)
    assert fn.calls < total + 1, f"collapse=0 should skip points after the first loss, made {fn.calls} calls"
    saved = json.loads((tmp_path / "ana.json").read_text())
    skipped = saved.get("collapsed", [])
    assert len(skipped) == total + 1 - fn.calls, (
        f"{len(skipped)} points are marked collapsed but {total + 1 - fn.calls} were skipped"
    )
    for key in skipped:
        g, r = key.split("/")
        curve = sens.curves[int(g)]
        lost = [v for q, v in sorted(curve.items()) if q < float(r) and sens._rel(v) > 0]
        assert lost and curve[float(r)] == lost[0], f"collapsed point {key} should repeat the collapsed value: {curve}"


def test_table_plot_and_progress(tmp_path, capsys, monkeypatch):
    model, x, loader = demo()
    monkeypatch.setattr("prunekit.workflow.progress.interactive", lambda: True)  # as on a terminal
    sens, logs = run_ana(model, x, Counting(loader), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "ana" in err and "<" in err, f"a progress bar with an ETA (elapsed<remaining) is expected: {err!r:.300}"
    assert not [m for m in logs if m.startswith("ana: group")], "a bar replaces the per-group lines"
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000, "sensitivity.png should be written"
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert Sensitivity.from_dict(data).curves == sens.curves, "sensitivity.json should round-trip"
    order = sens.order()
    means = [sum(sens._rel(v) for v in sens.curves[g].values()) / len(RATIOS) for g in order]
    assert means == sorted(means, reverse=True), f"order() must put the most sensitive first: {means}"
    rows = [line.split()[0] for line in sens.table().splitlines()[3:]]
    assert rows == [str(g) for g in order], f"the table should list groups most sensitive first: {rows} vs {order}"
    assert sens.labels[order[0]] in sens.table(), "the table should name each group's layer"


def test_loss_interpolates_and_is_infinite_past_the_curve():
    sens = Sensitivity(1.0, False, [0.2, 0.4], {0: {0.2: 0.9, 0.4: 0.5}})
    assert sens.loss(0, 0.0) == 0.0, "no pruning costs nothing"
    assert sens.loss(0, 0.1) == pytest.approx(0.05), "linear from 0 to the first point"
    assert sens.loss(0, 0.3) == pytest.approx(0.3), "linear between points"
    assert sens.loss(0, 0.4) == pytest.approx(0.5)
    assert math.isinf(sens.loss(0, 0.5)), "beyond the analysed ratios the loss is unknown (inf)"
    assert math.isinf(sens.loss(7, 0.1)), "a group that was not analysed cannot be pruned"


def test_loss_fits_a_noisy_curve_non_decreasing():
    # losses 0.3, 0.1, 0.4: the point at 0.4 happened to score well (noise)
    curve = {0.2: 0.7, 0.4: 0.9, 0.6: 0.6}
    iso = Sensitivity(1.0, False, [0.2, 0.4, 0.6], {0: dict(curve)})
    assert iso.loss(0, 0.2) == pytest.approx(0.2) and iso.loss(0, 0.4) == pytest.approx(0.2), (
        "the violating pair should be pooled to its mean"
    )
    assert iso.loss(0, 0.6) == pytest.approx(0.4), "a point that violates nothing keeps its value"
    losses = [iso.loss(0, r / 100) for r in range(61)]
    assert all(b >= a - 1e-12 for a, b in zip(losses, losses[1:])), "more pruning never predicts less loss"
    mx = Sensitivity(1.0, False, [0.2, 0.4, 0.6], {0: dict(curve)}, fit="running_max")
    assert mx.loss(0, 0.4) == pytest.approx(0.3), "running_max carries the high point forward"
    assert Sensitivity.from_dict(mx.to_dict()).fit == "running_max", "the fit should round-trip"
    assert Sensitivity.from_dict({k: v for k, v in iso.to_dict().items() if k != "fit"}).fit == "isotonic"
    with pytest.raises(ValueError, match="fit='smooth' is not one of isotonic, running_max"):
        Sensitivity(1.0, False, [0.2], {0: {0.2: 0.9}}, fit="smooth")


def test_isotonic_fit_lets_one_unlucky_point_cost_less_allocation():
    """Two groups with the same true curve; one measured point of group 0 came out far too low.

    The running maximum holds that point's loss over every larger ratio, so group 0 is spared
    far more than group 1; the isotonic fit pools it with its neighbours and the two end closer.
    """
    from prunekit.engine.allocate import MacsModel, equal_loss

    ratios = [0.1 * i for i in range(1, 10)]
    true = {r: 1.0 - 0.5 * r * r for r in ratios}
    noisy = dict(true)
    noisy[ratios[1]] = true[ratios[1]] - 0.15  # one unlucky evaluation at 0.2
    mm = MacsModel([100.0, 100.0], [[0], [1]], total=200.0, n_groups=2)
    got = {}
    for fit in ("running_max", "isotonic"):
        sens = Sensitivity(1.0, False, ratios, {0: noisy, 1: dict(true)}, fit=fit)
        r = equal_loss(mm, [0, 1], sens.loss, {0: 0.9, 1: 0.9}, target_macs=100.0)
        got[fit] = abs(r.get(0, 0.0) - r.get(1, 0.0))
    assert got["isotonic"] < got["running_max"] - 0.05, got


# ----- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["high", None, [0.5], torch.ones(3)])
def test_eval_fn_must_return_a_number(tmp_path, bad):
    model, x, _ = demo()
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        prunekit.ana(model, x, lambda m: bad, workspace=tmp_path, progress=False, log=lambda s: None)
    assert not (tmp_path / "ana.json").exists(), "nothing should be cached from a failed baseline"


def test_eval_fn_nan_and_not_callable(tmp_path):
    model, x, _ = demo()
    with pytest.raises(ValueError, match="NaN"):
        prunekit.ana(model, x, lambda m: float("nan"), workspace=tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(TypeError, match="eval_fn must be callable"):
        prunekit.ana(model, x, 0.5, workspace=tmp_path, progress=False)


def test_tensor_scalar_is_accepted(tmp_path):
    model, x, _ = demo()
    sens = prunekit.ana(
        model, x, lambda m: torch.tensor(0.5), workspace=tmp_path, ratios=(0.5,), progress=False, log=lambda s: None
    )
    assert sens.baseline == 0.5, f"a one-element tensor is a number, got baseline {sens.baseline}"


def test_unknown_module_in_excludes(tmp_path):
    model, x, loader = demo()
    with pytest.raises(ValueError, match=r"'stage2\.0\.conv9' does not exist.*did you mean"):
        run_ana(model, x, Counting(loader), tmp_path, excludes=["stage2.0.conv9"])


@pytest.mark.parametrize("ratios", [(), (0.0,), (1.0,), (0.5, 1.2), (-0.1,)])
def test_ratios_must_be_fractions(tmp_path, ratios):
    model, x, loader = demo()
    with pytest.raises(ValueError, match=r"ratios must be fractions in \(0, 1\)"):
        run_ana(model, x, Counting(loader), tmp_path, ratios=ratios)


def test_wrong_metric_direction_is_reported(tmp_path):
    model, x, loader = demo()
    _, logs = run_ana(model, x, Counting(loader), tmp_path, ratios=(0.5,), lower_is_better=False)
    assert any("lower_is_better" in m and "warning" in m for m in logs), (
        f"a loss eval_fn analysed as higher-is-better should be reported: {logs}"
    )


def test_excluded_groups_are_not_analysed(tmp_path):
    model, x, loader = demo()
    sens, _ = run_ana(model, x, Counting(loader), tmp_path, excludes=["stage2.0.conv2"])
    pruner = prunekit.Pruner(model, x, excludes=["stage2.0.conv2"])
    fixed = [g.id for g in pruner.groups if not g.prunable]
    assert fixed and not set(fixed) & set(sens.curves), (
        f"groups {fixed} keep their channels and must not be analysed; analysed {sorted(sens.curves)}"
    )


def test_sparse_model_is_analysed_on_top_of_its_masks(tmp_path):
    model, x, loader = demo()
    pruner = prunekit.Pruner(model, x)
    pruner.prune({pruner.prunable_groups[0].id: 0.5})
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    run_ana(model, x, Counting(loader), tmp_path, ratios=(0.5,))
    assert prunekit.engine.sparse.is_sparse(model), "the model's own masks must be restored"
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), f"ana changed {n} of a sparse model"
    with torch.no_grad():
        assert torch.equal(model(x), out), "the sparse model computes something else after ana"


def test_verbs_are_exported():
    import importlib

    assert callable(prunekit.ana) and callable(prunekit.prune), "prunekit.ana and prunekit.prune are the verbs"
    assert prunekit.prune.__module__ == "prunekit.workflow.prune", prunekit.prune.__module__
    assert prunekit.ana.__module__ == "prunekit.workflow.ana", prunekit.ana.__module__
    mod = importlib.import_module("prunekit.workflow.prune")
    assert mod.PruneResult is prunekit.PruneResult, "the module stays importable for everything else"
    assert prunekit.make_eval_fn is make_eval_fn


def test_ana_accepts_its_config(tmp_path):
    """``ana(..., config=AnaConfig(...))`` takes its ratios (and the rest) from the config."""
    from prunekit.workflow.options import AnaConfig

    model, x, loader = demo()
    cfg = AnaConfig(ratios=[0.25, 0.5], collapse=None, fast=False)
    sens, _ = run_ana(model, x, Counting(loader), tmp_path, ratios=[0.25, 0.5], config=cfg)
    assert sens.ratios == [0.25, 0.5] and all(set(c) == {0.25, 0.5} for c in sens.curves.values())
    with pytest.raises(TypeError, match="config.ratios"):
        run_ana(model, x, Counting(loader), tmp_path / "b", ratios=[0.3], config=AnaConfig(ratios=[0.25]))
