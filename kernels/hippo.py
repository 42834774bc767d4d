"""HiPPO: online projection of a signal's history onto orthogonal polynomials (LegS, LegT, LagT).

Gu, Dao, Ermon, Rudra, Re 2020, "HiPPO: Recurrent Memory with Optimal Polynomial Projections".
Each measure gives its own (A, B) (the paper's Theorem 1 and Appendix D); here:

* LegS (scaled Legendre, uniform on [0, t], the whole history): ``hippo_legs``, ``legs_recurrence``;
* LegT (translated Legendre, uniform on the sliding window [t - theta, t]; the LMU): ``hippo_legt``,
  ``legt_recurrence``, reconstruction ``legt_reconstruct``, exact window projection ``legt_projection_reference``;
* LagT (translated Laguerre, the exponentially weighted past e^{-(t - s)} on (-inf, t]): ``hippo_lagt``,
  ``lagt_recurrence``, ``laguerre_reconstruct``, exact projection ``lagt_projection_reference``.

LegT and LagT are time-invariant (``d/dt c = A c + B f``), so they are discretised as any LTI system by
``jaxlab.kernels.s4.discretize``; zero-order hold is then exact for a piecewise-constant signal.
For the scaled Legendre measure (uniform on [0, t]) the coefficients

    c_n(t) = (1/t) int_0^t f(s) sqrt(2n+1) P_n(2s/t - 1) ds                          (LegS projection)

obey the linear, time-varying ODE (paper eq. 3, written here with A's sign folded in, the S4
convention, so that ``x' = A x + B u`` reads as usual)

    d/dt c(t) = (1/t) (A c(t) + B f(t)),
    A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k),  -(n+1) (n = k),  0 (n < k);   B_n = sqrt(2n+1),

and f is recovered from c as  f(s) ~= sum_n c_n(t) sqrt(2n+1) P_n(2s/t - 1)  for s in [0, t].

Here the signal is a sequence f_1..f_L held constant on (k-1, k]. ``legs_recurrence`` runs the
discretised ODE with ``lax.scan``: forward Euler (the paper's eq. 7), bilinear (GBT-1/2), or the exact
zero-order-hold transition. In log-time s = log t the ODE is time-invariant, dc/ds = A c + B f, so
over a cell where f is constant

    c(k) = E_k c(k-1) + (I - E_k) e_0 f_k,     E_k = exp(A log(k / (k-1)))    (-A^{-1} B = e_0)

with no discretisation error. E_k needs no matrix exponential: it maps the coefficients of a
polynomial on [0, k-1] to those of the same polynomial (zero on (k-1, k]) on [0, k], i.e. with
r = (k-1)/k the Gram matrix ``(E_k)_nm = r int_0^1 g_n(r u) g_m(u) du`` (g_n(x) = sqrt(2n+1) P_n(2x-1)),
which N-point Gauss-Legendre quadrature computes exactly. Applied as "evaluate at the nodes, project
onto the rescaled basis", a step costs O(N^2), like the bilinear one. ``legs_projection_reference``
computes the projection exactly for that piecewise-constant f from Legendre antiderivatives, so the
recurrence is checked against exact values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from jaxlab.kernels.s4 import DISCRETIZATIONS, discretize

__all__ = [
    "LEGS_DISCRETIZATIONS",
    "hippo_lagt",
    "hippo_legs",
    "hippo_legt",
    "lagt_projection_reference",
    "lagt_recurrence",
    "laguerre",
    "laguerre_reconstruct",
    "legendre",
    "legendre_reconstruct",
    "legs_projection_reference",
    "legs_recurrence",
    "legt_projection_reference",
    "legt_reconstruct",
    "legt_recurrence",
]


LEGS_DISCRETIZATIONS = ("euler", "bilinear", "zoh")


def hippo_legs(N: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """HiPPO-LegS continuous-time matrices ``A [N, N]`` (lower triangular) and ``B [N]``.

    Sign convention: ``d/dt c = (1/t)(A c + B f)``; A's diagonal is ``-(n+1)``.
    """
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"{N=} must be a positive integer")
    q = jnp.sqrt(2.0 * jnp.arange(N, dtype=dtype) + 1.0)                # sqrt(2n+1), [N]
    n = jnp.arange(N)
    A = jnp.where(n[:, None] > n[None, :], q[:, None] * q[None, :], 0.0)
    A = -(A + jnp.diag(n.astype(dtype) + 1.0))                          # [N, N]
    return A.astype(dtype), q


def legendre(N: int, x: jax.Array) -> jax.Array:
    """``P_0(x) .. P_{N-1}(x)`` by Bonnet's recursion: ``(n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1}``.

    Returns ``[N, *x.shape]``. The recursion runs as a ``lax.scan`` so compile time does not grow with N.
    """
    x = jnp.asarray(x)
    if N < 1:
        raise ValueError(f"{N=} must be >= 1")

    def step(carry, n):                                   # carry = (P_{n-1}, P_n)
        p_prev, p = carry
        p_next = ((2 * n + 1) * x * p - n * p_prev) / (n + 1)
        return (p, p_next), p_next

    first = jnp.stack([jnp.ones_like(x), x])[:N]
    if N <= 2:
        return first
    ns = jnp.arange(1, N - 1, dtype=x.dtype)
    _, rest = jax.lax.scan(step, (first[0], first[1]), ns)  # [N-2, *x.shape]
    return jnp.concatenate([first, rest])


@jax.jit
def legendre_reconstruct(c: jax.Array, x: jax.Array) -> jax.Array:
    """``f(x) = sum_n c_n sqrt(2n+1) P_n(x)`` at ``x`` in [-1, 1] (x = 2s/t - 1).

    c: ``[..., N]`` coefficients; x: ``[M]``. Returns ``[..., M]``.
    """
    N = c.shape[-1]
    basis = legendre(N, x) * jnp.sqrt(2.0 * jnp.arange(N) + 1.0)[:, None]   # [N, M]
    return jnp.einsum("...n,nm->...m", c, basis)                            # [..., M]


def _legendre_shift(p: jax.Array, x: jax.Array, shift: jax.Array) -> jax.Array:
    """``P_n(x - shift) - P_n(x)`` for n < N, given ``p = legendre(N, x)`` (``[N, *x.shape]``).

    Bonnet's recursion subtracted from itself, ``(n+1) D_{n+1} = (2n+1)(x D_n - shift P_n(x - shift)) - n D_{n-1}``
    with ``D_0 = 0, D_1 = -shift``: every term is O(shift), so small differences keep their relative precision.
    """
    N = p.shape[0]
    shift = jnp.broadcast_to(shift, x.shape).astype(p.dtype)

    def step(carry, inputs):                               # carry = (D_{n-1}, D_n)
        d_prev, d = carry
        n, p_n = inputs
        d_next = ((2 * n + 1) * (x * d - shift * (p_n + d)) - n * d_prev) / (n + 1)
        return (d, d_next), d_next

    first = jnp.stack([jnp.zeros_like(shift), -shift])[:N]
    if N <= 2:
        return first
    ns = jnp.arange(1, N - 1, dtype=p.dtype)
    _, rest = jax.lax.scan(step, (first[0], first[1]), (ns, p[1:N - 1]))  # [N-2, *x.shape]
    return jnp.concatenate([first, rest])


def _check_signal(f: jax.Array) -> jax.Array:
    f = jnp.asarray(f)
    if f.ndim not in (1, 2):
        raise ValueError(f"f must be [L] or [B, L], got shape {f.shape}")
    if f.shape[-1] < 1:
        raise ValueError(f"f must have at least one sample, got shape {f.shape}")
    if not jnp.issubdtype(f.dtype, jnp.floating):
        raise ValueError(f"f must be floating point, got {f.dtype}")
    return f


@functools.partial(jax.jit, static_argnames=("N", "discretization"))
def legs_recurrence(f: jax.Array, N: int, *, discretization: str = "bilinear") -> jax.Array:
    """Online LegS coefficients after each sample: ``c[..., k-1, :] ~= c(t=k)``.

    Args:
      f: ``[L]`` or ``[B, L]`` samples, f_k held on (k-1, k].
      N: number of coefficients (state size).
      discretization: ``"euler"``: ``c_k = (I + A/k) c_{k-1} + (1/k) B f_k`` (paper eq. 7);
        ``"bilinear"``: ``(I - A/(2k)) c_k = (I + A/(2k)) c_{k-1} + (1/k) B f_k``, solved as a
        triangular system since A is lower triangular (O(N^2) per step); ``"zoh"``: the exact
        transition ``c_k = E_k c_{k-1} + (I - E_k) e_0 f_k`` with ``E_k = exp(A log(k/(k-1)))``
        applied by Gauss-Legendre quadrature (module docstring; O(N^2) per step), so ``c_k`` equals
        the LegS projection of f_1..f_k up to rounding.

    Returns:
      ``[L, N]`` or ``[B, L, N]`` coefficient trajectories.
    """
    f = _check_signal(f)
    if discretization not in LEGS_DISCRETIZATIONS:
        raise ValueError(f"{discretization=} must be one of {LEGS_DISCRETIZATIONS}")
    A, B = hippo_legs(N, dtype=f.dtype)
    eye = jnp.eye(N, dtype=f.dtype)
    batched = f.reshape(-1, f.shape[-1]).T                                  # [L, B']
    if discretization == "zoh":
        nodes, weights = np.polynomial.legendre.leggauss(N)                  # exact for degree <= 2N - 1
        x = jnp.asarray(nodes, f.dtype)                                     # [Q] nodes in (-1, 1), Q = N
        w = jnp.asarray(weights / 2, f.dtype)                               # [Q] weights on (0, 1)
        scale = jnp.sqrt(2.0 * jnp.arange(N, dtype=f.dtype) + 1.0)[:, None]  # [N, 1]
        p_nodes = legendre(N, x)                                            # [N, Q]: P_n(x_q)
        g_nodes = p_nodes * scale                                           # [N, Q]: g_n(u_q), u = (x+1)/2

    def step(c, inputs):                                                   # c [B', N]
        k, f_k = inputs
        inv_k = 1.0 / k
        if discretization == "zoh":
            # E_k - I = (r g(r u) - g(u)) W g(u)^T with r = 1 - 1/k (the quadrature's g(u) W g(u)^T is I).
            # r g_n(r u) - g_n(u) = sqrt(2n+1) ((1 - 1/k) D_n - P_n(x) / k) with D_n = P_n(x - (x+1)/k) - P_n(x)
            # from its own recursion: no term is formed as a difference of O(1) numbers, so E_k - I = O(1/k)
            # keeps its relative precision and the rounding does not build up over the steps.
            d = _legendre_shift(p_nodes, x, inv_k * (x + 1))               # [N, Q]
            delta = scale * ((1 - inv_k) * d - inv_k * p_nodes) * w         # [N, Q]: (r g(r u) - g(u)) W
            values = c @ g_nodes                                           # [B', Q]: history at the nodes
            c = c + values @ delta.T - f_k[:, None] * jnp.sum(delta, -1)   # (E_k - I)(c - e_0 f_k); g_0 = 1
        elif discretization == "euler":
            c = c @ (eye + inv_k * A).T + inv_k * f_k[:, None] * B
        else:
            rhs = c @ (eye + 0.5 * inv_k * A).T + inv_k * f_k[:, None] * B
            c = solve_triangular(eye - 0.5 * inv_k * A, rhs.T, lower=True).T
        return c, c

    ks = jnp.arange(1, f.shape[-1] + 1, dtype=f.dtype)
    c0 = jnp.zeros((batched.shape[1], N), f.dtype)
    _, cs = jax.lax.scan(step, c0, (ks, batched))                          # [L, B', N]
    cs = jnp.moveaxis(cs, 0, 1)                                            # [B', L, N]
    return cs[0] if f.ndim == 1 else cs


@functools.partial(jax.jit, static_argnames=("N",))
def legs_projection_reference(f: jax.Array, N: int) -> jax.Array:
    """Exact LegS coefficients ``c(t=L)`` of the piecewise-constant signal (f_k on (k-1, k]).

    With x = 2s/L - 1 and the antiderivative ``Q_n = (P_{n+1} - P_{n-1}) / (2n+1)`` (Q_0 = P_1),
    ``c_n = (1/2) sqrt(2n+1) sum_k f_k (Q_n(x_k) - Q_n(x_{k-1}))``. Returns ``[N]`` or ``[B, N]``.
    """
    f = _check_signal(f)
    L = f.shape[-1]
    x = 2.0 * jnp.arange(L + 1, dtype=f.dtype) / L - 1.0                   # [L+1] cell edges
    P = legendre(N + 1, x)                                                 # [N+1, L+1]
    P_prev = jnp.concatenate([jnp.zeros_like(P[:1]), P[:-2]])              # P_{n-1}, P_{-1} := 0
    n = jnp.arange(N, dtype=f.dtype)[:, None]
    Q = (P[1:] - P_prev) / (2 * n + 1)                                     # [N, L+1]; Q_0 = P_1
    cell = Q[:, 1:] - Q[:, :-1]                                            # [N, L]
    return 0.5 * jnp.sqrt(2 * n[:, 0] + 1) * jnp.einsum("...l,nl->...n", f, cell)


# ----------------------------------------------------------------------------------------------------------
# LegT and LagT: time-invariant measures.
#
# LegT: uniform measure 1/theta on [t - theta, t], orthonormal basis g_n(s) = sqrt(2n+1) P_n(z),
# z = 2(s - t)/theta + 1 (z = 1 now, z = -1 at the far end of the window). Differentiating
# c_n(t) = (1/theta) int_{t-theta}^t f g_n ds brings in f(t - theta), which the state approximates by its own
# reconstruction sum_k c_k g_k(t - theta) = sum_k (-1)^k sqrt(2k+1) c_k (paper, Appendix D.1), giving
#
#     A_nk = -(1/theta) sqrt(2n+1) sqrt(2k+1) * (1 if k <= n else (-1)^(n-k)),   B_n = (1/theta) sqrt(2n+1).
#
# (The paper's Theorem 1 states the same system for unnormalised coefficients c_n / sqrt(2n+1) with
# signs (-1)^n folded in, the LMU's form; the orthonormal one here shares legendre_reconstruct with LegS.)
#
# LagT: measure e^{-(t - s)} on (-inf, t], orthonormal basis L_n(t - s) (Laguerre, alpha = 0). With L_n(0) = 1
# and L_n' = -sum_{k<n} L_k, the projection c_n(t) = int f(s) e^{-(t-s)} L_n(t - s) ds obeys exactly
#
#     A_nk = -1 (k <= n), 0 (k > n),   B_n = 1                                   (paper, Theorem 1, LagT)
# ----------------------------------------------------------------------------------------------------------


def _check_N(N):
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise ValueError(f"{N=} must be a positive integer")


def hippo_legt(N: int, theta: float = 1.0, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """HiPPO-LegT matrices ``A [N, N]``, ``B [N]`` of the window ``[t - theta, t]``: ``d/dt c = A c + B f``.

    Coefficients are orthonormal-basis ones: ``f(t - s) ~= legt_reconstruct(c, s, theta)`` for s in [0, theta].
    """
    _check_N(N)
    if not theta > 0:
        raise ValueError(f"{theta=} must be > 0")
    q = jnp.sqrt(2.0 * jnp.arange(N, dtype=dtype) + 1.0)                 # sqrt(2n+1), [N]
    n = jnp.arange(N)
    sign = jnp.where(n[None, :] <= n[:, None], 1.0, jnp.where((n[:, None] - n[None, :]) % 2 == 0, 1.0, -1.0))
    A = -(q[:, None] * q[None, :] * sign) / theta                      # [N, N]
    return A.astype(dtype), (q / theta).astype(dtype)


def hippo_lagt(N: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """HiPPO-LagT matrices ``A [N, N]`` (``-1`` on and below the diagonal) and ``B [N]`` (ones): ``d/dt c = A c + B f``.

    ``c(t)`` is the projection of the past weighted by ``e^{-(t - s)}`` onto Laguerre polynomials:
    ``f(t - s) ~= laguerre_reconstruct(c, s)`` for s >= 0.
    """
    _check_N(N)
    return -jnp.tril(jnp.ones((N, N), dtype)), jnp.ones((N,), dtype)


def laguerre(N: int, y: jax.Array) -> jax.Array:
    """``L_0(y) .. L_{N-1}(y)`` by ``(n+1) L_{n+1} = (2n+1-y) L_n - n L_{n-1}``; returns ``[N, *y.shape]``."""
    y = jnp.asarray(y)
    _check_N(N)

    def step(carry, n):                                   # carry = (L_{n-1}, L_n)
        l_prev, l = carry
        l_next = ((2 * n + 1 - y) * l - n * l_prev) / (n + 1)
        return (l, l_next), l_next

    first = jnp.stack([jnp.ones_like(y), 1.0 - y])[:N]
    if N <= 2:
        return first
    _, rest = jax.lax.scan(step, (first[0], first[1]), jnp.arange(1, N - 1, dtype=y.dtype))  # [N-2, *y.shape]
    return jnp.concatenate([first, rest])


@jax.jit
def laguerre_reconstruct(c: jax.Array, lag: jax.Array) -> jax.Array:
    """LagT reconstruction ``f(t - lag) ~= sum_n c_n L_n(lag)``: c ``[..., N]``, lag ``[M]`` (>= 0) -> ``[..., M]``."""
    return jnp.einsum("...n,nm->...m", c, laguerre(c.shape[-1], lag))


@jax.jit
def legt_reconstruct(c: jax.Array, lag: jax.Array, theta: float = 1.0) -> jax.Array:
    """LegT reconstruction ``f(t - lag)`` for lag in [0, theta]: c ``[..., N]``, lag ``[M]`` -> ``[..., M]``."""
    return legendre_reconstruct(c, 1.0 - 2.0 * lag / theta)


def _lti_recurrence(f, A, B, dt, discretization):
    """Run ``c_k = A_bar c_{k-1} + B_bar f_k`` from c_0 = 0 over f ``[L]`` or ``[B, L]``; ``[..., L, N]``."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"{discretization=} must be one of {DISCRETIZATIONS}")
    if not dt > 0:
        raise ValueError(f"{dt=} must be > 0")
    A_bar, B_bar = discretize(A, B, dt, discretization)                   # [N, N], [N]
    batched = f.reshape(-1, f.shape[-1]).T                                  # [L, B']

    def step(c, f_k):                                                      # c [B', N]
        c = c @ A_bar.T + f_k[:, None] * B_bar
        return c, c

    _, cs = jax.lax.scan(step, jnp.zeros((batched.shape[1], A.shape[0]), f.dtype), batched)  # [L, B', N]
    cs = jnp.moveaxis(cs, 0, 1)                                            # [B', L, N]
    return cs[0] if f.ndim == 1 else cs


