"""Shared semantics of exact attention: argument checks, masks, block ranges, logit soft-capping.

Every implementation in ``jaxlab.kernels.attention`` (reference, xla, blockwise, pallas, cudnn) takes
its masking rules from here, so they cannot drift apart. Positions follow FlashAttention-2
(Dao 2023) and splash attention:

* query ``i`` sits at key position ``p_i = i + Lk - Lq`` (bottom-right alignment, so decoding the
  last ``Lq`` tokens against a cache of ``Lk`` keys is causal in the usual sense);
* ``causal``: query ``i`` sees keys ``j <= p_i``;
* ``window=W``: a sliding window of ``W`` keys, the query's own included: query ``i`` sees keys
  ``|p_i - j| <= W - 1`` (W keys on each side counting its own; with ``causal``, the W keys
  ``p_i - W + 1 .. p_i``). Internally the mask holds the offsets ``band = (W - 1, W - 1)``;
* ``segment_ids``: query ``i`` sees key ``j`` only when ``q_ids[i] == kv_ids[j]`` (packed sequences);
* keys at ``j >= Lk`` (padding added by the tiled kernels) are never visible.

Without segment ids the visible keys of query ``i`` form one interval ``[key_lo(i), key_hi(i)]`` whose
ends are non-decreasing in ``i``; :class:`MaskSpec` uses this to find, for a tile of queries (keys),
the range of key (query) tiles that can contribute at all and the sub-range that is fully visible
and needs no mask. The block-range methods accept Python ints or traced int32 scalars, so the same
code drives ``lax`` loops and Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "AttentionArgs",
    "MaskSpec",
    "check_attention_args",
    "dense_mask",
    "softcap_grad",
    "softcap_logits",
]


def _idiv(a, b: int):
    """Floor division of a non-negative (possibly traced) int32 by a static positive int."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(jnp.asarray(x, jnp.int32), lo), hi)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static (hashable) part of an attention mask: lengths, causality and the local window.

    Attributes:
      q_len: number of real queries ``Lq`` (tiled kernels may pad beyond it).
      kv_len: number of real keys ``Lk``; keys at index ``>= kv_len`` are padding and never visible.
      causal: key ``j`` visible to query ``i`` only if ``j <= p_i = i + kv_len - q_len``.
      band: offsets ``(left, right)``: key ``j`` visible only if ``p_i - left <= j <= p_i + right``
        (``window=W`` gives ``(W - 1, W - 1)``).
    """

    q_len: int
    kv_len: int
    causal: bool = False
    band: tuple[int, int] | None = None

    @property
    def offset(self) -> int:
        """``p_i - i``: the key position of query 0 (bottom-right aligned)."""
        return self.kv_len - self.q_len

    @property
    def _right(self) -> int | None:
        """Largest visible ``j - p_i`` (None: unbounded)."""
        right = None if self.band is None else self.band[1]
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return right

    @property
    def _left(self) -> int | None:
        """Largest visible ``p_i - j`` (None: unbounded)."""
        return None if self.band is None else self.band[0]

    def visible(self, q_idx, k_idx, q_seg=None, kv_seg=None):
        """Boolean visibility of key ``k_idx`` to query ``q_idx`` (broadcasting int arrays).

        ``q_seg``/``kv_seg`` are the segment ids at those positions (both or neither).
        """
        pos = q_idx + self.offset
        ok = k_idx < self.kv_len
        if self._right is not None:
            ok = ok & (k_idx <= pos + self._right)
        if self._left is not None:
            ok = ok & (k_idx >= pos - self._left)
        if q_seg is not None:
            ok = ok & (q_seg == kv_seg)
        return ok

    def needs_mask(self, *, kv_padded_len: int, segments: bool) -> bool:
        """Whether any (query, key) pair inside ``[0, q_len) x [0, kv_padded_len)`` is hidden."""
        return bool(self.causal or self.band is not None or segments or kv_padded_len != self.kv_len)

    # ---- block ranges (ints or traced int32 scalars) ---------------------------------------------
    def kv_blocks(self, q_start, block_q: int, block_k: int, num_k_blocks: int, *, segments: bool):
        """Key tiles for the query tile ``[q_start, q_start + block_q)``.

        Returns ``(lo, full_lo, full_hi, hi)``: tiles ``[lo, hi)`` may hold a visible key (all other
        tiles are skipped); tiles ``[full_lo, full_hi)`` are visible in full (no mask needed), and
        ``lo <= full_lo <= full_hi <= hi``. Query rows past ``q_len`` (padding) are treated like
        real rows, which is harmless: their outputs are discarded and their gradients are zero.
        """
        q_first = jnp.asarray(q_start, jnp.int32) + self.offset  # p of the first row
        q_last = q_first + (block_q - 1)
        # any-visible key interval: [key_lo(first row), key_hi(last row)]
        k_lo = 0 if self._left is None else jnp.maximum(q_first - self._left, 0)
        k_hi = self.kv_len if self._right is None else jnp.minimum(q_last + self._right + 1, self.kv_len)
        lo = _clip(_idiv(k_lo, block_k), 0, num_k_blocks)
        hi = _clip(_idiv(jnp.maximum(k_hi, 0) + (block_k - 1), block_k), lo, num_k_blocks)
        if segments:  # ids are data: no tile is known to be fully visible
            return lo, hi, hi, hi
        # fully visible key interval: [key_lo(last row), key_hi(first row)]
        f_lo = 0 if self._left is None else jnp.maximum(q_last - self._left, 0)
        f_hi = self.kv_len if self._right is None else jnp.minimum(q_first + self._right + 1, self.kv_len)
        full_lo = _clip(_idiv(f_lo + (block_k - 1), block_k), lo, hi)
        full_hi = _clip(_idiv(jnp.maximum(f_hi, 0), block_k), full_lo, hi)
        empty = full_hi <= full_lo
        return lo, jnp.where(empty, hi, full_lo), jnp.where(empty, hi, full_hi), hi

    def q_blocks(self, k_start, block_k: int, block_q: int, num_q_blocks: int, *, segments: bool):
        """Query tiles for the key tile ``[k_start, k_start + block_k)``; same contract as ``kv_blocks``."""
        k_first = jnp.asarray(k_start, jnp.int32)
        k_last = k_first + (block_k - 1)
        # rows i with key_hi(i) >= k_first and key_lo(i) <= k_last; p_i = i + offset
        i_lo = 0 if self._right is None else jnp.maximum(k_first - self._right - self.offset, 0)
        i_hi = num_q_blocks * block_q if self._left is None else k_last + self._left - self.offset + 1
        lo = _clip(_idiv(i_lo, block_q), 0, num_q_blocks)
        hi = _clip(_idiv(jnp.maximum(i_hi, 0) + (block_q - 1), block_q), lo, num_q_blocks)
        if segments:
            return lo, hi, hi, hi
        # rows seeing the whole tile: key_lo(i) <= k_first and key_hi(i) >= k_last (and no padding)
        f_lo = 0 if self._right is None else jnp.maximum(k_last - self._right - self.offset, 0)
        f_hi = num_q_blocks * block_q if self._left is None else k_first + self._left - self.offset + 1
        full_lo = _clip(_idiv(f_lo + (block_q - 1), block_q), lo, hi)
        full_hi = _clip(_idiv(jnp.maximum(f_hi, 0), block_q), full_lo, hi)
        empty = (full_hi <= full_lo) | (k_first + block_k > self.kv_len)
        return lo, jnp.where(empty, hi, full_lo), jnp.where(empty, hi, full_hi), hi


def softcap_logits(s, softcap: float | None):
    """``softcap * tanh(s / softcap)`` (Gemma 2 logit soft-capping); identity when ``softcap`` is None."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def softcap_grad(capped, softcap: float | None):
    """d softcap_logits / d s, written in terms of the capped logits: ``1 - (capped / softcap)**2``."""
    return 1.0 if softcap is None else 1.0 - jnp.square(capped / softcap)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_segment_ids", "kv_segment_ids"],
    meta_fields=["mask", "scale", "softcap"],
)
@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """Validated arguments shared by all implementations (see :func:`check_attention_args`).

    A pytree: the segment ids are its leaves, everything else is static, so it can be passed
    straight through ``jax.jit``.
    """

    mask: MaskSpec
    scale: float
    softcap: float | None
    q_segment_ids: Any  # int32 [B, Lq] or None
    kv_segment_ids: Any  # int32 [B, Lk] or None

    @property
    def segments(self) -> bool:
        return self.q_segment_ids is not None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_attention_args(q, k, v, *, causal, segment_ids, window, softcap, scale, impl: str) -> AttentionArgs:
    """Validate shapes and options; raise ``ValueError`` naming the argument (and ``impl``) otherwise.

    q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with ``Hq % Hkv == 0``. ``segment_ids`` is an int
    [B, L] array (self-attention, Lq == Lk) or a pair ``(q_ids [B, Lq], kv_ids [B, Lk])``.
    """
    where = f"(impl={impl!r})"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-D array [B, L, H, D] {where}, got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point {where}, got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype {where}, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Lk, Hkv, D] {where}, got {k.shape=}, {v.shape=}")
    (B, Lq, Hq, D), (Bk, Lk, Hkv, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"q and k must have the same batch size {where}, got {q.shape=}, {k.shape=}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head dim D {where}, got {q.shape=}, {k.shape=}")
    if min(Lq, Lk, Hq, Hkv, D) < 1:
        raise ValueError(f"q and k must have non-empty axes {where}, got {q.shape=}, {k.shape=}")
    if Hq % Hkv != 0:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} {where}, "
                         f"got {q.shape=}, {k.shape=}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool {where}, got causal={causal!r}")
    band = None
    if window is not None:
        if not (_is_int(window) and window >= 1):
            raise ValueError(f"window must be None or an int >= 1 (keys per query, its own included) {where}, "
                             f"got window={window!r}")
        band = (int(window) - 1, int(window) - 1)
    if softcap is not None and not (isinstance(softcap, numbers.Real) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0 {where}, got softcap={softcap!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number {where}, got scale={scale!r}")

    q_ids = kv_ids = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(f"segment_ids pair must be (q_ids, kv_ids) {where}, got {len(segment_ids)} items")
            q_ids, kv_ids = segment_ids
        else:
            if Lq != Lk:
                raise ValueError(
                    f"segment_ids as one [B, L] array needs Lq == Lk {where}, got Lq={Lq}, Lk={Lk}; "
                    "pass a pair (q_ids [B, Lq], kv_ids [B, Lk])")
            q_ids = kv_ids = segment_ids
        for name, ids, L in (("q", q_ids, Lq), ("kv", kv_ids, Lk)):
            shape = getattr(ids, "shape", None)
            if shape != (B, L):
                raise ValueError(f"segment_ids ({name} ids) must have shape {(B, L)} {where}, got shape {shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids ({name} ids) must be integers {where}, got dtype {ids.dtype}")
        q_ids, kv_ids = jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
    mask = MaskSpec(q_len=Lq, kv_len=Lk, causal=bool(causal), band=band)
    return AttentionArgs(mask, float(scale), None if softcap is None else float(softcap), q_ids, kv_ids)


def dense_mask(args: AttentionArgs):
    """The full boolean mask, broadcastable to [B, H, Lq, Lk]: [B|1, 1, Lq, Lk]."""
    spec = args.mask
    q_idx = lax.broadcasted_iota(jnp.int32, (spec.q_len, spec.kv_len), 0)
    k_idx = lax.broadcasted_iota(jnp.int32, (spec.q_len, spec.kv_len), 1)
    if args.segments:
        return spec.visible(q_idx, k_idx, args.q_segment_ids[:, None, :, None], args.kv_segment_ids[:, None, None, :])
    return spec.visible(q_idx, k_idx)[None, None]

