"""Transformers: heads, head_dim, MLP and residual widths; torchvision ViT/Swin and Hugging Face models.

Every case prunes a small model built from a config (random weights, made "alive" so attention
and norms matter), checks slim == sparse like the core zoo, that pruning changed the output
(the check is not vacuous), which tensors shrank and that width attributes and configs follow.
The Hugging Face cases skip (with a message) when ``transformers`` is not installed.
Full-size torchvision ViT (all five) and Swin (v1, v2) models: ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from helpers import assert_equivalent, assert_identical, loss_of, run, shrunk
from prunekit.engine.prepare import prepare
from prunekit.graph.trace import call_model

HAVE_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(
    not HAVE_HF,
    reason="transformers is not installed: pip install 'prunekit[hf]' "
    "(or pip install transformers) to run the Hugging Face cases",
)
MODES = [("auto", True), ("auto", False), ("head_dim", True)]


@torch.no_grad()
def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights large enough that attention, norms and every head matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif name.endswith("weight") or "logit_scale" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        else:
            p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.6)
    return model.eval()


def _img(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


# ----- the models ---------------------------------------------------------------------------
def tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ), _img(32)


def tv_swin(v2: bool = False):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5, **kw
    ), _img(32)


def hf_bert(**kw):
    import transformers as T

    cfg = T.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        **kw,
    )
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return T.BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": mask}


def hf_vit():
    import transformers as T

    cfg = T.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return T.ViTForImageClassification(cfg), _img(16)


def hf_gpt2(**kw):
    import transformers as T

    cfg = T.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0, **kw
    )
    return T.GPT2LMHeadModel(cfg), {"input_ids": _ids(), "use_cache": False}


def hf_llama(mask: bool = False, **kw):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=100,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **kw,
    )
    ids = _ids()
    inputs = {"input_ids": ids, "use_cache": False}
    if mask:
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["attention_mask"][1, 5:] = 0
    return T.LlamaForCausalLM(cfg), inputs


def hf_falcon():
    import transformers as T

    cfg = T.FalconConfig(
        vocab_size=100,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_kv_heads=2,
        new_decoder_architecture=True,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.FalconForCausalLM(cfg), {"input_ids": _ids(), "use_cache": False}


def hf_bloom():
    import transformers as T

    cfg = T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return T.BloomForCausalLM(cfg), {"input_ids": _ids(), "use_cache": False}


def hf_swin():
    import transformers as T

    cfg = T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3
    )
    return T.SwinForImageClassification(cfg), _img(32)


TORCHVISION = {"tv_vit": tv_vit, "tv_swin": tv_swin, "tv_swin_v2": lambda: tv_swin(v2=True)}
HF = {
    "bert": hf_bert,
    "hf_vit": hf_vit,
    "gpt2": hf_gpt2,
    "llama": hf_llama,
    "falcon": hf_falcon,
    "bloom": hf_bloom,
    "hf_swin": hf_swin,
}
#: fragments of tensor names that must shrink: (attention, MLP, residual)
EXPECT = {
    "tv_vit": ("self_attention.in_proj_weight", "mlp.0.weight", "conv_proj.weight"),
    "tv_swin": ("attn.qkv.weight", "mlp.0.weight", "features.0.0.weight"),
    "tv_swin_v2": ("attn.qkv.weight", "mlp.0.weight", "features.0.0.weight"),
    "bert": ("attention.self.query.weight", "intermediate.dense.weight", "word_embeddings.weight"),
    "hf_vit": ("attention.q_proj.weight", "mlp.fc1.weight", "patch_embeddings.projection.weight"),
    "gpt2": ("attn.c_attn.weight", "mlp.c_fc.weight", "wte.weight"),
    "llama": ("self_attn.k_proj.weight", "mlp.up_proj.weight", "embed_tokens.weight"),
    "falcon": ("self_attention.query_key_value.weight", "mlp.dense_h_to_4h.weight", "word_embeddings.weight"),
    "bloom": ("self_attention.query_key_value.weight", "mlp.dense_h_to_4h.weight", "word_embeddings.weight"),
    "hf_swin": ("attention.q_proj.weight", "mlp.fc1.weight", "patch_embeddings.projection.weight"),
}
HEAD_DIM_FIXED = {"llama"}  # rotary embeddings slice head_dim: only whole heads can go


def _cases():
    for name in TORCHVISION:
        for attention, residual in MODES:
            yield pytest.param(name, attention, residual, id=f"{name}-{attention}-{'res' if residual else 'nores'}")
    for name in HF:
        for attention, residual in MODES:
            yield pytest.param(
                name, attention, residual, marks=needs_hf, id=f"{name}-{attention}-{'res' if residual else 'nores'}"
            )


def _build(name: str):
    model, inputs = {**TORCHVISION, **HF}[name]()
    return liven(model), inputs


def _attention_modules(model: nn.Module):
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith(("Attention", "SelfAttention", "AttentionV2"))
        or isinstance(m, nn.MultiheadAttention)
    ]


# ----- slim == sparse ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "attention", "residual"), list(_cases()))
def test_slim_equals_sparse(name, attention, residual):
    model, inputs = _build(name)
    dense = run(model, inputs)
    pruner = prunekit.Pruner(model, inputs, attention=attention, residual=residual)
    assert not pruner.warnings, f"{name}: unexpected warnings {pruner.warnings}"
    pruner.prune(0.5)
    sparse_out = run(model, inputs)
    assert prunekit.max_error(dense, sparse_out) > 1e-3, f"{name}: pruning half of every group changed nothing"
    slim = pruner.transform()  # raises when slim != sparse
    assert_equivalent(sparse_out, run(slim, inputs), f"{name} ({attention}, residual={residual}): slim vs sparse")
    gone = shrunk(model, slim)
    attn, mlp, res = EXPECT[name]
    want = [mlp] + ([res] if residual else [])
    if not (attention == "head_dim" and name in HEAD_DIM_FIXED):
        want.append(attn)
    missing = [w for w in want if not any(w in g for g in gone)]
    assert not missing, f"{name}: nothing named like {missing} shrank; shrunk: {gone}"
    if not residual:
        assert not any(res in g for g in gone), f"{name}: residual=False but the residual stream shrank: {gone}"
    if attention == "auto" and residual:
        before, after = prunekit.count(model, inputs), prunekit.count(slim, inputs)
        assert after.macs < before.macs and after.params < before.params, f"{name}: MACs/params did not drop"
        slim.train()
        loss_of(call_model(slim, inputs)).backward()  # the slim model trains


@pytest.mark.parametrize(
    "name",
    ["tv_vit", "tv_swin", "tv_swin_v2", pytest.param("bert", marks=needs_hf), pytest.param("llama", marks=needs_hf)],
)
def test_heads_are_units(name):
    """With heads, one unit per head (per key/value head under grouped-query attention)."""
    model, inputs = _build(name)
    pruner = prunekit.Pruner(model, inputs, residual=False)
    sizes = []
    for m in _attention_modules(model):
        cfg = getattr(m, "config", None)
        heads = (
            cfg.num_key_value_heads
            if hasattr(cfg, "num_key_value_heads")
            else getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None)
        )
        if heads is not None:
            sizes.append(heads)
    qkv = ("in_proj_weight", "qkv.weight", "query.weight", "k_proj.weight")
    got = sorted(g.n_units for g in pruner.prunable_groups if any(m.name.endswith(qkv) for m in g.members))
    assert got == sorted(sizes), f"{name}: attention groups have {got} units, the model has {sizes} heads"


def test_heads_attributes_follow():
    model, inputs = _build("tv_swin_v2")
    pruner = prunekit.Pruner(model, inputs, residual=False)
    pruner.prune(0.5)
    slim = pruner.transform()
    for m in _attention_modules(slim):
        assert m.num_heads == m.logit_scale.shape[0] and m.qkv.out_features == 3 * m.num_heads * 8, (
            f"Swin v2: num_heads {m.num_heads}, qkv {m.qkv.out_features}, logit_scale {tuple(m.logit_scale.shape)}"
        )
    assert any(m.num_heads < n for m, n in zip(_attention_modules(slim), (2, 2, 4, 4))), "no head was pruned"


def test_prepare_keeps_outputs():
    """Switching Swin attention to its prunable subclass changes nothing."""
    for v2 in (False, True):
        model, x = tv_swin(v2)
        model = liven(model)
        before = run(model, x)
        done = prepare(model)
        assert done, "no Swin attention module was switched"
        assert_identical(before, run(model, x), f"Swin v{2 if v2 else 1}: prepared model")


@pytest.mark.parametrize("v2", [False, True])
def test_swin_reload_from_spec(v2, tmp_path):
    model, x = tv_swin(v2)
    model = liven(model)
    pruner = prunekit.Pruner(model, x)
    pruner.prune({g.id: r for g, r in zip(pruner.prunable_groups, [0.25, 0.5, 0.75] * 20)})
    slim = pruner.transform()
    prunekit.save_slim(slim, tmp_path)
    fresh, _ = tv_swin(v2)
    loaded = prunekit.load_slim(fresh, tmp_path)
    assert_identical(run(slim, x), run(loaded, x), "Swin slim model reloaded from its spec")


class InferredHeads(nn.Module):
    """``view(b, n, -1, head_dim)`` and SDPA with its default scale."""

    def __init__(self, dim=32, head_dim=8):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.out(x + self.o(o))


def test_sdpa_default_scale_prunes_heads():
    """Heads can go under SDPA's default scale (head_dim, which the scale depends on, stays)."""
    model = liven(InferredHeads())
    x = torch.randn(2, 5, 32)
    pruner = prunekit.Pruner(model, x)
    heads = [g for g in pruner.prunable_groups if any(m.name == "q.weight" for m in g.members)]
    assert len(heads) == 1 and heads[0].n_units == 4, [g.describe() for g in pruner.groups]
    assert {"q.weight", "k.weight", "v.weight", "o.weight"} <= {m.name for m in heads[0].members}
    pruner.prune(0.5)
    slim = pruner.transform()
    assert slim.q.out_features == 16 and slim.o.in_features == 16
    fixed = prunekit.Pruner(liven(InferredHeads()), x, attention="head_dim")
    assert not any(any(m.name == "q.weight" and m.dim == 0 for m in g.members) for g in fixed.prunable_groups), (
        "head_dim pruning under SDPA's default scale must keep q/k widths"
    )


