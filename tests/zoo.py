"""A zoo of small topologies, one per channel-flow structure the engine must handle.

``ZOO`` maps a case name to a factory returning ``(model, example_inputs)``. Factories are
deterministic given the global torch seed; use :func:`build` to get a case with a seed.
``UNPRUNABLE`` lists the cases that are meant to have no prunable group, with a fragment of
the warning the pruner must report for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Factory = Callable[[], tuple[nn.Module, Any]]
ZOO: dict[str, Factory] = {}
#: case name -> fragment expected in ``Pruner.warnings`` (and the groups' reasons).
UNPRUNABLE: dict[str, str] = {}
#: case name -> tensors that pruning 50% must shrink (the structure the case is about).
MUST_SHRINK: dict[str, tuple[str, ...]] = {
    "conv_chain": ("0.weight", "1.weight", "3.weight", "5.weight"),
    "residual_add": ("stem.0.weight", "conv2.0.weight", "conv3.weight", "head.weight"),
    "residual_mul_se": ("conv.0.weight", "fc2.weight", "gate.weight", "fc1.weight"),
    "concat": ("a.0.weight", "b.0.weight", "mix.0.weight", "out.weight"),
    "concat_nonchannel_dim": ("a.0.weight", "b.weight"),
    "split_chunk_unbind": ("a.weight", "proj.weight", "e.weight"),
    "slicing_nonchannel": ("a.0.weight", "b.weight"),
    "flatten_linear": ("conv.0.weight", "fc1.weight", "fc2.weight", "fc3.weight"),
    "permute_convnext": ("stem.weight", "stem_norm.weight", "dw.weight", "norm.weight", "gamma", "pw1.weight"),
    "depthwise": ("1.weight",),
    "depthwise_multiplier": ("1.weight",),
    "grouped_conv": ("1.weight", "4.weight"),
    "conv_transpose": ("up.weight", "gup.weight", "dwup.weight", "dwmul.weight"),
    "conv1d": ("0.weight", "3.weight"),
    "conv3d": ("0.weight", "3.weight"),
    "batchnorm_1d_2d_3d": ("bn1.weight", "bn1c.weight", "bn2.weight", "bn3.weight"),
    "layernorm": ("ln1.weight", "ln2.weight"),
    "groupnorm": ("1.weight",),
    "instancenorm": ("1.weight",),
    "prelu": ("1.weight",),
    "embedding_linear": ("emb.weight", "fc1.weight"),
    "mha_batch_first": ("attn.in_proj_weight", "attn.out_proj.weight"),
    "mha_seq_first": ("attn.in_proj_weight", "attn.out_proj.weight"),
    "sdpa_explicit_scale": ("q.weight", "k.weight", "v.weight", "proj.weight"),
    "sdpa_default_scale": ("v.weight", "proj.weight"),
    "channel_shuffle": ("b.weight", "out.weight"),
    "pixel_shuffle": ("up.weight", "out.weight", "out2.weight"),
    "control_flow": ("blocks.0.0.weight", "extra.weight"),
    "multi_input_tuple": ("a.0.weight", "b.0.weight", "fc.weight"),
    "multi_input_dict": ("a.0.weight", "b.0.weight", "fc.weight"),
    "multi_output_tuple": ("mid.0.weight", "cls.weight", "seg.weight"),
    "multi_output_dict": ("body.0.weight",),
    "shared_module": ("shared.weight", "fc.weight"),
    "bare_parameters": ("cls_token", "pos", "gamma", "fc1.weight"),
    "frozen_parameters": ("0.0.weight", "1.0.weight"),
    "no_grad_inside": ("teacher.weight", "b.weight"),
    "vit_block": ("qkv.weight", "proj.weight", "fc1.weight", "cls_token", "pos"),
    "einsum": ("w1", "w2", "w3"),
    "matmul_bare_parameter": ("weight", "w2"),
    "roi_pool_rows_fill": ("p3.weight", "p4.weight", "box.1.weight"),
}


def case(name: str, unprunable: str | None = None):
    def deco(fn: Factory) -> Factory:
        ZOO[name] = fn
        if unprunable is not None:
            UNPRUNABLE[name] = unprunable
        return fn

    return deco


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """The model and example inputs of a zoo case, built from ``seed``; the model is in eval mode."""
    torch.manual_seed(seed)
    model, inputs = ZOO[name]()
    _randomize_norms(model)
    return model.eval(), inputs


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial norm statistics and affine parameters, so pruning them matters."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.5, 0.5)


def img(c: int = 3, s: int = 8, n: int = 2) -> torch.Tensor:
    return torch.randn(n, c, s, s)


def cbr(cin: int, cout: int, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


# ----- plain structures -----------------------------------------------------------------
@case("conv_chain")
def conv_chain():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)
    )
    return model, img(s=10)


class ResidualAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.conv1 = cbr(8, 12)
        self.conv2 = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.conv2(self.conv1(x)))
        x = x + self.conv3(x)  # a second residual on the same channels
        return self.head(x.mean((2, 3)))


@case("residual_add")
def residual_add():
    return ResidualAdd(), img()


class SEGate(nn.Module):
    """Squeeze-and-excitation and a sigmoid gate: ``x * s`` couples x with the gate producer."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 16)
        self.fc1 = nn.Conv2d(16, 6, 1)
        self.fc2 = nn.Conv2d(6, 16, 1)
        self.gate = nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        x = x * s
        x = x * torch.sigmoid(self.gate(x))
        return self.out(x)


