"""The iterative loop: earlier pruned channels stay pruned, a killed run resumes to the same result,
a step that loses too much is retried with a smaller increment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.cli.job import AnaConfig, IterativeConfig
from prunekit.engine.plan import PruningPlan
from prunekit.workflow.evaluation import make_eval_fn
from prunekit.workflow.finetune import FinetuneConfig
from prunekit.workflow.iterative import IterativePruner
from tinyjob import TinyNet, loaders, trained

X = torch.zeros(1, 1, 8, 8)
FT = FinetuneConfig(epochs=2, lr=0.02, progress=False)
ANA = AnaConfig(ratios=[0.3, 0.6])
QUIET = lambda m: None


def run(ws, model=None, eval_fn=None, **kw):
    model = model or trained()
    train, evald = loaders()
    kw.setdefault("config", IterativeConfig(schedule=[0.3, 0.5]))
    return IterativePruner(model, X, eval_fn or make_eval_fn(evald), train, workspace=ws, finetune=FT, ana=ANA,
                           log=kw.pop("log", QUIET), **kw).run()


def pruned_units(plan: PruningPlan) -> dict:
    return {(n, d): set(idx) for n, dims in plan.pruned.items() for d, idx in dims.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, shared: its artifacts are checked, and a killed run must end the same."""
    ws = tmp_path_factory.mktemp("reference")
    return ws, run(ws)


def test_steps_keep_earlier_channels_pruned_and_write_artifacts(reference):
    tmp_path, res = reference
    plans = [PruningPlan.load(tmp_path / a["dir"] / "model" / "plan.json") for a in res.attempts]
    assert len(plans) == 2 and all(a["accepted"] for a in res.attempts), res.attempts
    first, second = pruned_units(plans[0]), pruned_units(plans[1])
    for key, idx in first.items():
        assert idx <= second.get(key, set()), f"{key}: channels {sorted(idx - second.get(key, set()))} pruned in " \
                                              "step 1 came back in step 2"
    assert res.attempts[1]["macs"] < res.attempts[0]["macs"] < res.baseline["macs"], res.attempts
    # TinyNet's groups have 8 and 16 channels: the allocation cannot hit 0.5 exactly; it says so in the notes
    assert 0.35 <= res.final["macs_reduction"] <= 0.6, res.final
    assert res.final["macs_reduction"] == res.attempts[1]["macs_reduction"], res.final
    # artifacts: state, summary, slim model that loads into a fresh TinyNet and matches
    state = json.loads((tmp_path / "iterative.json").read_text())
    assert state["done"] and len(state["attempts"]) == 2
    assert (tmp_path / "sensitivity.json").exists() and (tmp_path / "summary.json").exists()
    slim = prunekit.load_slim(TinyNet(), tmp_path / "final").eval()
    x = torch.randn(3, 1, 8, 8)
    assert prunekit.max_error(res.model(x), slim(x)) <= 1e-6, "the saved slim model differs from the returned one"
    assert "step" in res.table() and "slim" in res.table()
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"


class Kill(Exception):
    pass


def test_resume_after_kill_mid_step_gives_the_same_result(tmp_path, reference):
    ref = reference[1]
    ws = tmp_path / "killed"
    _, evald = loaders()
    inner = make_eval_fn(evald)
    calls = {"after_step1": 0}

    def dying(model):  # killed while evaluating epoch 2 of step 2 (epoch 1 is checkpointed)
        if (ws / "steps" / "step1-try0" / "model" / "plan.json").exists():
            calls["after_step1"] += 1
            if calls["after_step1"] == 3:  # step 2: start, epoch 1, epoch 2
                raise Kill
        return inner(model)

    with pytest.raises(Kill):
        run(ws, eval_fn=dying)
    state = json.loads((ws / "iterative.json").read_text())
    assert [a["step"] for a in state["attempts"]] == [1], "step 1 should be recorded as finished, step 2 not"
    assert (ws / "steps" / "step2-try0" / "finetune" / "checkpoint.pt").exists()
    logs: list[str] = []
    res = run(ws, log=logs.append)
    assert any("resuming fine-tuning after epoch 1" in m for m in logs), logs
    assert any("resuming: 1 finished step" in m for m in logs), logs
    strip = lambda atts: [{k: v for k, v in a.items() if k not in ("seconds", "history")} for a in atts]
    assert strip(res.attempts) == strip(ref.attempts), "the resumed run's steps differ from the uninterrupted run's"
    assert res.final["metric"] == ref.final["metric"] and res.final["macs"] == ref.final["macs"]
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), f"{k}: resumed and uninterrupted slim models differ"


def nonzero_fraction(model: nn.Module) -> float:
    """A metric that falls as channels go (it ignores training): the share of non-zero weights."""
    ws = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    total = sum(p.numel() for p in ws)
    return sum(int((p != 0).sum()) for p in ws) / total


