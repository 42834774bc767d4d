"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences", Section 3 and Algorithm 1).

A diagonal complex linear recurrence over N modes, read out by its real part::

    h_t = lambda * h_{t-1} + gamma * (B x_t),    y_t = Re(C h_t) + D * x_t

* Exponential parameterisation (Section 3.3): ``lambda = exp(-exp(nu_log) + i exp(theta_log))``, so
  ``|lambda| = exp(-exp(nu_log)) < 1`` for every real parameter (stable by construction).
* Normalisation (Section 3.4): ``gamma = sqrt(1 - |lambda|^2)`` keeps the state's variance at the input's
  for white-noise inputs however close to 1 ``|lambda|`` is; the paper trains ``log gamma`` from this value
  (:func:`lru_gamma` gives it).
* Ring initialisation (Lemma 3.2): lambda uniform on the ring ``r_min <= |lambda| <= r_max`` with phase in
  ``[0, max_phase]`` (:func:`ring_init`).

Forms: :func:`lru` runs the recurrence through ``scan.linear_recurrence`` (its "associative" method is the
paper's parallel scan; "sequential", "chunked" or "auto" also work); :func:`lru_reference` is one Python-loop
step per token; :func:`lru_step` is one decoding step. Shapes: x [B, L, H] real (H features), B [N, H] and
C [H, N] complex, D [H] real, state h [B, N] complex.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlab.kernels.scan import linear_recurrence

__all__ = ["lru", "lru_gamma", "lru_lambda", "lru_reference", "lru_step", "ring_init"]


def ring_init(key, num_modes: int, r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 2 * math.pi):
    """``(nu_log, theta_log)`` [N] float32 with lambda uniform on the ring r_min <= |lambda| <= r_max.

    The paper's Lemma 3.2: ``|lambda|^2 ~ U[r_min^2, r_max^2]`` (uniform in area), ``nu = -log|lambda|``,
    ``theta ~ U[0, max_phase]``; stored as logs (exponential parameterisation).
    """
    if num_modes < 1:
        raise ValueError(f"num_modes={num_modes} must be >= 1")
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
    if not max_phase > 0:
        raise ValueError(f"max_phase={max_phase} must be > 0")
    k_r, k_p = jax.random.split(key)
    u1 = jax.random.uniform(k_r, (num_modes,), jnp.float32)
    u2 = jax.random.uniform(k_p, (num_modes,), jnp.float32, minval=1e-6)  # theta > 0: its log is finite
    nu = -0.5 * jnp.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2)
    nu = jnp.maximum(nu, 1e-8)  # r_max = 1 would give nu = 0 and log nu = -inf
    return jnp.log(nu), jnp.log(max_phase * u2)


def lru_lambda(nu_log, theta_log):
    """``lambda = exp(-exp(nu_log) + i exp(theta_log))``: the modes' complex decays [N], |lambda| < 1."""
    return jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))


def lru_gamma(nu_log):
    """The normalisation ``gamma = sqrt(1 - |lambda|^2) = sqrt(1 - exp(-2 exp(nu_log)))`` [N] (real)."""
    return jnp.sqrt(-jnp.expm1(-2.0 * jnp.exp(nu_log)))


def _check(x, nu_log, theta_log, B, C, D, gamma, initial_state, reset):
    if x.ndim != 3:
        raise ValueError(f"x must be [B, L, H], got shape {x.shape}")
    Bn, L, H = x.shape
    N = jnp.shape(nu_log)[0] if jnp.ndim(nu_log) == 1 else None
    if N is None or jnp.shape(theta_log) != (N,):
        raise ValueError(f"nu_log and theta_log must be [N] of one shape, got {jnp.shape(nu_log)}, "
                         f"{jnp.shape(theta_log)}")
    if jnp.shape(B) != (N, H) or jnp.shape(C) != (H, N) or jnp.shape(D) != (H,):
        raise ValueError(f"need B [N, H] = {(N, H)}, C [H, N] = {(H, N)}, D [H] = ({H},); got B {jnp.shape(B)}, "
                         f"C {jnp.shape(C)}, D {jnp.shape(D)}")
    if gamma is not None and jnp.shape(gamma) != (N,):
        raise ValueError(f"gamma must be [N] = ({N},), got {jnp.shape(gamma)}")
    if initial_state is not None and jnp.shape(initial_state) != (Bn, N):
        raise ValueError(f"initial_state must be [B, N] = {(Bn, N)}, got {jnp.shape(initial_state)}")
    if reset is not None and jnp.shape(reset) != (Bn, L):
        raise ValueError(f"reset must be [B, L] = {(Bn, L)}, got {jnp.shape(reset)}")


