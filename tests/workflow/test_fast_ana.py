"""The fast sensitivity analysis (prunekit.workflow.fast_ana): as good as the full one, for fewer images.

Models are tiny (DemoNet, a width-4 CIFAR ResNet with zero-padding shortcuts) on random inputs;
the labels are the unpruned model's own predictions with 15% replaced at random, so the
baseline accuracy is about 0.87 and pruning lowers it smoothly.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import randomize_batchnorm
from prunekit.graph.trace import single_thread
from prunekit.models.cifar_resnet import cifar_resnet
from prunekit.models.demo import DemoNet
from prunekit.workflow import fast_ana
from prunekit.workflow.ana import Sensitivity
from prunekit.workflow.evaluation import make_eval_fn
from prunekit.workflow.options import ConfigError, FastAnaConfig

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_RUN_CHUNK = fast_ana.FastAnalysis._run_chunk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def data(model, n: int = 1024, batch: int = 64, shape=(1, 8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    noise = torch.rand(n, generator=g) < 0.15
    y = torch.where(noise, torch.randint(0, 10, (n,), generator=g), y)
    return x[:2], [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@functools.cache
def demo(seed: int = 0, width: int = 8):
    """A DemoNet and its data, shared by the tests (ana leaves the model as it was; the tests check it)."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(DemoNet(1, 10, width=width, blocks=2)).eval()
    return (model, *data(model, seed=seed))


@functools.cache
def pruner_of(model, x):
    return prunekit.Pruner(model, x)


def run(model, x, eval_fn, ws, **kw):
    """ana with the test defaults (and one Pruner per model: tracing once is enough)."""
    kw.setdefault("ratios", RATIOS)
    kw.setdefault("progress", False)
    kw.setdefault("pruner", pruner_of(model, x))
    logs: list[str] = []
    sens = prunekit.ana(model, x, eval_fn, workspace=ws, log=logs.append, **kw)
    return sens, logs


