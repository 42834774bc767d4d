"""S4 (DPLR): HiPPO-LegS's NPLR form, the Cauchy kernel, the generating-function kernel against the dense
unrolled one, and the recurrent form against the convolution (float64 where the check is exactness)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels.hippo import hippo_legs
from jaxlab.kernels.s4_dplr import (cauchy, cauchy_reference, dplr_dense, hippo_legs_dplr, s4, s4_kernel,
                                    s4_kernel_dense_reference, s4_recurrence, s4_step)
from jaxlab.xla_options import FAST_COMPILE

H, N, L = 3, 8, 12
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # compiles dominate these tests


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _random_dplr(seed=0):
    """Stable random half-mode parameters [H, N/2] and steps [H] (complex128)."""
    rng = np.random.default_rng(seed)
    c = lambda s=1.0: s * (rng.standard_normal((H, N // 2)) + 1j * rng.standard_normal((H, N // 2)))  # noqa: E731
    Lambda = -rng.uniform(0.2, 1.0, (H, N // 2)) + 1j * rng.uniform(0, 5, (H, N // 2))
    return tuple(jnp.asarray(x) for x in (Lambda, c(0.3), c(), c())) + (jnp.asarray(rng.uniform(0.05, 0.5, H)),)


def test_hippo_legs_dplr_is_hippo_legs(x64):
    Lambda, P, B, V = hippo_legs_dplr(N)
    A, b = (np.asarray(x) for x in hippo_legs(N, jnp.float64))
    A_d, B_d, _ = (np.asarray(x) for x in dplr_dense(Lambda, P, B, B))
    V_f = np.concatenate([V, V.conj()], axis=1)
    np.testing.assert_allclose(V_f.conj().T @ V_f, np.eye(N), atol=1e-12)        # unitary
    np.testing.assert_allclose(V_f @ A_d @ V_f.conj().T, A, atol=1e-12)
    np.testing.assert_allclose(V_f @ B_d, b, atol=1e-12)
    np.testing.assert_allclose(Lambda.real, -0.5)                                 # normal part -1/2 + skew
    with pytest.raises(ValueError, match="N=5"):
        hippo_legs_dplr(5)


def test_cauchy_kernel_matches_the_naive_sum_values_and_gradients(x64):
    Lambda, P, B, C, dt = _random_dplr()
    z = jnp.asarray(np.random.default_rng(1).standard_normal((H, 7)) * (1 + 1j))

    def loss(fn, v, w):
        r = fn(v, z, w)
        return jnp.sum(r.real * jnp.arange(7)) + jnp.sum(r.imag ** 2)

    @fast_jit
    def both(v, w):
        fast = lambda *a: cauchy(*a, block=3)  # noqa: E731  3 does not divide 7: a partial last block
        grads = [jax.grad(loss, argnums=(1, 2))(fn, v, w) for fn in (fast, cauchy_reference)]
        return fast(v, z, w), cauchy_reference(v, z, w), grads

    r, r_ref, (g, g_ref) = both(C * B, Lambda)
    np.testing.assert_allclose(r, r_ref, rtol=1e-12)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize("length", [L, L - 1])  # even L has the omega = -1 node, odd L does not
def test_hippo_kernel_equals_dense_unrolled_kernel(x64, length):
    A, b = hippo_legs(N, jnp.float64)
    Lambda, P, B, V = hippo_legs_dplr(N)
    c = np.random.default_rng(0).standard_normal((H, N))
    dt = jnp.asarray([0.02, 0.1, 0.5])
    K = s4_kernel(jnp.tile(Lambda, (H, 1)), jnp.tile(P, (H, 1)), jnp.tile(B, (H, 1)), jnp.asarray(c @ V), dt, length)
    K_ref = fast_jit(jax.vmap(s4_kernel_dense_reference, (None, None, 0, 0, None)), static_argnums=4)(
        A, b, jnp.asarray(c), dt, length)
    assert K.shape == (H, length)
    np.testing.assert_allclose(K, K_ref, atol=1e-12 * float(jnp.max(jnp.abs(K_ref))))


def test_random_dplr_kernel_values_and_gradients_equal_dense_reference(x64):
    params = _random_dplr()
    w = jnp.asarray(np.random.default_rng(2).standard_normal((H, L)))

    @jax.vmap  # over channels
    def dense(Lambda, P, B, C, dt):
        return s4_kernel_dense_reference(*dplr_dense(Lambda, P, B, C), dt, L)

    @fast_jit
    def both(params):
        g = jax.grad(lambda p: jnp.sum(w * s4_kernel(*p, L)))(params)
        g_ref = jax.grad(lambda p: jnp.sum(w * dense(*p).real))(params)
        return s4_kernel(*params, L), dense(*params), g, g_ref

    K, K_ref, g, g_ref = both(params)
    np.testing.assert_allclose(K_ref.imag, 0, atol=1e-12)                       # conjugate-symmetric system
    np.testing.assert_allclose(K, K_ref.real, atol=1e-11)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_recurrence_equals_convolution_and_decodes_in_pieces(x64):
    Lambda, P, B, C, dt = _random_dplr(3)
    rng = np.random.default_rng(4)
    u = jnp.asarray(rng.standard_normal((2, L, H)))
    D = jnp.asarray(rng.standard_normal(H))
    @fast_jit
    def run(u):
        y = s4(u, Lambda, P, B, C, dt, D)
        y_rec, last = s4_recurrence(u, Lambda, P, B, C, dt, D, return_state=True)
        # decoding: a prefix, then one s4_step per token from the carried state
        y_pre, x = s4_recurrence(u[:, :5], Lambda, P, B, C, dt, D, return_state=True)
        ys = [y_pre]
        for t in range(5, L):
            x, y_t = s4_step(x, u[:, t], Lambda, P, B, C, dt)
            ys.append((y_t + D * u[:, t])[:, None])
        return y, y_rec, last, jnp.concatenate(ys, axis=1), x

    y, y_rec, last, y_dec, x = run(u)
    np.testing.assert_allclose(y_rec, y, atol=1e-12)
    np.testing.assert_allclose(y_dec, y, atol=1e-12)
    np.testing.assert_allclose(x, last, atol=1e-12)


def test_recurrence_resets_at_segment_starts(x64):
    Lambda, P, B, C, dt = _random_dplr(5)
    u = jnp.asarray(np.random.default_rng(6).standard_normal((1, L, H)))
    seg = jnp.asarray([[0] * 5 + [1] * (L - 5)])
    y, first, second = fast_jit(lambda u: (s4_recurrence(u, Lambda, P, B, C, dt, segment_ids=seg),
                                          s4(u[:, :5], Lambda, P, B, C, dt), s4(u[:, 5:], Lambda, P, B, C, dt)))(u)
    np.testing.assert_allclose(y[:, :5], first, atol=1e-12)
    np.testing.assert_allclose(y[:, 5:], second, atol=1e-12)
    # a carried state enters the first segment only (the row continues a stream); later segments start from 0
    x0 = jnp.asarray(np.random.default_rng(7).standard_normal((1, H, N // 2)) * (1 + 1j))
    y0, y0_first = fast_jit(lambda u: (s4_recurrence(u, Lambda, P, B, C, dt, initial_state=x0, segment_ids=seg),
                                      s4_recurrence(u[:, :5], Lambda, P, B, C, dt, initial_state=x0)))(u)
    np.testing.assert_allclose(y0[:, :5], y0_first, atol=1e-12)
    np.testing.assert_allclose(y0[:, 5:], second, atol=1e-12)


def test_bad_shapes_name_the_tensor():
    Lambda, P, B, C, dt = _random_dplr()
    with pytest.raises(ValueError, match=r"dt \(2,\)"):
        s4_kernel(Lambda, P, B, C, dt[:2], L)
    with pytest.raises(ValueError, match="u must be"):
        s4(jnp.ones((2, L, H + 1)), Lambda, P, B, C, dt)
    with pytest.raises(ValueError, match="initial_state"):
        s4_recurrence(jnp.ones((2, L, H)), Lambda, P, B, C, dt, initial_state=jnp.zeros((2, H, N)))
