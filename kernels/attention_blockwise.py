"""Memory-efficient exact attention in pure JAX: online softmax over tiles, recomputing backward.

The forward pass walks over key/value tiles keeping, per query row, the running max ``m``, the
running sum ``l`` and the unnormalised output ``acc`` (the online softmax of Milakov & Gimelshein
2018, as used by Rabe & Staats 2021 and FlashAttention, Dao et al. 2022, Algorithm 1)::

    m_new = max(m, rowmax(S_j));  alpha = exp(m - m_new);  P_j = exp(S_j - m_new)
    l = alpha * l + rowsum(P_j);  acc = alpha * acc + P_j V_j;   O = acc / l,  LSE = m + log l

It saves only ``O`` and ``LSE`` and recomputes ``P = exp(S - LSE)`` tile by tile in the backward
pass (FlashAttention-2, Dao 2023, Algorithm 2; ``D_i = rowsum(dO_i * O_i)``)::

    dV_j += P^T dO_i;  dP = dO_i V_j^T;  dS = P * (dP - D_i);  dQ_i += dS K_j;  dK_j += dS^T Q_i

so memory is O(L) on every backend. Tiles that the causal/window mask hides entirely are never
visited (``MaskSpec.kv_blocks``/``q_blocks``). Use it through
``jaxlab.kernels.attention.dot_product_attention(..., impl="blockwise")``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.kernels.attention_masks import AttentionArgs, MaskSpec, softcap_grad, softcap_logits

__all__ = ["DEFAULT_BLOCK", "blockwise_attention"]

DEFAULT_BLOCK = 256  # tile edge: a 256 x 256 fp32 score tile per head stays in CPU cache


@dataclasses.dataclass(frozen=True)
class _Config:
    mask: MaskSpec
    scale: float
    softcap: float | None
    segments: bool
    block_q: int
    block_k: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.mask.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.mask.kv_len // self.block_k)

    @property
    def needs_mask(self) -> bool:
        return self.mask.needs_mask(kv_padded_len=self.num_k_blocks * self.block_k, segments=self.segments)


# ---- tiling layouts --------------------------------------------------------------------------------
def _pad_axis(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _split_q(x, cfg: _Config, num_kv_heads: int):
    """[B, Lq, Hq, D] -> [nq, B, Hkv, G, bq, D] (zero padded)."""
    B, _, Hq, D = x.shape
    nq, bq = cfg.num_q_blocks, cfg.block_q
    x = _pad_axis(x, 1, nq * bq).reshape(B, nq, bq, num_kv_heads, Hq // num_kv_heads, D)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _merge_q(x, q_len: int):
    """[nq, B, Hkv, G, bq, D] -> [B, Lq, Hq, D]."""
    nq, B, Hkv, G, bq, D = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, Hkv * G, D)[:, :q_len]


def _split_kv(x, cfg: _Config):
    """[B, Lk, Hkv, D] -> [nk, B, Hkv, bk, D] (zero padded)."""
    B, _, Hkv, D = x.shape
    nk, bk = cfg.num_k_blocks, cfg.block_k
    return _pad_axis(x, 1, nk * bk).reshape(B, nk, bk, Hkv, D).transpose(1, 0, 3, 2, 4)


def _merge_kv(x, kv_len: int):
    """[nk, B, Hkv, bk, D] -> [B, Lk, Hkv, D]."""
    nk, B, Hkv, bk, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, Hkv, D)[:, :kv_len]


def _split_ids(ids, num_blocks: int, block: int):
    """[B, L] -> [n, B, b]; None stays None (padding is hidden by the key-length mask)."""
    if ids is None:
        return None
    B = ids.shape[0]
    return _pad_axis(ids, 1, num_blocks * block).reshape(B, num_blocks, block).transpose(1, 0, 2)


# ---- one tile -------------------------------------------------------------------------------------
def _tile_logits(q_i, k_j, cfg: _Config):
    """Capped, scaled logits of one tile: [B, Hkv, G, bq, D] x [B, Hkv, bk, D] -> [B, Hkv, G, bq, bk] fp32."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_i, k_j, preferred_element_type=jnp.float32)
    return softcap_logits(s * cfg.scale, cfg.softcap)


def _tile_mask(i, j, q_ids_i, kv_ids_j, cfg: _Config):
    """Visibility of tile (i, j), broadcastable to [B, Hkv, G, bq, bk]."""
    q_idx = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
    k_idx = j * cfg.block_k + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    if not cfg.segments:
        return cfg.mask.visible(q_idx, k_idx)
    return cfg.mask.visible(q_idx, k_idx, q_ids_i[:, None, None, :, None], kv_ids_j[:, None, None, None, :])


