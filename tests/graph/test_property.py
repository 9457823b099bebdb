"""Random architectures and random ratios: the slim model always equals the sparse model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from helpers import assert_equivalent, run, shrunk

KINDS = (
    "conv",
    "residual",
    "concat",
    "depthwise",
    "grouped",
    "gate",
    "chunk",
    "split",
    "split_int",
    "glu",
    "pad",
    "se",
    "shuffle",
    "transposed",
    "unet",
    "cat_input",
)


@st.composite
def architectures(draw):
    blocks = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=5))
    return {
        "stem": draw(st.sampled_from([4, 6, 8, 12])),
        "bn": draw(st.booleans()),
        "blocks": [(k, draw(st.integers(0, 2**16))) for k in blocks],
        "head": draw(st.sampled_from(["flatten", "pool"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


def make_block(kind: str, c: int, pick) -> tuple[nn.Module, int, dict]:
    """One block of ``kind`` on ``c`` channels: ``(modules, output width, options for forward)``."""
    if kind == "conv":
        w = pick([4, 6, 8, 12])
        return nn.Sequential(_conv(c, w, pick([1, 3])), nn.ReLU()), w, {}
    if kind == "residual":
        hidden = pick([4, 8])
        return nn.Sequential(_conv(c, hidden), nn.BatchNorm2d(hidden), nn.ReLU(), _conv(hidden, c, 1)), c, {}
    if kind in ("concat", "chunk", "split", "split_int"):
        # two convs of unequal widths, concatenated (and then cut: the parts are pruned unequally)
        a = pick([2, 4, 6])
        b = pick([4, 6, 10]) if kind != "split_int" else pick([a, 2 * a + a])
        mods = nn.ModuleList([_conv(c, a, 1), _conv(c, b)])
        cut = pick([1, 2, a + 1]) if kind == "split" else a
        w = {"concat": a + b, "chunk": (a + b) // 2, "split": a + b, "split_int": a}[kind]
        return mods, w, {"cut": cut}
    if kind == "depthwise":
        w = c * pick([1, 2])
        return nn.Sequential(_conv(c, w, groups=c), nn.ReLU()), w, {}
    if kind == "grouped":
        g = pick([g for g in (2, 4) if c % g == 0] or [1])
        w = g * pick([1, 2, 3])
        return nn.Sequential(_conv(c, w, groups=g), nn.ReLU()), w, {}
    if kind == "gate":
        return _conv(c, c, 1), c, {}
    if kind == "glu":
        w = pick([2, 4, 6])
        return _conv(c, 2 * w), w, {}
    if kind == "pad":  # a conv to c + before + after channels, plus the zero-padded input (option A)
        before, after = pick([0, 1, 2]), pick([1, 2])
        return _conv(c, c + before + after), c + before + after, {"pad": (0, 0, 0, 0, before, after)}
    if kind == "se":
        hidden = pick([2, 4])
        return nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c)), c, {}
    if kind == "shuffle":  # sub-pixel upsampling, then back to the same size
        w = pick([2, 3])
        return _conv(c, 4 * w), w, {}
    if kind == "transposed":
        w = pick([4, 6])
        return nn.Sequential(nn.ConvTranspose2d(c, w, 3, padding=1), nn.ReLU()), w, {}
    if kind == "unet":  # down, up, concat with the skip
        m, u = pick([4, 6]), pick([2, 4])
        return nn.ModuleList([_conv(c, m, stride=2), nn.ConvTranspose2d(m, u, 2, stride=2)]), c + u, {}
    if kind == "cat_input":  # concat with the image: channels that can never be pruned
        return nn.Identity(), c + 3, {}
    raise ValueError(f"unknown block kind {kind!r}; known: {KINDS}")


def run_block(kind: str, blk: nn.Module, opts: dict, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    if kind == "residual":
        return F.relu(x + blk(x))
    if kind == "concat":
        return torch.cat([m(x) for m in blk], 1)
    if kind == "chunk":
        h1, h2 = torch.cat([m(x) for m in blk], 1).chunk(2, 1)
        return h1 + F.relu(h2)
    if kind == "split":
        y = torch.cat([m(x) for m in blk], 1)
        h1, h2 = torch.split(y, [opts["cut"], y.shape[1] - opts["cut"]], 1)
        return torch.cat([h2, 2 * h1], 1)
    if kind == "split_int":
        return sum(torch.split(torch.cat([m(x) for m in blk], 1), opts["cut"], 1))
    if kind == "gate":
        return x * torch.sigmoid(blk(x))
    if kind == "glu":
        a, b = blk(x).chunk(2, dim=1)
        return a * torch.sigmoid(b)
    if kind == "pad":
        return F.relu(blk(x) + F.pad(x, opts["pad"]))
    if kind == "se":
        return x * torch.sigmoid(blk(x.mean((2, 3))))[:, :, None, None]
    if kind == "shuffle":
        return F.avg_pool2d(F.pixel_shuffle(blk(x), 2), 2)
    if kind == "unet":
        return torch.cat([x, blk[1](F.relu(blk[0](x)))], 1)
    if kind == "cat_input":
        return torch.cat([x, image], 1)
    return blk(x)


class RandomNet(nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        c = arch["stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c) if arch["bn"] else nn.Identity())
        self.kinds, self.opts = [], []
        self.blocks = nn.ModuleList()
        for kind, r in arch["blocks"]:
            rnd = torch.Generator().manual_seed(r)

            def pick(options, rnd=rnd):
                return options[int(torch.randint(len(options), (1,), generator=rnd))]

            blk, c, opts = make_block(kind, c, pick)
            self.kinds.append(kind)
            self.opts.append(opts)
            self.blocks.append(blk)
        self.head = arch["head"]
        if self.head == "flatten":
            self.fc1 = nn.Linear(c * 4, 10)
            self.fc2 = nn.Linear(10, 3)
        else:
            self.fc1 = nn.Linear(c, 3)

    def forward(self, image):
        x = self.stem(image)
        for kind, blk, opts in zip(self.kinds, self.blocks, self.opts):
            x = run_block(kind, blk, opts, x, image)
        if self.head == "flatten":
            return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))))
        return self.fc1(x.mean((2, 3)))


def check_random_net(arch: dict, data) -> None:
    """Prune a random net at random ratios; the slim model runs and equals the sparse one, no validate()."""
    torch.manual_seed(arch["seed"])
    model = RandomNet(arch).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = prunekit.Pruner(model, x)
    assert not pruner.warnings, f"{arch}: unexpected warnings {pruner.warnings}"
    assert pruner.prunable_groups, f"{arch}: no prunable group"
    criterion = data.draw(st.sampled_from(["l2", "l1", "fpgm", "random"]), label="criterion")
    if data.draw(st.booleans(), label="per-group ratios"):
        ratio = {g.id: data.draw(st.floats(0.0, 0.95), label=f"ratio of group {g.id}") for g in pruner.prunable_groups}
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


@settings(max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), data=st.data())
def test_random_architecture_slim_equals_sparse(arch, data):
    check_random_net(arch, data)


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("PRUNEKIT_RANDOM_NETS", "1000")),
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(arch=architectures(), data=st.data())
def test_random_architecture_slim_equals_sparse_many(arch, data):
    """1,000 random nets (``PRUNEKIT_RANDOM_NETS`` sets how many): zero slim models that fail or differ."""
    check_random_net(arch, data)
