"""S4: the structured state space with a diagonal plus low-rank (DPLR) state matrix.

Gu, Goel and Re 2022, "Efficiently Modeling Long Sequences with Structured State Spaces". HiPPO-LegS
(``jaxlab.kernels.hippo.hippo_legs``) is normal plus low rank (NPLR, Theorem 1): with ``P_n = sqrt(n + 1/2)``,
``A + P P^T = -1/2 I + S`` with S skew-symmetric, so ``A = V (Lambda - P~ P~^*) V^*`` with V unitary
(``hippo_legs_dplr``; A is ``jaxlab.kernels.hippo.hippo_legs``, built in float64 here). In that basis the state
matrix is DPLR, ``A = Lambda - P P^*``, and the layer is parameterised by ``Lambda, P, B, C`` (complex,
``[H, N/2]``: one of each conjugate pair of modes; the full N modes are ``[x, conj x]``, so every sum over
modes is ``2 Re`` of the half's sum and outputs are real).

Bilinear discretisation with step dt (per channel): ``A_bar = (2/dt - A)^{-1} (2/dt + A)``,
``B_bar = 2 (2/dt - A)^{-1} B`` (as ``jaxlab.kernels.s4.discretize``). The convolution kernel
``K_l = C A_bar^l B_bar``, l < L, is computed from its truncated generating function at the roots of
unity omega_k = exp(-2 pi i k / L) (Lemma C.3, Algorithm 1):

    K^(omega) = sum_l K_l omega^l = C~ (I - A_bar omega)^{-1} B_bar,      C~ = C (I - A_bar^L)  (omega^L = 1)
              = 2 C~ ((2/dt)(1 - omega) - (1 + omega) A)^{-1} B
              = 2 / (1 + omega) [k00 - k01 k10 / (1 + k11)]                 (Woodbury, rank 1)

with ``k_ab = sum_n v_n / (g(omega) - lambda_n)``, ``g = (2/dt)(1 - omega)/(1 + omega)``, for v = C~ B, C~ P,
P^* B, P^* P: four Cauchy matrix-vector products (``cauchy``; ``cauchy_reference`` is the naive sum over all N
modes). ``K = irfft(K^)`` gives the length-L kernel in O(N L + L log L); at omega = -1 (even L) the limit
``K^(-1) = (dt/2) C~ B`` is used. ``C~`` is computed once from C by repeated squaring (``dplr_c_tilde``).

For decoding, the same discretised system runs as a recurrence in O(N) per step (Section 3.4): with
``D = (2/dt - Lambda)^{-1}`` diagonal, ``(2/dt - A)^{-1} = D - D P (1 + P^* D P)^{-1} P^* D`` (Woodbury) and
``2/dt + A = 2/dt + Lambda - P P^*`` (``s4_step``, ``s4_recurrence``). ``s4_kernel_dense_reference``
discretises a dense A and unrolls ``C A_bar^l B_bar``; the tests check all three agree in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.kernels.s4 import causal_fft_conv, discretize
from jaxlab.kernels.scan import segment_starts

__all__ = ["cauchy", "cauchy_reference", "dplr_c_tilde", "dplr_dense", "hippo_legs_dplr", "s4", "s4_kernel",
           "s4_kernel_dense_reference", "s4_recurrence", "s4_step"]


def hippo_legs_dplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The DPLR form of HiPPO-LegS: ``(Lambda, P, B, V)``, complex128, ``[N/2]`` each and V ``[N, N/2]``.

    ``hippo_legs(N) = (A, b)`` equals ``V_f (diag(Lambda_f) - P_f P_f^*) V_f^*`` and ``b = V_f B_f`` with the
    full modes ``V_f = [V, conj V]``, ``Lambda_f = [Lambda, conj Lambda]``, ``P_f = [P, conj P]``,
    ``B_f = [B, conj B]``; Lambda = -1/2 + i omega, omega > 0 ascending. A real output row c maps to ``C = c V``.
    """
    if not isinstance(N, int) or N < 2 or N % 2:
        raise ValueError(f"{N=} must be an even integer >= 2 (conjugate pairs of modes)")
    b = np.sqrt(2.0 * np.arange(N) + 1.0)                                   # hippo_legs in float64
    A = -(np.tril(np.outer(b, b), -1) + np.diag(np.arange(1.0, N + 1)))
    p = np.sqrt(np.arange(N) + 0.5)
    S = A + np.outer(p, p)                                                  # -1/2 I + skew-symmetric
    skew = S + 0.5 * np.eye(N)
    omega, V = np.linalg.eigh(-1j * skew)                                   # skew = V diag(i omega) V^*
    keep = omega > 0
    if keep.sum() != N // 2:  # no zero mode for even N; a failed pairing must not pass silently
        raise ValueError(f"HiPPO-LegS's normal part with {N=} has {int(keep.sum())} modes with omega > 0, not {N // 2}")
    V, omega = V[:, keep], omega[keep]                                      # [N, N/2]
    Lambda = -0.5 + 1j * omega
    return Lambda, V.conj().T @ p, V.conj().T @ b, V


