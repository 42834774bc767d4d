"""Linear-time attention mixers: kernelised linear attention (elu+1, FAVOR+) and GAU/FLASH.

* :class:`LinearAttention` (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4-7): softmax
  replaced by a feature-map product, ``o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i)`` with the running
  state ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``; ``phi`` is elu+1 or
  Performer's FAVOR+ positive random features (Choromanski et al. 2021). Decoding carries (S, z).
* :class:`GAU` (Hua et al. 2022, "Transformer Quality in Linear Time", FLASH): a gated attention
  unit ``o = U * (A V)`` with one shared low-dimensional ``Z`` giving queries and keys by per-dim
  scale/offset, and mixed-chunk attention: ``relu^2`` attention inside chunks of C tokens plus causal
  linear attention across chunks. Decoding carries the across-chunk state and the current chunk.

FAVOR+ stabilisers. Queries use the kernel's per-row maximum, which cancels in the normalisation. Keys use
the kernel's causal form, c = 0 (``favor_features(..., is_query=False, causal=True)``): a key's features depend
on that key alone (causal; decoding equals the full forward) and stay O(1) for keys of moderate norm. A
data-independent bound such as ``c = max_r |w_r|^2 / 2`` (chi^2(D) / 2, ~D / 2) is equally causal but scales
every key feature by ~exp(-D / 2): at D = 32 the features fall far below the normaliser's eps and the mixer's
output vanishes. The projection is a fixed, untrained parameter (``stop_gradient``; ``favor_projection`` is in
``models.lm.NO_DECAY_PARAMS``, so AdamW's decoupled decay does not shrink it either). Performer redraws the
features during training (Choromanski et al. 2021, Section 4.2): :func:`redraw_favor_projections` is that
redraw as a pure function of the parameters and a key, which the LM trainer applies inside its jitted step
every ``LMConfig.feature_redraw`` steps (``models.lm_training``), so a resumed run draws the same features.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.feature_maps import elu_plus_one, favor_features, orthogonal_gaussian
from jaxlab.kernels.gau import mixed_chunk_attention
from jaxlab.kernels.linear_attention import LinearAttentionState, linear_attention
from jaxlab.models.layers import positions_from_segments

__all__ = ["FAVOR_PROJECTION", "FEATURE_MAPS", "GAU", "GAUState", "LinearAttention", "favor_key_features",
           "redraw_favor_projections"]

FEATURE_MAPS = ("elu", "favor")
FAVOR_PROJECTION = "favor_projection"
"""Parameter name of FAVOR+'s random projection [m, D] (stacked [G, m, D] under ``scan_layers``)."""


def redraw_favor_projections(params, key):
    """``params`` with every ``favor_projection`` leaf replaced by a fresh draw of ``orthogonal_gaussian`` (the
    distribution of the initialiser), in the leaf's dtype; other leaves are returned as they are.

    Leaf i of the tree (in ``jax.tree_util`` order) draws from ``fold_in(key, i)``; a stacked leaf
    ``[..., m, D]`` (scanned layers) draws every ``[m, D]`` slice from its own split of that key.
    """

    def redraw(i, path, leaf):
        if not path or getattr(path[-1], "key", None) != FAVOR_PROJECTION:
            return leaf
        *lead, m, D = leaf.shape
        n = math.prod(lead)
        keys = jax.random.split(jax.random.fold_in(key, i), n)
        draws = jax.vmap(lambda k: orthogonal_gaussian(k, m, D))(keys)  # [n, m, D]
        return draws.reshape(leaf.shape).astype(leaf.dtype)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(treedef, [redraw(i, path, leaf) for i, (path, leaf) in enumerate(leaves)])


def favor_key_features(k, projection):
    """FAVOR+ features of keys k [B, L, H, D] -> [B, L, H, m], causal: each key's features depend on it alone.

    ``phi(k) = exp(W k' - |k'|^2 / 2) / sqrt(m)``, ``k' = k / D^(1/4)`` (no stabiliser, c = 0): the kernel's
    ``favor_features(k, W, is_query=False, causal=True)``. The exponent ``w . k' - |k'|^2 / 2`` is at most
    ``|w|^2 / 2`` and near ``-|k'|^2 / 2`` for a typical w, so the features are O(1) for moderate key norms.
    """
    return favor_features(k, projection, is_query=False, causal=True)