def test_attention_mode_is_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        prunekit.Pruner(nn.Linear(2, 2), torch.randn(1, 2), attention="rows")


# ----- Hugging Face specifics -------------------------------------------------------------------
@needs_hf
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", [False, True])
def test_grouped_query_attention(impl, mask):
    """A key/value head goes with its query heads (SDPA's enable_gqa, repeat_kv and eager paths)."""
    model, inputs = hf_llama(mask=mask, attn_implementation=impl)
    model = liven(model)
    pruner = prunekit.Pruner(model, inputs, residual=False)
    groups = [g for g in pruner.prunable_groups if any("k_proj" in m.name for m in g.members)]
    assert [g.n_units for g in groups] == [2, 2], [g.describe() for g in groups]
    q_rows = [m for m in groups[0].members if m.name.endswith("q_proj.weight")][0]
    assert q_rows.unit.tolist() == [0] * 24 + [1] * 24, "query heads 0-2 belong to key/value head 0, 3-5 to 1"
    pruner.prune(0.5)
    slim = pruner.transform()
    att = slim.model.layers[0].self_attn
    assert att.q_proj.out_features == 24 and att.k_proj.out_features == 8 and att.num_key_value_groups == 3
    assert slim.config.num_attention_heads == 3 and slim.config.num_key_value_heads == 1


