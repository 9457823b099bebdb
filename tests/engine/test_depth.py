"""Depth pruning (whole residual blocks / transformer layers) and expert pruning (mixture of experts).

Each case builds a tiny model from a config, removes blocks or experts (alone and together with
width pruning), checks slim == sparse, that the slim model physically lost them (configs and
per-layer indices follow) and that it reloads.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import assert_equivalent, run
from prunekit.engine import depth, experts
from prunekit.workflow.structure import block_scores

HAVE_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed: pip install 'prunekit[hf]'")
QUIET = {"log": lambda m: None}


class Res(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x)) + 0.1


def stack() -> nn.Sequential:
    """Residual blocks 1 and 3 (3 barely changes its input), a non-residual block 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Res(), Plain(), Res(scale=0.01), nn.Linear(6, 2)).eval()


def test_find_blocks_keeps_only_identity_when_zeroed():
    model = stack()
    blocks = depth.find_blocks(model, torch.randn(3, 4))
    assert [(b.name, b.kind, b.container) for b in blocks] == [("1", "residual", ""), ("3", "residual", "")]


def test_block_scores_influence_and_metric():
    model = stack()
    x = torch.randn(16, 4)
    blocks = depth.find_blocks(model, x)
    infl = block_scores(model, blocks, "influence", [x])
    assert infl["3"] < infl["1"]
    ref = run(model, x)
    metric = block_scores(model, blocks, "metric", eval_fn=lambda m: -float((run(m, x) - ref).abs().mean()))
    assert metric["3"] > metric["1"]
    assert torch.equal(run(model, x), ref)  # the bypass is gone again
    with pytest.raises(ValueError, match="needs eval_fn"):
        block_scores(model, blocks, "metric")
    with pytest.raises(ValueError, match="block_criterion must be one of"):
        block_scores(model, blocks, "cosine", [x])


def test_prune_removes_the_least_influential_block(tmp_path):
    model = stack()
    x = torch.randn(8, 4)
    res = prunekit.prune(model, x, remove_blocks=1, calibration=[x], **QUIET)
    assert res.plan.meta["blocks"] == ["3"] and res.method == "spec"
    slim = prunekit.to_slim(model)
    assert isinstance(slim[3], nn.Identity) and isinstance(model[3], Res)
    assert_equivalent(run(model, x), run(slim, x), "depth-pruned stack")
    assert res.macs_after < res.macs_before
    prunekit.save_slim(slim, tmp_path / "slim")
    assert torch.equal(run(prunekit.load_slim(stack(), tmp_path / "slim"), x), run(slim, x))
    prunekit.save_sparse(model, tmp_path / "sparse")
    assert torch.equal(run(prunekit.load_sparse(stack(), tmp_path / "sparse"), x), run(model, x))


def test_remove_blocks_errors():
    model = stack()
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="has 2 removable blocks"):
        prunekit.prune(model, x, remove_blocks=3, calibration=[x], **QUIET)
    with pytest.raises(ValueError, match="needs calibration batches"):
        prunekit.prune(model, x, remove_blocks=1, **QUIET)
    with pytest.raises(ValueError, match="remove_blocks must be a number"):
        prunekit.prune(model, x, remove_blocks=-1, removal_ratio=0.2, **QUIET)
    with pytest.raises(ValueError, match="not an element of an nn.Sequential"):
        depth.remove_blocks(model, ["0.weight"])


def test_torchvision_resnet_blocks():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    names = [b.name for b in depth.find_blocks(model, torch.randn(1, 3, 32, 32))]
    assert names == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # no downsampling


def _bn_alive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.bias.uniform_(-0.2, 0.6)
    return model.eval()


def test_cifar_resnet_depth_and_width_in_one_plan(tmp_path):
    from prunekit.models.cifar_resnet import cifar_resnet

    torch.manual_seed(0)
    model = _bn_alive(cifar_resnet(depth=14, width=16, num_classes=5))
    x = torch.randn(2, 3, 16, 16)
    assert [b.name for b in depth.find_blocks(model, x)] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1"]
    res = prunekit.prune(
        model,
        x,
        removal_ratio=0.5,
        remove_blocks=2,
        calibration=[torch.randn(4, 3, 16, 16)],
        criterion="fluctuation",
        compensate=True,
        **QUIET,
    )
    assert abs(res.macs_reduction - 0.5) <= 0.01 and len(res.plan.meta["blocks"]) == 2
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "cifar resnet depth + width")
    for b in res.plan.meta["blocks"]:
        assert isinstance(slim.get_submodule(b), nn.Identity)
    assert not any(k.startswith(tuple(b + "." for b in res.plan.meta["blocks"])) for k in res.plan.meta["compensated"])
    prunekit.save_slim(slim, tmp_path / "slim")
    again = prunekit.load_slim(cifar_resnet(depth=14, width=16, num_classes=5), tmp_path / "slim")
    assert torch.equal(run(again, x), run(slim, x))


