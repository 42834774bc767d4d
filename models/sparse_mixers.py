"""Sparse-pattern and LSH attention mixers for the LM: the Sparse Transformer's factorised patterns and
Reformer's locality-sensitive hashing, with the mixers' interface ``mixer(x, positions, segment_ids, state)``.

* :class:`SparseAttention` (Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse
  Transformers", Section 4.2, the "merged head"): causal multi-head attention (GQA as ``models.attention``,
  rotary positions) where every head attends to the union of a factorised pattern's two heads,
  ``kernels.sparse_attention.sparse_transformer_mask``: "strided" (the last ``stride`` tokens, or every
  stride-th) or "fixed" (its own block of ``stride`` tokens, or the last ``summary`` tokens of every earlier
  block). The pattern is a function of the tokens' positions: the mask of positions ``(p_i, p_j)`` is read
  from the pattern's table ``[max_len, max_len]``, then restricted to the same segment and to keys at or
  before the query in the row, so a packed row gives each document the pattern it has alone. The merged head
  is computed densely by ``kernels.sparse_attention.masked_attention_reference`` (O(L^2) like the dense
  attention path; the sub-quadratic kernels of ``kernels.sparse_attention`` compute the separate heads).
  Decoding keeps every key (:class:`~jaxlab.models.attention.KVCache` without window, ``max_len`` slots):
  the pattern decides which cached keys each new token sees, so decoding equals the full forward.
* :class:`LSHAttention` (Kitaev, Kaiser and Levskaya 2020, "Reformer", Section 2): one shared query/key
  projection (rotary positions on it), causal ``kernels.lsh_attention.lsh_attention`` with ``n_buckets``,
  ``chunk_len`` and ``n_rounds``. The hashing rotations are fixed, not trained: drawn from
  ``LSH_SEED`` folded with a CRC-32 of the module's path (``block_3/mixer``), so every layer hashes with its
  own rotations and every call of a layer (training, evaluation, another process) with the same ones. Under
  ``scan_layers`` the layers at one position of the scanned pattern share a path and so their rotations.
  Rows are padded to a multiple of ``chunk_len`` with tokens of their own segment. The sorted chunks of
  Reformer depend on the buckets of every token of the row (later tokens and other packed documents
  included), so the mixer's outputs are causal and segment-local in the values they mix (gradients with
  respect to later or other documents' inputs are zero) but not prefix-consistent: there is no decoding
  path that equals the forward pass, and ``init_state`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.kernels.lsh_attention import lsh_attention
from jaxlab.kernels.sparse_attention import masked_attention_reference, sparse_transformer_mask
from jaxlab.models.attention import KVCache
from jaxlab.models.layers import Projection, RopeScaling, apply_rope

__all__ = ["LSHAttention", "LSH_SEED", "SPARSE_PATTERNS", "SparseAttention", "lsh_layer_key", "sparse_pattern_mask"]

SPARSE_PATTERNS = ("strided", "fixed")
LSH_SEED = 0x5EED
"""Base seed of the LSH mixers' hashing rotations (folded with each layer's path)."""


def sparse_pattern_mask(q_positions, k_positions, table):
    """Pattern mask [B, Lq, Lk] of query positions [B, Lq] and key positions [B, Lk] read from ``table``
    [T, T] (``sparse_transformer_mask(T, ...)``); positions must lie in ``[0, T)``."""
    return table[q_positions[:, :, None], k_positions[:, None, :]]  # [B, Lq, Lk]


def lsh_layer_key(path: tuple[str, ...]) -> jax.Array:
    """The hashing key of the LSH mixer at module ``path``: ``fold_in(PRNGKey(LSH_SEED), crc32("a/b/c"))``."""
    return jax.random.fold_in(jax.random.PRNGKey(LSH_SEED), zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


class SparseAttention(nn.Module):
    """Causal multi-head attention restricted to a Sparse Transformer pattern (merged head).

    Attributes:
      num_heads, num_kv_heads: query heads Hq and key/value heads Hkv (None: Hq).
      pattern: "strided" | "fixed"; stride: the pattern's stride (block length); summary: the "fixed"
        pattern's summary tokens per block c (<= stride).
      max_len: largest position + 1 the pattern table covers (the LM's ``max_len``).
      rope_base, rope_scaling: rotary positions (rope_base None: none).
    """

    num_heads: int
    num_kv_heads: int | None = None
    pattern: str = "strided"
    stride: int = 8
    summary: int = 1
    max_len: int = 2048
    rope_base: float | None = 10000.0
    rope_scaling: RopeScaling | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def table(self) -> jax.Array:
        """The pattern over positions, bool [max_len, max_len] (causal in the positions)."""
        return sparse_transformer_mask(self.max_len, self.stride, pattern=self.pattern, summary=self.summary)

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> KVCache:
        """A :class:`KVCache` of ``max_len`` slots (no window: the pattern reaches back to the first block)."""
        return KVCache.zeros(batch, max_len, self.kv_heads, d_model // self.num_heads, self.dtype)

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state: KVCache | None = None):
        B, L, d = x.shape
        Hq, Hkv = self.num_heads, self.kv_heads
        if d % Hq or Hq % Hkv:
            raise ValueError(f"d_model={d} must be divisible by num_heads={Hq}, a multiple of num_kv_heads={Hkv}")
        if self.pattern not in SPARSE_PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} must be one of {SPARSE_PATTERNS}")
        if positions is None:
            raise ValueError("positions are required: the sparse pattern is a function of the positions")
        D = d // Hq
        dense = lambda feats, axes, name, contract=1: Projection(  # noqa: E731
            feats, axes, contract, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q = dense((Hq, D), ("embed", "heads", "head_dim"), "query")(x)  # [B, L, Hq, D]
        k = dense((Hkv, D), ("embed", "kv_heads", "head_dim"), "key")(x)  # [B, L, Hkv, D]
        v = dense((Hkv, D), ("embed", "kv_heads", "head_dim"), "value")(x)  # [B, L, Hkv, D]
        if self.rope_base is not None:
            q = apply_rope(q, positions, self.rope_base, self.rope_scaling)
            k = apply_rope(k, positions, self.rope_base, self.rope_scaling)
        table = self.table()
        if state is None:
            row = jnp.arange(L)
            mask = sparse_pattern_mask(positions, positions, table) & (row[None, :, None] >= row[None, None, :])
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
            out = masked_attention_reference(q, k, v, mask)  # [B, L, Hq, D]
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids must be None when decoding with a cache (one document per row)")
            C, idx = state.capacity, state.index
            k_c = jax.lax.dynamic_update_slice_in_dim(state.k, k.astype(state.k.dtype), idx, axis=1)  # [B, C, Hkv, D]
            v_c = jax.lax.dynamic_update_slice_in_dim(state.v, v.astype(state.v.dtype), idx, axis=1)
            slots = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))  # slot s holds stream position s
            mask = sparse_pattern_mask(positions, slots, table)  # [B, L, C]; causal: no slot past the query's
            out = masked_attention_reference(q, k_c, v_c, mask)  # [B, L, Hq, D]
            state = state.replace(k=k_c, v=v_c, index=idx + L)
        y = dense((d,), ("heads", "head_dim", "embed"), "out", contract=2)(out.astype(self.dtype))  # [B, L, d]
        return y, state


class LSHAttention(nn.Module):
    """Causal Reformer LSH attention with a shared query/key projection (no decoding: see the module doc).

    Attributes:
      num_heads: heads H (shared QK: no GQA).
      n_buckets: buckets per round (1 or even); chunk_len: chunk length of the sorted sequence;
        n_rounds: hashing rounds.
      rope_base, rope_scaling: rotary positions on the shared QK (rope_base None: none).
    """

    num_heads: int
    n_buckets: int = 8
    chunk_len: int = 32
    n_rounds: int = 2
    rope_base: float | None = 10000.0
    rope_scaling: RopeScaling | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int):
        raise NotImplementedError(
            "mixer='lsh' has no decoding state: Reformer's sorted chunks depend on the buckets of later tokens, "
            "so no token-by-token computation equals the forward pass (sample with another mixer)")

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        if state is not None:
            raise NotImplementedError("mixer='lsh' cannot decode from a state (see LSHAttention.init_state)")
        B, L, d = x.shape
        H = self.num_heads
        if d % H:
            raise ValueError(f"d_model={d} must be divisible by num_heads={H}")
        D = d // H
        dense = lambda feats, axes, name, contract=1: Projection(  # noqa: E731
            feats, axes, contract, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        qk = dense((H, D), ("embed", "heads", "head_dim"), "query_key")(x)  # [B, L, H, D]
        v = dense((H, D), ("embed", "heads", "head_dim"), "value")(x)  # [B, L, H, D]
        if self.rope_base is not None:
            if positions is None:
                raise ValueError("positions are required with rotary embeddings")
            qk = apply_rope(qk, positions, self.rope_base, self.rope_scaling)
        seg = jnp.zeros((B, L), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        pad = -L % self.chunk_len
        if pad:  # padding: its own segment (never seen by a real token), unit vectors as keys (finite norms)
            qk = jnp.pad(qk, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=1.0)
            v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
            seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
        out = lsh_attention(qk, v, lsh_layer_key(self.scope.path), n_buckets=self.n_buckets,
                            chunk_len=self.chunk_len, n_rounds=self.n_rounds, causal=True,
                            segment_ids=seg)[:, :L]  # [B, L, H, D]
        y = dense((d,), ("heads", "head_dim", "embed"), "out", contract=2)(out.astype(self.dtype))  # [B, L, d]
        return y, None