def test_a_step_that_loses_too_much_is_retried_with_a_smaller_increment(tmp_path):
    logs: list[str] = []
    cfg = IterativeConfig(schedule=[0.5], max_drop=0.35, max_retries=2, retry_factor=0.5)
    res = run(tmp_path, model=TinyNet(), eval_fn=nonzero_fraction, config=cfg, log=logs.append,
              train_fn=lambda m, epoch: None)
    got = [(a["ratio"], a["accepted"]) for a in res.attempts]
    assert got[0] == (0.5, False) and got[1][0] == 0.25, res.attempts  # the increment halves after a miss
    for a in res.attempts:  # every verdict follows max_drop
        assert a["accepted"] == (a["drop"] <= 0.35), a
    assert sum(not ok for _, ok in got) <= 1 + cfg.max_retries, "more failures than max_retries allows"
    assert any("retrying with a smaller increment" in n for n in res.notes), res.notes
    assert any("retrying" in m for m in logs), logs
    last_ok = [a for a in res.attempts if a["accepted"]][-1]
    assert res.final["step"] == last_ok["dir"].split("/")[-1], "the final model should be the last accepted step"
    assert res.final["macs_reduction"] < res.attempts[0]["macs_reduction"], res.final
    assert any("below the planned" in n for n in res.notes), res.notes


class Scripted(IterativePruner):
    """The real steps, with the verdicts of the attempts in ``fail`` forced to 'rejected'."""

    fail: set = set()

    def _attempt(self, k, a, *args):
        att = super()._attempt(k, a, *args)
        att["accepted"] = (k, a) not in self.fail
        return att


def test_retry_sequence_with_scripted_verdicts(tmp_path):
    """0.5 misses -> half the increment (0.25) passes -> the rest of the way (0.5) misses -> half the
    remaining increment (0.375) passes -> 0.5 misses a third time: 1 + max_retries failures, stop."""
    Scripted.fail = {(1, 0), (1, 2), (1, 4)}
    res = Scripted(TinyNet(), X, nonzero_fraction, train_fn=lambda m, epoch: None, workspace=tmp_path,
                   config=IterativeConfig(schedule=[0.5], max_retries=2), finetune=FT, ana=ANA, log=QUIET).run()
    got = [(a["ratio"], a["accepted"]) for a in res.attempts]
    assert got == [(0.5, False), (0.25, True), (0.5, False), (0.375, True), (0.5, False)], res.attempts
    assert res.final["step"] == "step1-try3", res.final
    assert any("stopped at step 1" in n and "0.375" in n for n in res.notes), res.notes


def test_an_accepted_smaller_increment_continues_to_the_planned_ratio(tmp_path):
    """A step that fails is split: after the smaller increment passes, the rest is tried from there."""
    Scripted.fail = {(1, 0)}
    res = Scripted(TinyNet(), X, nonzero_fraction, train_fn=lambda m, epoch: None, workspace=tmp_path,
                   config=IterativeConfig(schedule=[0.4], max_retries=1), finetune=FT, ana=ANA, log=QUIET).run()
    got = [(a["ratio"], a["accepted"]) for a in res.attempts]
    assert got == [(0.4, False), (0.2, True), (0.4, True)], res.attempts
    assert res.final["step"] == "step1-try2", res.final
    assert res.final["macs_reduction"] > res.attempts[1]["macs_reduction"] > 0, res.attempts


def test_a_new_plan_that_drops_earlier_channels_is_merged(tmp_path):
    """With the random criterion the larger plan need not contain the earlier one: it is merged."""
    torch.manual_seed(0)
    res = run(tmp_path, model=TinyNet(), eval_fn=nonzero_fraction, train_fn=lambda m, epoch: None,
              criterion="random", config=IterativeConfig(schedule=[0.3, 0.6]))
    plans = [PruningPlan.load(tmp_path / a["dir"] / "model" / "plan.json") for a in res.attempts]
    first, second = pruned_units(plans[0]), pruned_units(plans[1])
    for key, idx in first.items():
        assert idx <= second.get(key, set()), f"{key}: earlier pruned channels came back"
    merged = any("merged the previous plan" in n for n in res.notes)
    assert merged, f"expected the random criterion to need a merge: {res.notes}"


def test_no_step_meets_the_tolerance_keeps_the_baseline(tmp_path):
    cfg = IterativeConfig(schedule=[0.5], max_drop=0.0, max_retries=1)
    res = run(tmp_path, model=TinyNet(), eval_fn=nonzero_fraction, config=cfg, train_fn=lambda m, epoch: None)
    assert len(res.attempts) == 2 and not any(a["accepted"] for a in res.attempts), res.attempts
    assert res.final["macs"] == res.baseline["macs"] and res.final["step"] is None, res.final
    assert any("nothing was pruned" in n for n in res.notes), res.notes


def test_changed_settings_start_the_steps_over(tmp_path):
    model = TinyNet()
    kw = dict(model=model, eval_fn=nonzero_fraction, train_fn=lambda m, epoch: None)
    run(tmp_path, config=IterativeConfig(schedule=[0.3]), **kw)
    logs: list[str] = []
    res = run(tmp_path, config=IterativeConfig(schedule=[0.4]), log=logs.append, **kw)
    assert any("starting the steps over" in m for m in logs), logs
    assert [a["ratio"] for a in res.attempts] == [0.4]


def test_schedule_from_target_and_errors():
    assert IterativeConfig(target=0.6, steps=3).schedule_ratios() == [0.2, 0.4, 0.6]
    assert IterativeConfig(schedule=[0.1, 0.3]).schedule_ratios() == [0.1, 0.3]
    with pytest.raises(ValueError, match="increase strictly"):
        IterativeConfig(schedule=[0.3, 0.2])
    with pytest.raises(ValueError, match="retry_factor"):
        IterativeConfig(retry_factor=1.0)
    model = TinyNet()
    prunekit.Pruner(model, X).prune(0.5)
    with pytest.raises(ValueError, match="already sparse"):
        IterativePruner(model, X, nonzero_fraction, [], workspace="unused")