@functools.partial(jax.jit, static_argnames=("N", "theta", "dt", "discretization"))
def legt_recurrence(f: jax.Array, N: int, *, theta: float = 1.0, dt: float = 1.0,
                    discretization: str = "zoh") -> jax.Array:
    """Online LegT coefficients of the window of length ``theta`` after each sample, ``c[..., k-1, :] ~= c(k dt)``.

    Args:
      f: ``[L]`` or ``[B, L]`` samples, f_k held on ((k-1) dt, k dt] (zero before time 0).
      N: state size; theta: window length (time units); dt: sampling step.
      discretization: "zoh" (exact for the held signal) or "bilinear" (``jaxlab.kernels.s4.discretize``).

    Returns ``[L, N]`` or ``[B, L, N]``. The LegT ODE itself approximates the sample leaving the window by the
    state's reconstruction, so ``c`` approaches ``legt_projection_reference`` as N grows (not exactly).
    """
    f = _check_signal(f)
    A, B = hippo_legt(N, theta, f.dtype)
    return _lti_recurrence(f, A, B, dt, discretization)


@functools.partial(jax.jit, static_argnames=("N", "dt", "discretization"))
def lagt_recurrence(f: jax.Array, N: int, *, dt: float = 1.0, discretization: str = "zoh") -> jax.Array:
    """Online LagT coefficients after each sample, ``c[..., k-1, :] ~= c(k dt)``; arguments as ``legt_recurrence``.

    With "zoh" the recurrence is the exact LagT projection of the held signal (``lagt_projection_reference``)
    up to rounding.
    """
    f = _check_signal(f)
    A, B = hippo_lagt(N, f.dtype)
    return _lti_recurrence(f, A, B, dt, discretization)