def _inputs(x, nu_log, theta_log, B, gamma):
    """lambda [N] and gamma * B x [..., N]. The complex product is two real ones (x is real): on CPU complex
    matrix products ran 2-4x slower than the real pair, forward and backward."""
    lam = lru_lambda(nu_log, theta_log)  # [N]
    gamma = lru_gamma(nu_log) if gamma is None else gamma
    x = x.astype(jnp.real(B).dtype)
    bx = jax.lax.complex(jnp.einsum("nh,...h->...n", jnp.real(B), x), jnp.einsum("nh,...h->...n", jnp.imag(B), x))
    return lam, gamma * bx


def _readout(h, x, C, D):
    """Re(C h) + D x, as Re(C) Re(h) - Im(C) Im(h) (two real products)."""
    return jnp.einsum("hn,...n->...h", jnp.real(C), jnp.real(h)) - jnp.einsum("hn,...n->...h", jnp.imag(C),
                                                                             jnp.imag(h)) + D * x


def lru(x, nu_log, theta_log, B, C, D, *, gamma=None, initial_state=None, reset=None, method="auto",
        return_state=False):
    """The LRU over a sequence: ``y_t = Re(C h_t) + D x_t``, ``h_t = lambda h_{t-1} + gamma B x_t``.

    Args:
      x: inputs [B, L, H], real.
      nu_log, theta_log: [N], the exponential parameterisation of lambda (:func:`lru_lambda`).
      B: input matrix [N, H], complex; C: output matrix [H, N], complex; D: skip [H], real.
      gamma: input scale [N] (default the normalisation :func:`lru_gamma`; the paper trains its log).
      initial_state: h before the first token [B, N] complex (default zeros); enters the first segment.
      reset: bool [B, L], True where a packed segment starts (``scan.segment_starts``).
      method: a ``scan.linear_recurrence`` method ("associative" is the paper's parallel scan).
      return_state: also return h after the last token [B, N].

    Returns:
      y [B, L, H] real; (y, h_L) with ``return_state``.
    """
    x = jnp.asarray(x)
    _check(x, nu_log, theta_log, B, C, D, gamma, initial_state, reset)
    lam, bx = _inputs(x, nu_log, theta_log, B, gamma)  # [N], [B, L, N]
    h = linear_recurrence(lam[None, None], bx, initial_state, reset=reset, method=method)  # [B, L, N] complex
    y = _readout(h, x, C, D)
    return (y, h[:, -1]) if return_state else y


def lru_step(h, x_t, nu_log, theta_log, B, C, D, *, gamma=None):
    """One decoding step: h [B, N] complex, x_t [B, H] -> (y_t [B, H], new h)."""
    lam, bx = _inputs(x_t, nu_log, theta_log, B, gamma)
    h = lam * h + bx
    return _readout(h, x_t, C, D), h


def lru_reference(x, nu_log, theta_log, B, C, D, *, gamma=None, initial_state=None, reset=None):
    """The recurrence one Python-loop step per token (short sequences only): ``(y [B, L, H], h_L [B, N])``.

    For t = 0..L-1: zero h if ``reset[t]`` and t >= 1, ``h = lambda h + gamma (B x_t)``,
    ``y_t = Re(C h) + D x_t``.
    """
    lam = jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))
    gamma = jnp.sqrt(1.0 - jnp.abs(lam) ** 2) if gamma is None else gamma
    Bn, L, H = x.shape
    h = jnp.zeros((Bn, lam.shape[0]), jnp.result_type(lam, B)) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        if reset is not None and t > 0:
            h = jnp.where(reset[:, t, None], 0, h)
        h = lam * h + gamma * (x[:, t].astype(B.dtype) @ B.T)
        ys.append(jnp.real(h @ C.T) + D * x[:, t])
    return jnp.stack(ys, axis=1), h
