"""Multi-head attention (MHA, GQA, MQA) with rotary positions, optional QK-norm and a KV cache.

The math is ``jaxlab.kernels.attention.dot_product_attention``; this module adds the projections
(Vaswani et al. 2017, §3.2.2), grouped key/value heads (GQA, Ainslie et al. 2023; MQA is
``num_kv_heads=1``), rotary positions (Su et al. 2021), RMS-normalised queries and keys
(QK-norm, as Chameleon Team 2024 uses against logit growth) and decoding with a cache.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, §3). The parameters carry logical axis names:
query ``("embed", "heads", "head_dim")``, key/value ``("embed", "kv_heads", "head_dim")`` (column-parallel),
output ``("heads", "head_dim", "embed")`` (row-parallel), QK-norm scales ``("head_dim",)``; queries, keys,
values and the per-head output are constrained to ``("batch", "length", "heads" | "kv_heads", "head_dim")``.
With ``heads``/``kv_heads`` on a model axis every device attends over its own heads and the output
projection ends in one all-reduce. Without logical axis rules the names change nothing.

Decoding. :class:`KVCache` is a ring buffer of ``C`` slots: the token at stream position ``t`` lives in
slot ``t % C``, and ``index`` counts the tokens written. Full causal attention uses ``C = max_len``
(never wraps); a sliding window of ``W`` keys uses ``C = min(W, max_len)``, so its memory is constant
in the length. :func:`cached_attention` handles two cases, both through the attention kernel:

* one new token (``Lq == 1``): write it to its slot, then attend over the ring; slots not yet
  written are hidden through key segment ids. The ring holds exactly the last ``C`` positions, so
  nothing else needs masking and the slot order is irrelevant.
* a chunk (``Lq > 1``, e.g. the prompt): gather the ring oldest-first, so column ``a`` holds stream
  position ``index - C + a``, append the chunk and attend with the kernel's bottom-right aligned
  ``causal``/``window`` masks, which then measure exactly the stream distance; then write the
  chunk's last ``min(Lq, C)`` tokens into the ring.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.attention import dot_product_attention
from jaxlab.kernels.ring_attention import context_parallel_attention
from jaxlab.models.layers import Projection, RMSNorm, RopeScaling, apply_rope

__all__ = ["Attention", "KVCache", "cached_attention"]


@struct.dataclass
class KVCache:
    """Keys/values of past tokens in a ring buffer.

    Attributes:
      k, v: [B, C, Hkv, D] (rotary positions already applied to k).
      index: int32 [] number of tokens written so far = stream position of the next token.
      window: sliding-window size W (static), None for full attention.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def zeros(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32,
              window: int | None = None) -> KVCache:
        """An empty cache for up to ``max_len`` tokens (``min(window, max_len)`` slots with a window)."""
        capacity = max_len if window is None else min(window, max_len)
        shape = (batch, capacity, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), window)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def cached_attention(q, k, v, cache: KVCache, *, impl: str = "auto", softcap=None):
    """Causal attention of new tokens over the cache and themselves; returns (out, updated cache).

    Args:
      q: [B, Lq, Hq, D] queries of the new tokens at stream positions ``index .. index + Lq - 1``.
      k, v: [B, Lq, Hkv, D] their keys and values (rotary already applied).
      cache: the :class:`KVCache` of everything before them (``index + Lq`` must not exceed the
        capacity of a cache without window: it would wrap).

    Returns:
      out [B, Lq, Hq, D] and the cache holding the new tokens, ``index`` advanced by ``Lq``.
    """
    B, Lq = q.shape[:2]
    C, idx = cache.capacity, cache.index
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    slot_ids = jnp.arange(C, dtype=jnp.int32)
    if Lq == 1:
        slot = idx % C
        k_c = jax.lax.dynamic_update_slice_in_dim(cache.k, k, slot, axis=1)  # [B, C, Hkv, D]
        v_c = jax.lax.dynamic_update_slice_in_dim(cache.v, v, slot, axis=1)
        written = jnp.broadcast_to(slot_ids <= idx, (B, C)).astype(jnp.int32)  # [B, C]
        out = dot_product_attention(q, k_c, v_c, segment_ids=(jnp.ones((B, 1), jnp.int32), written),
                                    softcap=softcap, impl=impl)
        return out, cache.replace(k=k_c, v=v_c, index=idx + 1)

    order = (idx + slot_ids) % C  # column a of the gathered ring holds position idx - C + a
    k_all = jnp.concatenate([jnp.take(cache.k, order, axis=1), k], axis=1)  # [B, C + Lq, Hkv, D]
    v_all = jnp.concatenate([jnp.take(cache.v, order, axis=1), v], axis=1)
    written = jnp.concatenate([idx - C + slot_ids >= 0, jnp.ones((Lq,), bool)])  # [C + Lq]
    kv_ids = jnp.broadcast_to(written, (B, C + Lq)).astype(jnp.int32)
    out = dot_product_attention(q, k_all, v_all, causal=True, window=cache.window,
                                segment_ids=(jnp.ones((B, Lq), jnp.int32), kv_ids), softcap=softcap, impl=impl)
    n = min(Lq, C)  # only the last C tokens survive in the ring
    slots = (idx + Lq - n + jnp.arange(n, dtype=jnp.int32)) % C
    k_c = cache.k.at[:, slots].set(k[:, Lq - n:])
    v_c = cache.v.at[:, slots].set(v[:, Lq - n:])
    return out, cache.replace(k=k_c, v=v_c, index=idx + Lq)


