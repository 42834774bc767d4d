"""Ring attention: exact attention over a sequence split across devices (context parallelism).

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context".
The length axis of q, k, v is split in order over a mesh axis of size ``n``: device ``i`` holds
positions ``[i L/n, (i+1) L/n)``, i.e. per device

    q [B, L/n, Hq, D],  k, v [B, L/n, Hkv, D]  (Hq % Hkv == 0: MHA, GQA, MQA),  segment ids [B, L/n].

Each device keeps its query block; the key/value block (with its segment ids) travels around the
ring: at step ``s = 0 .. n-1`` device ``i`` holds the block of device ``src = (i - s) mod n`` and
passes it to device ``i + 1`` with ``lax.ppermute``, so every block is sent ``n - 1`` times and each
device sends ``(n - 1)`` blocks of ``2 B (L/n) Hkv D`` elements in all. The send of step ``s`` does
not depend on step ``s``'s compute, so XLA can overlap the two (the paper's point: with block
compute O((L/n)^2) and communication O(L/n), communication hides behind compute for long blocks).

Each arriving block is folded into the running online-softmax statistics of the query rows
(Milakov & Gimelshein 2018; Rabe & Staats 2021; FlashAttention, Dao et al. 2022, Algorithm 1)::

    m_new = max(m, rowmax(S_src));  alpha = exp(m - m_new);  P = exp(S_src - m_new)
    l = alpha * l + rowsum(P);  acc = alpha * acc + P V_src;   O = acc / l,  LSE = m + log l

The mask of block ``src`` is that of the unsplit sequence (``attention_masks.MaskSpec`` on global
positions ``i L/n + r`` and ``src L/n + c``): causal, a sliding ``window=W`` and segment ids (packed
documents may cross device boundaries). A block that the causal/window mask hides entirely
(``MaskSpec.kv_blocks`` on blocks of ``L/n``) is still passed on but its compute is skipped
(``lax.cond``): under ``causal`` device ``i`` computes ``i + 1`` of the ``n`` blocks.

Backward: a ``custom_vjp`` that runs the ring again, as in the paper. The forward saves only
``O`` and ``LSE`` of the local rows (memory O(L/n)); the backward recomputes ``P = exp(S - LSE)``
block by block (FlashAttention-2, Dao 2023, Algorithm 2; ``D = rowsum(dO * O)``)::

    dV_src += P^T dO;  dP = dO V_src^T;  dS = P * (dP - D);  dQ += dS K_src;  dK_src += dS^T Q

with ``dK_src, dV_src`` travelling around the ring beside ``K_src, V_src`` and one last hop home
(``n`` sends of the fp32 gradient blocks, ``n - 1`` of k, v). Differentiating through the scan of
ppermutes instead would also be exact (JAX transposes ppermute into the reverse permutation) but
would keep every arriving K/V block and every [L/n, L/n] probability block for the backward pass,
memory O(L) per device, which context parallelism exists to avoid.

Within one step the block is computed densely ([B, Hkv, G, L/n, L/n] fp32 scores); the blocks
are the unit of both memory and communication.

Use ``ring_attention`` inside ``jax.shard_map``; ``context_parallel_attention`` wraps it for
callers holding global arrays and a mesh with a ``seq`` axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlab.kernels.attention import attention_reference
from jaxlab.kernels.attention_masks import MaskSpec, check_attention_args, softcap_grad, softcap_logits

__all__ = ["context_parallel_attention", "ring_attention", "ring_attention_reference"]

_IMPL = "ring"


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring: mesh axis, its size, the global mask, logit options."""

    axis_name: str
    size: int  # n, devices in the ring
    block: int  # L/n, positions per device
    mask: MaskSpec  # over the global length n * block
    scale: float
    softcap: float | None
    segments: bool

    @property
    def needs_mask(self) -> bool:
        return self.mask.needs_mask(kv_padded_len=self.mask.kv_len, segments=self.segments)

    @property
    def may_skip(self) -> bool:
        """Whether some blocks can be hidden entirely (causal or window)."""
        return self.mask.causal or self.mask.band is not None

    def send(self, x):
        """Pass a pytree of blocks to the next device of the ring."""
        return lax.ppermute(x, self.axis_name, [(j, (j + 1) % self.size) for j in range(self.size)])