def _full(x):
    """Half modes ``[..., N/2]`` -> all N modes ``[..., N]`` (conjugate pairs)."""
    return jnp.concatenate([x, jnp.conj(x)], axis=-1)


def dplr_dense(Lambda, P, B, C):
    """The full N-mode system of half-mode DPLR parameters ``[N/2]``: ``(A [N, N], B [N], C [N])``, complex.

    ``A = diag(Lambda_f) - P_f P_f^*``; conjugate-symmetric, so ``C A^l B`` is real.
    """
    Lambda, P, B, C = (jnp.asarray(x) for x in (Lambda, P, B, C))
    if not (Lambda.ndim == 1 and P.shape == B.shape == C.shape == Lambda.shape):
        raise ValueError(f"need Lambda, P, B, C of one shape [N/2]; got {Lambda.shape}, {P.shape}, {B.shape}, "
                         f"{C.shape}")
    p = _full(P)
    return jnp.diag(_full(Lambda)) - jnp.outer(p, jnp.conj(p)), _full(B), _full(C)


def _check_params(Lambda, P, B, C, dt):
    Lambda, P, B, C, dt = (jnp.asarray(x) for x in (Lambda, P, B, C, dt))
    if not (Lambda.ndim == 2 and P.shape == B.shape == C.shape == Lambda.shape and dt.shape == Lambda.shape[:1]):
        raise ValueError(f"need Lambda, P, B, C [H, N/2] and dt [H]; got Lambda {Lambda.shape}, P {P.shape}, "
                         f"B {B.shape}, C {C.shape}, dt {dt.shape}")
    return Lambda, P, B, C, dt


def dplr_c_tilde(Lambda, P, C, dt, L: int):
    """``C~ = C (I - A_bar^L)`` per channel (half modes ``[H, N/2]``), A_bar the bilinear discretisation.

    Computed on the dense N-mode A_bar with ``matrix_power`` (O(N^3 log L), once per kernel).
    """
    Lambda, P, _, C, dt = _check_params(Lambda, P, P, C, dt)
    N2 = Lambda.shape[1]

    def one(lam, p, c, step):
        A, _, c_f = dplr_dense(lam, p, p, c)
        A_bar, _ = discretize(A, jnp.zeros(2 * N2, A.dtype), step, "bilinear")
        return (c_f - c_f @ jnp.linalg.matrix_power(A_bar, L))[:N2]

    return jax.vmap(one)(Lambda, P, C, dt)


def cauchy_reference(v, z, w):
    """``sum_n v_n / (z_m - w_n)`` over all N modes ``[w, conj w]`` with weights ``[v, conj v]``, naively.

    v, w: ``[..., N/2]``; z: ``[..., M]`` (leading axes broadcast). Returns ``[..., M]``.
    """
    v_f, w_f = _full(jnp.asarray(v)), _full(jnp.asarray(w))
    return jnp.sum(v_f[..., None, :] / (jnp.asarray(z)[..., :, None] - w_f[..., None, :]), axis=-1)