# ---- forward ----------------------------------------------------------------------------------------
def _forward(q, k, v, q_ids, kv_ids, cfg: _Config):
    """Returns out [B, Lq, Hq, D] and LSE [nq, B, Hkv, G, bq] (+inf on rows with no visible key)."""
    q_blocks = _split_q(q, cfg, k.shape[2])  # [nq, B, Hkv, G, bq, D]
    k_blocks, v_blocks = _split_kv(k, cfg), _split_kv(v, cfg)  # [nk, B, Hkv, bk, D]
    q_id_blocks = _split_ids(q_ids, cfg.num_q_blocks, cfg.block_q)
    kv_id_blocks = _split_ids(kv_ids, cfg.num_k_blocks, cfg.block_k)

    def q_tile(xs):
        i, q_i, q_ids_i = xs
        lo, _, _, hi = cfg.mask.kv_blocks(i * cfg.block_q, cfg.block_q, cfg.block_k, cfg.num_k_blocks,
                                          segments=cfg.segments)

        def kv_step(j, carry):
            m, l, acc = carry  # [B, Hkv, G, bq], [B, Hkv, G, bq], [B, Hkv, G, bq, D]
            s = _tile_logits(q_i, k_blocks[j], cfg)
            if cfg.needs_mask:
                kv_ids_j = None if kv_id_blocks is None else kv_id_blocks[j]
                s = jnp.where(_tile_mask(i, j, q_ids_i, kv_ids_j, cfg), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: keep zeros
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_blocks[j], preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        stats_shape = q_i.shape[:-1]
        init = (jnp.full(stats_shape, -jnp.inf), jnp.zeros(stats_shape), jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = lax.fori_loop(lo, hi, kv_step, init)
        out = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)
        lse = jnp.where(l == 0, jnp.inf, m + jnp.log(l))
        return out, lse

    out, lse = lax.map(q_tile, (jnp.arange(cfg.num_q_blocks), q_blocks, q_id_blocks))
    return _merge_q(out, q.shape[1]), lse


# ---- backward ---------------------------------------------------------------------------------------
def _backward(cfg: _Config, res, d_out):
    q, k, v, q_ids, kv_ids, out, lse = res
    Hkv = k.shape[2]
    q_blocks, do_blocks = _split_q(q, cfg, Hkv), _split_q(d_out, cfg, Hkv)  # [nq, B, Hkv, G, bq, D]
    # D_i = rowsum(dO_i * O_i)  [nq, B, Hkv, G, bq]
    delta = jnp.sum(_split_q(d_out.astype(jnp.float32) * out.astype(jnp.float32), cfg, Hkv), axis=-1)
    q_id_blocks = _split_ids(q_ids, cfg.num_q_blocks, cfg.block_q)
    kv_id_blocks = _split_ids(kv_ids, cfg.num_k_blocks, cfg.block_k)

    def kv_tile(dq, xs):
        j, k_j, v_j, kv_ids_j = xs
        lo, _, _, hi = cfg.mask.q_blocks(j * cfg.block_k, cfg.block_k, cfg.block_q, cfg.num_q_blocks,
                                         segments=cfg.segments)

        def q_step(i, carry):
            dq, dk, dv = carry
            q_i, do_i = q_blocks[i], do_blocks[i]
            s = _tile_logits(q_i, k_j, cfg)  # [B, Hkv, G, bq, bk]
            p = jnp.exp(s - lse[i][..., None])
            if cfg.needs_mask:
                q_ids_i = None if q_id_blocks is None else q_id_blocks[i]
                p = jnp.where(_tile_mask(i, j, q_ids_i, kv_ids_j, cfg), p, 0.0)
            dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None]) * (softcap_grad(s, cfg.softcap) * cfg.scale)  # d logits before scaling
            ds = ds.astype(q.dtype)
            dq = dq.at[i].add(jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_j, preferred_element_type=jnp.float32))
            dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk, dv = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    xs = (jnp.arange(cfg.num_k_blocks), _split_kv(k, cfg), _split_kv(v, cfg), kv_id_blocks)
    dq, (dk, dv) = lax.scan(kv_tile, jnp.zeros(q_blocks.shape, jnp.float32), xs)
    dq = _merge_q(dq, q.shape[1]).astype(q.dtype)
    return dq, _merge_kv(dk, k.shape[1]).astype(k.dtype), _merge_kv(dv, v.shape[1]).astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, q_ids, kv_ids, cfg: _Config):
    return _forward(q, k, v, q_ids, kv_ids, cfg)[0]


def _blockwise_fwd(q, k, v, q_ids, kv_ids, cfg: _Config):
    out, lse = _forward(q, k, v, q_ids, kv_ids, cfg)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


_blockwise.defvjp(_blockwise_fwd, _backward)
_blockwise_jit = jax.jit(_blockwise, static_argnums=5)


def _block_size(block: int | None, length: int, name: str) -> int:
    if block is None:
        return min(DEFAULT_BLOCK, length)
    if not isinstance(block, numbers.Integral) or isinstance(block, bool) or block < 1:
        raise ValueError(f"{name} must be a positive int (impl='blockwise'), got {name}={block!r}")
    return min(int(block), length)


def blockwise_attention(q, k, v, args: AttentionArgs, *, block_q: int | None = None, block_k: int | None = None):
    """Tiled online-softmax attention with a recomputing backward pass.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; ``args`` from ``check_attention_args``.
      block_q, block_k: tile sizes (default ``min(DEFAULT_BLOCK, L)``); lengths need not divide them.

    Returns:
      [B, Lq, Hq, D] in the dtype of q.
    """
    cfg = _Config(mask=args.mask, scale=args.scale, softcap=args.softcap, segments=args.segments,
                  block_q=_block_size(block_q, args.mask.q_len, "block_q"),
                  block_k=_block_size(block_k, args.mask.kv_len, "block_k"))
    return _blockwise_jit(q, k, v, args.q_segment_ids, args.kv_segment_ids, cfg)