@pytest.mark.parametrize("v2", [False, True])
def test_vit_and_swin_blocks(v2):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    swin = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5, **kw
    ).eval()
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    assert [b.name for b in depth.find_blocks(swin, x)] == [
        "features.1.0",
        "features.1.1",
        "features.3.0",
        "features.3.1",
    ]
    assert len(depth.find_blocks(vit, x)) == 3
    for model, block in ((swin, "features.3.0"), (vit, "encoder.layers.encoder_layer_1")):
        plan = prunekit.Pruner(model, x).plan(0.3)
        plan.meta["blocks"] = [block]
        prunekit.apply_plan(model, plan)
        slim = prunekit.to_slim(model)
        assert isinstance(slim.get_submodule(block), nn.Identity)
        assert_equivalent(run(model, x), run(slim, x), type(model).__name__)


# ----- Hugging Face -------------------------------------------------------------------------
def _ids(n: int = 2, t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (n, t), generator=torch.Generator().manual_seed(seed))


def llama(layers: int = 3):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval()


def bert(layers: int = 3):
    import transformers as T

    cfg = T.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    return T.BertForSequenceClassification(cfg).eval()


@needs_hf
def test_llama_layers_removed_config_and_indices_follow(tmp_path):
    import transformers as T

    from prunekit.integrations import hf

    model = llama(4)
    x = {"input_ids": _ids(), "use_cache": False}
    assert [b.kind for b in depth.find_blocks(model, x)] == ["residual"] * 4
    res = prunekit.prune(
        model,
        x,
        removal_ratio=0.5,
        remove_blocks=2,
        calibration=[{"input_ids": _ids(4, 7, 2)}],
        excludes=["model.embed_tokens"],
        **QUIET,
    )
    assert abs(res.macs_reduction - 0.5) <= 0.01
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "llama depth + width")
    assert slim.config.num_hidden_layers == 2 and len(slim.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in slim.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 4  # the sparse model keeps its layers
    cached = {"input_ids": _ids(1, 5, 3), "use_cache": True}
    slim(**cached)  # the KV cache is built from the updated config
    hf.save_pretrained(slim, tmp_path / "m")
    again = hf.from_pretrained(T.LlamaForCausalLM, tmp_path / "m")
    assert prunekit.max_error(run(slim, x), run(again, x)) <= prunekit.TOLERANCE
    if not (tmp_path / "m" / hf.REMOTE_FILE).exists():  # uniform widths: the plain loader rebuilds it
        native = T.LlamaForCausalLM.from_pretrained(tmp_path / "m")
        assert prunekit.max_error(run(slim, x), run(native, x)) <= prunekit.TOLERANCE


@needs_hf
def test_bert_post_norm_layers_by_metric(tmp_path):
    import transformers as T

    model = bert(3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    x = {"input_ids": _ids(), "attention_mask": mask}
    blocks = depth.find_blocks(model, x)
    assert [(b.name, b.kind) for b in blocks] == [(f"bert.encoder.layer.{i}", "layer") for i in range(3)]
    ref = run(model, x).logits

    def fidelity(m):
        return -float((run(m, x).logits - ref).abs().mean())

    res = prunekit.prune(model, x, remove_blocks=1, block_criterion="metric", eval_fn=fidelity, **QUIET)
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "bert layer dropped")
    assert slim.config.num_hidden_layers == 2 and len(slim.bert.encoder.layer) == 2
    slim.save_pretrained(tmp_path / "m")
    native = T.BertForSequenceClassification.from_pretrained(tmp_path / "m")
    assert prunekit.max_error(run(slim, x), run(native, x)) <= prunekit.TOLERANCE
    assert len(res.plan.meta["blocks"]) == 1


# ----- mixture of experts -------------------------------------------------------------------
def mixtral():
    import transformers as T

    cfg = T.MixtralConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return T.MixtralForCausalLM(cfg).eval()


def qwen_moe():
    import transformers as T

    cfg = T.Qwen2MoeConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return T.Qwen2MoeForCausalLM(cfg).eval()


MOE = {
    "mixtral": (mixtral, "num_local_experts", "intermediate_size"),
    "qwen2_moe": (qwen_moe, "num_experts", "moe_intermediate_size"),
}


@needs_hf
@pytest.mark.parametrize("name", sorted(MOE))
def test_expert_width_is_prunable(name):
    make, _, width_field = MOE[name]
    model = make()
    x = {"input_ids": _ids(), "use_cache": False}
    pruner = prunekit.Pruner(model, x)
    assert not any("_grouped_mm" in w for w in pruner.warnings)
    expert_groups = [g for g in pruner.prunable_groups if any(m.name.endswith("experts.down_proj") for m in g.members)]
    assert len(expert_groups) == 3  # each layer's expert width, and the residual stream
    assert all(g.align == experts.EXPERT_ALIGN for g in expert_groups)
    pruner.prune(0.5)
    slim = pruner.transform()
    e = slim.model.layers[0].mlp.experts
    width = e.down_proj.shape[2]
    assert width % experts.EXPERT_ALIGN == 0 and width < getattr(make().config, width_field)
    assert getattr(slim.config, width_field) == width and e.intermediate_dim == width


@needs_hf
@pytest.mark.parametrize("name", sorted(MOE))
def test_remove_experts_router_and_config_follow(name, tmp_path):
    make, count_field, _ = MOE[name]
    model = make()
    n = getattr(model.config, count_field)
    x = {"input_ids": _ids(), "use_cache": False}
    cal = [{"input_ids": _ids(4, 7, s)} for s in (2, 3)]
    layers = experts.find_moe_layers(model)
    assert len(layers) == 2 and layers[0].num_experts == n and layers[0].top_k == 2
    usage = experts.expert_usage(model, layers, cal)
    res = prunekit.prune(model, x, remove_experts=2, calibration=cal, **QUIET)
    for layer in layers:
        gone = res.plan.meta["routers"][layer.router]
        assert gone == sorted(torch.argsort(usage[layer.router], stable=True)[:2].tolist())
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), f"{name} experts removed")
    mlp = slim.model.layers[1].mlp
    assert mlp.gate.weight.shape[0] == n - 2 == mlp.experts.num_experts == mlp.gate.num_experts
    assert getattr(slim.config, count_field) == n - 2
    assert res.params_after < res.params_before
    slim.save_pretrained(tmp_path / "m")
    native = type(slim).from_pretrained(tmp_path / "m")
    assert prunekit.max_error(run(slim, x), run(native, x)) <= prunekit.TOLERANCE


