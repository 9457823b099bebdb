"""Random architectures and random ratios: the slim model always equals the sparse model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from helpers import assert_equivalent, run, shrunk

KINDS = ("conv", "residual", "concat", "depthwise", "grouped", "gate")


@st.composite
def architectures(draw):
    blocks = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    return {
        "stem": draw(st.sampled_from([4, 6, 8, 12])),
        "bn": draw(st.booleans()),
        "blocks": [(k, draw(st.integers(0, 2**16))) for k in blocks],
        "head": draw(st.sampled_from(["flatten", "pool"])),
        "seed": draw(st.integers(0, 2**16)),
    }


class RandomNet(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        c = arch["stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c) if arch["bn"] else nn.Identity())
        self.kinds = []
        self.blocks = nn.ModuleList()
        for kind, r in arch["blocks"]:
            rnd = torch.Generator().manual_seed(r)

            def pick(options, rnd=rnd):
                return options[int(torch.randint(len(options), (1,), generator=rnd))]

            if kind == "conv":
                w = pick([4, 6, 8, 12])
                blk = nn.Sequential(nn.Conv2d(c, w, pick([1, 3]), padding="same"), nn.ReLU())
            elif kind == "residual":
                w = c
                hidden = pick([4, 8])
                blk = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                    nn.Conv2d(hidden, c, 1))
            elif kind == "concat":
                a, b = pick([2, 4, 6]), pick([2, 4, 6])
                blk = nn.ModuleList([nn.Conv2d(c, a, 1), nn.Conv2d(c, b, 3, padding=1)])
                w = a + b
            elif kind == "depthwise":
                w = c * pick([1, 2])
                blk = nn.Sequential(nn.Conv2d(c, w, 3, padding=1, groups=c), nn.ReLU())
            elif kind == "grouped":
                g = pick([g for g in (2, 4) if c % g == 0] or [1])
                w = g * pick([1, 2, 3])
                blk = nn.Sequential(nn.Conv2d(c, w, 3, padding=1, groups=g), nn.ReLU())
            else:  # gate
                w = c
                blk = nn.Conv2d(c, c, 1)
            self.kinds.append(kind)
            self.blocks.append(blk)
            c = w
        self.head = arch["head"]
        if self.head == "flatten":
            self.fc1 = nn.Linear(c * 4, 10)
            self.fc2 = nn.Linear(10, 3)
        else:
            self.fc1 = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for kind, blk in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = F.relu(x + blk(x))
            elif kind == "concat":
                x = torch.cat([m(x) for m in blk], 1)
            elif kind == "gate":
                x = x * torch.sigmoid(blk(x))
            else:
                x = blk(x)
        if self.head == "flatten":
            return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))))
        return self.fc1(x.mean((2, 3)))


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), data=st.data())
def test_random_architecture_slim_equals_sparse(arch, data):
    torch.manual_seed(arch["seed"])
    model = RandomNet(arch).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = prunekit.Pruner(model, x)
    assert not pruner.warnings, f"{arch}: unexpected warnings {pruner.warnings}"
    assert pruner.prunable_groups, f"{arch}: no prunable group"
    criterion = data.draw(st.sampled_from(["l2", "l1", "fpgm", "random"]), label="criterion")
    if data.draw(st.booleans(), label="per-group ratios"):
        ratio = {g.id: data.draw(st.floats(0.0, 0.95), label=f"ratio of group {g.id}")
                 for g in pruner.prunable_groups}
    else:
        ratio = data.draw(st.floats(0.0, 0.95), label="ratio")
    pruner.prune(ratio, criterion=criterion)
    slim = prunekit.to_slim(model)
    gone = shrunk(model, slim)
    plan = prunekit.get_plan(model)
    assert bool(gone) == bool(plan.pruned), f"{arch}: plan {plan.pruned} but shrunk tensors {gone}"
    for n, t in slim.state_dict().items():
        assert all(s >= 1 for s in t.shape), f"{arch}: {n} lost every channel ({tuple(t.shape)})"
    assert_equivalent(run(model, x), run(slim, x), f"{arch} ratio={ratio} criterion={criterion}")