class LinearAttention(nn.Module):
    """Causal multi-head linear attention; state = the kernel's ``LinearAttentionState`` (kv [B, H, m, D],
    z [B, H, m]), a frozen dataclass pytree like every mixer state."""

    num_heads: int
    feature_map: str = "elu"
    num_features: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _feature_dim(self, head_dim: int) -> int:
        return head_dim if self.feature_map == "elu" else self.num_features

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> LinearAttentionState:
        D = d_model // self.num_heads
        m = self._feature_dim(D)
        return LinearAttentionState(jnp.zeros((batch, self.num_heads, m, D), jnp.float32),
                                    jnp.zeros((batch, self.num_heads, m), jnp.float32))

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} must be one of {FEATURE_MAPS}")
        B, L, d = x.shape
        H = self.num_heads
        if d % H:
            raise ValueError(f"d_model={d} must be divisible by num_heads={H}")
        D = d // H
        dense = lambda name: nn.DenseGeneral((H, D), use_bias=False, dtype=self.dtype,  # noqa: E731
                                             param_dtype=self.param_dtype, name=name)
        q = checkpoint_name(dense("query")(x), "query_proj")  # [B, L, H, D]
        k = checkpoint_name(dense("key")(x), "key_proj")
        v = checkpoint_name(dense("value")(x), "value_proj")
        if self.feature_map == "elu":
            phi_q, phi_k = elu_plus_one(q.astype(jnp.float32)), elu_plus_one(k.astype(jnp.float32))
        else:  # drawn once at init; a fixed (non-trained) projection
            W = jax.lax.stop_gradient(self.param(
                FAVOR_PROJECTION, lambda key, shape: orthogonal_gaussian(key, *shape), (self.num_features, D)))
            phi_q, phi_k = favor_features(q, W, is_query=True), favor_key_features(k, W)  # [B, L, H, m]
        v32 = v.astype(jnp.float32)
        if state is None:
            o = linear_attention(phi_q, phi_k, v32, causal=True, segment_ids=segment_ids)
        else:
            o, state = linear_attention(phi_q, phi_k, v32, causal=True, segment_ids=segment_ids,
                                        initial_state=state, return_state=True)
        o = checkpoint_name(o.astype(self.dtype), "context")  # [B, L, H, D]
        y = nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="out")(o)
        return y, state


@struct.dataclass
class GAUState:
    """Decoding state of :class:`GAU` at stream position ``index`` (chunk offset ``p = index % C``).

    k_buf, v_buf: [B, C, S], [B, C, E] quadratic keys / values of the current chunk (slots < p valid).
    kv_prev: [B, S, E] ``sum lin_k_j v_j^T / C`` over all completed chunks (what the linear part reads).
    kv_cur: [B, S, E] the same sum over the current chunk so far (merged into kv_prev when it completes).
    """

    k_buf: jax.Array
    v_buf: jax.Array
    kv_prev: jax.Array
    kv_cur: jax.Array
    index: jax.Array


def _rel_bias(rel, C: int):
    """Causal relative-position bias [C, C] from a learned vector [C]: ``bias_ij = rel[i - j]`` (i >= j)."""
    i = jnp.arange(C)
    return rel[jnp.clip(i[:, None] - i[None, :], 0, C - 1)]