@case("residual_mul_se")
def residual_mul_se():
    return SEGate(), img()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 6)
        self.b = cbr(3, 10)
        self.c = nn.Conv2d(3, 4, 1)
        self.mix = cbr(16, 8)
        self.out = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        y = self.mix(torch.cat([a, b], dim=1))  # offsets: b starts at channel 6
        z = torch.cat((torch.cat([y, c], 1), a), -3)  # cascaded, negative dim
        return self.out(z)


@case("concat")
def concat():
    return Concat(), img()


class ConcatSpatial(nn.Module):
    """Concatenation along height: both branches must lose the same channels."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=2))


@case("concat_nonchannel_dim")
def concat_nonchannel_dim():
    return ConcatSpatial(), img()


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(4, 6, 1)
        self.d = nn.Conv2d(12, 6, 1)
        self.proj = nn.Conv2d(3, 8, 1)
        self.e = nn.Conv2d(8, 6, 1)
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        a, b = h.chunk(2, dim=1)  # halves lose the same positions
        c, d = torch.split(h, [4, 12], dim=1)  # fixed sizes
        p = self.proj(x)
        rows = p.unbind(2)  # unbind a non-channel dim
        q = torch.stack(rows, 2)
        y = self.a(a) + self.b(b) + self.c(c) + self.d(d) + self.e(q)
        return self.out(y)


@case("split_chunk_unbind")
def split_chunk_unbind():
    return Split(), img()


class Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.a(x)
        y = y[:, :, 1:-1, ::2]
        y = y[..., 1:]
        y = torch.narrow(y, 2, 0, 5)
        return self.b(y)


@case("slicing_nonchannel")
def slicing_nonchannel():
    return Slicing(), img(s=12)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 8)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32 + 4 * 16, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        y = F.max_pool2d(self.conv(x), 2)
        y = F.relu(self.fc1(torch.flatten(y, 1)))
        z = self.conv2(x)
        z = z.view(z.shape[0], -1)
        h = F.relu(self.fc2(torch.cat([y, z], 1)))
        h = h.reshape(h.shape[0], 4, -1).reshape(h.shape[0], -1)  # widths from the tensor, not constants
        return self.fc3(h)


@case("flatten_linear")
def flatten_linear():
    return FlattenLinear(), img()


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, permute to channels-last, LayerNorm over channels, MLP, layer scale."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stem_norm = nn.LayerNorm(dim)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.stem_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        y = (self.gamma * y).transpose(1, 3).transpose(2, 3)
        return self.head(x + y)


@case("permute_convnext")
def permute_convnext():
    return ConvNeXtBlock(), img(s=8)


@case("depthwise")
def depthwise():
    model = nn.Sequential(
        cbr(3, 8), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)
    )
    return model, img()


@case("depthwise_multiplier")
def depthwise_multiplier():
    model = nn.Sequential(
        cbr(3, 8), nn.Conv2d(8, 24, 3, padding=1, groups=8), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 4, 1)
    )
    return model, img()


@case("grouped_conv")
def grouped_conv():
    model = nn.Sequential(
        cbr(3, 16),
        nn.Conv2d(16, 24, 3, padding=1, groups=4),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Conv2d(24, 12, 1, groups=2),
        nn.ReLU(),
        nn.Conv2d(12, 4, 1),
    )
    return model, img()


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 8)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.bn = nn.BatchNorm2d(12)
        self.gup = nn.ConvTranspose2d(12, 16, 3, padding=1, groups=4)
        self.dwup = nn.ConvTranspose2d(16, 16, 3, padding=1, groups=16)
        self.dwmul = nn.ConvTranspose2d(16, 32, 1, groups=16)  # depthwise with a channel multiplier
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.up(self.conv(x))))
        y = F.relu(self.gup(y))
        return self.out(F.relu(self.dwmul(F.relu(self.dwup(y)))))


@case("conv_transpose")
def conv_transpose():
    return Transposed(), img(s=6)


@case("conv1d")
def conv1d():
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=8),
        nn.ReLU(),
        nn.Conv1d(8, 3, 1),
    )
    return model, torch.randn(2, 4, 12)


@case("conv3d")
def conv3d():
    model = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 6, 3), nn.ReLU(), nn.Conv3d(6, 2, 1)
    )
    return model, torch.randn(2, 2, 5, 5, 5)


class BatchNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.c1 = nn.Conv1d(1, 8, 3, padding=1)
        self.bn1c = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv3d(8, 8, 1)
        self.bn3 = nn.BatchNorm3d(8)
        self.out = nn.Linear(16 + 8, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.fc(x)))  # (N, C)
        s = F.relu(self.bn1c(self.c1(x.unsqueeze(1))))  # (N, C, L)
        s = F.relu(self.bn2(self.c2(s.unsqueeze(-1))))  # (N, C, L, 1)
        s = F.relu(self.bn3(self.c3(s.unsqueeze(-1))))  # (N, C, L, 1, 1)
        return self.out(torch.cat([h, s.mean((2, 3, 4))], 1))


@case("batchnorm_1d_2d_3d")
def batchnorm_1d_2d_3d():
    return BatchNorms(), torch.randn(4, 6)


class MLPLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.ln1 = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 24)
        self.ln2 = nn.LayerNorm(24, elementwise_affine=True, bias=False)
        self.fc3 = nn.Linear(24, 3)

    def forward(self, x):
        x = F.gelu(self.ln1(self.fc1(x)))
        return self.fc3(F.silu(self.ln2(self.fc2(x))))


@case("layernorm")
def layernorm():
    return MLPLayerNorm(), torch.randn(2, 5, 8)


@case("groupnorm")
def groupnorm():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, padding=1),
        nn.GroupNorm(12, 12),
        nn.SiLU(),
        nn.Conv2d(12, 4, 1),
    )
    return model, img()


@case("instancenorm")
def instancenorm():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    return model, img()


@case("prelu")
def prelu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 3), nn.PReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.5)
    return model, img()


class EmbeddingLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, tokens):
        return self.fc2(F.relu(self.fc1(self.emb(tokens))))


@case("embedding_linear")
def embedding_linear():
    return EmbeddingLinear(), torch.randint(0, 20, (2, 7))


class MHA(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        y = self.out(h + a)
        return y if self.batch_first else y.transpose(0, 1)


@case("mha_batch_first")
def mha_batch_first():
    return MHA(True), torch.randn(2, 5, 6)


@case("mha_seq_first")
def mha_seq_first():
    return MHA(False), torch.randn(2, 5, 6)


class SDPA(nn.Module):
    def __init__(self, explicit_scale: bool, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5 if explicit_scale else None
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.inp = nn.Linear(6, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.scale is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = o.transpose(1, 2).reshape(b, n, -1)
        return self.out(x + self.proj(o))


@case("sdpa_explicit_scale")
def sdpa_explicit_scale():
    return SDPA(True), torch.randn(2, 5, 6)


@case("sdpa_default_scale")
def sdpa_default_scale():
    return SDPA(False), torch.randn(2, 5, 6)


class ChannelShuffle(nn.Module):
    def __init__(self, groups=2):
        super().__init__()
        self.g = groups
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 1, groups=2)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.b(self.a(x))
        n, c, h, w = x.shape
        x = x.view(n, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.out(F.relu(x))


@case("channel_shuffle")
def channel_shuffle():
    return ChannelShuffle(), img()


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.up = nn.Conv2d(8, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.out = nn.Conv2d(4, 2, 1)
        self.down = nn.PixelUnshuffle(2)
        self.out2 = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        y = self.shuffle(F.relu(self.up(self.a(x))))  # 16 channels -> 4 channels x (2 x 2) positions
        z = self.down(self.a(x))  # 8 channels -> 32 = 8 x (2 x 2)
        return self.out(y), self.out2(z)


@case("pixel_shuffle")
def pixel_shuffle():
    return PixelShuffle(), img(s=4)


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([cbr(8, 8) for _ in range(3)])
        self.stem = cbr(3, 8)
        self.extra = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x, depth: int = 2):
        x = self.stem(x)
        for i, blk in enumerate(self.blocks):
            if i >= depth:
                break
            x = x + blk(x) if i % 2 == 0 else blk(x)
        if x.shape[-1] > 4:
            x = self.extra(x)
        else:
            x = -self.extra(x)
        return self.out(x)


@case("control_flow")
def control_flow():
    return ControlFlow(), (img(), 3)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(1, 8)
        self.fc = nn.Linear(5, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, image, depth, meta=None):
        y = self.a(image) + self.b(depth)
        if meta is not None:
            y = y * self.fc(meta)[:, :, None, None]
        return self.out(y)


@case("multi_input_tuple")
def multi_input_tuple():
    return TwoInputs(), (img(), img(1), torch.randn(2, 5))


@case("multi_input_dict")
def multi_input_dict():
    return TwoInputs(), {"image": img(), "depth": img(1), "meta": torch.randn(2, 5)}


class MultiOut(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.body = cbr(3, 8)
        self.mid = cbr(8, 8)
        self.cls = nn.Linear(8, 5)
        self.seg = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.mid(self.body(x))
        logits = self.cls(f.mean((2, 3)))
        seg = self.seg(f)
        if self.as_dict:
            return {"logits": logits, "seg": seg, "features": [f.amax((2, 3))]}
        return logits, seg


@case("multi_output_tuple")
def multi_output_tuple():
    return MultiOut(False), img()


@case("multi_output_dict")
def multi_output_dict():
    return MultiOut(True), img()


class Shared(nn.Module):
    """The same conv applied twice (weights shared): its in and out channels couple."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 12)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.shared(x))
        x = self.bn(self.shared(x))
        y = F.relu(self.mid(x)).permute(0, 2, 3, 1)
        y = self.fc(F.relu(self.fc(y)))  # a Linear called twice as well
        return self.out(y.permute(0, 3, 1, 2))


