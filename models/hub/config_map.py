"""Hugging Face ``config.json`` <-> :class:`~jaxlab.models.lm.LMConfig`, for the architectures jaxlab reads.

=====================  ==========================================================================
``architectures[0]``   what it sets on ``LMConfig``
=====================  ==========================================================================
LlamaForCausalLM       SwiGLU, RMSNorm, RoPE (``rope_type`` "default" or "llama3" -> ``rope_scaling``),
                       GQA, ``attention_bias`` -> ``qkv_bias`` + ``attn_out_bias``, ``mlp_bias``
Qwen2ForCausalLM       Llama plus biases on q/k/v (``qkv_bias``), tied or untied head
MistralForCausalLM     Llama with ``sliding_window`` -> the "sliding" mixer, ``window = sliding_window``
GPT2LMHeadModel        learned positions, LayerNorm, GELU tanh ("gelu_new"), biases everywhere, tied head
=====================  ==========================================================================

Window off-by-one: Hugging Face masks key ``j`` for query ``i`` unless ``i - sliding_window < j <= i``
(``masking_utils.sliding_window_overlay``), so a query sees ``sliding_window`` keys, itself included:
jaxlab's ``window`` (the one meaning of the word in the repository) is ``sliding_window`` itself.

Both config styles are read: transformers 5's ``rope_parameters`` ``{"rope_type", "rope_theta", ...}`` and
the older top-level ``rope_theta`` + ``rope_scaling``; :func:`hf_config` writes both, so older and newer
transformers load what :func:`jaxlab.models.hub.save_pretrained` writes.
"""

from __future__ import annotations

import dataclasses

from jaxlab.models.layers import DTYPES, RopeScaling
from jaxlab.models.lm import LMConfig

__all__ = ["ARCHITECTURES", "hf_config", "infer_architecture", "lm_config"]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
               "GPT2LMHeadModel": "gpt2"}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def _require(hf: dict, key: str, arch: str, source: str):
    if key not in hf:
        raise ValueError(f"{source}: {arch} config has no {key!r}")
    return hf[key]


def checkpoint_dtype(hf: dict) -> str | None:
    """The dtype name the config declares (``dtype``, or the older ``torch_dtype``), None if it says none."""
    name = hf.get("dtype", hf.get("torch_dtype"))
    if name is None:
        return None
    if str(name) not in TORCH_DTYPES:
        raise ValueError(f"config dtype {name!r} is not one of {tuple(DTYPES)}")
    return TORCH_DTYPES[str(name)]


