"""Hugging Face ``transformers`` support: attributes, configs, RMSNorm and reloading.

Nothing here imports ``transformers`` at module level: the slim updaters run on modules
whose class lives in the ``transformers`` package (see ``PACKAGE_UPDATERS`` in
:mod:`prunekit.engine.slim`), and :mod:`prunekit.engine.prepare` switches hand-written RMSNorms to an
``F.rms_norm`` form before tracing.

After pruning, every attention module's width attributes follow its weights
(``num_attention_heads`` / ``num_heads``, ``attention_head_size`` / ``head_dim``,
``all_head_size``, ``num_key_value_heads``, ``num_key_value_groups``, GPT-2's
``split_size`` / ``embed_dim``, ``nf`` / ``nx`` of ``Conv1D``, ``hidden_size`` /
``intermediate_size`` of MLPs), and ``model.config`` gets the new sizes where every layer
agrees (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size`` / ``n_inner``). The config also records, under ``prunekit``, the
original sizes and the slim spec (new tensor shapes), so a slim model saved with
``model.save_pretrained(dir)`` reloads with :func:`from_pretrained` whatever its per-layer
widths. A uniformly pruned model whose config can state its sizes (LLaMA-style with
``head_dim``, ViT, or any model pruned in MLP/residual width only) also reloads with the
plain ``AutoModel...from_pretrained(dir)``; for the others :func:`save_pretrained` writes a
loader file and an ``auto_map`` so the plain ``from_pretrained(dir, trust_remote_code=True)``
of an Auto class rebuilds them.

Example:
    >>> import transformers, torch, prunekit  # doctest: +SKIP
    >>> model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2))  # doctest: +SKIP
    >>> ids = torch.randint(0, 1000, (1, 8))  # doctest: +SKIP
    >>> pruner = prunekit.Pruner(model, {"input_ids": ids}, residual=False)  # doctest: +SKIP
    >>> pruner.prune(0.5); slim = pruner.transform()  # doctest: +SKIP
    >>> slim.save_pretrained("out")  # doctest: +SKIP
    >>> again = from_pretrained(transformers.BertModel, "out")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.engine import slim as _slim

__all__ = [
    "update_module",
    "prepare_module",
    "from_pretrained",
    "save_pretrained",
    "loader_class",
    "attention_sizes",
    "RMSNORM_TOL",
]

#: (query, key, value) child names of separate projections, and fused projections.
_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
_FUSED = ("c_attn",)
_HEADS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_HEAD_DIM = ("attention_head_size", "head_dim", "head_size")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_UP = ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h")
#: config fields that may change; recorded (original values) under ``config.prunekit``
CONFIG_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "ffn_hidden_size",
    "n_inner",
    "ffn_dim",
    "d_ff",
    "hidden_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "num_hidden_layers",
    "layer_types",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_intermediate_size",
)
#: config fields that give an MLP width (OPT ``ffn_dim``, T5 ``d_ff``, DistilBERT ``hidden_dim``,
#: BART/Whisper per encoder/decoder), with the part of the module names each applies to
_INTER_FIELDS = (
    ("intermediate_size", ""),
    ("ffn_hidden_size", ""),
    ("n_inner", ""),
    ("ffn_dim", ""),
    ("d_ff", ""),
    ("hidden_dim", ""),
    ("encoder_ffn_dim", "encoder."),
    ("decoder_ffn_dim", "decoder."),
)
#: largest relative difference accepted when switching an RMSNorm to ``F.rms_norm``
RMSNORM_TOL = 1e-5


def _qual(mod: nn.Module) -> str:
    return f"{type(mod).__module__}.{type(mod).__qualname__}"


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx")


def _out_in(mod: nn.Module, shape: list[int] | None = None) -> tuple[int, int] | None:
    """(out, in) widths of a linear-like layer (``nn.Linear``: weight (out, in); GPT-2
    ``Conv1D``: weight (in, out)), from ``shape`` when given."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    s = list(shape) if shape is not None else list(w.shape)
    return (s[1], s[0]) if _is_conv1d(mod) else (s[0], s[1])


def _first_attr(mod: nn.Module, names) -> str | None:
    return next(
        (n for n in names if isinstance(getattr(mod, n, None), int) and not isinstance(getattr(mod, n), bool)), None
    )


