"""timm models from tiny configs: slim == sparse without validate(), counting, saving and loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import assert_equivalent, run, shrunk


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def tiny_cait(timm) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "cait_xxs24_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=4,
        num_classes=10,
    ).eval()


class ClsToken(nn.Module):
    """A learned token expanded to the batch and handed to a child module, as CaiT does."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 1, 4))
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.tok.expand(x.shape[0], -1, -1)) * x.mean()


@pytest.mark.parametrize("meta", [True, False])
def test_count_with_a_parameter_view_as_module_input(meta):
    # under no_grad, tok.expand(...) requires grad yet has no grad function: torch's module
    # tracker inside the FLOP counter used to assert on it ("Expected gradient function to be set")
    model = ClsToken()
    c = prunekit.count(model, torch.randn(2, 1, 4), meta=meta)
    assert c.macs == 2 * 4 * 3 and c.params == 4 + 15
    assert all(p.requires_grad for p in model.parameters()), "counting must leave requires_grad as it was"


@pytest.mark.parametrize("attention", ["auto", "heads"])
def test_cait_slim_equals_sparse_without_validate(timm, attention):
    model = tiny_cait(timm)
    x = torch.randn(2, 3, 32, 32)
    before = prunekit.count(model, x)
    pruner = prunekit.Pruner(model, x, attention=attention)
    assert not pruner.warnings, pruner.warnings
    heads = [g for g in pruner.prunable_groups if any(m.name == "blocks_token_only.0.attn.q.weight" for m in g.members)]
    assert heads, "the class attention's query width is not prunable"
    pruner.prune(0.5)
    slim = prunekit.to_slim(model)
    gone = shrunk(model, slim)
    assert "blocks_token_only.0.attn.q.weight" in gone and "blocks.0.attn.qkv.weight" in gone, gone
    assert_equivalent(run(model, x), run(slim, x), f"tiny CaiT ({attention})")
    after = prunekit.count(slim, x)
    assert after.macs < before.macs and after.params < before.params
    attn = slim.blocks_token_only[0].attn
    if attention == "heads":
        assert attn.num_heads < 4
    loss = slim(x).pow(2).mean()
    loss.backward()
    assert slim.blocks_token_only[0].attn.q.weight.grad is not None


def test_cait_slim_save_and_load(timm, tmp_path):
    model = tiny_cait(timm)
    x = torch.randn(2, 3, 32, 32)
    pruner = prunekit.Pruner(model, x, attention="heads")
    pruner.prune(0.5)
    slim = prunekit.to_slim(model)
    prunekit.save_slim(slim, tmp_path)
    again = prunekit.load_slim(tiny_cait(timm), tmp_path)
    assert again.blocks_token_only[0].attn.num_heads == slim.blocks_token_only[0].attn.num_heads
    assert_equivalent(run(slim, x), run(again, x), "reloaded tiny CaiT")


@pytest.mark.parametrize("attention", ["auto", "heads"])
def test_vit_attention_attributes_follow_the_weights(timm, attention):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = prunekit.Pruner(model, x, attention=attention)
    pruner.prune(0.5)
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), f"tiny ViT ({attention})")
    attn = slim.blocks[0].attn
    assert attn.num_heads * attn.head_dim == attn.attn_dim == attn.qkv.out_features // 3
    if attention == "heads":
        assert attn.num_heads < 3


def test_metaformer_scale_shape_follows(timm):
    # PoolFormer-v2's layer/residual Scale multiplies by scale.view(self.shape), a stored (dim, 1, 1):
    # the slim model failed with "shape '[320, 1, 1]' is invalid for input of size 160"
    from timm.models.metaformer import GroupNorm1, MetaFormer, Pooling

    torch.manual_seed(0)
    model = MetaFormer(  # poolformerv2_s12 with one block per stage and narrow stages
        depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), token_mixers=Pooling, norm_layers=GroupNorm1, num_classes=5
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("res_scale1.scale"):
                p.uniform_(0.5, 1.5)  # every channel different, so slicing the wrong ones shows
    x = torch.randn(2, 3, 64, 64)
    pruner = prunekit.Pruner(model, x)
    assert not pruner.warnings, pruner.warnings
    pruner.prune(0.5)
    slim = prunekit.to_slim(model)  # no validate()
    assert "stages.2.blocks.0.res_scale1.scale" in shrunk(model, slim)
    assert_equivalent(run(model, x), run(slim, x), "tiny PoolFormer-v2")
    scale = slim.stages[2].blocks[0].res_scale1
    assert scale.shape[0] == scale.scale.numel() < 24
