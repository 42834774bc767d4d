"""HiPPO-LegS: matrices, Legendre basis, the online recurrence against the exact projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import legendre as npl

from jaxlab.kernels.hippo import (hippo_legs, legendre, legendre_reconstruct, legs_projection_reference,
                                  legs_recurrence)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def test_hippo_legs_matrices():
    A, B = hippo_legs(4)
    q = np.sqrt(2 * np.arange(4) + 1)
    expected = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(1, 5))
    np.testing.assert_allclose(A, expected, rtol=1e-6)
    np.testing.assert_allclose(B, q, rtol=1e-6)
    with pytest.raises(ValueError, match="N=0"):
        hippo_legs(0)


def test_legendre_matches_numpy():
    x = np.linspace(-1, 1, 11)
    ref = np.stack([npl.legval(x, np.eye(7)[n]) for n in range(7)])
    np.testing.assert_allclose(legendre(7, jnp.asarray(x)), ref, atol=1e-5)
    np.testing.assert_allclose(legendre(1, jnp.asarray(x)), ref[:1])


def _signal(L):
    t = (np.arange(L) + 0.5) / L
    return np.sin(6 * t) + 0.5 * np.cos(17 * t ** 2)


def test_recurrence_converges_to_exact_projection(x64):
    N = 16
    errors = {}
    for L in (500, 4000):
        f = jnp.asarray(_signal(L))
        ref = legs_projection_reference(f, N)
        for method in ("euler", "bilinear"):
            c = legs_recurrence(f, N, discretization=method)
            errors[method, L] = float(jnp.max(jnp.abs(c[-1] - ref)))
    for method in ("euler", "bilinear"):
        assert errors[method, 4000] < errors[method, 500] / 4  # first-order (or better) convergence
    assert errors["bilinear", 4000] < 5e-4 and errors["bilinear", 4000] < errors["euler", 4000]


def test_zoh_transition_is_exact(x64):
    """The zero-order-hold step is exp(A log(k/(k-1))): the online states equal the exact projections."""
    import scipy.linalg

    N = 10
    f = jnp.asarray(np.random.default_rng(0).normal(size=(2, 300)))
    c = legs_recurrence(f, N, discretization="zoh")
    for k in (1, 2, 7, 300):
        np.testing.assert_allclose(c[:, k - 1], legs_projection_reference(f[:, :k], N), atol=1e-12)
    A, _ = hippo_legs(N, dtype=jnp.float64)
    impulse = jnp.zeros(40).at[:3].set(jnp.array([1.0, -2.0, 0.5]))  # zero input from t=3 on
    c = legs_recurrence(impulse, N, discretization="zoh")
    np.testing.assert_allclose(c[-1], scipy.linalg.expm(np.asarray(A) * np.log(40 / 3)) @ np.asarray(c[2]),
                               atol=1e-13)
    np.testing.assert_allclose(legs_recurrence(f[0], 1, discretization="zoh")[-1], [f[0].mean()], rtol=1e-12)


def test_zoh_keeps_float32_precision():
    """E_k - I = O(1/k) is formed without cancellation, so rounding does not build up over 4096 steps."""
    L, N = 4096, 32
    t = (np.arange(L) + 0.5) / L
    f = np.sin(40 * t) + 0.5 * np.cos(17 * t ** 2)
    ref = np.asarray(legs_projection_reference(jnp.asarray(f, jnp.float32), N))
    c = np.asarray(legs_recurrence(jnp.asarray(f, jnp.float32), N, discretization="zoh")[-1])
    assert np.linalg.norm(c - ref) / np.linalg.norm(ref) < 1e-4


def test_online_states_are_projections_of_prefixes(x64):
    f = jnp.asarray(_signal(2000))
    c = legs_recurrence(f, 12)
    for k in (400, 1000):
        np.testing.assert_allclose(c[k - 1], legs_projection_reference(f[:k], 12), atol=5e-3)


def test_projection_is_exact_for_piecewise_constant_signals(x64):
    """Independent check: Gauss-Legendre quadrature cell by cell (exact for polynomials on a cell)."""
    L, N = 5, 9
    f = np.random.default_rng(0).normal(size=L)
    nodes, weights = npl.leggauss(16)
    edges = np.linspace(-1, 1, L + 1)
    c_ref = np.zeros(N)
    for k in range(L):
        half = (edges[k + 1] - edges[k]) / 2
        xs = edges[k] + half * (nodes + 1)
        for n in range(N):
            c_ref[n] += 0.5 * np.sqrt(2 * n + 1) * f[k] * half * np.sum(weights * npl.legval(xs, np.eye(N)[n]))
    np.testing.assert_allclose(legs_projection_reference(jnp.asarray(f), N), c_ref, atol=1e-12)


def test_smooth_polynomial_is_captured_by_its_first_coefficients(x64):
    L, N = 2048, 8
    x_mid = 2 * (np.arange(L) + 0.5) / L - 1
    poly = npl.Legendre([0.3, -1.0, 0.5, 0.25])  # degree 3 < N
    c = legs_projection_reference(jnp.asarray(poly(x_mid)), N)
    np.testing.assert_allclose(c[4:], 0.0, atol=1e-6)
    np.testing.assert_allclose(legendre_reconstruct(c, jnp.asarray(x_mid)), poly(x_mid), atol=1e-5)


def test_batched_and_bad_inputs():
    f = jax.random.normal(jax.random.PRNGKey(0), (3, 50))
    batched = legs_recurrence(f, 6)
    assert batched.shape == (3, 50, 6)
    np.testing.assert_allclose(batched[1], legs_recurrence(f[1], 6), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="discretization='rk4'"):
        legs_recurrence(f, 6, discretization="rk4")
    with pytest.raises(ValueError, match=r"\[L\] or \[B, L\]"):
        legs_recurrence(jnp.zeros((2, 3, 4)), 6)
    with pytest.raises(ValueError, match="floating point"):
        legs_projection_reference(jnp.arange(5), 3)