def _projections(mod: nn.Module) -> tuple[str, str, str, str | None] | None:
    """Child names of (query, key, value) and of the fused projection, if any."""
    children = dict(mod.named_children())
    for names in _QKV:
        if all(n in children and _out_in(children[n]) is not None for n in names):
            return (*names, None)
    for f in _FUSED:
        if f in children and _out_in(children[f]) is not None:
            return (f, f, f, f)
    return None


def attention_sizes(mod: nn.Module) -> dict[str, int] | None:
    """``{"heads", "head_dim", "kv_heads", "width"}`` of a Hugging Face attention module
    (None when ``mod`` does not look like one)."""
    proj = _projections(mod)
    h_attr, d_attr = _first_attr(mod, _HEADS), _first_attr(mod, _HEAD_DIM)
    if proj is None and _fused_heads(mod):  # Falcon, Bloom
        heads, dim = getattr(mod, h_attr), getattr(mod, d_attr)
        kv_attr = _first_attr(mod, _KV_HEADS)
        return {
            "heads": heads,
            "head_dim": dim,
            "kv_heads": getattr(mod, kv_attr) if kv_attr else heads,
            "width": heads * dim,
        }
    if proj is None or (h_attr is None and d_attr is None):
        return None
    heads = getattr(mod, h_attr) if h_attr else None
    q_w, k_w, _ = _widths(mod, proj, None)
    head_dim = getattr(mod, d_attr) if d_attr else q_w // heads
    if heads is None:
        heads = q_w // head_dim
    return {"heads": heads, "head_dim": head_dim, "kv_heads": k_w // head_dim, "width": q_w}


def _widths(mod: nn.Module, proj, old: dict | None) -> tuple[int, int, int]:
    """(query width, key width, input width) now, or before pruning with ``old`` shapes."""
    q, k, _, fused = proj

    def out_in(child: str) -> tuple[int, int]:
        m = getattr(mod, child)
        shape = (old or {}).get(f"{child}.weight")
        return _out_in(m, shape)

    if fused is None:
        (q_w, c_in), (k_w, _) = out_in(q), out_in(k)
        return q_w, k_w, c_in
    total, c_in = out_in(fused)
    if hasattr(mod, "q_attn"):  # GPT-2 cross-attention: c_attn holds k and v
        q_w = out_in("q_attn")[0]
        return q_w, total // 2, c_in
    return total // 3, total // 3, c_in


def _update_attention(mod: nn.Module, proj, old: dict) -> None:
    q_new, k_new, c_new = _widths(mod, proj, None)
    q_old, k_old, c_old = _widths(mod, proj, old)
    h_attr, d_attr, kv_attr = _first_attr(mod, _HEADS), _first_attr(mod, _HEAD_DIM), _first_attr(mod, _KV_HEADS)
    heads0 = getattr(mod, h_attr) if h_attr else None
    dim0 = getattr(mod, d_attr) if d_attr else q_old // heads0
    heads0 = heads0 if heads0 is not None else q_old // dim0
    kv0 = getattr(mod, kv_attr) if kv_attr else k_old // dim0
    choice = _slim.head_split(mod) or ("heads" if q_new % dim0 == 0 and k_new % dim0 == 0 else "head_dim")
    if choice == "heads":
        dim, heads, kv = dim0, q_new // dim0, k_new // dim0
    else:
        heads, kv = heads0, kv0
        dim = q_new // heads
    if h_attr:
        setattr(mod, h_attr, heads)
    if d_attr:
        setattr(mod, d_attr, dim)
    _note_head_dim(mod, dim0, dim)
    if kv_attr:
        setattr(mod, kv_attr, kv)
    if isinstance(getattr(mod, "num_key_value_groups", None), int) and kv:
        mod.num_key_value_groups = heads // kv
    for a in ("all_head_size", "inner_dim"):
        if isinstance(getattr(mod, a, None), int):
            setattr(mod, a, q_new)
    if isinstance(getattr(mod, "split_size", None), int):
        mod.split_size = q_new if proj[3] else mod.split_size
    for a in ("embed_dim", "hidden_size"):
        if getattr(mod, a, None) == c_old and c_new != c_old:
            setattr(mod, a, c_new)


def _update_mlp(mod: nn.Module) -> None:
    children = dict(mod.named_children())
    up = next((children[n] for n in _UP if n in children and _out_in(children[n]) is not None), None)
    if up is None:
        return
    out_w, in_w = _out_in(up)
    if isinstance(getattr(mod, "intermediate_size", None), int):
        mod.intermediate_size = out_w
    if isinstance(getattr(mod, "hidden_size", None), int):
        mod.hidden_size = in_w


def _note_head_dim(mod: nn.Module, was: int, now: int) -> None:
    """Record, for the config update, that ``mod`` lost part of every head: a model built from
    a config stating the new widths would compute a different attention scale from them."""
    ctx = _slim.update_context()
    if ctx is not None and now != was:
        ctx.setdefault("head_dim_pruned", set()).add(ctx["names"].get(id(mod), ""))


def _fused_heads(mod: nn.Module) -> bool:
    """Whether ``mod`` is a Falcon/Bloom-style attention: one ``query_key_value`` projection
    with ``num_heads`` and ``head_dim`` attributes."""
    qkv = getattr(mod, "query_key_value", None)
    return (
        isinstance(qkv, nn.Module)
        and _out_in(qkv) is not None
        and _first_attr(mod, _HEADS) is not None
        and _first_attr(mod, _HEAD_DIM) is not None
    )


def _update_fused_heads(mod: nn.Module, old: dict) -> None:
    """Falcon-style ``query_key_value``: rows laid out per key/value group as (group, query heads
    of the group + key + value, head_dim) in the new decoder architecture, (head, q/k/v, head_dim)
    otherwise; ``num_heads``, ``num_kv_heads`` and ``head_dim`` follow the weight."""
    w_new = mod.query_key_value.weight.shape[0]
    w_old = old.get("query_key_value.weight", [w_new])[0]
    if w_new == w_old or getattr(mod, "multi_query", False) and not getattr(mod, "new_decoder_architecture", False):
        return
    heads0, dim0 = mod.num_heads, mod.head_dim
    new_arch = bool(getattr(mod, "new_decoder_architecture", False))
    groups0 = mod.num_kv_heads if new_arch else heads0
    per = heads0 // groups0 + 2 if new_arch else 3  # rows of head_dim per group
    choice = _slim.head_split(mod) or ("heads" if w_new % (per * dim0) == 0 else "head_dim")
    groups, dim = (w_new // (per * dim0), dim0) if choice == "heads" else (groups0, w_new // (per * groups0))
    mod.head_dim = dim
    _note_head_dim(mod, dim0, dim)
    mod.num_heads = groups * (per - 2) if new_arch else groups
    mod.num_kv_heads = groups
    dense = getattr(mod, "dense", None)
    if isinstance(getattr(dense, "weight", None), torch.Tensor):
        for a in ("hidden_size", "split_size"):
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, dense.weight.shape[0])


def update_module(mod: nn.Module, old: dict) -> None:
    """Slim updater for every module of the ``transformers`` package (children first)."""
    if _is_conv1d(mod):
        mod.nx, mod.nf = mod.weight.shape
        return
    proj = _projections(mod)
    if proj is not None and (_first_attr(mod, _HEADS) or _first_attr(mod, _HEAD_DIM)):
        _update_attention(mod, proj, old)
    elif _fused_heads(mod):
        _update_fused_heads(mod, old)
    else:
        _update_mlp(mod)
    ctx = _slim.update_context()
    if ctx is None:
        return
    cfg = getattr(mod, "config", None)
    if cfg is not None and next((m for m in ctx["model"].modules() if getattr(m, "config", None) is cfg), None) is mod:
        _update_config(mod, old)  # the outermost module holding this config
    elif isinstance(getattr(mod, "hidden_size", None), int):
        widths = _residual_width(ctx["model"])
        if widths is not None and mod.hidden_size == widths[0]:
            mod.hidden_size = widths[1]


def _residual_width(model: nn.Module) -> tuple[int, int] | None:
    """(original, new) width of the residual stream: the input width of the first attention."""
    ctx = _slim.update_context() or {}
    names = ctx.get("names", {})
    old_shapes = ctx.get("old_shapes", {})
    for m in model.modules():
        proj = _projections(m)
        fused = proj is None and _fused_heads(m)
        if not fused and (proj is None or not (_first_attr(m, _HEADS) or _first_attr(m, _HEAD_DIM))):
            continue
        pre = names.get(id(m), "")
        pre = pre + "." if pre else ""
        old = {k[len(pre) :]: v for k, v in old_shapes.items() if k.startswith(pre)}
        if fused:
            return _out_in(m.query_key_value, old.get("query_key_value.weight"))[1], _out_in(m.query_key_value)[1]
        return _widths(m, proj, old)[2], _widths(m, proj, None)[2]
    return None


def _settable(cfg: Any, field: str) -> bool:
    """Whether config ``field`` can be assigned (not a read-only property such as Falcon's
    ``head_dim``, which the config derives from ``hidden_size`` and the heads)."""
    attr = getattr(type(cfg), field, None)
    return not (isinstance(attr, property) and attr.fset is None)


def _update_config(model: nn.Module, old: dict) -> None:
    """Config fields and ``config.prunekit`` of ``model``, the outermost module holding the config
    (names in the recorded spec are relative to it: a wrapper's ``bert.`` prefix is dropped)."""
    cfg = model.config
    ctx = _slim.update_context() or {}
    here = ctx.get("names", {}).get(id(model), "")
    pre = here + "." if here else ""
    old_shapes = {k[len(pre) :]: v for k, v in ctx.get("old_shapes", old).items() if k.startswith(pre)}
    splits = {
        ("<root>" if k == here else k[len(pre) :]): v
        for k, v in ctx.get("head_splits", {}).items()
        if k == here or k.startswith(pre) or (not here and k == "<root>")
    }
    record = dict(getattr(cfg, "prunekit", None) or {})
    original = record.get("original") or {
        f: getattr(cfg, f) for f in CONFIG_FIELDS if hasattr(cfg, f) and _settable(cfg, f)
    }
    hidden0 = original.get("hidden_size", getattr(cfg, "hidden_size", None))
    # (field, original MLP width, part of the names it applies to); GPT-2's n_inner=None means 4 * hidden
    mlps = [
        (f, original[f], where)
        for f, where in _INTER_FIELDS
        if isinstance(original.get(f), int) and hasattr(cfg, f) and not (f == "hidden_dim" and original[f] == hidden0)
    ]
    if not mlps and isinstance(hidden0, int):
        mlps = [(next((f for f, _ in _INTER_FIELDS if hasattr(cfg, f)), "n_inner"), 4 * hidden0, "")]
    attn, inter = [], {f: [] for f, _, _ in mlps}
    for name, m in model.named_modules():
        sizes = attention_sizes(m)
        if sizes is not None:
            attn.append(sizes)
            continue
        was = _out_in(m, old_shapes.get(f"{name}.weight"))
        for field, inter0, where in mlps if was is not None else ():
            if where not in name:
                continue
            if was == (inter0, hidden0):  # an MLP's first projection
                inter[field].append(_out_in(m)[0])
            elif was == (2 * inter0, hidden0) and name.endswith("gate_up_proj"):
                inter[field].append(_out_in(m)[0] // 2)  # Phi-3's fused (gate, up) projection
    residual = _residual_width(model)
    # head widths pruned: the config keeps the original sizes (a model built from the new ones
    # would take its attention scale from the pruned head_dim); prunekit's loaders rebuild it
    head_dim_pruned = bool(record.get("head_dim_pruned")) or any(
        n == here or n.startswith(pre) for n in ctx.get("head_dim_pruned", ())
    )
    layers_uniform = not head_dim_pruned

    # per-stage lists (HF Swin's num_heads): the config states one value per stage, not per layer
    per_stage = isinstance(getattr(cfg, "num_attention_heads", None), (list, tuple))

    def set_if_uniform(field: str, values: list[int]) -> None:
        nonlocal layers_uniform
        if not values:
            return
        now = getattr(cfg, field, None)
        if head_dim_pruned:
            return
        if len(set(values)) != 1 or isinstance(now, (list, tuple)) or not _settable(cfg, field):
            # a read-only field (Falcon's derived head_dim) or a per-stage list cannot state it
            layers_uniform = layers_uniform and len(set(values)) == 1 and now == values[0]
        elif hasattr(cfg, field) or (field == "head_dim" and not per_stage):
            setattr(cfg, field, values[0])

    if residual is not None and hidden0 is not None and residual[0] == getattr(cfg, "hidden_size", None):
        set_if_uniform("hidden_size", [residual[1]])
    set_if_uniform("num_attention_heads", [a["heads"] for a in attn])
    kv_field = next((f for f in _KV_HEADS if hasattr(cfg, f)), None)
    if kv_field is not None:
        set_if_uniform(kv_field, [a["kv_heads"] for a in attn])
    dims = [a["head_dim"] for a in attn]
    if dims and (hasattr(cfg, "head_dim") or len(set(dims)) == 1):
        set_if_uniform("head_dim", dims)
    for field, values in inter.items():
        set_if_uniform(field, values)
    record["original"] = original
    record["uniform"] = layers_uniform
    record["head_dim_pruned"] = head_dim_pruned
    record["spec"] = _compose_spec(record.get("spec"), model, old_shapes, splits)
    cfg.prunekit = record


def _compose_spec(prev: dict | None, model: nn.Module, old_shapes: dict, head_splits: dict) -> dict:
    """The slim spec against the *original* model, composed with an earlier pruning's."""
    from prunekit.engine.sparse import get_tensor

    shapes = dict((prev or {}).get("shapes", {}))
    original = dict((prev or {}).get("original_shapes", {}))
    for name, old in old_shapes.items():
        original.setdefault(name, list(old))
        shapes[name] = list(get_tensor(model, name).shape)
    splits = dict((prev or {}).get("head_splits", {}))
    splits.update(head_splits)
    spec = {"format": _slim.SPEC_FORMAT, "version": 1, "shapes": shapes, "original_shapes": original}
    if splits:
        spec["head_splits"] = splits
    _add_structure(spec, prev or {}, model)
    return spec


def _add_structure(spec: dict, prev: dict, model: nn.Module) -> None:
    """The removed layers and compensation biases of the update running (names relative to ``model``)."""
    ctx = _slim.update_context() or {}
    here = ctx.get("names", {}).get(id(model), "")
    pre = here + "." if here else ""
    structure = ctx.get("structure", {})
    blocks = list(prev.get("blocks", [])) + [b[len(pre) :] for b in structure.get("blocks", []) if b.startswith(pre)]
    biases = {
        **prev.get("added_biases", {}),
        **{k[len(pre) :]: v for k, v in structure.get("added_biases", {}).items() if k.startswith(pre)},
    }
    if blocks:
        spec["blocks"] = list(dict.fromkeys(blocks))
    if biases:
        spec["added_biases"] = biases


# ----- preparing: hand-written RMSNorm -> F.rms_norm -----------------------------------
_RMS_CLASSES: dict[type, type] = {}


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    dtype = hidden_states.dtype
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    w = self.weight
    out = F.rms_norm(hidden_states.float(), (w.shape[0],), w if w.dtype == torch.float32 else None, eps)
    if w.dtype != torch.float32:
        return w * out.to(dtype)
    return out.to(dtype)


def prepare_module(mod: nn.Module) -> bool:
    """Switch a hand-written RMSNorm (``x * rsqrt(mean(x**2) + eps) * weight``) to a subclass
    that calls ``F.rms_norm``, so its width can be pruned; checked numerically first."""
    cls = type(mod)
    if not cls.__name__.endswith("RMSNorm") or cls in _RMS_CLASSES.values():
        return False
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter) or w.ndim != 1 or w.is_meta:
        return False
    if not any(isinstance(getattr(mod, a, None), float) for a in ("variance_epsilon", "eps")):
        return False
    sub = _RMS_CLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {"forward": _rms_forward, "__module__": __name__, "__qualname__": f"Prunable{cls.__qualname__}"},
        )
        _RMS_CLASSES[cls] = sub
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=g).to(w.device, w.dtype)
    with torch.no_grad():
        want = mod(x)
        got = _rms_forward(mod, x)
    if want.shape != got.shape or float((want - got).abs().max()) > RMSNORM_TOL * (1 + float(want.abs().max())):
        return False
    mod.__class__ = sub
    return True


