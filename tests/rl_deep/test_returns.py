"""GAE and n-step returns against Python-loop references, and the equivalences between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.returns import gae, gae_reference, n_step_returns, n_step_returns_reference

T, E = 13, 3  # an awkward length


def _trajectory(seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, E)).astype(np.float32)
    values = rng.normal(size=(T, E)).astype(np.float32)
    next_values = rng.normal(size=(T, E)).astype(np.float32)
    terminated = rng.random((T, E)) < 0.15
    truncated = (rng.random((T, E)) < 0.15) & ~terminated
    # A real trajectory's critic agrees with itself: V(s'_t) = V(s_{t+1}) unless the episode ended at t.
    values[1:] = np.where(terminated[:-1] | truncated[:-1], values[1:], next_values[:-1])
    return rewards, values, next_values, terminated, truncated


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    r, v, nv, term, trunc = _trajectory()
    adv, targets = gae(*map(jnp.asarray, (r, v, nv, term, trunc)), gamma, lam)
    ref_adv, ref_targets = gae_reference(r, v, nv, term, trunc, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 4, T, T + 7])
def test_n_step_returns_match_python_loop(n):
    r, _, nv, term, trunc = _trajectory(1)
    got = n_step_returns(*map(jnp.asarray, (r, nv, term, trunc)), 0.9, n)
    np.testing.assert_allclose(got, n_step_returns_reference(r, nv, term, trunc, 0.9, n), rtol=1e-5, atol=1e-5)


def test_equivalent_forms_agree():
    r, v, nv, term, trunc = map(jnp.asarray, _trajectory(2))
    # n >= T is Monte Carlo to the cut: GAE with lambda = 1 (both code paths of n_step_returns).
    _, mc = gae(r, v, nv, term, trunc, 0.95, 1.0)
    np.testing.assert_allclose(n_step_returns(r, nv, term, trunc, 0.95, T), mc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(n_step_returns(r, nv, term, trunc, 0.95, T - 1)[-2:], mc[-2:], rtol=1e-5, atol=1e-5)
    # n = 1 and lambda = 0 are the one-step TD target r + gamma (1 - terminated) V(s').
    td = r + 0.95 * (1.0 - term) * nv
    np.testing.assert_allclose(n_step_returns(r, nv, term, trunc, 0.95, 1), td, rtol=1e-6)
    np.testing.assert_allclose(gae(r, v, nv, term, trunc, 0.95, 0.0)[1], td, rtol=1e-5, atol=1e-6)


def test_truncation_bootstraps_and_termination_does_not():
    """A time limit at t=1 bootstraps from V(s'_1); a terminal state at t=1 contributes nothing after it."""
    r = jnp.ones((3, 1))
    v = nv = jnp.full((3, 1), 10.0)  # a critic that says 10 everywhere
    cut = jnp.array([[False], [True], [False]])
    none = jnp.zeros((3, 1), bool)
    _, truncated = gae(r, v, nv, none, cut, 0.5, 1.0)
    _, terminated = gae(r, v, nv, cut, none, 0.5, 1.0)
    np.testing.assert_allclose(truncated[:, 0], [1 + 0.5 * (1 + 0.5 * 10), 1 + 0.5 * 10, 1 + 0.5 * 10])
    np.testing.assert_allclose(terminated[:, 0], [1 + 0.5 * 1, 1, 1 + 0.5 * 10])


def test_jit_vmap_and_bad_input():
    r, v, nv, term, trunc = map(jnp.asarray, _trajectory(3))
    batched = jax.jit(jax.vmap(lambda *a: gae(*a, 0.9, 0.9)[0], in_axes=1, out_axes=1))(r, v, nv, term, trunc)
    np.testing.assert_allclose(batched, gae(r, v, nv, term, trunc, 0.9, 0.9)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, nv, term, trunc, 1.5, 0.9)
    with pytest.raises(ValueError, match="gae_lambda"):
        gae(r, v, nv, term, trunc, 0.9, -0.1)
    with pytest.raises(ValueError, match="shape"):
        gae(r, v[:-1], nv, term, trunc, 0.9, 0.9)
    with pytest.raises(ValueError, match="n=0"):
        n_step_returns(r, nv, term, trunc, 0.9, 0)