@case("shared_module")
def shared_module():
    return Shared(), img()


class BareParams(nn.Module):
    """cls token concatenated, position embedding added, layer-scale gamma: no layer owns them."""

    def __init__(self, dim=16, n=9):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.1)
        self.fc1 = nn.Linear(dim, 24)
        self.fc2 = nn.Linear(24, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


@case("bare_parameters")
def bare_parameters():
    return BareParams(), img(s=6)


@case("frozen_parameters")
def frozen_parameters():
    model = nn.Sequential(cbr(3, 8), cbr(8, 12), nn.Conv2d(12, 4, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[1][0].weight.requires_grad_(False)
    return model, img()


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.teacher = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        with torch.no_grad():
            t = torch.sigmoid(self.teacher(x))
        return self.out(F.relu(self.b(x)) * t)


@case("no_grad_inside")
def no_grad_inside():
    return NoGradInside(), img()


class ViTBlock(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # a constant: pruning head_dim must not change it
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 10, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + self.proj(o)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x)[:, 0])


@case("vit_block")
def vit_block():
    return ViTBlock(), img(s=6)


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 16) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, 4) * 0.3)
        self.conv = nn.Conv2d(3, 8, 1)
        self.w3 = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x, img):
        h = F.relu(torch.einsum("bnd,de->bne", x, self.w1) + self.b1)
        y = torch.einsum("bne,ef->bnf", h, self.w2)
        z = torch.einsum("bchw,cd->bdhw", F.relu(self.conv(img)), self.w3)
        return y, self.out(torch.einsum("...chw->...chw", z))