# ---- one block ---------------------------------------------------------------------------------
def _logits(qg, k_blk, ring: _Ring):
    """[B, Hkv, G, Lb, D] x [B, Lb, Hkv, D] -> capped, scaled logits [B, Hkv, G, Lb, Lb] fp32."""
    s = jnp.einsum("bhgqd,bkhd->bhgqk", qg, k_blk, preferred_element_type=jnp.float32)
    return softcap_logits(s * ring.scale, ring.softcap)


def _block_mask(me, src, q_ids, kv_ids, ring: _Ring):
    """Visibility of key block ``src`` to query block ``me`` on global positions: [B|1, 1, 1, Lb, Lb]."""
    q_idx = me * ring.block + lax.broadcasted_iota(jnp.int32, (ring.block, 1), 0)
    k_idx = src * ring.block + lax.broadcasted_iota(jnp.int32, (1, ring.block), 1)
    if not ring.segments:
        return ring.mask.visible(q_idx, k_idx)[None, None, None]
    return ring.mask.visible(q_idx, k_idx, q_ids[:, None, None, :, None], kv_ids[:, None, None, None, :])


def _visible_block(me, src, ring: _Ring):
    """Whether key block ``src`` can hold a key visible to query block ``me`` (causal/window)."""
    lo, _, _, hi = ring.mask.kv_blocks(me * ring.block, ring.block, ring.block, ring.size, segments=False)
    return (lo <= src) & (src < hi)


def _maybe(pred, fn, carry, ring: _Ring):
    """``fn(carry)`` where the block may be visible, ``carry`` unchanged where it is hidden."""
    if not ring.may_skip:
        return fn(carry)
    return lax.cond(pred, fn, lambda c: c, carry)


def _group_q(x, num_kv_heads: int):
    """[B, Lb, Hq, D] -> [B, Hkv, G, Lb, D]."""
    B, Lb, Hq, D = x.shape
    return x.reshape(B, Lb, num_kv_heads, Hq // num_kv_heads, D).transpose(0, 2, 3, 1, 4)


def _ungroup_q(x):
    """[B, Hkv, G, Lb, D] -> [B, Lb, Hq, D]."""
    B, Hkv, G, Lb, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, Lb, Hkv * G, D)


# ---- forward -----------------------------------------------------------------------------------
def _forward(q, k, v, q_ids, kv_ids, ring: _Ring):
    """Local rows' output [B, Lb, Hq, D] and LSE [B, Hkv, G, Lb] (+inf on rows with no visible key)."""
    me = lax.axis_index(ring.axis_name)
    qg = _group_q(q, k.shape[2])  # [B, Hkv, G, Lb, D]

    def fold(stats, blk, src):
        k_blk, v_blk = blk[0], blk[1]
        kv_ids_blk = blk[2] if ring.segments else None

        def compute(stats):
            m, l, acc = stats  # [B, Hkv, G, Lb], [B, Hkv, G, Lb], [B, Hkv, G, Lb, D]
            s = _logits(qg, k_blk, ring)  # [B, Hkv, G, Lb, Lb]
            if ring.needs_mask:
                s = jnp.where(_block_mask(me, src, q_ids, kv_ids_blk, ring), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: keep zeros
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)  # [B, Hkv, G, Lb, D]
            return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

        return _maybe(_visible_block(me, src, ring), compute, stats, ring)

    def step(carry, s):
        blk, stats = carry
        nxt = ring.send(blk)  # independent of this step's compute: overlappable
        return (nxt, fold(stats, blk, (me - s) % ring.size)), None

    row = jnp.zeros_like(qg[..., 0], jnp.float32)  # [B, Hkv, G, Lb], typed like q (varying over the ring)
    stats = (row - jnp.inf, row, jnp.zeros_like(qg, jnp.float32))
    blk = (k, v, kv_ids) if ring.segments else (k, v)
    (blk, stats), _ = lax.scan(step, (blk, stats), jnp.arange(ring.size - 1))
    m, l, acc = fold(stats, blk, (me + 1) % ring.size)  # the last block, never sent on
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l == 0, jnp.inf, m + jnp.log(l))
    return _ungroup_q(out).astype(q.dtype), lse