@needs_hf
def test_head_dim_mode_ties_query_key_value():
    """head_dim pruning keeps one head_dim for q, k and v (HF views them with one attribute)."""
    model, inputs = hf_bert()
    model = liven(model)
    pruner = prunekit.Pruner(model, inputs, attention="head_dim", residual=False)
    attn = [g for g in pruner.prunable_groups if any("attention.self" in m.name for m in g.members)]
    assert [g.n_units for g in attn] == [8, 8]
    names = {m.name.split(".")[-2] for m in attn[0].members}
    assert {"query", "key", "value", "dense"} <= names, names
    pruner.prune(0.5)
    slim = pruner.transform()
    sa = slim.bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size) == (4, 4, 16)


@needs_hf
def test_rotary_keeps_head_dim():
    model, inputs = hf_llama()
    pruner = prunekit.Pruner(liven(model), inputs, attention="head_dim")
    for g in pruner.groups:
        if any(m.name.endswith("self_attn.v_proj.weight") and m.dim == 0 for m in g.members):
            assert not g.prunable and g.reasons, g.describe()


@needs_hf
def test_hf_rmsnorm_prepared_and_residual_pruned():
    model, inputs = hf_llama()
    model = liven(model)
    before = run(model, inputs)
    pruner = prunekit.Pruner(model, inputs)
    assert any(n.endswith("input_layernorm") for n in pruner.prepared), pruner.prepared
    assert_equivalent(before, run(model, inputs), "LLaMA with F.rms_norm RMSNorms")
    residual = [g for g in pruner.prunable_groups if any(m.name == "model.embed_tokens.weight" for m in g.members)]
    assert residual and residual[0].norm, "the residual stream (embeddings, RMSNorms) is not prunable"