# ----- reloading ------------------------------------------------------------------------
def from_pretrained(cls: Any, directory: str | Path, **kwargs) -> nn.Module:
    """Load a slim model saved with ``save_pretrained``, whatever its per-layer widths.

    ``cls`` is the model class (``BertModel``, ``AutoModelForCausalLM``, ...). The model is
    built from the original sizes recorded in ``config.prunekit``, resized to the slim spec,
    then Hugging Face loads the weights as usual. Without a ``prunekit`` record this is
    ``cls.from_pretrained(directory)``.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    record = getattr(config, "prunekit", None)
    if not record:
        return cls.from_pretrained(directory, **kwargs)
    if hasattr(cls, "_model_mapping"):  # an Auto class: find the concrete one
        cls = cls._model_mapping[type(config)]
    if isinstance(cls, (tuple, list)):  # several classes for one config (DeiT): the saved one
        saved = getattr(config, "architectures", None) or []
        cls = next((c for c in cls if c.__name__ in saved), cls[0])
    spec = record["spec"]

    def restore(cfg: Any) -> None:  # the original sizes, also of sub-configs (CLIP's text_config)
        for field, value in ((getattr(cfg, "prunekit", None) or {}).get("original") or {}).items():
            if _settable(cfg, field):  # read-only fields (Falcon's head_dim) follow the others
                setattr(cfg, field, value)
        for value in vars(cfg).values():
            if isinstance(value, transformers.PretrainedConfig):
                restore(value)

    class Slim(cls):  # builds the original architecture, then takes the slim shapes
        def __init__(self, cfg, *args, **kw):
            orig = copy.deepcopy(cfg)
            restore(orig)
            super().__init__(orig, *args, **kw)
            _slim.apply_spec(self, spec)

    Slim.__name__ = cls.__name__
    Slim.__qualname__ = cls.__qualname__
    Slim.__module__ = cls.__module__
    model = Slim.from_pretrained(directory, **kwargs)
    model.__class__ = cls
    return model


# ----- saving for the plain ``AutoModel...from_pretrained(dir, trust_remote_code=True)`` ----
#: the code file written next to the weights; Hugging Face imports it when loading
REMOTE_FILE = "prunekit_slim.py"
_REMOTE_CODE = '''"""A prunekit slim model: per-layer widths its config cannot state, reloaded from the
widths recorded in config.json under "prunekit". Written by prunekit.integrations.hf.save_pretrained;
loading needs prunekit installed (pip install prunekit)."""
import transformers

import prunekit.integrations.hf

{name} = prunekit.integrations.hf.loader_class(transformers.{name})
'''


def loader_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``from_pretrained`` is :func:`from_pretrained` (used by the
    code file that :func:`save_pretrained` writes); the loaded model is a plain ``cls``."""

    def _from_pretrained(_sub, directory, *args, **kwargs):
        if args:
            raise TypeError(
                f"{cls.__name__}.from_pretrained of a prunekit slim model takes no positional model arguments"
            )
        return from_pretrained(cls, directory, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"from_pretrained": classmethod(_from_pretrained), "__module__": __name__, "__qualname__": cls.__qualname__},
    )


