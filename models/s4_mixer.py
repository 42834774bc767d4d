"""The S4 token mixer: a DPLR (HiPPO-LegS) state space per channel, by FFT convolution or recurrence.

Gu, Goel and Re 2022, "Efficiently Modeling Long Sequences with Structured State Spaces". Per channel
(``d_model`` of them) a state of ``d_state`` modes (``d_state / 2`` conjugate pairs) with the diagonal plus
low-rank matrix ``A = Lambda - P P^*`` initialised to HiPPO-LegS in its DPLR basis
(``jaxlab.kernels.s4_dplr.hippo_legs_dplr``), bilinear discretisation with a learned step dt, output
``y = C x + D u``, then GELU and a GLU output projection (the S4 block, as :class:`models.ssm_mixers.S4D`).

* A whole sequence without a state or segment ids runs as the convolution with the S4 kernel from the
  generating function (Cauchy kernel + Woodbury, ``kernels.s4_dplr.s4``): O(N L + L log L) per channel.
* With a decoding state or packed segment ids it runs as the equivalent recurrence, O(N) per token
  (``kernels.s4_dplr.s4_recurrence``); the state (:class:`S4State`) is the N/2 complex modes, constant size,
  and segment starts zero it, so packed documents do not interact.

Parameters (per channel): ``log_A_real`` and ``A_imag`` (``Lambda = -exp(log_A_real) + i A_imag``), ``P``, ``B``
and ``C`` (real and imaginary parts stacked on a leading axis of 2), ``D`` and ``log_dt``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxlab.kernels.s4_dplr import hippo_legs_dplr, s4, s4_recurrence
from jaxlab.models.ssm_mixers import ChannelSSM

__all__ = ["S4", "S4State"]


@struct.dataclass
class S4State:
    """Decoding state of :class:`S4`: h [B, H, N/2] complex64, the modes after the last token."""

    h: jax.Array


def _complex_init(values: np.ndarray):
    """Initialiser of a [2, H, N/2] (real, imaginary) parameter from complex ``values [N/2]``, every channel alike."""
    def init(key, shape, dtype=jnp.float32):
        v = np.broadcast_to(values, shape[1:])
        return jnp.asarray(np.stack([v.real, v.imag]), dtype)
    return init


class S4(ChannelSSM):
    """S4 layer: ``d_model`` DPLR SSMs with ``d_state / 2`` complex modes each, HiPPO-LegS initialised."""

    state_cls = S4State

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, state=None):
        N2 = self.num_modes()
        B, L, H = x.shape
        Lambda0, P0, B0, _ = hippo_legs_dplr(self.d_state)                     # numpy complex128 [N/2] constants
        log_A_real = self.param("log_A_real", lambda k, s: jnp.full(s, math.log(0.5)), (H, N2))  # Re Lambda = -1/2
        A_imag = self.param("A_imag", lambda k, s: jnp.broadcast_to(jnp.asarray(Lambda0.imag, jnp.float32), s),
                            (H, N2))
        P = self.param("P", _complex_init(P0), (2, H, N2))
        B_ = self.param("B", _complex_init(B0), (2, H, N2))
        C_c, D, dt = self.readout(H, N2)
        u = checkpoint_name(x.astype(jnp.float32), "ssm_in")                   # [B, L, H]
        Lambda = -jnp.exp(log_A_real) + 1j * A_imag                             # [H, N/2]
        P_c, B_c = P[0] + 1j * P[1], B_[0] + 1j * B_[1]
        if state is None and segment_ids is None:
            y = s4(u, Lambda, P_c, B_c, C_c, dt, D)
        else:
            y, h = s4_recurrence(u, Lambda, P_c, B_c, C_c, dt, D, initial_state=None if state is None else state.h,
                                 segment_ids=segment_ids, return_state=True)
            state = S4State(h)
        return self.output(y), state