def cauchy(v, z, w, *, block: int = 64):
    """The Cauchy kernel ``sum_n v_n/(z - w_n) + conj(v_n)/(z - conj(w_n))`` by conjugate pairs, in blocks of z.

    Each pair is one fraction, ``(2 Re(v) z - 2 Re(v conj(w))) / (z^2 - 2 Re(w) z + |w|^2)``, and the nodes z
    go through ``lax.map`` ``block`` at a time, so memory is O(block N) rather than O(M N). Arguments as
    :func:`cauchy_reference`.
    """
    v, z, w = jnp.asarray(v), jnp.asarray(z), jnp.asarray(w)
    a, b = 2 * v.real, 2 * (v * jnp.conj(w)).real                           # [..., N/2]
    s, r = 2 * w.real, (w * jnp.conj(w)).real

    def at(z_m):                                                           # z_m [...] -> [...]
        z_m = z_m[..., None]
        return jnp.sum((a * z_m - b) / (z_m * z_m - s * z_m + r), axis=-1)

    lead = jnp.broadcast_shapes(v.shape[:-1], z.shape[:-1])
    zt = jnp.moveaxis(jnp.broadcast_to(z, lead + z.shape[-1:]), -1, 0)    # [M, ...]
    return jnp.moveaxis(jax.lax.map(at, zt, batch_size=min(block, zt.shape[0])), 0, -1)


