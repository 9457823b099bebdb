"""Channel rules that must be right by construction: slim == sparse *without* ``validate()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from helpers import assert_equivalent, run, shrunk


class PadBlock(nn.Module):
    """A CIFAR ResNet basic block whose shortcut is the option-A zero padding of channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + short)


class OptionAResNet(nn.Module):
    """3 stages of widths 4/8/16, one padded-shortcut block each (the first pads 4 -> 4: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layers = nn.Sequential(PadBlock(4, 4, 1), PadBlock(4, 8, 2), PadBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_channel_zero_pad_shortcut_pruner(ratio):
    model = _randomised(OptionAResNet())
    x = torch.randn(2, 3, 16, 16)
    pruner = prunekit.Pruner(model, x)
    stream = next(g for g in pruner.groups if any(m.name == "fc.weight" and m.dim == 1 for m in g.members))
    # the 16-wide residual stream: only the 4 channels that come from conv1 through both pads are free
    assert stream.n_units == 16 and stream.n_prunable == 4, stream.describe()
    assert any("cannot be pruned" in r for r in stream.reasons), stream.reasons
    before = prunekit.count(model, x)
    pruner.prune(ratio)
    slim = prunekit.to_slim(model)
    assert "conv1.weight" in shrunk(model, slim)
    assert_equivalent(run(model, x), run(slim, x), f"option-A ResNet at {ratio}")
    assert prunekit.count(slim, x).macs < before.macs


def test_channel_zero_pad_shortcut_prune_to_macs():
    model = _randomised(OptionAResNet())
    x = torch.randn(2, 3, 16, 16)
    lines: list[str] = []
    res = prunekit.prune(model, x, removal_ratio=0.5, log=lines.append)
    # prune() validates first: the rules must already be right, so validation freezes nothing
    assert not [line for line in lines if "froze" in line], lines
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "option-A ResNet pruned to 50% of MACs")
    assert res.macs_after < res.macs_before and prunekit.count(slim, x).macs == res.macs_after


class ChunkAfterConcat(nn.Module):
    """A concat of a prunable conv output with the (never prunable) image, then cut in two."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 7 if how == "split" else 6, 1)
        self.head = nn.Conv2d(7, 4, 1) if how == "split" else nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), x], 1)  # 5 prunable channels, then 3 fixed ones
        if self.how == "chunk":
            h1, h2 = y.chunk(2, 1)
            return self.head(h1 * torch.sigmoid(h2))
        if self.how == "split":  # a 1-channel piece, then the rest: python-int sizes
            h1, h2 = torch.split(y, [1, 7], 1)
            return self.head(torch.cat([h2, h1], 1)[:, :7] + F.relu(self.b(x)))
        h1, h2 = torch.cat([F.relu(self.b(x)), y], 1).split(7, 1)  # 6 + 8 = 14: two of 7
        return self.head(F.relu(h1[:, :4] + h2[:, 3:]))


@pytest.mark.parametrize("how", ["chunk", "split", "split_int"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_equal_split_of_partly_pruned_concat(how, ratio):
    torch.manual_seed(0)
    model = ChunkAfterConcat(how).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = prunekit.Pruner(model, x)
    pruner.prune(ratio)
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), f"{how} of a partly pruned concat at {ratio}")
    a = next(g for g in pruner.groups if any(m.name == "a.weight" and m.dim == 0 for m in g.members))
    if how == "chunk":  # channel k of one half goes with channel k of the other; the image's partners stay
        assert a.n_prunable == 1, a.describe()
    else:  # cut at python-int sizes: nothing of the cut tensor is prunable
        assert a.n_prunable == 0, a.describe()
