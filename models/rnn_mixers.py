"""Recurrent token mixers: RWKV-6 time mixing, RetNet's multi-scale retention and the LRU.

Each maps x [B, L, d_model] -> (y [B, L, d_model], state) with the interface of every mixer of
``jaxlab.models.lm``: with ``state=None`` it runs a whole (possibly packed) row and returns ``None``; with a
state from ``init_state(batch, max_len, d_model)`` it continues from it (O(1) work and memory per token,
whatever ``max_len``) and returns the new one. ``segment_ids`` restart the recurrence, and RWKV's token
shift, at every segment start, so a packed row equals its documents run separately.

* :class:`RWKV` (Peng et al. 2024, "Eagle and Finch", Section 4, RWKV-6 "Finch" time mixing): token shift by
  data-dependent linear interpolation (ddlerp, eq. 12-13) between each token and the previous one, low-rank
  (LoRA) data-dependent decay ``w_t = exp(-exp(time_decay + tanh(x_w A) B))`` (eq. 14-15), receptance, key,
  value and a SiLU gate, the WKV-6 operator (``kernels.rwkv.wkv6``) with its bonus ``u``, GroupNorm over
  heads, gate, output projection (eq. 16-20). RWKV's channel mixing is not part of the mixer: the LM's
  feed-forward (``LMConfig.ffn``) takes its place in each block.
* :class:`RetNet` (Sun et al. 2023, "Retentive Network", Section 2.2, eq. 8-9): multi-scale retention,
  heads with decays ``gamma_h = 1 - 2^(-5-h)`` (``kernels.retention``), queries and keys rotated by position
  (the paper's ``Theta_n = e^{i n theta}``; rotary, the relative part of xPos), keys scaled by ``D^-1/2``,
  values ``expand`` times wider than the queries (the paper's 2), GroupNorm per head, a swish gate and the
  output projection: ``MSR(X) = (swish(X W_G) * GroupNorm(heads)) W_O``.
* :class:`LRU` (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks", Algorithm 1): ``expand *
  d_model`` complex modes, exponential parameterisation, ring initialisation, the normalisation gamma trained
  in log space, ``y = Re(C h) + D x`` (``kernels.lru``), then the paper's block output, GELU and a GLU
  (Figure 1; as ``S4D``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.linear_attention import LinearAttentionState
from jaxlab.kernels.lru import lru, lru_gamma, ring_init
from jaxlab.kernels.retention import retention, retention_decays
from jaxlab.kernels.rwkv import wkv6
from jaxlab.kernels.scan import segment_starts
from jaxlab.models.layers import apply_rope, default_positions

__all__ = ["LRU", "LRUState", "RWKV", "RWKVState", "RetNet", "head_group_norm", "token_shift"]


@struct.dataclass
class RWKVState:
    """Decoding state of :class:`RWKV`.

    shift: [B, d_model] the mixer's last input (what the next token's token shift reads).
    wkv: [B, H, N, N] float32, the WKV-6 state after the last token.
    """

    shift: jax.Array
    wkv: jax.Array


@struct.dataclass
class LRUState:
    """Decoding state of :class:`LRU`: h [B, N] complex64, the modes after the last token."""

    h: jax.Array


def token_shift(x, previous=None, segment_ids=None):
    """The previous token's input at every position, ``x_{t-1}`` [B, L, d] (RWKV's time shift).

    Position 0 reads ``previous`` [B, d] (the last input of the previous piece; zeros when None); a
    position where a packed segment starts reads zeros, as the first token of a document does.
    """
    first = jnp.zeros_like(x[:, :1]) if previous is None else previous[:, None].astype(x.dtype)
    shifted = jnp.concatenate([first, x[:, :-1]], axis=1)
    if segment_ids is None:
        return shifted
    starts = segment_starts(segment_ids).at[:, 0].set(False)  # [B, L]; t = 0 keeps ``previous``
    return jnp.where(starts[..., None], 0, shifted)


def head_group_norm(o, scale, bias, eps):
    """GroupNorm with one group per head, per token: o [B, L, H, D] -> [B, L, H * D] with scale, bias [H D]."""
    B, L, H, D = o.shape
    o = o.astype(jnp.float32)
    mean = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
    o = ((o - mean) * jax.lax.rsqrt(var + eps)).reshape(B, L, H * D)  # [B, L, H D]
    return o * scale + bias


class _HeadNorm(nn.Module):
    """:func:`head_group_norm` with its learned scale (ones) and bias (zeros)."""

    num_heads: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, o):
        width = o.shape[-2] * o.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
        return head_group_norm(o, scale, bias, self.eps)


def _reset(segment_ids):
    return None if segment_ids is None else segment_starts(segment_ids)


def _constant_init(value):
    """An initializer filling the parameter with ``value`` (broadcast to its shape)."""
    return lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(value, shape).astype(dtype)


def _small_uniform(key, shape, dtype=jnp.float32):
    """RWKV-LM's LoRA down-projections: uniform in [-0.01, 0.01]."""
    return jax.random.uniform(key, shape, dtype, -0.01, 0.01)