@functools.partial(jax.jit, static_argnames=("L",))
def s4_kernel(Lambda, P, B, C, dt, L: int):
    """S4 convolution kernel ``K [H, L]``, ``K_l = C A_bar^l B_bar``, by the generating function (module doc).

    Args:
      Lambda, P, B, C: ``[H, N/2]`` complex half-mode DPLR parameters (``A = Lambda - P P^*``, output C);
      dt: ``[H]`` bilinear steps; L: kernel length.
    """
    Lambda, P, B, C, dt = _check_params(Lambda, P, B, C, dt)
    Ct = dplr_c_tilde(Lambda, P, C, dt, L)                                 # [H, N/2]
    k = jnp.arange(L // 2 + 1)
    omega = jnp.exp(-2j * jnp.pi * k / L).astype(jnp.result_type(Lambda, jnp.complex64))   # rfft nodes, [M]
    nyquist = 2 * k == L                                                   # omega = -1 exactly
    omega = jnp.where(nyquist, 0, omega)                                   # a finite stand-in, replaced below
    g = (2.0 / dt[:, None]) * (1 - omega) / (1 + omega)                    # [H, M]
    Pc = jnp.conj(P)
    r00, r01, r10, r11 = (cauchy(v, g, Lambda) for v in (Ct * B, Ct * P, Pc * B, Pc * P))   # [H, M] each
    K_hat = 2.0 / (1 + omega) * (r00 - r01 * r10 / (1 + r11))             # [H, M]
    K_hat = jnp.where(nyquist, dt[:, None] * jnp.sum((Ct * B).real, -1, keepdims=True), K_hat)  # (dt/2) 2 Re
    return jnp.fft.irfft(K_hat, L, axis=-1)                                # [H, L]


def s4(u, Lambda, P, B, C, dt, D=None):
    """S4 layer by FFT convolution: u ``[B, L, H]`` -> y ``[B, L, H]``, ``y = K * u + D u`` (D ``[H]`` skip)."""
    u = jnp.asarray(u)
    if u.ndim != 3 or jnp.shape(Lambda)[:1] != u.shape[2:]:
        raise ValueError(f"u must be [B, L, H] with H = Lambda.shape[0]; got u {u.shape}, Lambda {jnp.shape(Lambda)}")
    y = causal_fft_conv(u, s4_kernel(Lambda, P, B, C, dt, u.shape[1]).astype(u.dtype))
    return y if D is None else y + D * u


def s4_step(x, u_k, Lambda, P, B, C, dt):
    """One recurrent step: state x ``[..., H, N/2]`` complex, input u_k ``[..., H]`` -> (x, y_k ``[..., H]``).

    ``x_k = A_bar x_{k-1} + B_bar u_k`` through the Woodbury form (module doc), O(N) per channel;
    ``y_k = 2 Re(C . x_k)``. Low-rank products over all N modes are ``2 Re`` of the half's sums.
    """
    two_dt = (2.0 / dt)[:, None]                                           # [H, 1]
    Pc = jnp.conj(P)

    def inv_solve(v):                                                      # (2/dt - A)^{-1} v
        Dv, DP = v / (two_dt - Lambda), P / (two_dt - Lambda)
        num = 2 * jnp.sum(Pc * Dv, -1, keepdims=True).real
        den = 1 + 2 * jnp.sum(Pc * DP, -1, keepdims=True).real
        return Dv - DP * (num / den)

    rhs = (two_dt + Lambda) * x - P * (2 * jnp.sum(Pc * x, -1, keepdims=True).real)   # (2/dt + A) x
    x = inv_solve(rhs + 2 * B * u_k[..., None])                           # A_bar x + B_bar u
    return x, 2 * jnp.sum(C * x, -1).real


def s4_recurrence(u, Lambda, P, B, C, dt, D=None, *, initial_state=None, segment_ids=None, return_state=False):
    """S4 as a recurrence, one :func:`s4_step` per token: u ``[B, L, H]`` -> y ``[B, L, H]`` (decoding, packing).

    initial_state: ``[B, H, N/2]`` complex (enters the first segment); segment_ids: int ``[B, L]``, the state
    is zeroed where a segment starts at t >= 1 (``scan.segment_starts``). With ``return_state`` also returns
    the state after the last token.
    """
    u = jnp.asarray(u)
    Lambda, P, B, C, dt = _check_params(Lambda, P, B, C, dt)
    if u.ndim != 3 or u.shape[2] != Lambda.shape[0]:
        raise ValueError(f"u must be [B, L, H] with H = {Lambda.shape[0]}, got shape {u.shape}")
    Bsz, L, H = u.shape
    dtype = jnp.result_type(Lambda, P, B, C, u)
    x0 = jnp.zeros((Bsz, H, Lambda.shape[1]), dtype) if initial_state is None else jnp.asarray(initial_state, dtype)
    if x0.shape != (Bsz, H, Lambda.shape[1]):
        raise ValueError(f"initial_state must be [B, H, N/2] = {(Bsz, H, Lambda.shape[1])}, got {x0.shape}")
    starts = jnp.zeros((Bsz, L), bool) if segment_ids is None else segment_starts(segment_ids)
    starts = starts.at[:, 0].set(False)                                    # the initial state enters segment 1

    def step(x, inputs):
        u_k, start_k = inputs
        x = jnp.where(start_k[:, None, None], 0, x)
        return s4_step(x, u_k, Lambda, P, B, C, dt)

    last, y = jax.lax.scan(step, x0, (jnp.moveaxis(u, 1, 0), starts.T))
    y = jnp.moveaxis(y, 0, 1).astype(u.dtype)                              # [B, L, H]
    y = y if D is None else y + D * u
    return (y, last) if return_state else y


def s4_kernel_dense_reference(A, B, C, dt, L: int):
    """``K_l = C A_bar^l B_bar`` for l < L by unrolling, with A_bar, B_bar the bilinear ``s4.discretize`` of dense
    A ``[N, N]``, B ``[N]`` (C ``[N]``, scalar dt). Returns ``[L]``, complex when the inputs are (real for a real or
    conjugate-symmetric system, up to rounding)."""
    A_bar, B_bar = discretize(A, B, dt, "bilinear")

    def step(x, _):
        return A_bar @ x, jnp.dot(jnp.asarray(C), x)

    _, K = jax.lax.scan(step, B_bar, None, length=L)
    return K