def _auto_classes(model: nn.Module) -> list[str]:
    """Names of the ``transformers`` Auto classes that map this model's config to its class."""
    import transformers

    model_type = getattr(model.config, "model_type", None)
    out = []
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        try:
            names = getattr(transformers, name)._model_mapping._model_mapping
        except (AttributeError, ImportError):
            continue
        if names.get(model_type) == type(model).__name__:
            out.append(name)
    return sorted(out)


def _loads_natively(model: nn.Module) -> bool:
    """Whether the model class built from the saved config has the slim model's shapes."""
    cfg = copy.deepcopy(model.config)
    try:
        with torch.device("meta"):
            fresh = type(model)(cfg)
    except Exception:  # noqa: BLE001 - the config does not even build: it cannot state the widths
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return all(theirs.get(k, shape) == shape for k, shape in mine.items()) and set(mine) <= set(theirs)


def save_pretrained(model: nn.Module, directory: str | Path, **kwargs) -> Path:
    """``model.save_pretrained(directory)`` plus what lets the plain Hugging Face loader rebuild
    a slim model whose widths its config cannot state (per-layer widths, pruned BERT/GPT-2
    heads: ``transformers`` 5 has no ``pruned_heads`` any more): a small code file and an
    ``auto_map`` in ``config.json``, so ``AutoModel...from_pretrained(directory,
    trust_remote_code=True)`` works, as for any architecture that ships its code (prunekit must
    be installed where it loads). A model the config describes as it is saves as usual.

    Example:
        >>> save_pretrained(slim, "out")  # doctest: +SKIP
        >>> transformers.AutoModel.from_pretrained("out", trust_remote_code=True)  # doctest: +SKIP
    """
    import json

    import transformers

    from prunekit.utils.files import atomic_write

    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    record = getattr(model.config, "prunekit", None)
    if not record or _loads_natively(model):
        return directory
    name = type(model).__name__
    if not isinstance(getattr(transformers, name, None), type):
        raise ValueError(
            f"{name} is not a class exported by transformers; reload the saved model with "
            f"prunekit.integrations.hf.from_pretrained({name}, {str(directory)!r})"
        )
    autos = _auto_classes(model)
    if not autos:
        raise ValueError(
            f"no transformers Auto class maps model_type {model.config.model_type!r} to {name}; "
            f"reload with prunekit.integrations.hf.from_pretrained({name}, {str(directory)!r})"
        )
    atomic_write(directory / REMOTE_FILE, _REMOTE_CODE.format(name=name))
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {a: f"{REMOTE_FILE[:-3]}.{name}" for a in autos}
    atomic_write(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory
