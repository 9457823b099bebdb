"""``make_eval_fn`` / ``accuracy``: bounded, eval-mode, no-grad evaluation over a loader."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.workflow.evaluation import accuracy, make_eval_fn


class Recorder(nn.Module):
    """A linear classifier that records the mode and grad state of every forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool, int]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        return self.fc(x)


def batches(sizes=(8, 8, 8, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def test_eval_mode_no_grad_and_mode_restored():
    model = Recorder().train()
    make_eval_fn(batches())(model)
    assert model.seen and all(not training and not grad for training, grad, _ in model.seen), (
        f"every forward should run in eval mode without gradients: {model.seen}"
    )
    assert model.training, "the model's training mode must be restored"


@pytest.mark.parametrize(
    "kw, n",
    [
        ({}, 4),
        ({"max_batches": 2}, 2),
        ({"max_batches": 10}, 4),
        ({"fraction": 0.5}, 2),
        ({"fraction": 0.3}, 2),
        ({"fraction": 0.01}, 1),
        ({"fraction": 1.0}, 4),
    ],
)
def test_max_batches_and_fraction_bound_the_cost(kw, n):
    model = Recorder()
    make_eval_fn(batches(), **kw)(model)
    assert len(model.seen) == n, f"{kw} should evaluate {n} of 4 batches, evaluated {len(model.seen)}"


def test_accuracy_and_loss_are_sample_weighted():
    model = Recorder()
    data = batches()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        out = model.fc(x)
    want_acc = float((out.argmax(1) == y).double().mean())
    want_loss = float(F.cross_entropy(out.double(), y))
    assert accuracy(model, data) == pytest.approx(want_acc), "accuracy over uneven batches"
    loss_fn = make_eval_fn(data, "loss")
    assert loss_fn(model) == pytest.approx(want_loss, rel=1e-5), "mean cross-entropy over uneven batches"
    assert loss_fn.lower_is_better is True and make_eval_fn(data).lower_is_better is False, (
        "built-in metrics declare their direction"
    )
    first = accuracy(model, data, max_batches=1)
    assert first == pytest.approx(float((out[:8].argmax(1) == y[:8]).double().mean())), "max_batches=1"


def test_callable_metric_and_tuple_inputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    data = [((torch.ones(2, 3), torch.ones(2, 3)), torch.zeros(2, 3))]
    fn = make_eval_fn(data, lambda out, target: (out - target).abs().mean())
    assert fn(Two()) == pytest.approx(2.0), "a tuple of inputs is passed as positional arguments"
    assert fn.lower_is_better is None, "a callable metric's direction is unknown"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_batches": 0}, "max_batches must be a positive int"),
        ({"max_batches": -3}, "max_batches must be a positive int"),
        ({"max_batches": 1.5}, "max_batches must be a positive int"),
        ({"max_batches": True}, "max_batches must be a positive int"),
        ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
        ({"fraction": float("nan")}, r"fraction must be a number in \(0, 1\]"),
        ({"fraction": "half"}, r"fraction must be a number in \(0, 1\]"),
        ({"fraction": 0.5, "max_batches": 2}, "not both"),
        ({"metric": "f1"}, "unknown metric 'f1'"),
    ],
)
def test_bad_values_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make_eval_fn(batches(), **kw)


def test_fraction_needs_a_length_and_batches_must_be_pairs():
    with pytest.raises(ValueError, match="fraction needs a loader with a length"):
        make_eval_fn(iter(batches()), fraction=0.5)
    with pytest.raises(ValueError, match="pair"):
        make_eval_fn([torch.randn(2, 4)])(Recorder())
    with pytest.raises(ValueError, match="no batches"):
        make_eval_fn([])(Recorder())
    with pytest.raises(TypeError, match="iterable of"):
        make_eval_fn(torch.randn(3, 4))
    with pytest.raises(TypeError, match="must return a number"):
        make_eval_fn(batches(), lambda out, t: "good")(Recorder())


def test_device_and_exports():
    fn = prunekit.make_eval_fn(batches(), device="cpu")
    value = fn(Recorder())
    assert isinstance(value, float) and 0.0 <= value <= 1.0 and not math.isnan(value), f"accuracy {value}"
    assert prunekit.accuracy is accuracy
