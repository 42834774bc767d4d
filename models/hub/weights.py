"""Tensor names and layouts: Hugging Face checkpoints <-> the parameters of :class:`~jaxlab.models.lm.LM`.

One :class:`TensorMap` per Hugging Face tensor says which jaxlab parameters it holds and how to convert
between the two layouts (numpy, exact: transposes, reshapes and splits only, so a round trip is bit-exact).

Llama, Qwen2 and Mistral (``torch.nn.Linear`` stores ``weight [out, in]``)::

    model.embed_tokens.weight            [V, d]            embed/embedding            [V, d]
    model.layers.{i}.input_layernorm     [d]               block_{i}/mixer_norm/scale
    self_attn.q_proj.weight              [Hq D, d]         mixer/query/kernel         [d, Hq, D]   (W^T)
    self_attn.{k,v}_proj.weight          [Hkv D, d]        mixer/{key,value}/kernel   [d, Hkv, D]
    self_attn.{q,k,v}_proj.bias          [H D]             mixer/.../bias             [H, D]
    self_attn.o_proj.weight              [d, Hq D]         mixer/out/kernel           [Hq, D, d]
    post_attention_layernorm             [d]               block_{i}/ffn_norm/scale
    mlp.{gate,up}_proj.weight            [F, d]            ffn/{gate,up}/kernel       [d, F]
    mlp.down_proj.weight                 [d, F]            ffn/down/kernel            [F, d]
    model.norm.weight                    [d]               final_norm/scale
    lm_head.weight                       [V, d]            head/kernel                [d, V]       (untied)

The query/key rows need no permutation: Hugging Face's Llama family rotates with ``rotate_half``
(channel ``i`` paired with ``i + D/2``), the layout of ``models.layers.apply_rope``.

GPT-2 (``Conv1D`` stores ``weight [in, out]``; fused q/k/v)::

    transformer.wte.weight / wpe.weight  [V, d] / [T, d]   embed/embedding, pos_embed/embedding
    transformer.h.{i}.ln_1.{weight,bias} [d]               block_{i}/mixer_norm/{scale,bias}
    attn.c_attn.weight                   [d, 3 d]          mixer/{query,key,value}/kernel [d, H, D] (split)
    attn.c_attn.bias                     [3 d]             mixer/{query,key,value}/bias   [H, D]
    attn.c_proj.weight / bias            [d, d] / [d]      mixer/out/kernel [H, D, d] / bias [d]
    transformer.h.{i}.ln_2               [d]               block_{i}/ffn_norm/{scale,bias}
    mlp.c_fc.weight / bias               [d, F] / [F]      ffn/up/kernel / bias
    mlp.c_proj.weight / bias             [F, d] / [d]      ffn/down/kernel / bias
    transformer.ln_f.{weight,bias}       [d]               final_norm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxlab.models.lm import LMConfig

__all__ = ["IGNORED_SUFFIXES", "TensorMap", "tensor_maps"]

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
"""Non-parameter buffers older checkpoints store (GPT-2's causal mask, Llama's rotary frequencies): skipped."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor ``name`` of ``shape`` holding the jaxlab parameters ``params`` (paths
    ``("block_0", "mixer", "query", "kernel")``): ``to_params(array) -> tuple`` of arrays in their order,
    ``from_params(*arrays) -> array`` the inverse."""

    name: str
    shape: tuple[int, ...]
    params: tuple[tuple[str, ...], ...]
    to_params: Callable
    from_params: Callable


def _same(name, shape, path):
    return TensorMap(name, shape, (path,), lambda a: (a,), lambda a: a)


def _linear(name, shape_out_in, path, param_shape):
    """``nn.Linear`` weight [out, in] -> kernel [in, *out] (``param_shape``)."""
    return TensorMap(name, shape_out_in, (path,), lambda a: (a.T.reshape(param_shape),),
                     lambda k: k.reshape(shape_out_in[::-1]).T)


def _reshaped(name, shape, path, param_shape):
    return TensorMap(name, shape, (path,), lambda a: (a.reshape(param_shape),), lambda p: p.reshape(shape))


def _llama_maps(cfg: LMConfig) -> list[TensorMap]:
    d, Hq, Hkv, D, F, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    maps = [_same("model.embed_tokens.weight", (V, d), ("embed", "embedding")),
            _same("model.norm.weight", (d,), ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        maps.append(_linear("lm_head.weight", (V, d), ("head", "kernel"), (d, V)))
    for i in range(cfg.num_layers):
        hf, jx = f"model.layers.{i}.", (f"block_{i}",)
        maps += [_same(hf + "input_layernorm.weight", (d,), jx + ("mixer_norm", "scale")),
                 _same(hf + "post_attention_layernorm.weight", (d,), jx + ("ffn_norm", "scale")),
                 _linear(hf + "self_attn.o_proj.weight", (d, Hq * D), jx + ("mixer", "out", "kernel"), (Hq, D, d))]
        for proj, param, H in (("q_proj", "query", Hq), ("k_proj", "key", Hkv), ("v_proj", "value", Hkv)):
            maps.append(_linear(hf + f"self_attn.{proj}.weight", (H * D, d), jx + ("mixer", param, "kernel"),
                                (d, H, D)))
            if cfg.qkv_bias:
                maps.append(_reshaped(hf + f"self_attn.{proj}.bias", (H * D,), jx + ("mixer", param, "bias"), (H, D)))
        if cfg.attn_out_bias:
            maps.append(_same(hf + "self_attn.o_proj.bias", (d,), jx + ("mixer", "out", "bias")))
        for proj, param, shape in (("gate_proj", "gate", (F, d)), ("up_proj", "up", (F, d)),
                                   ("down_proj", "down", (d, F))):
            maps.append(_linear(hf + f"mlp.{proj}.weight", shape, jx + ("ffn", param, "kernel"), shape[::-1]))
            if cfg.mlp_bias:
                maps.append(_same(hf + f"mlp.{proj}.bias", shape[:1], jx + ("ffn", param, "bias")))
    return maps


def _gpt2_maps(cfg: LMConfig) -> list[TensorMap]:
    d, H, D, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    maps = [_same("transformer.wte.weight", (V, d), ("embed", "embedding")),
            _same("transformer.wpe.weight", (cfg.max_len, d), ("pos_embed", "embedding")),
            _same("transformer.ln_f.weight", (d,), ("final_norm", "scale")),
            _same("transformer.ln_f.bias", (d,), ("final_norm", "bias"))]
    if not cfg.tie_embeddings:
        maps.append(_linear("lm_head.weight", (V, d), ("head", "kernel"), (d, V)))
    for i in range(cfg.num_layers):
        hf, jx = f"transformer.h.{i}.", (f"block_{i}",)
        for ln, norm in (("ln_1", "mixer_norm"), ("ln_2", "ffn_norm")):
            maps += [_same(hf + f"{ln}.weight", (d,), jx + (norm, "scale")),
                     _same(hf + f"{ln}.bias", (d,), jx + (norm, "bias"))]
        qkv = tuple(jx + ("mixer", p) for p in ("query", "key", "value"))
        maps += [TensorMap(hf + "attn.c_attn.weight", (d, 3 * H * D), tuple(p + ("kernel",) for p in qkv),
                           lambda a: tuple(x.reshape(d, H, D) for x in np.split(a, 3, axis=1)),  # [d, 3 H D]
                           lambda *ks: np.concatenate([k.reshape(d, H * D) for k in ks], axis=1)),
                 TensorMap(hf + "attn.c_attn.bias", (3 * H * D,), tuple(p + ("bias",) for p in qkv),
                           lambda a: tuple(x.reshape(H, D) for x in np.split(a, 3)),
                           lambda *bs: np.concatenate([b.reshape(H * D) for b in bs])),
                 _reshaped(hf + "attn.c_proj.weight", (H * D, d), jx + ("mixer", "out", "kernel"), (H, D, d)),
                 _same(hf + "attn.c_proj.bias", (d,), jx + ("mixer", "out", "bias")),
                 _same(hf + "mlp.c_fc.weight", (d, F), jx + ("ffn", "up", "kernel")),
                 _same(hf + "mlp.c_fc.bias", (F,), jx + ("ffn", "up", "bias")),
                 _same(hf + "mlp.c_proj.weight", (F, d), jx + ("ffn", "down", "kernel")),
                 _same(hf + "mlp.c_proj.bias", (d,), jx + ("ffn", "down", "bias"))]
    return maps


def tensor_maps(cfg: LMConfig, arch: str) -> list[TensorMap]:
    """Every tensor of architecture ``arch``'s checkpoint of ``cfg``, with its jaxlab parameters (unrolled
    layout: ``block_{i}``)."""
    if arch == "GPT2LMHeadModel":
        return _gpt2_maps(cfg)
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        return _llama_maps(cfg)
    raise ValueError(f"architecture {arch!r} has no tensor map")