class RWKV(nn.Module):
    """RWKV-6 (Finch) time mixing with ``num_heads`` heads of size N = d_model / num_heads.

    The initial values follow RWKV-LM's ``RWKV_Tmix_x060`` at the middle layer of a stack (its layer ratios
    set to 1/2; the mixer does not know its depth): token-shift mixes ``1 - (i / d)^(1/2)``, decay biases
    ``-6 + 5 (n / (d-1))^1.35`` (memories from ~1 token to ~400), bonus ``u`` from the same schedule, the
    LoRA up-projections zero and down-projections small uniform.
    """

    num_heads: int
    mix_rank: int = 32
    """Rank of the LoRA that makes the five token-shift mixes data-dependent (RWKV-6: 32)."""
    decay_rank: int = 64
    """Rank of the LoRA of the data-dependent decay (RWKV-6: 64)."""
    chunk_size: int = 16
    """C of ``wkv6``'s chunked form (its memory grows as L C d)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dims(self, d_model: int):
        if d_model % self.num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={self.num_heads}")
        return self.num_heads, d_model // self.num_heads

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> RWKVState:
        H, N = self._dims(d_model)
        return RWKVState(shift=jnp.zeros((batch, d_model), self.dtype),
                         wkv=jnp.zeros((batch, H, N, N), jnp.float32))

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        H, N = self._dims(d)
        ratio = 0.5  # RWKV-LM's ratio_0_to_1 and ratio_1_to_almost0 at the middle of the stack
        frac = jnp.arange(d, dtype=jnp.float32) / d  # RWKV-LM's ddd
        const, small = _constant_init, _small_uniform
        maa_x = self.param("time_maa_x", const(1 - frac ** ratio), (d,), self.param_dtype)
        # Base mixes of (w, k, v, r, g), then the LoRA making them depend on the token (ddlerp, eq. 12-13).
        maa = self.param("time_maa", const(jnp.stack([1 - frac ** ratio, 1 - frac ** ratio,
                                                      1 - (frac ** ratio + 0.3 * ratio),
                                                      1 - frac ** (0.5 * ratio), 1 - frac ** (0.5 * ratio)])),
                         (5, d), self.param_dtype)
        maa_w1 = self.param("time_maa_w1", nn.initializers.zeros, (d, 5 * self.mix_rank), self.param_dtype)
        maa_w2 = self.param("time_maa_w2", small, (5, self.mix_rank, d), self.param_dtype)
        n = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
        time_decay = self.param("time_decay", const(-6 + 5 * n ** (0.7 + 1.3 * ratio)), (d,), self.param_dtype)
        decay_w1 = self.param("time_decay_w1", nn.initializers.zeros, (d, self.decay_rank), self.param_dtype)
        decay_w2 = self.param("time_decay_w2", small, (self.decay_rank, d), self.param_dtype)
        zigzag = ((jnp.arange(d) + 1) % 3 - 1) * 0.1
        u = self.param("time_first", const((ratio * (1 - n) + zigzag).reshape(H, N)), (H, N), self.param_dtype)

        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        xf = f32(x)
        dx = token_shift(xf, None if state is None else state.shift, segment_ids) - xf  # x_{t-1} - x_t
        lora_in = jnp.tanh((xf + dx * f32(maa_x)) @ f32(maa_w1)).reshape(B, L, 5, self.mix_rank)
        mix = f32(maa) + jnp.einsum("blfr,frd->blfd", lora_in, f32(maa_w2))  # [B, L, 5, d]
        xw, xk, xv, xr, xg = (xf + dx * mix[:, :, i] for i in range(5))
        dense = lambda name: nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      name=name)
        heads = lambda a: f32(a).reshape(B, L, H, N)  # noqa: E731
        r = checkpoint_name(heads(dense("receptance")(xr.astype(self.dtype))), "query_proj")  # [B, L, H, N]
        k = checkpoint_name(heads(dense("key")(xk.astype(self.dtype))), "key_proj")
        v = checkpoint_name(heads(dense("value")(xv.astype(self.dtype))), "value_proj")
        g = nn.silu(dense("gate")(xg.astype(self.dtype)))  # [B, L, d]
        log_w = -jnp.exp(f32(time_decay) + jnp.tanh(xw @ f32(decay_w1)) @ f32(decay_w2))  # [B, L, d], log w_t
        o, S = wkv6(r, k, v, heads(log_w), f32(u), initial_state=None if state is None else state.wkv,
                    reset=_reset(segment_ids), chunk_size=self.chunk_size, return_state=True)  # [B, L, H, N]
        o = checkpoint_name(o, "context")
        o = _HeadNorm(H, 64e-5, self.param_dtype, name="ln_x")(o)  # RWKV-LM: eps 1e-5 * head_size_divisor^2
        y = dense("output")((o * f32(g)).astype(self.dtype))
        return y, None if state is None else RWKVState(shift=x[:, -1].astype(state.shift.dtype), wkv=S)


class RetNet(nn.Module):
    """Multi-scale retention: ``num_heads`` heads, query/key dim D = d_model / num_heads, value dim expand D."""

    num_heads: int
    expand: int = 2
    """Value width over the query width (the paper's d_v = 2 d)."""
    chunk_size: int = 64
    """C of the chunkwise form (eq. 7)."""
    rope_base: float = 10000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dims(self, d_model: int):
        if d_model % self.num_heads or (d_model // self.num_heads) % 2:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={self.num_heads} into an even "
                             "head dim (queries and keys are rotated in pairs)")
        D = d_model // self.num_heads
        return self.num_heads, D, self.expand * D

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> LinearAttentionState:
        H, D, Dv = self._dims(d_model)
        return LinearAttentionState(jnp.zeros((batch, H, D, Dv), jnp.float32), None)

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        H, D, Dv = self._dims(d)
        if positions is None:
            positions = default_positions(B, L, segment_ids)
        proj = lambda width, name: nn.DenseGeneral((H, width), use_bias=False, dtype=self.dtype,  # noqa: E731
                                                   param_dtype=self.param_dtype, name=name)
        q = checkpoint_name(proj(D, "query")(x), "query_proj")  # [B, L, H, D]
        k = checkpoint_name(proj(D, "key")(x), "key_proj")
        v = checkpoint_name(proj(Dv, "value")(x), "value_proj")  # [B, L, H, Dv]
        q = apply_rope(q.astype(jnp.float32), positions, self.rope_base)
        k = apply_rope(k.astype(jnp.float32), positions, self.rope_base) / math.sqrt(D)
        out = retention(q, k, v.astype(jnp.float32), retention_decays(H), segment_ids=segment_ids,
                        method="chunkwise", chunk_size=self.chunk_size, initial_state=state,
                        return_state=state is not None)
        o, state = out if state is not None else (out, None)
        o = checkpoint_name(o, "context")  # [B, L, H, Dv]
        o = _HeadNorm(H, 1e-6, self.param_dtype, name="group_norm")(o)  # [B, L, H Dv]
        gate = nn.silu(nn.Dense(H * Dv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="gate")(x)).astype(jnp.float32)
        y = nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="out")((gate * o).astype(self.dtype))
        return y, state