class GAU(nn.Module):
    """Gated attention unit with FLASH mixed-chunk attention (Hua et al. 2022, Code 1 and Code 6).

    ``u = silu(x W_u)``, ``v = silu(x W_v)`` [B, L, E = expand d]; ``z = silu(x W_z)`` [B, L, S]; four
    scale-offset maps of z give quad_q, quad_k, lin_q, lin_k; ``o = (u * attn) W_o`` with

        attn_i = sum_{j in chunk(i), j <= i} relu(quad_q_i . quad_k_j / C + b_{i-j})^2 v_j
               + sum_{j in earlier chunks} (lin_q_i . lin_k_j / C) v_j.

    Chunks are the positions ``[nC, (n+1)C)`` of each document. Three forms give the same numbers:
    the kernel ``mixed_chunk_attention`` (one document per row, no state); with ``segment_ids``
    (packed rows, chunks restart with every document), a local form over each tile and its
    predecessor plus the ``linear_attention`` kernel (which resets at segment starts) for the
    earlier chunks; with a state, one token at a time (:class:`GAUState`).
    """

    expand: int = 2
    qk_dim: int = 128
    chunk_size: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> GAUState:
        C, S, E = self.chunk_size, self.qk_dim, self.expand * d_model
        z = lambda *shape: jnp.zeros((batch,) + shape, jnp.float32)  # noqa: E731
        return GAUState(z(C, S), z(C, E), z(S, E), z(S, E), jnp.zeros((), jnp.int32))

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        C, S, E = self.chunk_size, self.qk_dim, self.expand * d
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        u = nn.silu(dense(E, "u")(x)).astype(jnp.float32)  # [B, L, E]
        v = checkpoint_name(nn.silu(dense(E, "v")(x)).astype(jnp.float32), "value_proj")
        z = checkpoint_name(nn.silu(dense(S, "z")(x)).astype(jnp.float32), "query_proj")  # [B, L, S]
        gamma = self.param("gamma", nn.initializers.normal(0.02), (4, S))
        beta = self.param("beta", nn.initializers.zeros, (4, S))
        quad_q, quad_k, lin_q, lin_k = (z * gamma[i] + beta[i] for i in range(4))
        rel = self.param("rel_bias", nn.initializers.zeros, (C,))  # b_{i-j}, i - j in [0, C)
        bias = _rel_bias(rel, C)  # [C, C]
        if state is not None:
            attn, state = self._decode(quad_q, quad_k, lin_q, lin_k, v, bias, state)
        elif segment_ids is None:
            pad = -L % C  # pad to whole chunks so the kernel's chunk (and 1/C scale) is C for every L
            padded = [jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (quad_q, quad_k, lin_q, lin_k, v)]
            attn = mixed_chunk_attention(*padded, chunk_size=C, bias=bias)[:, :L]
        else:
            attn = self._segmented(quad_q, quad_k, lin_q, lin_k, v, rel, segment_ids)
        o = checkpoint_name(u * attn, "context").astype(self.dtype)
        return dense(d, "out")(o), state

    def _segmented(self, quad_q, quad_k, lin_q, lin_k, v, rel, segment_ids):
        """Mixed-chunk attention of packed rows; chunks restart with each document, nothing crosses one.

        The keys sharing a chunk with query i lie within the C tokens up to i, so they are found in
        i's tile of C tokens and the tile before it; the linear part over earlier chunks is causal
        linear attention over the whole document minus those in-chunk terms.
        """
        B, L, _ = v.shape
        C = self.chunk_size
        pad = -L % C
        nc = (L + pad) // C
        pos = positions_from_segments(segment_ids)  # position within the document

        def tiles(a, fill=0):  # [B, L, ...] -> [B, nc, C, ...]
            a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
            return a.reshape((B, nc, C) + a.shape[2:])

        def with_prev(t, fill=0):  # [B, nc, C, ...] -> [B, nc, 2C, ...]: the previous tile, then this one
            prev = jnp.concatenate([jnp.full_like(t[:, :1], fill), t[:, :-1]], axis=1)
            return jnp.concatenate([prev, t], axis=2)

        idx = jnp.broadcast_to(jnp.arange(L), (B, L))
        i_q, seg_q, pos_q = tiles(idx), tiles(segment_ids, -1), tiles(pos)  # [B, nc, C]
        i_k, seg_k, pos_k = (with_prev(tiles(a, f), f) for a, f in ((idx, -1), (segment_ids, -1), (pos, 0)))
        mask = ((i_k[:, :, None] <= i_q[..., None]) & (i_k[:, :, None] >= 0) & (seg_k[:, :, None] == seg_q[..., None])
                & (pos_k[:, :, None] // C == pos_q[..., None] // C))  # [B, nc, C, 2C]
        bias = rel[jnp.clip(pos_q[..., None] - pos_k[:, :, None], 0, C - 1)]  # b_{i-j}
        qq, lq = tiles(quad_q), tiles(lin_q)  # [B, nc, C, S]
        qk, lk, vv = with_prev(tiles(quad_k)), with_prev(tiles(lin_k)), with_prev(tiles(v))  # [B, nc, 2C, .]
        w_quad = jnp.square(nn.relu(jnp.einsum("bcis,bcjs->bcij", qq, qk) / C + bias)) * mask
        w_lin_in_chunk = jnp.einsum("bcis,bcjs->bcij", lq, lk) / C * mask
        local = jnp.einsum("bcij,bcje->bcie", w_quad - w_lin_in_chunk, vv).reshape(B, nc * C, -1)[:, :L]
        heads = lambda a: a[:, :, None, :]  # noqa: E731  one head: [B, L, 1, .]
        linear = linear_attention(heads(lin_q), heads(lin_k), heads(v / C), causal=True, normalize=False,
                                  segment_ids=segment_ids)[:, :, 0]
        return local + linear

    def _decode(self, quad_q, quad_k, lin_q, lin_k, v, bias, state: GAUState):
        """Token-by-token mixed-chunk attention from ``state``: (attn [B, L, E], new state)."""
        C = self.chunk_size
        slots = jnp.arange(C)

        def step(st: GAUState, inputs):
            qq, qk, lq, lk, v_t = inputs  # [B, S], [B, S], [B, S], [B, S], [B, E]
            p = st.index % C
            k_buf = jax.lax.dynamic_update_slice_in_dim(st.k_buf, qk[:, None], p, axis=1)
            v_buf = jax.lax.dynamic_update_slice_in_dim(st.v_buf, v_t[:, None], p, axis=1)
            logits = jnp.einsum("bs,bjs->bj", qq, k_buf) / C + jnp.take(bias, p, axis=0)  # [B, C]
            w = jnp.square(nn.relu(logits)) * (slots <= p)
            out = jnp.einsum("bj,bje->be", w, v_buf) + jnp.einsum("bs,bse->be", lq, st.kv_prev)
            kv_cur = st.kv_cur + jnp.einsum("bs,be->bse", lk, v_t) / C
            done = p == C - 1  # the chunk is complete: the linear part of later chunks reads it
            st = GAUState(k_buf, v_buf, jnp.where(done, st.kv_prev + kv_cur, st.kv_prev),
                          jnp.where(done, 0.0, kv_cur), st.index + 1)
            return st, out

        xs = tuple(jnp.moveaxis(a, 1, 0) for a in (quad_q, quad_k, lin_q, lin_k, v))
        state, attn = jax.lax.scan(step, state, xs)
        return jnp.moveaxis(attn, 0, 1), state
