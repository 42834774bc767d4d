"""HiPPO-LegT and LagT: the paper's matrices, and the online state reconstructing what each measure weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import laguerre as npla

from jaxlab.kernels.hippo import (hippo_lagt, hippo_legt, lagt_projection_reference, lagt_recurrence, laguerre,
                                  laguerre_reconstruct, legt_projection_reference, legt_reconstruct, legt_recurrence)
from jaxlab.xla_options import FAST_COMPILE

fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # compiles dominate these tests


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_legt_matrices_are_the_papers_up_to_basis_scaling():
    # Theorem 1 (LegT) for c'_n = (-1)^n sqrt(2n+1) c_n: dc'/dt = -A' c' + B' f with
    # A'_nk = (2n+1)/theta * ((-1)^(n-k) if n >= k else 1), B'_n = (2n+1) (-1)^n / theta.
    N, theta = 6, 2.5
    A, B = (np.asarray(x, np.float64) for x in hippo_legt(N, theta))
    n = np.arange(N)
    T = np.diag((-1.0) ** n * np.sqrt(2 * n + 1))
    A_paper = (2 * n[:, None] + 1) / theta * np.where(n[:, None] >= n[None, :], (-1.0) ** (n[:, None] - n[None, :]), 1)
    np.testing.assert_allclose(-T @ A @ np.linalg.inv(T), A_paper, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(T @ B, (2 * n + 1) * (-1.0) ** n / theta, rtol=1e-5)
    with pytest.raises(ValueError, match="theta=0"):
        hippo_legt(4, 0)


def test_lagt_matrices_and_laguerre_basis():
    A, B = hippo_lagt(4)
    np.testing.assert_array_equal(A, -np.tril(np.ones((4, 4))))           # Theorem 1 (LagT): A_nk = 1 (n >= k)
    np.testing.assert_array_equal(B, np.ones(4))
    y = np.linspace(0, 6, 13)
    ref = np.stack([npla.lagval(y, np.eye(7)[n]) for n in range(7)])
    np.testing.assert_allclose(laguerre(7, jnp.asarray(y)), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="N=0"):
        hippo_lagt(0)


def test_lagt_recurrence_is_the_exact_projection_and_reconstructs_the_recent_past(x64):
    dt, L = 0.05, 200
    t = (np.arange(L) + 0.5) * dt
    fn = lambda s: np.sin(0.5 * s) + 0.3 * np.cos(0.2 * s)  # noqa: E731
    f = jnp.asarray(fn(t))
    lag = jnp.linspace(0.0, 3.0, 31)                                       # where e^{-lag} weighs the past

    @fast_jit  # one compiled program for every N
    def run(f):
        out = []
        for N in (4, 8, 16):
            c = lagt_recurrence(f, N, dt=dt)
            out.append((c, lagt_projection_reference(f, N, dt=dt), lagt_projection_reference(f[:L // 2], N, dt=dt),
                        laguerre_reconstruct(c[-1], lag)))
        return out

    errors = []
    for c, ref, ref_half, recon in run(f):
        # zero-order hold is exact for the held signal: the state is the projection, up to rounding
        np.testing.assert_allclose(c[-1], ref, atol=1e-12)
        np.testing.assert_allclose(c[L // 2 - 1], ref_half, atol=1e-12)
        errors.append(float(jnp.max(jnp.abs(recon - fn(L * dt - np.asarray(lag))))))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors


def test_legt_reconstructs_the_sliding_window_with_error_falling_in_N(x64):
    dt, L, theta = 2e-3, 1000, 1.0                                          # t = 2: the window is [1, 2]
    fn = lambda s: np.sin(2 * np.pi * 0.7 * s) + 0.5 * np.cos(3 * s)  # noqa: E731
    f = jnp.asarray(fn((np.arange(L) + 0.5) * dt))                         # midpoints: hold error O(dt^2)
    lag = jnp.linspace(0.0, theta, 41)
    window = fn(L * dt - np.asarray(lag))
    @fast_jit  # one compiled program for every N
    def run(f):
        out = []
        for N in (4, 8, 16):
            c = legt_recurrence(f, N, theta=theta, dt=dt)[-1]
            out.append((legt_reconstruct(c, lag, theta), c - legt_projection_reference(f, N, theta=theta, dt=dt)))
        return out

    errors, drift = [], []
    for recon, diff in run(f):
        errors.append(float(jnp.max(jnp.abs(recon - window))))
        drift.append(float(jnp.max(jnp.abs(diff))))
    # the window is forgotten beyond theta: the state tracks the window's projection, not the whole history
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors
    assert drift[0] > drift[1] > drift[2] and drift[2] < 1e-4, drift


def test_legt_projection_reference_is_a_window_projection(x64):
    # a signal that vanishes on the window has zero coefficients, whatever it did before
    f = jnp.concatenate([jnp.ones(30), jnp.zeros(20)])
    np.testing.assert_allclose(legt_projection_reference(f, 5, theta=20.0), 0.0, atol=1e-14)
    # a constant on the whole window projects onto P_0 only, with coefficient equal to the constant
    c = legt_projection_reference(jnp.full((2, 50), 3.0), 5, theta=20.0)
    np.testing.assert_allclose(c, np.tile([3.0, 0, 0, 0, 0], (2, 1)), atol=1e-12)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="discretization='euler'"):
        lagt_recurrence(jnp.ones(4), 3, discretization="euler")
    with pytest.raises(ValueError, match="f must be"):
        legt_recurrence(jnp.ones((2, 3, 4)), 3)
    with pytest.raises(ValueError, match="dt=0"):
        lagt_recurrence(jnp.ones(4), 3, dt=0.0)