SEQ_AXIS = "seq"
"""The mesh axis of context parallelism: self-attention under a mesh (``jax.set_mesh``) whose ``seq`` axis has
size > 1 runs as ring attention (``kernels.ring_attention.context_parallel_attention``), the length split
over that axis and K/V blocks passed around the ring, instead of gathering the whole sequence."""


def _seq_shards() -> int:
    """Size of the ``seq`` axis of the mesh in effect (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(dict(mesh.shape).get(SEQ_AXIS, 1))


class Attention(nn.Module):
    """Multi-head self- or cross-attention over ``dot_product_attention``.

    Attributes:
      num_heads: query heads Hq.
      num_kv_heads: key/value heads Hkv (None: Hq; 1: MQA); must divide ``num_heads``.
      head_dim: D (None: ``d_model // num_heads``).
      causal: causal masking (required for decoding with a cache).
      window: sliding window of W keys per query, the query included (None: unlimited); without
        ``causal``, W keys on each side, the query's own counted on both.
      rope_base: rotary base frequency; None disables rotary positions.
      rope_scaling: Llama 3.1's rescaling of the rotary frequencies (None: none).
      qk_norm: RMS-normalise queries and keys per head before the rotary embedding.
      impl: attention implementation passed to the kernel ("auto", "xla", "pallas", ...).
      use_bias: biases on every projection; ``qkv_bias`` / ``out_bias`` (None: ``use_bias``) set them apart
        for the query/key/value projections (Qwen2) and the output projection.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    window: int | None = None
    rope_base: float | None = 10000.0
    qk_norm: bool = False
    impl: str = "auto"
    softcap: float | None = None
    use_bias: bool = False
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def _head_dim(self, d_model: int) -> int:
        return d_model // self.num_heads if self.head_dim is None else self.head_dim

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> KVCache:
        """An empty :class:`KVCache` for ``max_len`` tokens (a ring of ``window`` slots when windowed)."""
        return KVCache.zeros(batch, max_len, self.kv_heads, self._head_dim(d_model), self.dtype, self.window)

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache: KVCache | None = None, *, kv=None):
        """Attend from x [B, Lq, d_model] to itself (or to ``kv`` [B, Lk, d_kv]).

        Args:
          positions: int [B, Lq] rotary positions of x (and of kv in self-attention).
          segment_ids: as in ``dot_product_attention``: [B, L] or a pair (q_ids, kv_ids).
          cache: decode with this :class:`KVCache` (causal self-attention only, no segment ids).
          kv: the sequence to attend to (cross-attention); None means self-attention.

        Returns:
          ``(y [B, Lq, d_model], cache)``; the cache is the updated one, or None without one.
        """
        B, Lq, d_model = x.shape
        D, Hq, Hkv = self._head_dim(d_model), self.num_heads, self.kv_heads
        if Hq % Hkv:
            raise ValueError(f"num_heads={Hq} must be a multiple of num_kv_heads={Hkv}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be a positive number of keys")
        if cache is not None:
            if not self.causal or kv is not None:
                raise ValueError("cache needs causal self-attention (causal=True, kv=None)")
            if segment_ids is not None:
                raise ValueError("segment_ids must be None when decoding with a cache (one document per row)")
        qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
        out_bias = self.use_bias if self.out_bias is None else self.out_bias

        def dense(feats, axes, name, contract=1, bias=qkv_bias):
            return Projection(feats, axes, contract, use_bias=bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)

        q_axes, kv_axes = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
        src = x if kv is None else kv
        q = dense((Hq, D), ("embed", "heads", "head_dim"), "query")(x)  # [B, Lq, Hq, D]
        k = dense((Hkv, D), ("embed", "kv_heads", "head_dim"), "key")(src)  # [B, Lk, Hkv, D]
        v = dense((Hkv, D), ("embed", "kv_heads", "head_dim"), "value")(src)  # [B, Lk, Hkv, D]
        q = checkpoint_name(nn.with_logical_constraint(q, q_axes), "query_proj")
        k = checkpoint_name(nn.with_logical_constraint(k, kv_axes), "key_proj")
        v = checkpoint_name(nn.with_logical_constraint(v, kv_axes), "value_proj")
        if self.qk_norm:
            norm = lambda name: RMSNorm(self.norm_eps, self.dtype, self.param_dtype, "head_dim",  # noqa: E731
                                        name=name)
            q, k = norm("query_norm")(q), norm("key_norm")(k)
        if self.rope_base is not None:
            if kv is not None:
                raise ValueError("rotary positions apply to self-attention only; set rope_base=None")
            if positions is None:
                raise ValueError("positions are required with rotary embeddings")
            q = apply_rope(q, positions, self.rope_base, self.rope_scaling)
            k = apply_rope(k, positions, self.rope_base, self.rope_scaling)
        seq_shards = _seq_shards()
        if cache is None and kv is None and seq_shards > 1:  # context parallel: ring attention over "seq"
            out = context_parallel_attention(q, k, v, jax.sharding.get_abstract_mesh(), seq_axis=SEQ_AXIS,
                                             causal=self.causal, segment_ids=segment_ids, window=self.window,
                                             softcap=self.softcap)
        elif cache is None:
            out = dot_product_attention(q, k, v, causal=self.causal, segment_ids=segment_ids,
                                        window=self.window, softcap=self.softcap,
                                        impl=self.impl)
        else:
            out, cache = cached_attention(q, k, v, cache, impl=self.impl, softcap=self.softcap)
        out = checkpoint_name(nn.with_logical_constraint(out, q_axes), "context")  # [B, Lq, Hq, D]
        y = dense((d_model,), ("heads", "head_dim", "embed"), "out", contract=2, bias=out_bias)(out)  # [B, Lq, d_model]
        return y, cache