# ---- backward ----------------------------------------------------------------------------------
def _backward(ring: _Ring, res, d_out):
    q, k, v, q_ids, kv_ids, out, lse = res
    me = lax.axis_index(ring.axis_name)
    Hkv = k.shape[2]
    qg, dog = _group_q(q, Hkv), _group_q(d_out, Hkv)  # [B, Hkv, G, Lb, D]
    delta = jnp.sum(_group_q(d_out.astype(jnp.float32) * out.astype(jnp.float32), Hkv), axis=-1)  # [B, Hkv, G, Lb]

    def fold(carry, blk, src):
        k_blk, v_blk = blk[0], blk[1]
        kv_ids_blk = blk[2] if ring.segments else None

        def compute(carry):
            dq, dk, dv = carry  # [B, Hkv, G, Lb, D], [B, Lb, Hkv, D], [B, Lb, Hkv, D]
            s = _logits(qg, k_blk, ring)  # [B, Hkv, G, Lb, Lb]
            p = jnp.exp(s - lse[..., None])
            if ring.needs_mask:
                p = jnp.where(_block_mask(me, src, q_ids, kv_ids_blk, ring), p, 0.0)
            dv = dv + jnp.einsum("bhgqk,bhgqd->bkhd", p.astype(dog.dtype), dog, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bkhd->bhgqk", dog, v_blk, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[..., None]) * (softcap_grad(s, ring.softcap) * ring.scale)).astype(q.dtype)
            dq = dq + jnp.einsum("bhgqk,bkhd->bhgqd", ds, k_blk, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bhgqd->bkhd", ds, qg, preferred_element_type=jnp.float32)
            return dq, dk, dv

        return _maybe(_visible_block(me, src, ring), compute, carry, ring)

    def step(carry, s):
        blk, dq, dkv = carry
        nxt = ring.send(blk)  # k, v (and ids): independent of this step's compute
        dq, dk, dv = fold((dq, *dkv), blk, (me - s) % ring.size)
        return (nxt, dq, ring.send((dk, dv))), None  # the gradients travel with their block

    blk = (k, v, kv_ids) if ring.segments else (k, v)
    dkv = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
    (blk, dq, dkv), _ = lax.scan(step, (blk, jnp.zeros_like(qg, jnp.float32), dkv), jnp.arange(ring.size - 1))
    dq, dk, dv = fold((dq, *dkv), blk, (me + 1) % ring.size)
    dk, dv = ring.send((dk, dv))  # last hop: block (me + 1)'s gradients back to their owner
    return _ungroup_q(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_ids, kv_ids, ring: _Ring):
    return _forward(q, k, v, q_ids, kv_ids, ring)[0]


def _ring_fwd(q, k, v, q_ids, kv_ids, ring: _Ring):
    out, lse = _forward(q, k, v, q_ids, kv_ids, ring)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


_ring.defvjp(_ring_fwd, _backward)


# ---- public API --------------------------------------------------------------------------------
def ring_attention(q, k, v, *, axis_name: str, causal=False, segment_ids=None, window=None, softcap=None,
                   scale=None):
    """Exact self-attention of a sequence split in order over mesh axis ``axis_name``; call inside ``shard_map``.

    Args:
      q: this device's queries [B, L/n, Hq, D]; k, v: its keys and values [B, L/n, Hkv, D], where device
        ``i`` of the ``n`` along ``axis_name`` holds positions ``[i L/n, (i+1) L/n)``.
      axis_name: the mesh axis the length is split over (a bound ``shard_map`` axis).
      causal, window, softcap, scale: as in ``jaxlab.kernels.attention.attention_reference``, applied to
        the global positions (the unsplit sequence is self-attention: Lq == Lk).
      segment_ids: this device's int ids [B, L/n] (or a pair ``(q_ids, kv_ids)``); a query sees a key
        only of the same id, across device boundaries too.

    Returns:
      This device's rows of the output [B, L/n, Hq, D] in the dtype of q; rows with no visible key are zero.

    Raises:
      ValueError: bad shapes or options (``attention_masks.check_attention_args``), local Lq != Lk, or
        ``axis_name`` not a bound mesh axis.
    """
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name must be the name (a str) of one mesh axis (impl={_IMPL!r}), "
                         f"got axis_name={axis_name!r}")
    args = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                                softcap=softcap, scale=scale, impl=_IMPL)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention is self-attention over one split sequence: each device's q and k "
                         f"must hold the same positions (impl={_IMPL!r}), got {q.shape=}, {k.shape=}")
    try:
        size = lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(f"ring_attention must run inside jax.shard_map over a mesh with axis "
                         f"{axis_name!r} (impl={_IMPL!r}): {err}") from None
    block = q.shape[1]
    mask = MaskSpec(q_len=size * block, kv_len=size * block, causal=args.mask.causal, band=args.mask.band)
    ring = _Ring(axis_name=axis_name, size=int(size), block=block, mask=mask, scale=args.scale,
                 softcap=args.softcap, segments=args.segments)
    return _ring(q, k, v, args.q_segment_ids, args.kv_segment_ids, ring)


