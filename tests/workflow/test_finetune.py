"""Fine-tuning: masks hold through training, resume gives the same weights, best epoch, LR trial, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.engine.sparse import is_sparse
from prunekit.workflow.evaluation import make_eval_fn
from prunekit.workflow.finetune import FinetuneConfig, distillation_loss, finetune
from tinyjob import TinyNet, loaders

QUIET = {"progress": False}


def sparse_tiny(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyNet()
    x = torch.randn(1, 1, 8, 8)
    prunekit.Pruner(model, x).prune(0.5)
    return model, x


def pruned_slices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    plan = prunekit.get_plan(model)
    out = []
    for name, dims in plan.pruned.items():
        t = dict(model.named_parameters()).get(name)
        if t is None:
            t = dict(model.named_buffers())[name]
        for d, idx in dims.items():
            out.append((name, t.detach().index_select(d, torch.tensor(idx))))
    return out


@pytest.mark.parametrize(
    "optimizer, schedule, amp", [("sgd", "cosine", None), ("adamw", "step", None), ("sgd", "constant", True)]
)  # amp on CPU: bfloat16 autocast
def test_masks_hold_through_training(optimizer, schedule, amp):
    model, _ = sparse_tiny()
    train, evald = loaders()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(
        epochs=2,
        optimizer=optimizer,
        lr=0.05,
        schedule=schedule,
        step_epochs=1,
        amp=amp,
        warmup_epochs=0.5,
        label_smoothing=0.1,
        restore_best=False,
        **QUIET,
    )
    res = finetune(model, train, make_eval_fn(evald), cfg, log=print)
    assert len(res.history) == 2 and all(h["loss"] is not None for h in res.history), res.history
    assert not torch.equal(before["conv1.weight"], model.conv1.weight), "training did not change the weights"
    for name, sl in pruned_slices(model):
        want = 1.0 if name.endswith("running_var") else 0.0
        assert torch.all(sl == want), f"{name}: pruned slice moved during {optimizer} training (max {sl.abs().max()})"
    slim = prunekit.to_slim(model)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert prunekit.max_error(model(x), slim(x)) <= 1e-4, "slim != sparse after fine-tuning"


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    train, evald = loaders()
    cfg = FinetuneConfig(epochs=3, lr=0.05, **QUIET)

    model_a, _ = sparse_tiny()
    finetune(model_a, train, make_eval_fn(evald), cfg, workspace=tmp_path / "a", log=lambda m: None)

    class Kill(Exception):
        pass

    calls = {"n": 0}
    inner = make_eval_fn(evald)

    def dying_eval(m):  # call 0: the start, 1: epoch 1, 2: epoch 2 -> killed while evaluating epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise Kill
        return inner(m)

    model_b, _ = sparse_tiny()
    with pytest.raises(Kill):
        finetune(model_b, train, dying_eval, cfg, workspace=tmp_path / "b", log=lambda m: None)
    assert not list((tmp_path / "b").glob("*.tmp")), "a temp file was left behind"
    model_c, _ = sparse_tiny()  # a fresh process would rebuild the same sparse model
    logs: list[str] = []
    res = finetune(model_c, train, inner, cfg, workspace=tmp_path / "b", log=logs.append)
    assert res.resumed_from == 1, f"should resume after epoch 1, resumed after {res.resumed_from}: {logs}"
    assert any("resuming" in m for m in logs), logs
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_c.state_dict()[k]), f"{k} differs between the resumed and the uninterrupted run"


def test_best_epoch_is_restored():
    model, _ = sparse_tiny()
    train, evald = loaders()
    scores = iter([0.5, 0.9, 0.7, 0.6])  # start, epoch 1 (best), epoch 2, epoch 3
    snaps = []

    def eval_fn(m):
        snaps.append(m.conv1.weight.detach().clone())
        return next(scores)

    res = finetune(model, train, eval_fn, FinetuneConfig(epochs=3, lr=0.05, **QUIET))
    assert res.best_epoch == 1 and res.best_metric == 0.9, res
    assert torch.equal(model.conv1.weight, snaps[1]), "the best epoch's weights were not restored"


def test_lr_trial_keeps_the_best_candidate(tmp_path):
    model, _ = sparse_tiny()
    train, evald = loaders()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(epochs=1, lr_trial=[1e-6, 0.05], trial_batches=3, **QUIET)
    logs: list[str] = []
    res = finetune(
        model, train, make_eval_fn(evald, "loss"), cfg, lower_is_better=True, log=logs.append, workspace=tmp_path
    )
    assert set(res.trial) == {1e-6, 0.05}, res.trial
    assert res.lr == min(res.trial, key=res.trial.get), res
    assert any("learning-rate trial" in m for m in logs), logs
    # the trial does not leak into the weights the training starts from
    model2, _ = sparse_tiny()
    assert all(torch.equal(start[k], v) for k, v in model2.state_dict().items())


def test_custom_train_fn_and_no_eval():
    model, _ = sparse_tiny()
    seen = []

    def train_fn(m, epoch):
        seen.append(epoch)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)  # touches the pruned slices too: finetune re-zeroes them

    res = finetune(model, None, None, FinetuneConfig(epochs=2, **QUIET), train_fn=train_fn)
    assert seen == [0, 1], seen
    assert res.best_metric is None and len(res.history) == 2
    for name, sl in pruned_slices(model):
        want = 1.0 if name.endswith("running_var") else 0.0
        assert torch.all(sl == want), f"{name}: a custom train_fn left pruned values non-zero"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"epochs": -1}, "epochs must be a non-negative int"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"lr_trial": 0.1}, "lr_trial must be a list"),
        ({"distill_weight": 1.5}, "distill_weight must be in"),
        ({"distill_temperature": 0}, "distill_temperature must be a positive"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**kwargs)


def test_config_round_trip():
    cfg = FinetuneConfig(epochs=3, optimizer="adamw", lr_trial=[0.1, 0.01])
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        FinetuneConfig.from_dict({"epoch": 3})


# ----- knowledge distillation -------------------------------------------------------------------------------------
def test_distillation_loss_is_the_scaled_soft_target_kl():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    T = 3.0
    p = torch.softmax(t / T, 1)
    want = (p * (p.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert float(distillation_loss(s, t, T)) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="of one shape"):
        distillation_loss(s, t[:, :3])


def _distill_run(weight: float, teacher: nn.Module | None, epochs: int = 1, workspace=None, eval_fn=None):
    model, _ = sparse_tiny()
    train, _ = loaders()
    cfg = FinetuneConfig(epochs=epochs, lr=0.05, distill_weight=weight, distill_temperature=2.0, **QUIET)
    res = finetune(model, train, eval_fn, cfg, teacher=teacher, workspace=workspace, log=lambda m: None)
    return model, res


def test_distillation_changes_the_loss_and_leaves_the_teacher_untouched():
    from tinyjob import trained

    teacher = trained().train()  # given in train mode: it must still run in eval mode, and be left in train mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.bn1.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    plain, res_plain = _distill_run(0.0, None)
    ignored, _ = _distill_run(0.0, teacher)  # weight 0: the teacher is not used
    assert not seen and all(torch.equal(v, ignored.state_dict()[k]) for k, v in plain.state_dict().items())
    distilled, res = _distill_run(0.7, teacher)
    assert seen and set(seen) == {(False, False)}, f"the teacher ran in train mode or with gradients: {set(seen)}"
    assert res.history[0]["loss"] != pytest.approx(res_plain.history[0]["loss"], rel=1e-3), "the loss is unchanged"
    assert not torch.equal(plain.conv1.weight, distilled.conv1.weight), "distillation did not change training"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"the teacher's {k} changed"
    assert all(p.grad is None for p in teacher.parameters()), "gradients reached the teacher"
    assert teacher.training, "the teacher's train/eval mode was not restored"
    for name, sl in pruned_slices(distilled):
        want = 1.0 if name.endswith("running_var") else 0.0
        assert torch.all(sl == want), f"{name}: pruned slice moved during distillation"


def test_distillation_needs_a_teacher():
    with pytest.raises(ValueError, match="distill_weight=0.5 distils from a teacher"):
        _distill_run(0.5, None)


def test_distillation_resumes_exactly(tmp_path):
    from tinyjob import trained

    teacher = trained()
    _, evald = loaders()
    inner = make_eval_fn(evald)
    full, _ = _distill_run(0.5, teacher, epochs=3, workspace=tmp_path / "a", eval_fn=inner)

    class Kill(Exception):
        pass

    calls = {"n": 0}

    def dying_eval(m):  # call 0: the start, 1: epoch 1, 2: epoch 2 -> killed while evaluating epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise Kill
        return inner(m)

    with pytest.raises(Kill):
        _distill_run(0.5, teacher, epochs=3, workspace=tmp_path / "b", eval_fn=dying_eval)
    resumed, res = _distill_run(0.5, teacher, epochs=3, workspace=tmp_path / "b", eval_fn=inner)
    assert res.resumed_from == 1, res
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), f"{k} differs between the resumed and the uninterrupted run"
    other = trained(seed=1)  # another teacher: the checkpoint does not fit, fine-tuning starts over
    _, res = _distill_run(0.5, other, epochs=3, workspace=tmp_path / "b", eval_fn=inner)
    assert res.resumed_from == 0, "a checkpoint made with another teacher was resumed"


def test_cli_finetune_distils_from_the_unpruned_checkpoint(tmp_path, monkeypatch, capsys):
    import prunekit.workflow.finetune as ft_module
    from prunekit.cli.main import main
    from tinyjob import trained, write_config

    ckpt = tmp_path / "tiny.pt"
    torch.save(trained().state_dict(), ckpt)
    cfg = write_config(tmp_path, model={"checkpoint": str(ckpt)}, finetune={"distill_weight": 0.5})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.3"]) == 0, capsys.readouterr().err
    seen = []
    original = ft_module.finetune

    def spy(*args, **kwargs):
        seen.append(kwargs.get("teacher"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ft_module, "finetune", spy)
    assert main(["finetune", "-c", str(cfg), "--epochs", "1"]) == 0, capsys.readouterr().err
    (teacher,) = seen
    assert teacher is not None and not is_sparse(teacher), "the teacher must be the unpruned model"
    assert all(torch.equal(v, trained().state_dict()[k]) for k, v in teacher.state_dict().items())
