"""FlashAttention-2 forward and backward as Pallas kernels (Dao 2023, Algorithms 1 and 2).

Three kernels, each over a grid of (tile, batch, head):

* forward, grid (Lq/bq, B, Hq): one query tile stays in SRAM while key/value tiles stream past it;
  online softmax in base 2 (``exp2``, logits pre-multiplied by log2 e), writes O and the
  logsumexp ``LSE`` that the backward pass needs;
* dQ, grid (Lq/bq, B, Hq): recomputes ``P = exp2(S - LSE)`` tile by tile and accumulates
  ``dQ = sum_j dS_j K_j`` with ``dS = P * (dO V^T - D)``, ``D = rowsum(dO * O)``;
* dK/dV, grid (Lk/bk, B, Hkv): one key/value tile stays put while the query tiles of all ``G``
  query heads sharing it stream past, so GQA/MQA gradients need neither atomics nor a reduction.

Each kernel visits only tiles the causal/window mask can reach and evaluates the mask only on tiles
that are partly hidden (``MaskSpec.kv_blocks``/``q_blocks``). Lengths are padded to the tile size
and the head dim to a power of two (Triton's tile shapes), both hidden from the caller; matmuls
take the input dtype (fp32/bf16/fp16) and accumulate in fp32.

The kernels lower to Triton on NVIDIA GPUs; with ``interpret=True`` (the default off GPU) they run
through Pallas' interpreter, which is how CPU CI checks them. Use them through
``jaxlab.kernels.attention.dot_product_attention(..., impl="pallas")``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlab.kernels.attention_masks import AttentionArgs, MaskSpec, softcap_grad, softcap_logits

__all__ = ["flash_attention", "default_blocks"]

LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # smallest tile edge Triton's tl.dot accepts


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one call (hashable: it keys jit caches and custom_vjp)."""

    mask: MaskSpec
    scale: float
    softcap: float | None
    segments: bool
    group: int  # G = Hq // Hkv query heads per key/value head
    head_dim: int  # padded D
    fwd: tuple[int, int]  # (block_q, block_k) of the forward kernel
    dq: tuple[int, int]  # ... of the dQ kernel
    dkv: tuple[int, int]  # ... of the dK/dV kernel
    interpret: bool
    split_masked: bool  # separate loops for fully visible tiles (no mask) and partly hidden ones
    num_warps: int
    num_stages: int

    @property
    def q_padded(self) -> int:
        return _round_up(self.mask.q_len, max(self.fwd[0], self.dq[0], self.dkv[0]))

    @property
    def kv_padded(self) -> int:
        return _round_up(self.mask.kv_len, max(self.fwd[1], self.dq[1], self.dkv[1]))

    @property
    def needs_mask(self) -> bool:
        return self.mask.needs_mask(kv_padded_len=self.kv_padded, segments=self.segments)

    def call(self, kernel, name: str, **kwargs):
        return pl.pallas_call(
            functools.partial(kernel, cfg=self), name=name, interpret=self.interpret,
            compiler_params=plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages), **kwargs)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- shared tile math --------------------------------------------------------------------------------
def _logits2(q, k, cfg: _Config):
    """Base-2 logits of one tile, ``log2(e) * softcap(scale * q k^T)``: [bq, Dp] x [bk, Dp] -> [bq, bk] fp32."""
    qk = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if cfg.softcap is None:
        return qk * (cfg.scale * LOG2E)
    return softcap_logits(qk * cfg.scale, cfg.softcap) * LOG2E


def _tile_mask(cfg: _Config, q_start, k_start, block_q: int, block_k: int, q_ids=None, kv_ids=None):
    """[bq, bk] visibility of the tile at (q_start, k_start); ids are the tile's [bq] / [bk] segment ids."""
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if q_ids is None:
        return cfg.mask.visible(q_idx, k_idx)
    return cfg.mask.visible(q_idx, k_idx, q_ids[:, None], kv_ids[None, :])