@case("einsum")
def einsum():
    return Einsum(), (torch.randn(2, 5, 6), img())


class MatmulLinear(nn.Module):
    """A linear layer written as ``x @ W.T + b`` with bare parameters, and as ``W @ x``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 6) * 0.3)
        self.bias = nn.Parameter(torch.randn(16) * 0.1)
        self.w2 = nn.Parameter(torch.randn(12, 16) * 0.3)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(x @ self.weight.t() + self.bias)
        h = torch.relu(torch.matmul(self.w2, h.transpose(-1, -2))).transpose(-1, -2)
        return self.out(h)


@case("matmul_bare_parameter")
def matmul_bare_parameter():
    return MatmulLinear(), torch.randn(2, 5, 6)


class RoIRowsFill(nn.Module):
    """Detector-style multi-scale RoI pooling (as torchvision's MultiScaleRoIAlign): two FPN
    levels, ``roi_align`` per level, written row by row into one zero tensor that a box head
    reads."""

    def __init__(self):
        super().__init__()
        self.p3 = nn.Conv2d(3, 8, 3, padding=1)
        self.p4 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.box = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 6))

    def forward(self, x):
        from torchvision.ops import roi_align

        levels = [self.p3(x), self.p4(x)]
        boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 2.0, 2.0, 7.0, 6.0], [0, 1.0, 3.0, 6.0, 7.0]])
        which = torch.tensor([0, 1, 0])
        result = torch.zeros(3, levels[0].shape[1], 2, 2, dtype=x.dtype)
        for lvl, (feat, scale) in enumerate(zip(levels, (1.0, 0.5))):
            idx = torch.where(which == lvl)[0]
            result[idx] = roi_align(feat, boxes[idx], (2, 2), spatial_scale=scale, sampling_ratio=2)
        return self.box(result)


@case("roi_pool_rows_fill")
def roi_pool_rows_fill():
    return RoIRowsFill(), img()


class UnknownOp(nn.Module):
    """Every hidden channel passes through an op without a channel rule: nothing prunable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.special.i0(self.a(x) * 0.1))