def _cell_edges(L: int, dt, dtype):
    """Lags ``t - s`` of the cell edges of f_1..f_L at t = L dt: lag_hi[k] >= lag_lo[k], ``[L]`` each."""
    k = jnp.arange(1, L + 1, dtype=dtype)
    return (L - k) * dt, (L - k + 1) * dt                                   # f_k lives on lags [lo, hi)


@functools.partial(jax.jit, static_argnames=("N", "theta", "dt"))
def legt_projection_reference(f: jax.Array, N: int, *, theta: float = 1.0, dt: float = 1.0) -> jax.Array:
    """Exact projection of the held signal's window ``[L dt - theta, L dt]`` onto LegT's basis: ``[N]`` or ``[B, N]``.

    ``c_n = (1/2) sqrt(2n+1) sum_k f_k (Q_n(z_hi) - Q_n(z_lo))`` over each cell's part of the window in
    z = 1 - 2 lag / theta, with the Legendre antiderivative ``Q_n = (P_{n+1} - P_{n-1}) / (2n+1)``.
    """
    f = _check_signal(f)
    lo, hi = _cell_edges(f.shape[-1], dt, f.dtype)
    z_hi, z_lo = (jnp.clip(1.0 - 2.0 * lag / theta, -1.0, 1.0) for lag in (lo, hi))   # [L] each
    z = jnp.stack([z_lo, z_hi])                                            # [2, L]
    P = legendre(N + 1, z)                                                 # [N+1, 2, L]
    P_prev = jnp.concatenate([jnp.zeros_like(P[:1]), P[:-2]])
    n = jnp.arange(N, dtype=f.dtype)
    Q = (P[1:] - P_prev) / (2 * n + 1)[:, None, None]                      # [N, 2, L]
    cell = Q[:, 1] - Q[:, 0]                                               # [N, L]
    return 0.5 * jnp.sqrt(2 * n + 1) * jnp.einsum("...l,nl->...n", f, cell)


@functools.partial(jax.jit, static_argnames=("N", "dt"))
def lagt_projection_reference(f: jax.Array, N: int, *, dt: float = 1.0) -> jax.Array:
    """Exact LagT projection ``c_n = int e^{-y} L_n(y) f(t - y) dy`` of the held signal at t = L dt.

    From ``d/dy [e^{-y} (L_n - L_{n-1})] = -e^{-y} L_n`` (L_{-1} = 0): each cell contributes
    ``f_k [e^{-y} (L_{n-1} - L_n)]`` between its lags. Returns ``[N]`` or ``[B, N]``.
    """
    f = _check_signal(f)
    lo, hi = _cell_edges(f.shape[-1], dt, f.dtype)
    y = jnp.stack([lo, hi])                                                # [2, L]
    Lg = laguerre(N, y)                                                    # [N, 2, L]
    Lg_prev = jnp.concatenate([jnp.zeros_like(Lg[:1]), Lg[:-1]])
    F = jnp.exp(-y) * (Lg_prev - Lg)                                       # [N, 2, L]
    return jnp.einsum("...l,nl->...n", f, F[:, 1] - F[:, 0])