def _ranged_loop(cfg: _Config, ranges, body, carry):
    """Run ``body(idx, carry, masked)`` over tiles [lo, hi), unmasked on the fully visible [full_lo, full_hi)."""
    lo, full_lo, full_hi, hi = ranges
    if not cfg.needs_mask:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    if not cfg.split_masked:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _dot(a, b, contract=(1, 0)):
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


# ---- kernels -------------------------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.fwd
    i = pl.program_id(0)
    q = q_ref[...]  # [bq, Dp]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def step(j, carry, masked):
        acc, m, l = carry  # [bq, Dp], [bq], [bq]
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s = _logits2(q, k_ref[ks, :], cfg)  # [bq, bk]
        if masked:
            kv_ids = None if kv_ids_ref is None else kv_ids_ref[ks]
            s = jnp.where(_tile_mask(cfg, i * bq, j * bk, bq, bk, q_ids, kv_ids), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: p = 0, alpha = 0
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        v = v_ref[ks, :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, cfg.head_dim), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    ranges = cfg.mask.kv_blocks(i * bq, bq, bk, cfg.kv_padded // bk, segments=cfg.segments)
    acc, m, l = _ranged_loop(cfg, ranges, step, init)
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0, jnp.inf, m + jnp.log2(l))  # +inf: row sees no key, P = 0 in backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref, *, cfg: _Config):
    bq, bk = cfg.dq
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]  # [bq, Dp]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def step(j, dq, masked):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _logits2(q, k, cfg)
        p = jnp.exp2(s - lse[:, None])  # [bq, bk]
        if masked:
            kv_ids = None if kv_ids_ref is None else kv_ids_ref[ks]
            p = jnp.where(_tile_mask(cfg, i * bq, j * bk, bq, bk, q_ids, kv_ids), p, 0.0)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        if cfg.softcap is not None:
            ds = ds * softcap_grad(s * (1 / LOG2E), cfg.softcap)
        return dq + _dot(ds.astype(k.dtype), k)

    ranges = cfg.mask.kv_blocks(i * bq, bq, bk, cfg.kv_padded // bk, segments=cfg.segments)
    dq = _ranged_loop(cfg, ranges, step, jnp.zeros((bq, cfg.head_dim), jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dk_ref, dv_ref, *,
                cfg: _Config):
    bq, bk = cfg.dkv
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [bk, Dp]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]

    def step(i, carry, masked):
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        mask = None
        if masked:
            q_ids = None if q_ids_ref is None else q_ids_ref[qs]
            mask = _tile_mask(cfg, i * bq, j * bk, bq, bk, q_ids, kv_ids)

        def head(g, carry):  # the G query heads that share this key/value head
            dk, dv = carry
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]  # [bq, Dp]
            s = _logits2(q, k, cfg)
            p = jnp.exp2(s - lse_ref[g, qs][:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))  # P^T dO: [bk, Dp]
            ds = p * (_dot(do, v, (1, 1)) - delta_ref[g, qs][:, None])
            if cfg.softcap is not None:
                ds = ds * softcap_grad(s * (1 / LOG2E), cfg.softcap)
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

        return head(0, carry) if cfg.group == 1 else lax.fori_loop(0, cfg.group, head, carry)

    zeros = jnp.zeros((bk, cfg.head_dim), jnp.float32)
    ranges = cfg.mask.q_blocks(j * bk, bk, bq, cfg.q_padded // bq, segments=cfg.segments)
    dk, dv = _ranged_loop(cfg, ranges, step, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- pallas_call wrappers (padded operands: q/do [B, Lqp, Hq, Dp], k/v [B, Lkp, Hkv, Dp]) ----------
def _id_specs(cfg: _Config, q_block, kv_block, q_first: bool):
    """BlockSpecs of (q_ids [B, Lqp], kv_ids [B, Lkp]); a block of None means the whole row."""
    if not cfg.segments:
        return [None, None]

    def spec(block, length, tiled):
        if tiled:
            return pl.BlockSpec((None, block), lambda t, b, h: (b, t))
        return pl.BlockSpec((None, length), lambda t, b, h: (b, 0))
    return [spec(q_block, cfg.q_padded, q_first), spec(kv_block, cfg.kv_padded, not q_first)]


def _query_major_specs(cfg: _Config, block_q: int):
    """Specs for grids (query tile i, b, h): a query tile, the whole K/V row of head h // G, a row-stat tile."""
    G, Dp = cfg.group, cfg.head_dim
    q_tile = pl.BlockSpec((None, block_q, None, Dp), lambda i, b, h: (b, i, h, 0))
    kv_row = pl.BlockSpec((None, cfg.kv_padded, None, Dp), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    stat_tile = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    return q_tile, kv_row, stat_tile


def _forward_call(q, k, v, q_ids, kv_ids, cfg: _Config):
    B, Lqp, Hq, _ = q.shape
    bq, _ = cfg.fwd
    q_tile, kv_row, stat_tile = _query_major_specs(cfg, bq)
    return cfg.call(
        _fwd_kernel, "flash_attention_fwd", grid=(Lqp // bq, B, Hq),
        in_specs=[q_tile, kv_row, kv_row, *_id_specs(cfg, bq, None, q_first=True)],
        out_specs=[q_tile, stat_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, Lqp), jnp.float32)],
    )(q, k, v, q_ids, kv_ids)


def _dq_call(q, k, v, do, lse, delta, q_ids, kv_ids, cfg: _Config):
    B, Lqp, Hq, _ = q.shape
    bq, _ = cfg.dq
    q_tile, kv_row, stat_tile = _query_major_specs(cfg, bq)
    return cfg.call(
        _dq_kernel, "flash_attention_dq", grid=(Lqp // bq, B, Hq),
        in_specs=[q_tile, kv_row, kv_row, q_tile, stat_tile, stat_tile, *_id_specs(cfg, bq, None, q_first=True)],
        out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, do, lse, delta, q_ids, kv_ids)


def _dkv_call(q, k, v, do, lse, delta, q_ids, kv_ids, cfg: _Config):
    B, Lkp, Hkv, Dp = k.shape
    _, bk = cfg.dkv
    G = cfg.group
    q_group = pl.BlockSpec((None, cfg.q_padded, G, Dp), lambda j, b, h: (b, 0, h, 0))  # heads h*G ... h*G+G-1
    kv_tile = pl.BlockSpec((None, bk, None, Dp), lambda j, b, h: (b, j, h, 0))
    row_group = pl.BlockSpec((None, G, cfg.q_padded), lambda j, b, h: (b, h, 0))
    return cfg.call(
        _dkv_kernel, "flash_attention_dkv", grid=(Lkp // bk, B, Hkv),
        in_specs=[q_group, kv_tile, kv_tile, q_group, row_group, row_group,
                  *_id_specs(cfg, None, bk, q_first=False)],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, do, lse, delta, q_ids, kv_ids)


def _pad(x, length: int, head_dim: int | None = None):
    """Zero-pad axis 1 to ``length`` and (if given) the last axis to ``head_dim``."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    if head_dim is not None:
        pad[-1] = (0, head_dim - x.shape[-1])
    return jnp.pad(x, pad)


def _pad_ids(ids, length: int):
    return None if ids is None else _pad(ids, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, cfg: _Config):
    return _flash_fwd(q, k, v, q_ids, kv_ids, cfg)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, cfg: _Config):
    Lq, D = q.shape[1], q.shape[-1]
    qp = _pad(q, cfg.q_padded, cfg.head_dim)
    kp, vp = (_pad(x, cfg.kv_padded, cfg.head_dim) for x in (k, v))
    out, lse = _forward_call(qp, kp, vp, _pad_ids(q_ids, cfg.q_padded), _pad_ids(kv_ids, cfg.kv_padded), cfg)
    out = out[:, :Lq, :, :D]
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(cfg: _Config, res, d_out):
    q, k, v, q_ids, kv_ids, out, lse = res
    (Lq, D), Lk = (q.shape[1], q.shape[-1]), k.shape[1]
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # D_i: [B, Lq, Hq]
    delta = jnp.pad(delta.transpose(0, 2, 1), ((0, 0), (0, 0), (0, cfg.q_padded - Lq)))  # [B, Hq, Lqp]
    qp, dop = (_pad(x, cfg.q_padded, cfg.head_dim) for x in (q, d_out.astype(q.dtype)))
    kp, vp = (_pad(x, cfg.kv_padded, cfg.head_dim) for x in (k, v))
    ids = (_pad_ids(q_ids, cfg.q_padded), _pad_ids(kv_ids, cfg.kv_padded))
    dq = _dq_call(qp, kp, vp, dop, lse, delta, *ids, cfg)
    dk, dv = _dkv_call(qp, kp, vp, dop, lse, delta, *ids, cfg)
    return dq[:, :Lq, :, :D], dk[:, :Lk, :, :D], dv[:, :Lk, :, :D], None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_jit = jax.jit(_flash, static_argnums=5)


# ---- public entry --------------------------------------------------------------------------------------
def default_blocks(head_dim: int) -> dict[str, tuple[int, int]]:
    """(block_q, block_k) per kernel for a padded head dim: big query tiles, narrower ones as D grows."""
    if head_dim <= 64:
        return {"fwd": (128, 128), "dq": (128, 64), "dkv": (64, 128)}
    if head_dim <= 128:
        return {"fwd": (128, 64), "dq": (128, 64), "dkv": (64, 128)}
    return {"fwd": (64, 64), "dq": (64, 64), "dkv": (64, 64)}


def _backend() -> str:
    return jax.default_backend()


def _fit(block: int, length: int) -> int:
    """Shrink a power-of-two tile to the smallest power of two >= length (at least ``_MIN_BLOCK``)."""
    return min(block, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _check_block(block, name: str) -> None:
    if block is None:
        return
    ok = (isinstance(block, numbers.Integral) and not isinstance(block, bool) and block >= _MIN_BLOCK
          and block & (block - 1) == 0)
    if not ok:
        raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK} (impl='pallas'), got {name}={block!r}")


def flash_attention(q, k, v, args: AttentionArgs, *, block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None, split_masked: bool | None = None):
    """FlashAttention-2 with Pallas kernels for the forward pass and both backward passes.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; ``args`` from ``check_attention_args``. Any lengths
        and head dims (padded internally).
      block_q, block_k: tile sizes for all three kernels (powers of two >= 16); default per head dim
        from :func:`default_blocks`, shrunk for short sequences.
      interpret: run through the Pallas interpreter; default True unless the backend is a GPU.
      split_masked: loop separately over fully visible tiles (mask skipped) and partly hidden ones,
        as FlashAttention-2 does; default on when compiled and off in interpret mode, where every
        extra loop costs XLA compile time and the mask costs nothing worth saving.

    Returns:
      [B, Lq, Hq, D] in the dtype of q.
    """
    backend = _backend()
    if interpret is None:
        interpret = backend != "gpu"
    elif not interpret and backend != "gpu":
        raise ValueError(f"interpret=False (impl='pallas') needs a GPU backend (Triton); backend is {backend!r}")
    _check_block(block_q, "block_q")
    _check_block(block_k, "block_k")
    Lq, Lk = args.mask.q_len, args.mask.kv_len
    head_dim = max(_MIN_BLOCK, pl.next_power_of_2(q.shape[-1]))
    blocks = {name: (_fit(int(block_q or bq), Lq), _fit(int(block_k or bk), Lk)) for name, (bq, bk) in
              default_blocks(head_dim).items()}
    cfg = _Config(mask=args.mask, scale=args.scale, softcap=args.softcap, segments=args.segments,
                  group=q.shape[2] // k.shape[2], head_dim=head_dim, **blocks, interpret=bool(interpret),
                  split_masked=not interpret if split_masked is None else bool(split_masked),
                  num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return _flash_jit(q, k, v, args.q_segment_ids, args.kv_segment_ids, cfg)
