"""Reformer's LSH attention: shared-QK attention restricted to keys hashed into the query's bucket.

Kitaev, Kaiser and Levskaya 2020, "Reformer: The Efficient Transformer", Section 2. Per head:

* **Shared QK**: one projection gives queries ``q_i = qk_i`` and keys ``k_j = qk_j / |qk_j|``; logits
  ``scale * q_i . k_j``. A token attends to itself only when it has no other key (its own logit would
  dominate), so self is masked unless nothing else is visible.
* **Hashing** (angular LSH, Andoni et al. 2015): a random rotation R ``[D, n_buckets/2]`` per round,
  ``h(x) = argmax([x R; -x R])``. ``n_buckets = 1`` puts every token in one bucket.
* **Sort and chunk**: tokens are sorted by (bucket, position) and cut into chunks of ``chunk_len``; a query
  attends to the keys of its own bucket in its own chunk and the previous one (no wrap-around), an
  O(L chunk_len) computation.
* **Causal**: keys at later positions are masked (with self excluded, the first token attends to itself).
* **Multi-round hashing**: ``n_rounds`` independent hashes; each round r gives an output o_r and the
  log-sum-exp z_r of its logits, combined as ``sum_r exp(z_r - logsumexp_r z_r) o_r`` (eq. 4 / Appendix).
  A key visible to a query in several rounds would count several times; each visible logit is lowered by
  the log of its count (the paper's duplicate correction), so the combined output is exact softmax attention
  over the union of the rounds' visible keys.

``lsh_attention_reference`` computes that union directly, without sorting or chunks: a dense mask of pairs
in the same bucket whose (bucket, position) ranks fall in the same or adjacent chunks. With ``n_buckets = 1``
and ``chunk_len = L`` it is full shared-QK attention. Layout ``[B, L, H, D]`` as ``kernels.attention``;
shared QK means one tensor ``qk`` per head (no GQA).

Packed rows: ``segment_ids`` [B, L] hide every key of another segment (a token alone in its segment sees
itself). The sort still runs over the whole row, so which keys share a query's chunk depends on the buckets of
every token of the row, later ones and other segments' included: outputs are causal and segment-local in the
values they mix, not in the chunk boundaries (Reformer's sort-and-chunk has no prefix-consistent form).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["lsh_attention", "lsh_attention_reference", "lsh_hash", "lsh_rotations"]

SELF_LOGIT_PENALTY = -1e5  # self's logit offset: exp() underflows to 0 beside any other visible key


def lsh_rotations(key, dim: int, n_buckets: int, n_rounds: int = 1, dtype=jnp.float32):
    """Random rotations ``[n_rounds, dim, n_buckets // 2]`` (i.i.d. normal, as the paper's angular LSH)."""
    _check_hash_args(n_buckets, n_rounds)
    return jax.random.normal(key, (n_rounds, dim, n_buckets // 2), dtype)


def _check_hash_args(n_buckets, n_rounds):
    if not (isinstance(n_buckets, int) and (n_buckets == 1 or (n_buckets >= 2 and n_buckets % 2 == 0))):
        raise ValueError(f"n_buckets={n_buckets!r} must be 1 or an even int >= 2 (argmax over [xR; -xR])")
    if not (isinstance(n_rounds, int) and n_rounds >= 1):
        raise ValueError(f"n_rounds={n_rounds!r} must be an int >= 1")


def lsh_hash(qk, rotations, n_buckets: int):
    """Bucket of every token and round: qk ``[B, L, H, D]``, rotations ``[R, D, n_buckets/2]`` -> int32
    ``[R, B, H, L]``."""
    if n_buckets == 1:
        return jnp.zeros((rotations.shape[0],) + qk.shape[:1] + qk.shape[2:3] + qk.shape[1:2], jnp.int32)
    if rotations.shape[1:] != (qk.shape[-1], n_buckets // 2):
        raise ValueError(f"rotations must be [n_rounds, D, n_buckets/2] = [*, {qk.shape[-1]}, {n_buckets // 2}], "
                         f"got shape {rotations.shape}")
    xr = jnp.einsum("blhd,rdn->rbhln", qk, rotations.astype(qk.dtype))   # [R, B, H, L, n_buckets/2]
    return jnp.argmax(jnp.concatenate([xr, -xr], axis=-1), axis=-1).astype(jnp.int32)


def _check_segments(segment_ids, shape):
    """segment_ids [B, L] int32 (all zeros when None)."""
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32)
    if getattr(segment_ids, "shape", None) != shape:
        raise ValueError(f"segment_ids must be [B, L] = {shape}, got shape {getattr(segment_ids, 'shape', None)}")
    return jnp.asarray(segment_ids, jnp.int32)


def _check(qk, v, n_buckets, chunk_len, n_rounds, causal, scale):
    for name, x in (("qk", qk), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, L, H, D], got shape {getattr(x, 'shape', None)}")
    if qk.shape[:3] != v.shape[:3]:
        raise ValueError(f"qk and v must share [B, L, H], got qk {qk.shape}, v {v.shape}")
    _check_hash_args(n_buckets, n_rounds)
    L = qk.shape[1]
    if not (isinstance(chunk_len, int) and chunk_len >= 1 and L % chunk_len == 0):
        raise ValueError(f"chunk_len={chunk_len!r} must be an int >= 1 dividing the length L={L}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got causal={causal!r}")
    return 1.0 / math.sqrt(qk.shape[-1]) if scale is None else float(scale)


def _keys(qk):
    return qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)


_STATIC = ("n_buckets", "chunk_len", "n_rounds", "causal", "scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def lsh_attention(qk, v, key, *, n_buckets: int, chunk_len: int, n_rounds: int = 1, causal: bool = False,
                  scale: float | None = None, segment_ids=None):
    """Reformer LSH attention by sorting and chunking: qk, v ``[B, L, H, D]`` -> ``[B, L, H, D]``.

    Args:
      qk: shared queries/keys; v: values; key: PRNG key of the rotations (``lsh_rotations``).
      n_buckets: 1 or even; chunk_len: chunk size, dividing L; n_rounds: hashing rounds.
      causal: mask later positions; scale: logit scale (default ``1/sqrt(D)``).
      segment_ids: int [B, L] packed rows; keys of another segment are hidden (None: one segment).
    """
    scale = _check(qk, v, n_buckets, chunk_len, n_rounds, causal, scale)
    B, L, H, D = qk.shape
    seg = _check_segments(segment_ids, (B, L))
    R, C, nc = n_rounds, chunk_len, L // chunk_len
    buckets = lsh_hash(qk, lsh_rotations(key, D, n_buckets, R, qk.dtype), n_buckets)   # [R, B, H, L]
    pos = jnp.arange(L, dtype=jnp.int32)
    perm = jnp.argsort(buckets * L + pos, axis=-1)                         # [R, B, H, L] sorted -> token
    rank = jnp.argsort(perm, axis=-1)                                      # token -> sorted slot
    chunk = rank // C                                                      # [R, B, H, L]
    rounds_of = jnp.moveaxis(jnp.stack([buckets, chunk], -1), 0, -2)      # [B, H, L, R', 2]: every round's hash

    def sort(x):                                                           # x [B, H, L, ...] -> [R, B, H, nc, C, ...]
        idx = perm.reshape(perm.shape + (1,) * (x.ndim - 3))
        xs = jnp.take_along_axis(x[None], idx, axis=3)
        return xs.reshape((R, B, H, nc, C) + x.shape[3:])

    def window(x):                                                         # [R, B, H, nc, C, ...] -> [.., nc, 2C, ..]
        return jnp.concatenate([jnp.roll(x, 1, axis=3), x], axis=4)

    q_s = sort(jnp.moveaxis(qk, 1, 2))                                     # [R, B, H, nc, C, D]
    k_w, v_w = window(sort(jnp.moveaxis(_keys(qk), 1, 2))), window(sort(jnp.moveaxis(v, 1, 2)))  # [.., nc, 2C, D]
    pos_q = sort(jnp.broadcast_to(pos, (B, H, L)))                         # [R, B, H, nc, C]
    pos_k = window(pos_q)                                                  # [R, B, H, nc, 2C]
    seg_q = sort(jnp.broadcast_to(seg[:, None], (B, H, L)))                # [R, B, H, nc, C]
    seg_k = window(seg_q)                                                  # [R, B, H, nc, 2C]
    hq = sort(rounds_of)                                                   # [R, B, H, nc, C, R', 2]
    hk = window(hq)                                                        # [R, B, H, nc, 2C, R', 2]
    has_prev = jnp.arange(nc)[:, None] > 0                                 # [nc, 1]
    valid = jnp.concatenate([jnp.broadcast_to(has_prev, (nc, C)), jnp.ones((nc, C), bool)], axis=1)  # [nc, 2C]
    valid = valid[:, None, :]                                              # [nc, 1, 2C]
    pq, pk = pos_q[..., :, None], pos_k[..., None, :]                      # [.., C, 1], [.., 1, 2C]
    same_seg = seg_k[..., None, :] == seg_q[..., :, None]                  # [R, B, H, nc, C, 2C]
    allowed = valid & same_seg & (pk != pq) & ((pk <= pq) if causal else True)   # [R, B, H, nc, C, 2C]
    hq_, hk_ = hq[..., :, None, :, :], hk[..., None, :, :, :]              # [.., C, 1, R', 2], [.., 1, 2C, R', 2]
    seen = (hq_[..., 0] == hk_[..., 0]) & ((hk_[..., 1] == hq_[..., 1]) | (hk_[..., 1] == hq_[..., 1] - 1))
    count = jnp.sum(seen & allowed[..., None], axis=-1)                    # [R, B, H, nc, C, 2C]: rounds seeing (i, j)
    r_idx = jnp.arange(R).reshape((R,) + (1,) * 6)
    visible = allowed & jnp.take_along_axis(seen, jnp.broadcast_to(r_idx, seen.shape[:-1] + (1,)), -1)[..., 0]
    is_self = valid & (pk == pq)
    s = scale * jnp.einsum("rbhncd,rbhnkd->rbhnck", q_s, k_w)             # [R, B, H, nc, C, 2C]
    neg = jnp.finfo(s.dtype).min
    s = jnp.where(visible, s - jnp.log(jnp.maximum(count, 1)).astype(s.dtype),
                  jnp.where(is_self, s + SELF_LOGIT_PENALTY, neg))
    lse = jax.nn.logsumexp(s, axis=-1)                                     # [R, B, H, nc, C]
    o = jnp.einsum("rbhnck,rbhnkd->rbhncd", jnp.exp(s - lse[..., None]), v_w)   # [R, B, H, nc, C, D]
    unsort = lambda x: jnp.take_along_axis(  # noqa: E731  sorted slots back to token order
        x.reshape((R, B, H, L) + x.shape[5:]), rank.reshape(rank.shape + (1,) * (x.ndim - 5)), axis=3)
    o, lse = unsort(o), unsort(lse)                                        # [R, B, H, L, D], [R, B, H, L]
    w = jax.nn.softmax(lse, axis=0)                                        # rounds' weights
    out = jnp.einsum("rbhl,rbhld->blhd", w.astype(o.dtype), o)             # [B, L, H, D]
    return out.astype(v.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def lsh_attention_reference(qk, v, key, *, n_buckets: int, chunk_len: int, n_rounds: int = 1, causal: bool = False,
                            scale: float | None = None, segment_ids=None):
    """LSH attention as dense attention under the mask of what the rounds see, computed directly.

    Pair (i, j) is visible when, in some round, i and j share a bucket and j's rank by (bucket, position)
    lies in i's chunk or the one before, j != i, i and j share a segment, and (causal) j <= i; rows with no
    visible key give v_i. Arguments as :func:`lsh_attention`; O(R L^2) memory.
    """
    scale = _check(qk, v, n_buckets, chunk_len, n_rounds, causal, scale)
    B, L, H, D = qk.shape
    seg = _check_segments(segment_ids, (B, L))
    b = lsh_hash(qk, lsh_rotations(key, D, n_buckets, n_rounds, qk.dtype), n_buckets)   # [R, B, H, L]
    i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    bi, bj = b[..., :, None], b[..., None, :]                              # [R, B, H, L, 1], [R, B, H, 1, L]
    rank = jnp.sum((bj < bi) | ((bj == bi) & (j < i)), axis=-1)            # [R, B, H, L]: sorted position
    ci, cj = (rank // chunk_len)[..., :, None], (rank // chunk_len)[..., None, :]
    seen = (bi == bj) & ((cj == ci) | (cj == ci - 1))                     # [R, B, H, L, L]
    same_seg = (seg[:, :, None] == seg[:, None, :])[:, None]               # [B, 1, L, L]
    mask = jnp.any(seen, axis=0) & same_seg & (j != i) & ((j <= i) if causal else True)   # [B, H, L, L]
    s = scale * jnp.einsum("blhd,bmhd->bhlm", qk, _keys(qk))               # [B, H, L, L]
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(s.dtype).min), axis=-1)
    out = jnp.einsum("bhlm,bmhd->blhd", p, v)                              # [B, L, H, D]
    alone = jnp.moveaxis(~jnp.any(mask, axis=-1), 1, 2)[..., None]         # [B, L, H, 1]
    return jnp.where(alone, v, out)