@case("unknown_op", unprunable="'special_i0' has no channel rule")
def unknown_op():
    return UnknownOp(), img()


# ----- known limitations: not in ZOO; Pruner.transform() refuses them, Pruner.validate() repairs them ---
def shuffle_channels(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleOfBlocks(nn.Module):
    """A channel shuffle of channels that already move in blocks (after a pixel (un)shuffle or a
    first shuffle). The view ``(n, 2, c // 2)`` hard-codes the number of groups, but the layout
    rule prunes whole rows of that outer dim (the only dim along which the blocks are disjoint)."""

    def __init__(self, first: str):
        super().__init__()
        self.first = first
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(3, 8, 1)  # an independent branch that stays prunable
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = shuffle_channels(y) if self.first == "shuffle" else F.pixel_unshuffle(F.pixel_shuffle(y, 2), 2)
        return self.b(shuffle_channels(y)) + self.d(F.relu(self.c(x)))


KNOWN_LIMITATIONS: dict[str, tuple[Factory, str]] = {
    "shuffle_twice": (
        lambda: (ShuffleOfBlocks("shuffle"), img(s=4)),
        "two consecutive channel shuffles: the second view splits channels that move in pairs; "
        "the layout rule then prunes the outer (groups) dim, whose size forward hard-codes",
    ),
    "shuffle_after_pixel_unshuffle": (
        lambda: (ShuffleOfBlocks("pixel"), img(s=4)),
        "channel shuffle after pixel_unshuffle(pixel_shuffle(x)): channels move "
        "in blocks of 4, so the layout rule prunes the hard-coded groups dim",
    ),
}


def build_limitation(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model, inputs = KNOWN_LIMITATIONS[name][0]()
    return model.eval(), inputs