def _rope(hf: dict, arch: str, source: str) -> tuple[float, RopeScaling | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind_params = params if params.get("rope_type", "default") != "default" else dict(legacy)
    kind = kind_params.get("rope_type", kind_params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{source}: rope_type={kind!r} of {arch} is not supported (only 'default' and 'llama3')")
    try:
        scaling = RopeScaling(float(kind_params["factor"]), float(kind_params["low_freq_factor"]),
                              float(kind_params["high_freq_factor"]),
                              int(kind_params.get("original_max_position_embeddings",
                                                  hf.get("max_position_embeddings"))))
    except KeyError as e:
        raise ValueError(f"{source}: llama3 rope scaling of {arch} lacks {e.args[0]!r}") from None
    return float(theta), scaling


def lm_config(hf: dict, *, dtype: str, source: str = "config.json", **overrides) -> LMConfig:
    """The :class:`LMConfig` of a Hugging Face config dict (``architectures[0]`` picks the mapping);
    ``dtype`` becomes both ``dtype`` and ``param_dtype``; ``overrides`` are further ``LMConfig`` fields
    (e.g. ``scan_layers``, ``attention_impl``)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported; jaxlab.models.hub reads {ARCHITECTURES}")
    req = lambda key: _require(hf, key, arch, source)  # noqa: E731
    common = dict(dtype=dtype, param_dtype=dtype)
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        ffn = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if ffn is None:
            raise ValueError(f"{source}: activation_function={act!r} of {arch} is not supported")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise ValueError(f"{source}: {key}={hf[key]!r} of {arch} is not supported (only {want})")
        d = req("n_embd")
        cfg = dict(vocab_size=req("vocab_size"), d_model=d, num_layers=req("n_layer"), num_heads=req("n_head"),
                   ffn=ffn, d_ff=hf.get("n_inner") or 4 * d, max_len=req("n_positions"), norm="layer",
                   norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position_embedding="learned",
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, attn_out_bias=True,
                   mlp_bias=True)
        return LMConfig(**{**common, **cfg, **overrides})
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} of {arch} is not supported (only 'silu')")
    d, heads = req("hidden_size"), req("num_attention_heads")
    theta, scaling = _rope(hf, arch, source)
    head_dim = hf.get("head_dim") or d // heads
    cfg = dict(vocab_size=req("vocab_size"), d_model=d, num_layers=req("num_hidden_layers"), num_heads=heads,
               num_kv_heads=hf.get("num_key_value_heads") or heads, ffn="swiglu", d_ff=req("intermediate_size"),
               max_len=req("max_position_embeddings"), norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
               rope_base=theta, rope_scaling=scaling, d_head=None if head_dim * heads == d else head_dim,
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if arch == "LlamaForCausalLM":
        bias = bool(hf.get("attention_bias", False))
        cfg.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    elif arch == "Qwen2ForCausalLM":
        cfg.update(qkv_bias=True)
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=True of {arch} (windows on some layers only) is not "
                             f"supported")
    else:  # Mistral
        window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
        if window is not None:
            cfg.update(mixer="sliding", window=int(window))
    return LMConfig(**{**common, **cfg, **overrides})


def infer_architecture(cfg: LMConfig) -> str:
    """The Hugging Face architecture whose layout ``cfg`` has (ValueError for configs none of them has)."""
    if cfg.mixer_pattern is not None or cfg.mixer not in ("attention", "sliding") or cfg.qk_norm:
        raise ValueError(f"mixer={cfg.mixer!r}, mixer_pattern={cfg.mixer_pattern!r}, qk_norm={cfg.qk_norm} have no "
                         f"Hugging Face architecture among {ARCHITECTURES}")
    if cfg.position_embedding == "learned":
        return "GPT2LMHeadModel"
    if cfg.mixer == "sliding":
        return "MistralForCausalLM"
    if cfg.qkv_bias and not cfg.attn_out_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _check_saveable(cfg: LMConfig, arch: str) -> None:
    want = {"GPT2LMHeadModel": dict(position_embedding="learned", norm="layer", qkv_bias=True, attn_out_bias=True,
                                    mlp_bias=True, mixer="attention"),
            "Qwen2ForCausalLM": dict(position_embedding="rope", norm="rms", ffn="swiglu", qkv_bias=True,
                                     attn_out_bias=False, mlp_bias=False, mixer="attention", rope_scaling=None),
            "MistralForCausalLM": dict(position_embedding="rope", norm="rms", ffn="swiglu", qkv_bias=False,
                                       attn_out_bias=False, mlp_bias=False, rope_scaling=None),
            "LlamaForCausalLM": dict(position_embedding="rope", norm="rms", ffn="swiglu", mixer="attention",
                                     attn_out_bias=cfg.qkv_bias)}[arch]
    if arch == "GPT2LMHeadModel" and cfg.ffn not in ("gelu", "gelu_tanh"):
        want["ffn"] = "gelu_tanh"
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"LMConfig fields {bad} cannot be written as {arch} (it needs {want})")


def hf_config(cfg: LMConfig, arch: str) -> dict:
    """The Hugging Face ``config.json`` dict of ``cfg`` as architecture ``arch`` (inverse of :func:`lm_config`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; jaxlab.models.hub writes {ARCHITECTURES}")
    _check_saveable(cfg, arch)
    base = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype}
    if arch == "GPT2LMHeadModel":
        return {**base, "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_inner": cfg.ffn_hidden, "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
                "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.ffn == "gelu_tanh" else "gelu",
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    out = {**base, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "intermediate_size": cfg.ffn_hidden, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "attention_dropout": 0.0, "rope_parameters": rope, "rope_theta": cfg.rope_base,
           "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"}}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=cfg.window if cfg.mixer == "sliding" else None)
    else:
        out.update(use_sliding_window=False)
    return out