@needs_hf
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "hf_vit"])
def test_save_pretrained_non_uniform(name, tmp_path):
    """Per-layer widths: config.prunekit records the spec; prunekit.integrations.hf.from_pretrained reloads."""
    import transformers as T

    from prunekit.integrations import hf

    model, inputs = _build(name)
    pruner = prunekit.Pruner(model, inputs)
    pruner.prune({g.id: r for g, r in zip(pruner.prunable_groups, [0.25, 0.5, 0.75] * 20)})
    slim = pruner.transform()
    assert slim.config.prunekit["uniform"] is False
    slim.save_pretrained(tmp_path)
    auto = {
        "bert": T.AutoModelForSequenceClassification,
        "gpt2": T.AutoModelForCausalLM,
        "llama": T.AutoModelForCausalLM,
        "hf_vit": T.AutoModelForImageClassification,
    }[name]
    loaded = hf.from_pretrained(auto, tmp_path)
    assert type(loaded) is type(slim)
    assert_identical(run(slim, inputs), run(loaded, inputs), f"{name}: reloaded slim model")
    again = prunekit.Pruner(loaded, inputs)  # a reloaded slim model prunes again
    again.prune(0.25)
    assert_equivalent(run(loaded, inputs), run(again.transform(), inputs), f"{name}: slim model pruned again")


@needs_hf
@pytest.mark.parametrize("name,uniform", [("bert", False), ("bert", True), ("gpt2", True), ("llama", False)])
def test_plain_auto_from_pretrained_with_remote_code(name, uniform, tmp_path):
    """Widths the config cannot state (pruned BERT/GPT-2 heads, per-layer widths): prunekit's
    save_pretrained writes a loader file, and the plain Auto class loads it (trust_remote_code)."""
    import json

    import transformers as T

    from prunekit.integrations import hf

    model, inputs = _build(name)
    if uniform:  # whole heads, hidden size kept: head_dim = hidden_size / heads no longer holds
        pruner = prunekit.Pruner(model, inputs, attention="heads", residual=False)
        pruner.prune(0.5)
    else:
        pruner = prunekit.Pruner(model, inputs)
        pruner.prune({g.id: r for g, r in zip(pruner.prunable_groups, [0.25, 0.5, 0.75] * 20)})
    slim = pruner.transform()
    # Hugging Face caches the code by folder name: one name per case
    out = hf.save_pretrained(slim, tmp_path / f"slim_{name}_{'uniform' if uniform else 'layers'}")
    cfg = json.loads((out / "config.json").read_text())
    auto = {
        "bert": T.AutoModelForSequenceClassification,
        "gpt2": T.AutoModelForCausalLM,
        "llama": T.AutoModelForCausalLM,
    }[name]
    assert auto.__name__ in cfg["auto_map"], cfg.get("auto_map")
    with pytest.raises((ValueError, RuntimeError, OSError)):  # plain class: the config cannot state the widths
        type(slim).from_pretrained(out)
    loaded = auto.from_pretrained(out, trust_remote_code=True)
    assert type(loaded) is type(slim)
    assert_identical(run(slim, inputs), run(loaded, inputs), f"{name}: plain Auto from_pretrained")


@needs_hf
def test_save_pretrained_native_when_config_states_widths(tmp_path):
    from prunekit.integrations import hf

    model, inputs = _build("llama")
    pruner = prunekit.Pruner(model, inputs)
    pruner.prune(0.5)
    out = hf.save_pretrained(pruner.transform(), tmp_path)
    assert not (out / hf.REMOTE_FILE).exists()
    assert "auto_map" not in (out / "config.json").read_text()