class Chunks:
    """Counts FastAnalysis._run_chunk calls (one per evaluated point when variants=1); interrupts after ``stop``."""

    def __init__(self, monkeypatch, stop: int | None = None):
        self.calls, self.stop = 0, stop
        inner = _RUN_CHUNK

        def wrapped(analysis, *a, **k):
            if self.stop is not None and self.calls >= self.stop:
                raise KeyboardInterrupt(f"interrupted after {self.calls} points")
            self.calls += 1
            return inner(analysis, *a, **k)

        monkeypatch.setattr(fast_ana.FastAnalysis, "_run_chunk", wrapped)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The full and the fast analysis of ``demo()`` (accuracy, collapse 0.5)."""
    model, x, loader = demo()
    fn = make_eval_fn(loader, "accuracy")
    full, _ = run(model, x, fn, tmp_path_factory.mktemp("full"), fast=False)
    before = copy.deepcopy(model.state_dict())
    ws = tmp_path_factory.mktemp("fast")
    fast, logs = run(model, x, fn, ws)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), f"the fast analysis changed {name} of the model"
    return model, x, full, fast, ws


# ----- as good as the full analysis ----------------------------------------------------------
def test_fast_agrees_with_full_ranking_and_allocation(pair):
    model, x, full, fast, _ = pair
    assert fast.baseline == pytest.approx(full.baseline, abs=1e-12), "the same baseline on the same batches"
    assert set(fast.curves) == set(full.curves) and all(set(fast.curves[g]) == set(RATIOS) for g in fast.curves)
    # every point within the stated tolerance: 3 confidence half-widths (early stops), 2 x interp_tolerance
    # (interpolated points; the drop's own sampling error comes on top), of the relative loss
    for g in full.curves:
        for r in RATIOS:
            a, b = full._rel(full.curves[g][r]), fast._rel(fast.curves[g][r])
            if a > 0.5 and b > 0.5:
                continue  # both collapsed: the allocation never goes there
            assert abs(a - b) <= 0.08, f"group {g} at {r}: full loss {a:.3f}, fast {b:.3f}"
    # the ranking: the same most sensitive group, and a rank correlation of at least 0.8 (near ties may swap)
    assert fast.order()[0] == full.order()[0], f"the most sensitive group: {full.order()} vs {fast.order()}"
    pos = {g: i for i, g in enumerate(fast.order())}
    n = len(pos)
    spearman = 1 - 6 * sum((i - pos[g]) ** 2 for i, g in enumerate(full.order())) / (n * (n * n - 1))
    assert spearman >= 0.8, f"rankings differ: {full.order()} vs {fast.order()} (Spearman {spearman:.2f})"
    ratios = {}
    for name, sens in (("full", full), ("fast", fast)):
        res = prunekit.prune(copy.deepcopy(model), x, removal_ratio=0.5, sensitivity=sens, log=lambda m: None)
        ratios[name] = res.ratios
    for g in set(ratios["full"]) | set(ratios["fast"]):
        a, b = ratios["full"].get(g, 0.0), ratios["fast"].get(g, 0.0)
        assert abs(a - b) <= 0.15, f"group {g}: the full analysis allocates {a:.2f}, the fast one {b:.2f}"


def test_fast_uses_far_fewer_images_and_says_so(pair):
    _, _, full, fast, _ = pair
    n = 1024
    c = fast.cost
    assert full.cost["method"] == "full" and c["method"] == "fast"
    assert c["points"] == len(fast.curves) * len(RATIOS)
    assert c["evaluated"] + c["interpolated"] + c["collapsed"] == c["points"], c
    assert c["evaluated"] == c["full"] + c["early_stop"], c
    assert c["early_stop"] == c["stopped_precise"] + c["stopped_collapsed"], c
    assert c["interpolated"] > 0 and c["early_stop"] > 0, f"a smooth curve on 1024 images needs neither all: {c}"
    point_images = sum(d.get("images", 0) for pts in fast.details.values() for d in pts.values())
    assert c["point_images"] == point_images
    assert c["images"] == c["baseline_images"] + c["capture_images"] + c["verify_images"] + point_images, c
    assert c["baseline_images"] == n
    full_images = (full.cost["evaluated"] + 1) * n
    assert c["images"] * 2 < full_images, f"fast: {c['images']} images, full: {full_images}"
    assert c["image_equivalents"] < c["images"], "cached activations skip part of the forward"
    assert c["prefix_groups"] >= 2, c
    for pts in fast.details.values():
        for d in pts.values():
            if d["how"] == "full":
                assert d["images"] == n and d["batches"] == 16
            elif d["how"] == "early_stop":
                assert 128 <= d["images"] < n and d["stop"] in ("precise", "collapsed") and d["halfwidth"] >= 0
            else:
                assert d["how"] in ("interpolated", "collapsed"), d
    est = fast.estimated()
    assert est and all(h != "full" for pts in est.values() for h in pts.values())
    table = fast.table()
    assert "~" in table and "interpolated" in table.splitlines()[0], "the table marks estimated cells"
    summary = fast.summary()  # what `prunekit ana` prints under the table
    assert summary.startswith(f"fast analysis: {c['evaluated']} of {c['points']} points evaluated"), summary
    assert f"{c['images']:,} images through the model" in summary and "early stop: the baseline minus" in summary
    assert c["settings"]["tolerance"] == FastAnaConfig().tolerance, "the result says which settings estimated it"
    assert full.summary().startswith(f"full analysis: {full.cost['evaluated']} of"), full.summary()


def test_results_on_disk_say_how_points_were_obtained(pair):
    *_, sens, ws = pair
    data = json.loads((ws / "sensitivity.json").read_text())
    back = Sensitivity.from_dict(data)
    assert back.details == sens.details and back.cost == sens.cost and back.curves == sens.curves
    saved = json.loads((ws / "ana.json").read_text())
    assert set(saved["info"]) == set(saved["points"]), "every saved point says how it was obtained"
    assert saved["config"]["method"]["fast"]["tolerance"] == FastAnaConfig().tolerance
    old = {k: v for k, v in data.items() if k not in ("details", "cost")}  # written before these existed
    assert Sensitivity.from_dict(old).details == {} and Sensitivity.from_dict(old).estimated() == {}


def test_a_sparse_model_is_analysed_on_top_of_its_masks(tmp_path):
    model, x, loader = demo()
    model = copy.deepcopy(model)
    pruner = prunekit.Pruner(model, x)
    pruner.prune({pruner.prunable_groups[1].id: 0.5})
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    sens, _ = run(model, x, make_eval_fn(loader, "accuracy"), tmp_path, ratios=(0.5,), pruner=pruner)
    assert sens.cost["method"] == "fast" and sens.cost["prefix_groups"] > 0
    assert prunekit.engine.sparse.is_sparse(model), "the model's own masks must be restored"
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), f"ana changed {n} of a sparse model"
    with torch.no_grad():
        assert torch.equal(model(x), out), "the sparse model computes something else after ana"


def test_opaque_eval_fn_is_evaluated_in_full(tmp_path, monkeypatch):
    model, x, loader = demo()
    inner = make_eval_fn(loader, "accuracy")
    calls = []

    def eval_fn(m):  # no .evaluation: ana cannot run its forward
        calls.append(1)
        return inner(m)

    chunks = Chunks(monkeypatch)
    sens, logs = run(model, x, eval_fn, tmp_path, ratios=(0.3, 0.6), collapse=None)
    assert chunks.calls == 0, "no fast evaluation for an opaque eval_fn"
    points = 2 * len(prunekit.Pruner(model, x).prunable_groups)
    assert len(calls) == points + 1, f"every point and the baseline in full, got {len(calls)} calls"
    assert sens.cost["method"] == "full" and sens.cost["evaluated"] == points and "images" not in sens.cost
    assert all(d["how"] == "full" for pts in sens.details.values() for d in pts.values())
    assert not any("fast ana" in m for m in logs), "falling back for an opaque eval_fn is not news"


def test_fast_false_and_a_metric_callable(tmp_path, monkeypatch):
    model, x, loader = demo()
    chunks = Chunks(monkeypatch)
    off, _ = run(model, x, make_eval_fn(loader, "accuracy"), tmp_path / "off", fast=False, ratios=(0.5,))
    assert chunks.calls == 0 and off.cost["method"] == "full"

    def top1(out, y):
        return (out.argmax(1) == y).float().mean()

    sens, _ = run(model, x, make_eval_fn(loader, top1), tmp_path / "callable", ratios=(0.5,), collapse=None)
    assert chunks.calls > 0 and sens.cost["method"] == "fast", "a callable metric: per-batch statistics"
    for g in sens.curves:
        assert sens.curves[g][0.5] == pytest.approx(off.curves[g][0.5], abs=0.06), (g, sens.details[g])


# ----- resume, cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5])
def test_interrupted_fast_analysis_resumes(tmp_path, monkeypatch, pair, k):
    model, x, _, ref, _ = pair
    _, _, loader = demo()
    fn = make_eval_fn(loader, "accuracy")
    first = Chunks(monkeypatch, stop=k)
    with pytest.raises(KeyboardInterrupt):
        run(model, x, fn, tmp_path)
    saved = json.loads((tmp_path / "ana.json").read_text())
    assert len([i for i in saved["info"].values() if i["how"] in fast_ana.EVALUATED]) >= k, (
        "every evaluated point is on disk at once"
    )
    again = Chunks(monkeypatch)
    resumed, logs = run(model, x, fn, tmp_path)
    assert first.calls + again.calls == ref.cost["evaluated"], (
        f"resuming re-evaluated points: {first.calls} + {again.calls} for {ref.cost['evaluated']}"
    )
    assert resumed.curves == ref.curves and resumed.details == ref.details
    assert any("reusing" in m for m in logs)
    third = Chunks(monkeypatch)
    cached, logs = run(model, x, fn, tmp_path)
    assert third.calls == 0 and cached.curves == ref.curves, "a finished analysis is served from the workspace"


def test_changing_the_method_invalidates_the_cache(tmp_path):
    model, x, loader = demo()
    fn = make_eval_fn(loader, "accuracy")
    run(model, x, fn, tmp_path, ratios=(0.5,))
    _, logs = run(model, x, fn, tmp_path, ratios=(0.5,), fast=FastAnaConfig(tolerance=0.05))
    stale = [m for m in logs if "stale" in m]
    assert stale and "the analysis method" in stale[0], logs
    sens, _ = run(model, x, fn, tmp_path, ratios=(0.5,), fast=False)
    assert sens.cost["method"] == "full"


def test_workers_share_the_groups(tmp_path, pair):
    model, x, _, ref, _ = pair
    _, _, loader = demo()
    sens, _ = run(model, x, make_eval_fn(loader, "accuracy"), tmp_path, workers=2)
    assert (tmp_path / "ana.rank0.json").exists() and (tmp_path / "ana.rank1.json").exists()
    for g in ref.curves:
        assert sens.curves[g] == pytest.approx(ref.curves[g], abs=1e-9), f"group {g} differs with workers=2"
        assert [d["how"] for d in sens.details[g].values()] == [d["how"] for d in ref.details[g].values()]
    assert sens.cost["images"] == ref.cost["images"], "the workers together put as many images through"


def test_workers_with_an_opaque_eval_fn(tmp_path):
    model, x, loader = demo()
    inner = make_eval_fn(loader, "loss")
    one, _ = run(model, x, lambda m: inner(m), tmp_path / "one", ratios=(0.5,), lower_is_better=True)
    two, _ = run(model, x, lambda m: inner(m), tmp_path / "two", ratios=(0.5,), lower_is_better=True, workers=2)
    assert two.cost["method"] == "full" and two.curves == one.curves


# ----- the building blocks ---------------------------------------------------------------------
def _models():
    torch.manual_seed(0)
    demo_net = randomize_batchnorm(DemoNet(1, 10, width=4, blocks=2)).eval()
    resnet = randomize_batchnorm(cifar_resnet(depth=8, width=4)).eval()
    return [("demo", demo_net, torch.randn(6, 1, 8, 8)), ("cifar_resnet8", resnet, torch.randn(6, 3, 16, 16))]


@pytest.mark.parametrize("name, model, x", _models(), ids=lambda v: v if isinstance(v, str) else "")
def test_prefix_and_batched_variants_equal_the_sparse_model(name, model, x):
    pruner = prunekit.Pruner(model, x[:1])
    rec = fast_ana.record_forward(model, x[:1])
    reused = 0
    with torch.no_grad():
        for g in pruner.prunable_groups:
            plans = [pruner.plan({g.id: r}) for r in (0.25, 0.5, 0.75)]
            refs = []
            for plan in plans:
                with fast_ana.sparse_variant(model, plan, None):
                    refs.append(model(x))
            prefix = fast_ana.plan_prefix(rec, model, [m.name for m in g.members])
            cache = None
            if isinstance(prefix, fast_ana.Prefix):
                reused += 1
                cache = fast_ana.capture(model, prefix, [x], 1 << 30)
                with fast_ana.sparse_variant(model, plans[1], None), fast_ana.stubbed(model, cache, 0):
                    out = model(x)
                assert torch.allclose(out, refs[1], atol=1e-6), f"{name} group {g.id}: prefix reuse differs"
            roles = fast_ana._mask_roles(model, g)
            assert not isinstance(roles, str), f"{name} group {g.id}: {roles}"
            with (
                fast_ana.stubbed(model, cache, 0, 3, len(x)) if cache else fast_ana.contextlib.nullcontext(),
                fast_ana.variant_masks(model, roles, plans, len(x)),
            ):
                out = model(torch.cat([x] * 3))
            for v in range(3):
                assert torch.allclose(out[v * len(x) : (v + 1) * len(x)], refs[v], atol=1e-6), (
                    f"{name} group {g.id}: variant {v} on its batch slice differs from the sparse model"
                )
    assert reused >= len(pruner.prunable_groups) - 1, "every group after the first layer reuses activations"


class Leaky(nn.Module):
    """A block that keeps an intermediate result for its parent (a module's internals escape it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        self.kept = torch.relu(self.a(x))
        return self.b(self.kept)


class WithLeak(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(1, 4, 3, padding=1), Leaky(), nn.Conv2d(4, 4, 3, padding=1)
        self.inplace = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.block(self.stem(x))
        z = self.inplace(y)  # a skipped module changing a cached output in place
        return self.head(z) + self.block.kept + y


def test_prefix_refuses_what_it_cannot_reuse():
    model = WithLeak().eval()
    x = torch.randn(2, 1, 6, 6)
    rec = fast_ana.record_forward(model, x)
    p = fast_ana.plan_prefix(rec, model, ["head.weight"])
    assert isinstance(p, str) and "changed in place" in p, p
    p = fast_ana.plan_prefix(rec, model, ["block.b.weight"])
    assert isinstance(p, fast_ana.Prefix) and p.stubs == ["stem", "block.a"], (
        f"the leaking block itself is not skipped, only what finishes inside it before the cut: {p}"
    )
    p = fast_ana.plan_prefix(rec, model, ["stem.weight"])
    assert isinstance(p, str) and "nothing runs before" in p


def test_a_fast_forward_that_differs_falls_back(tmp_path, monkeypatch):
    model, x, loader = demo()
    fn = make_eval_fn(loader, "accuracy")
    ref, _ = run(model, x, fn, tmp_path / "ref", ratios=(0.5,), fast=FastAnaConfig(prefix=False))
    real = fast_ana.Collector.caches

    def corrupted(self):
        caches = real(self)
        for outs in self.outputs.values():
            for _, leaves in outs:
                for t in leaves:
                    if isinstance(t, torch.Tensor):
                        t.mul_(1.5)
        return caches

    monkeypatch.setattr(fast_ana.Collector, "caches", corrupted)
    sens, logs = run(model, x, fn, tmp_path / "bad", ratios=(0.5,))
    assert any("differs from the plain sparse one" in m for m in logs), logs
    assert sens.cost["prefix_groups"] == 0 and sens.cost["fallbacks"], sens.cost
    assert sens.curves == ref.curves, "after the fallback every point is what the plain forward gives"


def test_caches_built_group_by_group_when_they_do_not_fit_at_once(tmp_path, monkeypatch):
    model, x, loader = demo()
    fn = make_eval_fn(loader, "accuracy")
    cfg = FastAnaConfig(early_stop=False, adaptive=False)
    at_once, _ = run(model, x, fn, tmp_path / "once", ratios=(0.5,), fast=cfg)
    assert at_once.cost["capture_images"] == 0, "kept during the baseline pass"
    monkeypatch.setattr(fast_ana.Collector, "caches", lambda self: {})  # as if over the budget
    stepwise, _ = run(model, x, fn, tmp_path / "steps", ratios=(0.5,), fast=cfg)
    assert stepwise.cost["capture_images"] > 0 and stepwise.cost["prefix_groups"] == at_once.cost["prefix_groups"]
    assert stepwise.curves == at_once.curves, "each cache is captured from the one before"


def test_batched_variants_in_ana_match_one_at_a_time(tmp_path):
    model, x, loader = demo()
    fn = make_eval_fn(loader, "loss")
    cfg = dict(early_stop=False, adaptive=False)
    one, _ = run(
        model,
        x,
        fn,
        tmp_path / "one",
        lower_is_better=True,
        collapse=None,
        ratios=(0.25, 0.5, 0.75),
        fast=FastAnaConfig(variants=1, **cfg),
    )
    three, _ = run(
        model,
        x,
        fn,
        tmp_path / "three",
        lower_is_better=True,
        collapse=None,
        ratios=(0.25, 0.5, 0.75),
        fast=FastAnaConfig(variants=3, **cfg),
    )
    full, _ = run(
        model, x, fn, tmp_path / "full", lower_is_better=True, collapse=None, ratios=(0.25, 0.5, 0.75), fast=False
    )
    assert three.cost["batched_groups"] == len(three.curves)
    for g in full.curves:
        assert three.curves[g] == pytest.approx(full.curves[g], rel=1e-5)
        assert one.curves[g] == pytest.approx(full.curves[g], rel=1e-5)


def test_paired_stats_and_stop_bounds():
    s = fast_ana.PairedStats(z=1.645, binary=True, lower_is_better=False)
    ones = torch.ones(200, dtype=torch.float64)
    s.add(ones, ones, 1.0, 1.0, 200)
    assert s.drop == 0 and 0.013 < s.halfwidth < 0.014, "no flip in 200 images: about z^2 / n of doubt"
    t = fast_ana.PairedStats(z=1.645, binary=True, lower_is_better=False)
    worse = torch.cat([torch.zeros(50), torch.ones(150)]).double()
    t.add(ones, worse, 1.0, 0.75, 200)
    assert t.drop == pytest.approx(0.25) and t.halfwidth == pytest.approx(1.645 * (0.1875 / 200) ** 0.5)
    u = fast_ana.PairedStats(z=1.645, binary=False, lower_is_better=True)  # per-batch values only
    for mean in (2.0, 2.2, 2.1):
        u.add(None, None, 2.0, mean, 10)
    assert u.drop == pytest.approx(0.1) and 0 < u.halfwidth < 0.2


def test_curve_planner_bisects_where_the_curve_bends():
    p = fast_ana.CurvePlanner(RATIOS, stride=2, interp_tolerance=0.01, collapse=0.5)
    assert p.next({}) == [0, 2, 4, 6, 8], "the coarse grid first"
    straight = {i: 0.05 * (i + 1) for i in (0, 2, 4, 6, 8)}  # a straight line: interpolation is exact
    assert p.next(straight) == []
    bent = {0: 0.0, 2: 0.0, 4: 0.02, 6: 0.3, 8: 0.45}  # flat, then a knee between 0.5 and 0.7
    assert p.next(bent) == [5, 7], "the gaps next to the knee"
    bent.update({5: 0.1, 7: 0.38})
    assert p.next(bent) == []
    rel = {0: 0.0, 2: 0.01, 4: 0.02, 6: 0.6}  # 6 collapsed: 8 is never needed
    assert p.next(rel) == [5], "only the gap into the collapse is refined"
    rel[5] = 0.2
    assert p.next(rel) == []
    values = {i: 1 - v for i, v in rel.items()}
    fill = p.fill(values, rel)
    assert fill[1] == (pytest.approx(0.995), "interpolated") and fill[3][1] == "interpolated"
    assert fill[7] == (values[6], "collapsed") and fill[8] == (values[6], "collapsed")
    uneven = fast_ana.CurvePlanner([0.1, 0.2, 0.5], stride=2, interp_tolerance=0.01, collapse=None)
    assert uneven.fill({0: 1.0, 2: 0.6}, {0: 0.0, 2: 0.4})[1] == (pytest.approx(0.9), "interpolated"), (
        "interpolated along the ratio, not the index"
    )


def test_fast_config_errors_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"ana\.fast\.confidence must be in \(0, 1\), got 1\.5"):
        FastAnaConfig(confidence=1.5)
    with pytest.raises(ConfigError, match=r"ana\.fast\.stride must be an int >= 1, got 0"):
        FastAnaConfig(stride=0)
    with pytest.raises(ConfigError, match=r"unknown key 'ana\.fast\.tolerence'.*did you mean 'tolerance'"):
        prunekit.workflow.options.AnaConfig(fast={"tolerence": 0.1})
    with pytest.raises(TypeError, match="fast must be True, False or a FastAnaConfig"):
        model, x, loader = demo()
        prunekit.ana(model, x, make_eval_fn(loader), workspace=tmp_path, fast="yes", progress=False)


def test_early_stopped_values_stay_in_the_metric_range(tmp_path):
    """The unpruned model is right on the first batches only (baseline 0.25): a point stopped there has
    a large paired drop, and "baseline minus drop" fell below 0 (accuracies of -0.28) before the clamp."""
    model, x, _ = demo()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(1024, 1, 8, 8, generator=g)
    with torch.no_grad():
        pred = model.eval()(xs).argmax(1)
    y = torch.where(torch.arange(1024) < 256, pred, (pred + 1) % 10)  # right on 256, wrong on the rest
    loader = [(xs[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)]
    cfg = FastAnaConfig(adaptive=False, min_images=64, tolerance=0.5)
    sens, _ = run(model, x, make_eval_fn(loader, "accuracy"), tmp_path, fast=cfg, collapse=None)
    assert sens.baseline == pytest.approx(0.25)
    stopped = [(g, r) for g, pts in sens.details.items() for r, d in pts.items() if d["how"] == "early_stop"]
    assert stopped, "the test needs early-stopped points"
    low = {(g, r): v for g, c in sens.curves.items() for r, v in c.items() if not 0.0 <= v <= 1.0}
    assert not low, f"accuracies outside [0, 1]: {low}"
    assert min(v for c in sens.curves.values() for v in c.values()) == 0.0, "clamped at 0, not dropped"