def ring_attention_reference(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None, scale=None):
    """Plain exact attention on the unsplit arrays (``attention_reference``): what the ring must equal.

    q [B, L, Hq, D], k, v [B, L, Hkv, D], segment_ids [B, L] or a pair; returns [B, L, Hq, D].
    """
    return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                               softcap=softcap, scale=scale)


def _split_axis(mesh, name: str | None, *dims: int) -> str | None:
    """``name`` if the mesh has it with size > 1 dividing every dim, else None (replicated)."""
    size = dict(mesh.shape).get(name, 1) if name is not None else 1
    return name if size > 1 and all(d % size == 0 for d in dims) else None


def context_parallel_attention(q, k, v, mesh, *, seq_axis: str = "seq", causal=False, segment_ids=None,
                               window=None, softcap=None, scale=None, batch_axis: str | None = "data",
                               head_axis: str | None = "model"):
    """``ring_attention`` on global arrays: the length split over ``mesh``'s ``seq_axis`` by ``jax.shard_map``.

    Args:
      q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] (global; self-attention, so one L).
      mesh: a ``jax.sharding.Mesh`` holding ``seq_axis``; with ``Auto`` axes (``parallel.mesh.make_mesh``),
        inputs of any sharding are resharded to the specs below.
      seq_axis: the mesh axis splitting L (L must be a multiple of its size).
      causal, segment_ids ([B, L] or a pair), window, softcap, scale: as in ``attention_reference``.
      batch_axis: mesh axis splitting B, used when the mesh has it and it divides B (else B is whole).
      head_axis: mesh axis splitting the heads, used when the mesh has it and it divides Hq and Hkv.

    Returns:
      [B, L, Hq, D], equal to ``ring_attention_reference`` on the same arrays.

    Raises:
      ValueError: bad shapes or options, a mesh without ``seq_axis``, or L not a multiple of its size.
    """
    args = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                                softcap=softcap, scale=scale, impl=_IMPL)
    axes = dict(mesh.shape)
    if seq_axis not in axes:
        raise ValueError(f"mesh has no axis seq_axis={seq_axis!r} to split the length over (impl={_IMPL!r}); "
                         f"its axes are {axes}")
    B, L, Hq, _ = q.shape
    Hkv = k.shape[2]
    if k.shape[1] != L:
        raise ValueError(f"context parallel attention is self-attention: q and k need one length L "
                         f"(impl={_IMPL!r}), got {q.shape=}, {k.shape=}")
    n = axes[seq_axis]
    if L % n:
        raise ValueError(f"length L={L} must be a multiple of the {seq_axis!r} axis size {n} (impl={_IMPL!r})")
    b = _split_axis(mesh, batch_axis, B) if batch_axis != seq_axis else None
    h = _split_axis(mesh, head_axis, Hq, Hkv) if head_axis not in (seq_axis, b) else None
    x_spec, ids_spec = P(b, seq_axis, h, None), P(b, seq_axis)
    fn = functools.partial(ring_attention, axis_name=seq_axis, causal=args.mask.causal, window=window,
                           softcap=args.softcap, scale=args.scale)
    if not args.segments:
        return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3, out_specs=x_spec)(q, k, v)

    def with_ids(q, k, v, q_ids, kv_ids):
        return fn(q, k, v, segment_ids=(q_ids, kv_ids))

    return jax.shard_map(with_ids, mesh=mesh, in_specs=(x_spec,) * 3 + (ids_spec,) * 2,
                         out_specs=x_spec)(q, k, v, args.q_segment_ids, args.kv_segment_ids)
