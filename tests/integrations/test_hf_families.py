"""Hugging Face families from tiny configs: prune heads and MLPs, slim == sparse, config fields, reload.

Each family is built from a config with hidden width 32 (48 where grouped-query attention needs
6 heads) and 2 layers, random weights made "alive" (``liven``). One test per family:

- heads and MLP widths prunable (the attention and MLP tensors named in ``FAMILIES`` shrink),
- the slim model equals the sparse one without ``validate()``,
- the config fields that state the pruned widths follow (heads, key/value heads, MLP width),
- ``prunekit.integrations.hf.save_pretrained`` then ``from_pretrained`` gives the same outputs.

Families this ``transformers`` does not have skip with a message; what does not work yet is an
``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_transformers import hf_bloom, hf_falcon, hf_swin, liven

import prunekit
from helpers import assert_equivalent, assert_identical, run, shrunk

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed: pip install 'prunekit[hf]' to run the Hugging Face families",
)

SMALL = {"vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
DECODER = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2}
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _img(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _lm():
    return {"input_ids": _ids(), "use_cache": False}


def _masked():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def qwen2(T):
    return T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, **DECODER, intermediate_size=64)), _lm()


def qwen3(T):
    return T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, **DECODER, head_dim=8, intermediate_size=64)), _lm()


def mistral(T):
    return T.MistralForCausalLM(T.MistralConfig(**SMALL, **DECODER, intermediate_size=64)), _lm()


def phi3(T):
    return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **DECODER, intermediate_size=64)), _lm()


def gemma2(T):
    cfg = T.Gemma2Config(**SMALL, **DECODER, head_dim=8, intermediate_size=64, sliding_window=8)
    return T.Gemma2ForCausalLM(cfg), _lm()


def opt(T):
    cfg = T.OPTConfig(
        **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32
    )
    return T.OPTForCausalLM(cfg), _lm()


def gpt_neox(T):
    cfg = T.GPTNeoXConfig(**SMALL, **ENCODER)
    return T.GPTNeoXForCausalLM(cfg), _lm()


def distilbert(T):
    cfg = T.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=16, num_labels=3
    )
    return T.DistilBertForSequenceClassification(cfg), _masked()


def roberta(T):
    cfg = T.RobertaConfig(**{**SMALL, "max_position_embeddings": 20, "pad_token_id": 1}, **ENCODER, num_labels=3)
    return T.RobertaForSequenceClassification(cfg), _masked()


def deberta_v2(T):
    cfg = T.DebertaV2Config(
        **SMALL, **ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, num_labels=3
    )
    return T.DebertaV2ForSequenceClassification(cfg), _masked()


def t5_encoder(T):
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T.T5EncoderModel(cfg), _masked()


def bart(T):
    cfg = T.BartConfig(
        **SMALL,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        decoder_start_token_id=0,
    )
    ids = _ids()
    return T.BartForConditionalGeneration(cfg), {"input_ids": ids, "decoder_input_ids": ids[:, :5], "use_cache": False}


def whisper_encoder(T):
    cfg = T.WhisperConfig(
        vocab_size=100,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_source_positions=8,
        max_target_positions=8,
        num_labels=3,
    )
    feats = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    return T.WhisperForAudioClassification(cfg), {"input_features": feats}


def deit(T):
    cfg = T.DeiTConfig(image_size=16, patch_size=4, **ENCODER, num_labels=3)
    return T.DeiTForImageClassification(cfg), _img(16)


def convnext(T):
    cfg = T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], num_labels=3, image_size=32)
    return T.ConvNextForImageClassification(cfg), _img(32)


def segformer(T):
    cfg = T.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[2, 4],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=3,
    )
    return T.SegformerForSemanticSegmentation(cfg), _img(32)


def mobilevit(T):
    cfg = T.MobileViTConfig(
        image_size=64,
        hidden_sizes=[32, 32, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=4,
        num_labels=3,
    )
    return T.MobileViTForImageClassification(cfg), _img(64)


def clip(T):
    cfg = T.CLIPConfig(
        text_config={**SMALL, **ENCODER, "pad_token_id": 1},
        vision_config={"image_size": 16, "patch_size": 4, **ENCODER},
        projection_dim=16,
    )
    return T.CLIPModel(cfg), {"input_ids": _ids(), "pixel_values": _img(16)}


def _reuse(build):
    return lambda T: build()


#: family: (builder, Auto class, attention tensor that must shrink, MLP tensor that must shrink,
#: (config field, module whose out_features it states) or None)
FAMILIES = {
    "qwen2": (qwen2, "AutoModelForCausalLM", "self_attn.k_proj.weight", "mlp.up_proj.weight", "intermediate_size"),
    "qwen3": (qwen3, "AutoModelForCausalLM", "self_attn.k_proj.weight", "mlp.up_proj.weight", "intermediate_size"),
    "mistral": (mistral, "AutoModelForCausalLM", "self_attn.k_proj.weight", "mlp.up_proj.weight", "intermediate_size"),
    "phi3": (phi3, "AutoModelForCausalLM", "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight", "intermediate_size"),
    "gemma2": (gemma2, "AutoModelForCausalLM", "self_attn.k_proj.weight", "mlp.up_proj.weight", "intermediate_size"),
    "falcon": (_reuse(hf_falcon), "AutoModelForCausalLM", "query_key_value.weight", "dense_h_to_4h.weight", None),
    "opt": (opt, "AutoModelForCausalLM", "self_attn.k_proj.weight", "fc1.weight", "ffn_dim"),
    "gpt_neox": (
        gpt_neox,
        "AutoModelForCausalLM",
        "query_key_value.weight",
        "dense_h_to_4h.weight",
        "intermediate_size",
    ),
    "bloom": (_reuse(hf_bloom), "AutoModelForCausalLM", "query_key_value.weight", "dense_h_to_4h.weight", None),
    "distilbert": (
        distilbert,
        "AutoModelForSequenceClassification",
        "attention.k_lin.weight",
        "ffn.lin1.weight",
        "hidden_dim",
    ),
    "roberta": (
        roberta,
        "AutoModelForSequenceClassification",
        "attention.self.key.weight",
        "intermediate.dense.weight",
        "intermediate_size",
    ),
    "deberta_v2": (
        deberta_v2,
        "AutoModelForSequenceClassification",
        "attention.self.key_proj.weight",
        "intermediate.dense.weight",
        "intermediate_size",
    ),
    "t5_encoder": (t5_encoder, "T5EncoderModel", "SelfAttention.k.weight", "DenseReluDense.wi.weight", "d_ff"),
    "bart": (bart, "AutoModelForSeq2SeqLM", "self_attn.k_proj.weight", "fc1.weight", "encoder_ffn_dim"),
    "whisper_encoder": (
        whisper_encoder,
        "AutoModelForAudioClassification",
        "self_attn.k_proj.weight",
        "fc1.weight",
        "encoder_ffn_dim",
    ),
    "deit": (deit, "AutoModelForImageClassification", "attention.k_proj.weight", "mlp.fc1.weight", "intermediate_size"),
    "hf_swin": (_reuse(hf_swin), "AutoModelForImageClassification", "attention.k_proj.weight", "mlp.fc1.weight", None),
    "convnext": (convnext, "AutoModelForImageClassification", None, "pwconv1.weight", None),
    "segformer": (
        segformer,
        "AutoModelForSemanticSegmentation",
        "attention.k_proj.weight",
        "mlp.fc1.weight",
        None,
    ),
    "mobilevit": (
        mobilevit,
        "AutoModelForImageClassification",
        "attention.key.weight",
        "intermediate.dense.weight",
        None,
    ),
    "clip": (clip, "CLIPModel", "self_attn.k_proj.weight", "mlp.fc1.weight", "intermediate_size"),
}
#: attention mode per family (default "heads": whole heads go, so the config can state them). A
#: fused per-group ``query_key_value`` (Falcon, Bloom) has no prunable whole heads yet: there every
#: head loses part of its width (``auto``) and the config keeps the original sizes
ATTENTION = {"falcon": "auto", "bloom": "auto"}
#: families that do not work yet: the reason (the test is xfail strict, so a fix must remove it)
BROKEN: dict[str, str] = {}


def _params():
    for name in FAMILIES:
        marks = [pytest.mark.xfail(reason=BROKEN[name], strict=True)] if name in BROKEN else []
        yield pytest.param(name, marks=marks, id=name)


def _build(name: str):
    import transformers as T

    build = FAMILIES[name][0]
    torch.manual_seed(0)
    try:
        model, inputs = build(T)
    except AttributeError as exc:  # this transformers has no such class
        pytest.skip(f"{name}: not in transformers {T.__version__} ({exc})")
    return liven(model), inputs


def _config_of(slim, field):
    """The config that states ``field`` (CLIP: its text config)."""
    cfg = slim.config
    return cfg if hasattr(cfg, field) else getattr(cfg, "text_config", cfg)


@pytest.mark.parametrize("name", list(_params()))
def test_family_prunes_and_reloads(name, tmp_path):
    import transformers as T

    from prunekit.integrations import hf

    _, auto, attn, mlp, field = FAMILIES[name]
    model, inputs = _build(name)
    dense = run(model, inputs)
    attention = ATTENTION.get(name, "heads")
    pruner = prunekit.Pruner(model, inputs, attention=attention)
    assert not pruner.warnings, f"{name}: unexpected warnings {pruner.warnings}"
    pruner.prune(0.5)
    sparse_out = run(model, inputs)
    assert prunekit.max_error(dense, sparse_out) > 1e-3, f"{name}: pruning half of every group changed nothing"
    slim = prunekit.to_slim(model)  # no validate(): the rules alone must give slim == sparse
    want = run(slim, inputs)
    assert_equivalent(sparse_out, want, f"{name}: slim vs sparse")
    gone = shrunk(model, slim)
    missing = [w for w in (attn, mlp) if w is not None and not any(w in g for g in gone)]
    assert not missing, f"{name}: nothing named like {missing} shrank; shrunk: {gone}"
    before, after = prunekit.count(model, inputs), prunekit.count(slim, inputs)
    assert after.macs < before.macs and after.params < before.params, f"{name}: MACs/params did not drop"
    if field is not None:  # the config states the pruned MLP width
        mod = next(m for n, m in slim.named_modules() if f"{n}.weight".endswith(mlp) and hasattr(m, "out_features"))
        cfg = _config_of(slim, field)
        width = mod.out_features // (2 if mlp.endswith("gate_up_proj.weight") else 1)
        assert getattr(cfg, field) == width, f"{name}: config.{field} {getattr(cfg, field)}, slim MLP width {width}"
    sizes = [s for s in map(hf.attention_sizes, slim.modules()) if s is not None]
    cfg = _config_of(slim, "num_attention_heads")
    if attention == "heads" and sizes and isinstance(getattr(cfg, "num_attention_heads", None), int):
        assert {s["heads"] for s in sizes} == {cfg.num_attention_heads}, f"{name}: heads {sizes} vs the config"
        assert cfg.num_attention_heads < 4, f"{name}: no head was pruned"
    out = hf.save_pretrained(slim, tmp_path / f"slim_{name}")
    loaded = hf.from_pretrained(getattr(T, auto), out)
    assert_identical(want, run(loaded, inputs), f"{name}: reloaded slim model")


@pytest.mark.xfail(
    strict=True,
    reason="DeBERTa-v2 scales its scores by sqrt(query.size(-1) * scale_factor), read from the shape: pruning "
    "part of every head (attention='auto') changes the slim model's scale; validate() freezes it, whole heads work",
)
def test_deberta_v2_head_dim_without_validate():
    model, inputs = _build("deberta_v2")
    pruner = prunekit.Pruner(model, inputs, attention="auto")
    pruner.prune(0.5)
    assert_equivalent(run(model, inputs), run(prunekit.to_slim(model), inputs), "DeBERTa-v2, head_dim pruned")