@needs_hf
@pytest.mark.parametrize("name", ["llama", "hf_vit"])
def test_save_pretrained_uniform_reloads_natively(name, tmp_path):
    """Uniform widths that the config can state: the plain from_pretrained works."""
    model, inputs = _build(name)
    pruner = prunekit.Pruner(model, inputs)
    pruner.prune(0.5)
    slim = pruner.transform()
    cfg = slim.config
    assert cfg.prunekit["uniform"] is True
    attn = _attention_modules(slim)[0]
    assert cfg.num_attention_heads == attn.q_proj.out_features // attn.head_dim
    assert (
        cfg.intermediate_size
        == slim.get_submodule("model.layers.0.mlp.up_proj" if name == "llama" else "vit.layers.0.mlp.fc1").out_features
    )
    slim.save_pretrained(tmp_path)
    loaded = type(slim).from_pretrained(tmp_path)
    assert_identical(run(slim, inputs), run(loaded, inputs), f"{name}: natively reloaded slim model")


@needs_hf
@pytest.mark.parametrize("name", ["falcon", "bloom", "hf_swin"])
def test_fused_qkv_and_per_stage_configs_reload(name, tmp_path):
    """Falcon (new decoder architecture: key/value groups with their query heads), Bloom (alibi,
    pruned head_dim) and HF Swin (per-stage num_heads): save_pretrained and reload give the slim
    model; the plain class reloads it natively only where the config states it exactly (never a
    model that loads and computes something else)."""
    import transformers as T

    from prunekit.integrations import hf

    model, inputs = _build(name)
    pruner = prunekit.Pruner(model, inputs)
    assert not pruner.warnings, pruner.warnings
    pruner.prune(0.5)
    slim = prunekit.to_slim(model)
    want = run(slim, inputs)
    out = hf.save_pretrained(slim, tmp_path / f"slim_{name}")
    auto = T.AutoModelForImageClassification if name == "hf_swin" else T.AutoModelForCausalLM
    assert_identical(want, run(hf.from_pretrained(auto, out), inputs), f"{name}: prunekit reload")
    if (out / hf.REMOTE_FILE).exists():
        assert_identical(want, run(auto.from_pretrained(out, trust_remote_code=True), inputs), f"{name}: remote code")
    try:
        plain = type(slim).from_pretrained(out)
    except (ValueError, RuntimeError, OSError):
        assert name != "falcon", "Falcon's config states the pruned widths: it must reload natively"
        return
    assert_identical(want, run(plain, inputs), f"{name}: the plain class loaded a model that computes otherwise")
    if name == "falcon":
        attn = plain.transformer.h[0].self_attention
        assert (attn.num_heads, attn.num_kv_heads) == (slim.config.num_attention_heads, slim.config.num_kv_heads)


@needs_hf
def test_gpt2_attributes_follow():
    model, inputs = hf_gpt2()
    pruner = prunekit.Pruner(liven(model), inputs)
    pruner.prune(0.5)
    slim = pruner.transform()
    a = slim.transformer.h[0].attn
    assert (a.num_heads, a.head_dim, a.split_size, a.embed_dim) == (2, 8, 16, 16)
    assert (a.c_attn.nx, a.c_attn.nf) == (16, 48) and slim.lm_head.weight is slim.transformer.wte.weight
    assert slim.config.n_embd == 16 and slim.config.n_inner == 64


# ----- full-size torchvision models (slow) ------------------------------------------------------
FULL = [
    "vit_b_16",
    "vit_b_32",
    "vit_l_16",
    "vit_l_32",
    "vit_h_14",
    "swin_t",
    "swin_s",
    "swin_b",
    "swin_v2_t",
    "swin_v2_s",
    "swin_v2_b",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_torchvision_full_size(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    with torch.no_grad():  # ViT's classifier starts at zero: outputs of about unit size
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, m.in_features**-0.5)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pruner = prunekit.Pruner(model, x, residual=False)
    assert not pruner.warnings, pruner.warnings
    pruner.prune(0.5)
    slim = pruner.transform()
    gone = shrunk(model, slim)
    assert any("attn" in g or "attention" in g for g in gone) and any("mlp" in g for g in gone), gone
    out = run(model, x)
    assert float(out.abs().max()) > 0.1, f"{name}: outputs too small for a meaningful check"
    assert_equivalent(out, run(slim, x), f"{name}: slim vs sparse")
