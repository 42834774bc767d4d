"""State-space token mixers: S4D, S5, Mamba (selective scan) and Mamba-2 (SSD).

All four are causal recurrences with constant-size state, so decoding carries a state instead of a
cache. Each mixer maps x [B, L, d_model] -> (y [B, L, d_model], state); ``segment_ids`` reset the
recurrence (and the short convolution) at segment starts, so packed documents do not interact. As for
every mixer of ``jaxlab.models``, the state is a frozen dataclass pytree with named fields
(:class:`S4DState`, :class:`S5State`, :class:`MambaState`, :class:`Mamba2State`) made by
``init_state(batch, max_len, d_model)``.

* :class:`S4D` (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
  Models"): per channel, ``N/2`` complex modes (conjugate pairs) with S4D-Lin initialisation
  ``A_n = -1/2 + i pi n``, zero-order hold ``A_bar = exp(dt A)``, ``B_bar = (A_bar - 1) / A B``,
  ``y = 2 Re(C h) + D u``, then GELU and a GLU output projection (the S4 block).
* :class:`S5` (Smith et al. 2023, "Simplified State Space Layers for Sequence Modeling"): one MIMO
  diagonal system over all channels, ``Lambda`` initialised to the eigenvalues of HiPPO-N (the
  normal part of HiPPO-LegS), ``Lambda_bar = exp(Lambda dt)``, ``B_bar = (Lambda_bar - 1) / Lambda B``.
* :class:`Mamba` (Gu & Dao 2023, Figure 3): in-projection to (x, z), causal depthwise conv1d, SiLU,
  input-dependent (delta, B, C), ``selective_scan`` gated by ``silu(z)``, out-projection.
* :class:`Mamba2` (Dao & Gu 2024, Figure 6): one in-projection to (z, x, B, C, dt), conv1d over
  (x, B, C), per-head scalar decay through ``ssd``, gated RMSNorm, out-projection.

S4D and S5 compose ``jaxlab.kernels.s4`` (ZOH ``discretize_diag``, the FFT convolution ``s4d``, the fused
recurrence ``s4d_recurrence`` with complex states, ``s5``); Mamba and Mamba-2 use
``jaxlab.kernels.ssm.selective_scan`` / ``ssd`` with ``initial_state`` and ``return_state``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.hippo import hippo_legs
from jaxlab.kernels.s4 import discretize_diag, s4d, s4d_lambda, s4d_recurrence, s5
from jaxlab.kernels.scan import segment_starts
from jaxlab.kernels.ssm import selective_scan, ssd
from jaxlab.models.layers import RMSNorm

__all__ = ["ChannelSSM", "Mamba", "Mamba2", "Mamba2State", "MambaState", "S4D", "S4DState", "S5", "S5State",
           "causal_conv1d",
           "hippo_n_eigenvalues"]


@struct.dataclass
class S4DState:
    """Decoding state of :class:`S4D`: h [B, H, N/2] complex64, the modes after the last token."""

    h: jax.Array


@struct.dataclass
class S5State:
    """Decoding state of :class:`S5`: h [B, P/2] complex64, the modes after the last token."""

    h: jax.Array


@struct.dataclass
class MambaState:
    """Decoding state of :class:`Mamba`.

    conv: [B, K-1, d_inner] the last K-1 inputs of the causal convolution.
    ssm: [B, d_inner, N] float32, the selective scan's state after the last token.
    """

    conv: jax.Array
    ssm: jax.Array


@struct.dataclass
class Mamba2State:
    """Decoding state of :class:`Mamba2`.

    conv: [B, K-1, d_inner + 2 G N] the last K-1 inputs of the convolution over (x, B, C).
    ssm: [B, H, N, P] float32, the SSD state after the last token.
    """

    conv: jax.Array
    ssm: jax.Array


def hippo_n_eigenvalues(N: int) -> np.ndarray:
    """The ``N/2`` eigenvalues with positive imaginary part of HiPPO-N = HiPPO-LegS + P P^T (S5, §4.3).

    With ``P_n = sqrt(n + 1/2)`` the normal part is ``-1/2 I`` plus a skew-symmetric matrix, so its
    eigenvalues are ``-1/2 + i omega``, in conjugate pairs; returns complex64 [N/2] sorted by omega.
    """
    if N < 2 or N % 2:
        raise ValueError(f"{N=} must be an even number >= 2")
    with jax.ensure_compile_time_eval():  # constants, also when called while tracing an init
        A, b = (np.asarray(a, np.float64) for a in hippo_legs(N))
    eig = np.linalg.eigvals(A + 0.5 * np.outer(b, b))
    eig = eig[eig.imag > 0]
    return eig[np.argsort(eig.imag)].astype(np.complex64)


def causal_conv1d(x, w, b, state=None, segment_ids=None):
    """Depthwise causal convolution ``y_t = b + sum_j w_j x_{t-K+1+j}`` with a carried input state.

    Args:
      x: [B, L, C]; w: [K, C] (``w[K-1]`` multiplies the current step); b: [C].
      state: [B, K-1, C] the last K-1 inputs before x (default zeros).
      segment_ids: int [B, L]; a tap never reads an input of another segment (the state counts as
        part of the first segment).

    Returns:
      y [B, L, C] and the new state [B, K-1, C] (the last K-1 inputs).
    """
    B, L, C = x.shape
    K = w.shape[0]
    past = jnp.zeros((B, K - 1, C), x.dtype) if state is None else state.astype(x.dtype)
    xp = jnp.concatenate([past, x], axis=1)  # [B, K-1+L, C]
    if segment_ids is not None:
        segp = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (B, K - 1)), segment_ids], axis=1)
    y = jnp.broadcast_to(b.astype(x.dtype), x.shape)
    for j in range(K):
        tap = xp[:, j:j + L]  # x_{t-K+1+j}
        if segment_ids is not None:
            tap = jnp.where((segp[:, j:j + L] == segment_ids)[..., None], tap, 0)
        y = y + tap * w[j].astype(x.dtype)
    return y, xp[:, L:]


def _reset(segment_ids):
    return None if segment_ids is None else segment_starts(segment_ids)


def _log_dt_init(dt_min: float, dt_max: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    return init


class _GLUOut(nn.Module):
    """The S4/S5 block's output: GELU, then a linear map to 2 d followed by a GLU."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y):
        d = y.shape[-1]
        h = nn.Dense(2 * d, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(nn.gelu(y.astype(self.dtype)))
        return nn.glu(h, axis=-1)


class ChannelSSM(nn.Module):
    """What the per-channel SSM layers :class:`S4D` and S4 (``models.s4_mixer``) share: per channel
    (``d_model`` of them) ``d_state / 2`` complex modes (conjugate pairs), a learned step ``dt`` drawn
    log-uniformly from [dt_min, dt_max], the readout ``y = 2 Re(C h) + D u`` and the block's GELU + GLU
    output. A subclass names its decoding state (``state_cls``, one field ``h [B, H, N/2]``) and builds ``A``
    and ``B`` in its ``__call__``."""

    d_state: int = 16
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    state_cls = S4DState  # overridden by subclasses

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int):
        return self.state_cls(jnp.zeros((batch, d_model, self.d_state // 2), jnp.complex64))  # [B, H, N/2]

    @nn.nowrap
    def num_modes(self) -> int:
        """``N/2``, the complex modes per channel (``d_state`` must be even: conjugate pairs)."""
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state={self.d_state} must be even and >= 2 (conjugate pairs)")
        return self.d_state // 2

    def readout(self, H: int, N2: int):
        """The parameters ``C`` (real and imaginary parts on a leading axis of 2), ``D`` and ``log_dt``,
        created after the subclass's ``A`` and ``B``: ``(C [H, N/2] complex, D [H], dt [H])``."""
        C = self.param("C", nn.initializers.normal(math.sqrt(0.5)), (2, H, N2))
        D = self.param("D", nn.initializers.ones, (H,))
        log_dt = self.param("log_dt", _log_dt_init(self.dt_min, self.dt_max), (H,))
        return C[0] + 1j * C[1], D, jnp.exp(log_dt)

    def output(self, y):
        """The block's output from the SSM's ``y [B, L, H]``: GELU, a linear map to 2 H, a GLU."""
        return _GLUOut(self.dtype, self.param_dtype, name="glu")(checkpoint_name(y, "context"))


class S4D(ChannelSSM):
    """S4D layer: ``d_model`` independent diagonal SSMs with ``d_state / 2`` complex modes each.

    Without state or segment ids the layer runs as a convolution with the Vandermonde kernel by FFT
    (``kernels.s4.s4d``, O(L log L)); with them, as the equivalent complex recurrence (``s4d_recurrence``).
    """

    state_cls = S4DState

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        N2 = self.num_modes()
        B, L, H = x.shape

        def lin(k, s):  # S4D-Lin: -1/2 + i pi n
            return jnp.broadcast_to(s4d_lambda(N2, "lin"), s)

        log_A_real = self.param("log_A_real", lambda k, s: jnp.log(-lin(k, s).real), (H, N2))
        A_imag = self.param("A_imag", lambda k, s: lin(k, s).imag, (H, N2))
        B_ = self.param("B", lambda k, s: jnp.zeros(s).at[0].set(1.0), (2, H, N2))  # real, imaginary parts
        C_c, D, dt = self.readout(H, N2)
        u = checkpoint_name(x.astype(jnp.float32), "ssm_in")  # [B, L, H]
        Lambda = -jnp.exp(log_A_real) + 1j * A_imag  # [H, N2]
        B_c = B_[0] + 1j * B_[1]
        if state is None and segment_ids is None:
            y = s4d(u, Lambda, B_c, C_c, dt, D, method="fft")
        else:
            Lambda_bar, B_bar = discretize_diag(Lambda, B_c, dt[:, None])  # [H, N2]
            y, h = s4d_recurrence(u, Lambda_bar, B_bar, C_c, initial_state=None if state is None else state.h,
                                  reset=_reset(segment_ids))  # y [B, L, H], h [B, H, N2] complex
            y = y + D * u
            state = S4DState(h)
        return self.output(y), state


class S5(nn.Module):
    """S5 layer: one diagonal MIMO SSM of ``d_state`` (``d_state / 2`` conjugate pairs) over all channels."""

    d_state: int = 16
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> S5State:
        return S5State(jnp.zeros((batch, self.d_state // 2), jnp.complex64))  # [B, P/2]

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state={self.d_state} must be even and >= 2 (conjugate pairs)")
        B, L, H = x.shape
        P2 = self.d_state // 2
        Lambda_re = self.param("Lambda_re", lambda k, s: jnp.asarray(hippo_n_eigenvalues(self.d_state).real), (P2,))
        Lambda_im = self.param("Lambda_im", lambda k, s: jnp.asarray(hippo_n_eigenvalues(self.d_state).imag), (P2,))
        B_ = self.param("B", nn.initializers.normal(1 / math.sqrt(2 * H)), (2, P2, H))
        C = self.param("C", nn.initializers.normal(1 / math.sqrt(P2)), (2, H, P2))
        D = self.param("D", nn.initializers.normal(1.0), (H,))
        log_dt = self.param("log_dt", _log_dt_init(self.dt_min, self.dt_max), (P2,))
        u = checkpoint_name(x.astype(jnp.float32), "ssm_in")  # [B, L, H]
        Lambda = jnp.minimum(Lambda_re, -1e-4) + 1j * Lambda_im  # keep the system stable
        y, h = s5(u, Lambda, B_[0] + 1j * B_[1], C[0] + 1j * C[1], jnp.exp(log_dt), D,
                  initial_state=None if state is None else state.h,
                  segment_ids=segment_ids, return_state=True)  # y = 2 Re(C h) + D u
        y = checkpoint_name(y, "context")
        return _GLUOut(self.dtype, self.param_dtype, name="glu")(y), S5State(h)


def _dt_bias_init(dt_min: float, dt_max: float):
    """Bias b with softplus(b) log-uniform in [dt_min, dt_max] (Mamba's dt initialisation)."""
    def init(key, shape, dtype=jnp.float32):
        dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
        return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    return init


class Mamba(nn.Module):
    """Mamba block (selective SSM, S6) with inner width ``expand * d_model`` and state size ``d_state``."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> MambaState:
        d_inner = self.expand * d_model
        return MambaState(conv=jnp.zeros((batch, self.d_conv - 1, d_inner), self.dtype),
                          ssm=jnp.zeros((batch, d_inner, self.d_state), jnp.float32))

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        d_inner, N = self.expand * d, self.d_state
        dt_rank = self.dt_rank or math.ceil(d / 16)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        xz = checkpoint_name(dense(2 * d_inner, "in_proj")(x), "ssm_in")  # [B, L, 2 d_inner]
        xi, z = jnp.split(xz, 2, axis=-1)
        conv_w = self.param("conv_w", nn.initializers.lecun_normal(in_axis=0, out_axis=1), (self.d_conv, d_inner))
        conv_b = self.param("conv_b", nn.initializers.zeros, (d_inner,))
        xi, conv_state = causal_conv1d(xi, conv_w, conv_b, None if state is None else state.conv, segment_ids)
        xi = nn.silu(xi)
        dbc = dense(dt_rank + 2 * N, "x_proj")(xi)
        dt, Bm, Cm = jnp.split(dbc, [dt_rank, dt_rank + N], axis=-1)  # [B, L, R], [B, L, N], [B, L, N]
        delta = dense(d_inner, "dt_proj")(dt)  # [B, L, d_inner]
        dt_bias = self.param("dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (d_inner,))
        A_log = self.param("A_log", lambda k, s: jnp.log(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), s)),
                           (d_inner, N))  # S4D-Real: A_n = -(n + 1)
        D = self.param("D", nn.initializers.ones, (d_inner,))
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        y, h = selective_scan(f32(xi), f32(delta), -jnp.exp(A_log), f32(Bm), f32(Cm), D=D, z=f32(z),
                              delta_bias=dt_bias, delta_softplus=True,
                              initial_state=None if state is None else state.ssm,
                              segment_ids=segment_ids, return_state=True)
        y = checkpoint_name(y.astype(self.dtype), "context")
        return dense(d, "out_proj")(y), MambaState(conv=conv_state, ssm=h)


class Mamba2(nn.Module):
    """Mamba-2 block: ``expand * d_model / head_dim`` heads of dim P, state size N, ``n_groups`` B/C groups."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 16
    n_groups: int = 1
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dims(self, d_model: int):
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ValueError(f"expand * d_model = {d_inner} must be divisible by head_dim={self.head_dim}")
        H = d_inner // self.head_dim
        if H % self.n_groups:
            raise ValueError(f"heads {H} must be divisible by n_groups={self.n_groups}")
        return d_inner, H, d_inner + 2 * self.n_groups * self.d_state

    @nn.nowrap
    def init_state(self, batch: int, max_len: int, d_model: int) -> Mamba2State:
        d_inner, H, conv_dim = self._dims(d_model)
        return Mamba2State(conv=jnp.zeros((batch, self.d_conv - 1, conv_dim), self.dtype),
                           ssm=jnp.zeros((batch, H, self.d_state, self.head_dim), jnp.float32))  # [B, H, N, P]

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        B, L, d = x.shape
        d_inner, H, conv_dim = self._dims(d)
        G, N, P = self.n_groups, self.d_state, self.head_dim
        proj = nn.Dense(2 * d_inner + 2 * G * N + H, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="in_proj")(x)
        z, xbc, dt = jnp.split(checkpoint_name(proj, "ssm_in"), [d_inner, d_inner + conv_dim], axis=-1)
        conv_w = self.param("conv_w", nn.initializers.lecun_normal(in_axis=0, out_axis=1), (self.d_conv, conv_dim))
        conv_b = self.param("conv_b", nn.initializers.zeros, (conv_dim,))
        xbc, conv_state = causal_conv1d(xbc, conv_w, conv_b, None if state is None else state.conv, segment_ids)
        xbc = nn.silu(xbc).astype(jnp.float32)
        xs, Bm, Cm = jnp.split(xbc, [d_inner, d_inner + G * N], axis=-1)
        dt_bias = self.param("dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (H,))
        A_log = self.param("A_log", lambda k, s: jnp.log(jax.random.uniform(k, s, jnp.float32, 1.0, 16.0)), (H,))
        D = self.param("D", nn.initializers.ones, (H,))
        y, h = ssd(xs.reshape(B, L, H, P), jax.nn.softplus(dt.astype(jnp.float32) + dt_bias), -jnp.exp(A_log),
                   Bm.reshape(B, L, G, N), Cm.reshape(B, L, G, N), D=D, chunk_size=self.chunk_size,
                   initial_state=None if state is None else state.ssm, segment_ids=segment_ids,
                   return_state=True)
        y = checkpoint_name(y.reshape(B, L, d_inner).astype(self.dtype), "context")
        y = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(y * nn.silu(z))  # gated norm
        out = nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(y)
        return out, Mamba2State(conv=conv_state, ssm=h)