class LRU(nn.Module):
    """LRU layer: ``expand * d_model`` complex modes on the ring ``[r_min, r_max]``, then GELU and a GLU."""

    expand: int = 2
    """Complex modes N per model channel: N = expand * d_model."""
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = math.pi / 10
    """The ring initialisation; defaults: the paper's setting for long-range dependencies (Section 4)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> LRUState:
        return LRUState(jnp.zeros((batch, self.expand * d_model), jnp.complex64))

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        N = self.expand * d
        ring = lambda i: lambda key, shape: ring_init(key, N, self.r_min, self.r_max, self.max_phase)[i]  # noqa: E731
        nu_log = self.param("nu_log", ring(0), (N,))  # [N]; nu and theta are independent draws
        theta_log = self.param("theta_log", ring(1), (N,))
        gamma_log = self.param("gamma_log", lambda key, shape: jnp.log(lru_gamma(nu_log)), (N,))  # normalisation
        B_ = self.param("lru_B", nn.initializers.normal(1 / math.sqrt(2 * d)), (2, N, d))  # real, imaginary
        C = self.param("lru_C", nn.initializers.normal(1 / math.sqrt(N)), (2, d, N))
        D = self.param("D", nn.initializers.normal(1.0), (d,))
        u = checkpoint_name(x.astype(jnp.float32), "ssm_in")  # [B, L, d]
        y, h = lru(u, nu_log, theta_log, B_[0] + 1j * B_[1], C[0] + 1j * C[1], D, gamma=jnp.exp(gamma_log),
                   initial_state=None if state is None else state.h, reset=_reset(segment_ids),
                   return_state=True)
        y = checkpoint_name(y, "context")
        out = nn.Dense(2 * d, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(nn.gelu(y.astype(self.dtype)))
        return nn.glu(out, axis=-1), None if state is None else LRUState(h)