@needs_hf
def test_experts_width_and_compensation_together(tmp_path):
    import transformers as T

    from prunekit.integrations import hf

    model = mixtral()
    x = {"input_ids": _ids(), "use_cache": False}
    cal = [{"input_ids": _ids(4, 7, s)} for s in (2, 3)]
    res = prunekit.prune(
        model,
        x,
        removal_ratio=0.3,
        remove_experts=1,
        criterion="fluctuation",
        compensate=True,
        calibration=cal,
        excludes=["model.embed_tokens"],
        **QUIET,
    )
    assert res.plan.meta["routers"] and 0.2 < res.macs_reduction < 0.4  # expert widths move in steps of 8
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "mixtral experts + width + compensation")
    hf.save_pretrained(slim, tmp_path / "m")
    again = hf.from_pretrained(T.MixtralForCausalLM, tmp_path / "m")
    assert prunekit.max_error(run(slim, x), run(again, x)) <= prunekit.TOLERANCE
    prunekit.save_sparse(model, tmp_path / "sparse")
    back = prunekit.load_sparse(mixtral(), tmp_path / "sparse")
    assert prunekit.max_error(run(model, x), run(back, x)) <= prunekit.TOLERANCE


@needs_hf
def test_remove_experts_errors():
    model = mixtral()
    x = {"input_ids": _ids(), "use_cache": False}
    with pytest.raises(ValueError, match="fewer than the 2 each token is routed to"):
        prunekit.prune(model, x, remove_experts=3, **QUIET)
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        prunekit.prune(llama(2), x, remove_experts=1, **QUIET)


def test_plans_with_removed_blocks_do_not_compose():
    a = prunekit.PruningPlan({}, {}, {"blocks": ["1"]})
    b = prunekit.PruningPlan({"w": {0: [0]}}, {"w": [2]})
    with pytest.raises(ValueError, match="cannot be composed"):
        a.compose(b)
    merged = a.merge(prunekit.PruningPlan({}, {}, {"blocks": ["3"], "routers": {"g.weight": [1]}}))
    assert merged.meta["blocks"] == ["1", "3"] and merged.meta["routers"] == {"g.weight": [1]}
