"""The tracer's own shortcuts: they must never change what is traced."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit import Pruner
from prunekit.graph import trace as T
from prunekit.graph.trace import _META_SHAPE, shadow_model, trace
from zoo import ZOO, build


def _meta(*shape, **kw):
    return torch.randn(*shape, **kw).to("meta")


CASES = [
    (F.relu, (_meta(2, 3, 4, 4),), {}),
    (F.hardtanh, (_meta(2, 3), 0.0, 6.0), {}),
    (F.hardswish, (_meta(2, 3, 4, 4).to(memory_format=torch.channels_last),), {}),
    (F.gelu, (_meta(2, 5, 8),), {"approximate": "tanh"}),
    (F.dropout, (_meta(2, 5), 0.1, False), {}),
    (torch.sigmoid, (_meta(4, 3),), {}),
    (F.batch_norm, (_meta(2, 3, 4, 4), _meta(3), _meta(3), _meta(3), _meta(3)), {}),
    (F.layer_norm, (_meta(2, 7, 8), [8], _meta(8), _meta(8)), {}),
    (F.group_norm, (_meta(2, 6, 5), 3, _meta(6), _meta(6)), {}),
    (F.softmax, (_meta(2, 6, 5),), {"dim": -1}),
    (F.linear, (_meta(2, 7, 8), _meta(5, 8), _meta(5)), {}),
    (F.linear, (_meta(8), _meta(5, 8)), {}),
    # everything by keyword
    (F.batch_norm, (), {"input": _meta(2, 3, 4), "running_mean": _meta(3), "running_var": _meta(3)}),
    (F.layer_norm, (), {"input": _meta(2, 8), "normalized_shape": [8]}),
    (F.group_norm, (), {"input": _meta(2, 6, 5), "num_groups": 2}),
    (F.softmax, (), {"input": _meta(2, 6), "dim": 1}),
    (F.linear, (), {"input": _meta(2, 8), "weight": _meta(5, 8)}),
]


@pytest.mark.parametrize("func,args,kwargs", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_meta_shortcut_matches_torch(func, args, kwargs):
    fast = _META_SHAPE[func](args, kwargs)
    real = func(*args, **kwargs)
    assert fast is not None
    assert (fast.shape, fast.dtype, fast.stride(), fast.device) == (real.shape, real.dtype, real.stride(), real.device)


def test_meta_shortcut_inplace_returns_the_input():
    x = _meta(2, 3)
    assert _META_SHAPE[F.relu]((x, True), {}) is x
    assert _META_SHAPE[F.hardswish]((x,), {"inplace": True}) is x


@pytest.mark.parametrize(
    "func,args,kwargs",
    [
        (F.batch_norm, (_meta(2, 3, 4), _meta(3), _meta(3), None, None, True), {}),  # training: stats
        (F.batch_norm, (_meta(2, 4, 4), _meta(3), _meta(3)), {}),  # wrong width: torch must raise
        (F.layer_norm, (_meta(2, 7, 8), [7, 8]), {}),  # several normalised dims
        (F.layer_norm, (_meta(2, 7, 8), [8], _meta(7)), {}),  # wrong weight
        (F.group_norm, (_meta(2, 7, 5), 3), {}),  # channels not divisible
        (F.softmax, (_meta(2, 3),), {"dim": 1, "dtype": torch.float64}),  # dtype change
        (F.linear, (_meta(2, 7), _meta(5, 8)), {}),  # wrong in_features: torch must raise
        (F.linear, (_meta(2, 8, dtype=torch.float64), _meta(5, 8)), {}),  # mixed dtypes
        (F.relu, (torch.randn(2, 3),), {}),  # not on meta
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_meta_shortcut_leaves_unusual_calls_to_torch(func, args, kwargs):
    assert _META_SHAPE[func](args, kwargs) is None


def test_meta_trace_still_reports_shape_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4))
    with pytest.raises(Exception, match=r"(?i)running_mean|size|shape|expected"):
        trace(model, torch.randn(1, 3, 8, 8), mode="meta")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_shortcuts_do_not_change_groups(name, monkeypatch):
    model, x = build(name)
    fast = [g.describe() for g in Pruner(model, x).groups]
    monkeypatch.setattr(T, "_META_SHAPE", {})
    assert fast == [g.describe() for g in Pruner(model, x).groups]


class _Cache(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.cache = {}
        self.alias = [self.conv]

    def forward(self, x):
        self.cache["last"] = x
        return self.alias[0](x)


def test_shadow_shares_weights_and_isolates_caches():
    model = _Cache()
    shadow = shadow_model(model)
    assert shadow.conv.weight is model.conv.weight
    assert shadow.alias[0] is shadow.conv and shadow.conv is not model.conv
    trace(model, torch.randn(1, 3, 8, 8), mode="meta")
    assert model.cache == {}
    assert model.conv.weight.device.type == "cpu"


class _SelfCopying(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.copies = 0

    def __deepcopy__(self, memo):
        self.copies += 1
        new = _SelfCopying.__new__(_SelfCopying)
        new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()})
        return new

    def forward(self, x):
        return self.conv(x)


def test_shadow_respects_a_module_own_deepcopy():
    model = nn.Sequential(_SelfCopying(), nn.ReLU())
    shadow = shadow_model(model)
    assert model[0].copies == 1 and shadow[0] is not model[0]
    trace(model, torch.randn(1, 3, 8, 8), mode="meta")


class _PartialWrite(nn.Module):
    def __init__(self, whole_rows: bool):
        super().__init__()
        self.whole_rows = whole_rows
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        out = torch.zeros_like(x[:, :1]).expand(-1, 8, -1, -1).clone()
        if self.whole_rows:
            out[torch.tensor([1, 0])] = y
        else:
            out[:, :4] = y[:, :4]  # a channel slice: not a row write
        return self.b(out)


@pytest.mark.parametrize("whole_rows", [True, False])
def test_setitem_couples_whole_rows_only(whole_rows):
    pruner = Pruner(_PartialWrite(whole_rows).eval(), torch.randn(2, 3, 4, 4))
    conv = [g for g in pruner.groups if any(m.name == "a.weight" and m.dim == 0 for m in g.members)]
    assert conv and conv[0].prunable == whole_rows, conv[0].describe()
    if whole_rows:
        assert any(m.name == "b.weight" and m.dim == 1 for m in conv[0].members)
