"""Chapter 6: incremental mean = sample mean, Robbins-Monro finds the root of a noisy increasing
function, BGD / MBGD / SGD converge to the mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.stochastic_approximation import (
    gradient_descent,
    mean_estimation,
    mean_estimation_gradient_descent,
    robbins_monro,
    step_sizes,
)


def _noisy_tanh(w, eta):
    """g(w) = tanh(w - 1) observed with N(0, 0.5^2) noise; the root is w* = 1 (the book's Sec. 6.2 example)."""
    return jnp.tanh(w - 1.0) + 0.5 * eta


def test_incremental_mean_is_the_sample_mean():
    x = jax.random.normal(jax.random.PRNGKey(0), (200, 3)) * 2.0 + 5.0
    w = mean_estimation(x, w1=100.0)  # a_1 = 1 forgets w_1 at once
    assert w.shape == (201, 3)
    np.testing.assert_allclose(w[1:], jnp.cumsum(x, 0) / jnp.arange(1, 201)[:, None], rtol=1e-5)


def test_robbins_monro_converges_to_the_root():
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    w = jax.vmap(lambda k: robbins_monro(k, _noisy_tanh, 3.0, num_steps=5000))(keys)  # a_k = 1/k
    assert w.shape == (4, 5001)
    np.testing.assert_allclose(w[:, -1], 1.0, atol=0.1)
    assert float(jnp.abs(w[:, -1] - 1).mean()) < float(jnp.abs(w[:, 50] - 1).mean())
    # Noise-free with a_k = 1/k from w_1 = 3: monotone decrease towards the root.
    w_clean = robbins_monro(keys[0], _clean_tanh, 3.0, num_steps=200)
    assert jnp.all(jnp.diff(w_clean) <= 0) and float(w_clean[-1]) > 1.0 and float(w_clean[-1]) < 1.2


def _clean_tanh(w, eta):
    return jnp.tanh(w - 1.0)


def test_bgd_mbgd_sgd_converge_to_the_mean():
    x = jax.random.uniform(jax.random.PRNGKey(2), (100, 2), minval=-10.0, maxval=10.0)
    mean = x.mean(0)
    w1 = jnp.array([20.0, 20.0])
    bgd = mean_estimation_gradient_descent(jax.random.PRNGKey(3), x, w1, batch_size=100, num_steps=50)
    np.testing.assert_allclose(bgd[1], mean, atol=1e-5)  # a_1 = 1 jumps straight to the batch mean
    errors = {}
    for m in (1, 10):
        w = jax.vmap(lambda k: mean_estimation_gradient_descent(k, x, w1, batch_size=m, num_steps=2000))(
            jax.random.split(jax.random.PRNGKey(4), 8))
        errors[m] = float(jnp.linalg.norm(w[:, -1] - mean, axis=-1).mean())
    # SGD's error shrinks like 1 / sqrt(k); a mini-batch of m cuts the gradient noise by sqrt(m).
    assert errors[1] < 1.0 and errors[10] < 0.6 * errors[1]


def test_generic_gradient_descent_on_least_squares():
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    w_true = jnp.array([1.5, -2.0])
    X = jax.random.normal(k1, (256, 2))
    data = jnp.concatenate([X, (X @ w_true)[:, None]], axis=1)  # [n, 3] = (x, y)

    def grad_fn(w, row):
        return (row[:2] @ w - row[2]) * row[:2]

    w = gradient_descent(k2, grad_fn, data, jnp.zeros(2), batch_size=16, num_steps=3000, a0=0.1, power=0.6)
    np.testing.assert_allclose(w[-1], w_true, atol=0.05)


def test_step_sizes_and_validation():
    np.testing.assert_allclose(step_sizes(4, a0=2.0, power=1.0), [2.0, 1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(step_sizes(3, power=0.0), [1.0, 1.0, 1.0])
    x = jnp.zeros((10, 2))
    with pytest.raises(ValueError, match="batch_size"):
        mean_estimation_gradient_descent(jax.random.PRNGKey(0), x, jnp.zeros(2), batch_size=11, num_steps=5)
    with pytest.raises(ValueError, match="power"):
        mean_estimation(x, power=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        robbins_monro(jax.random.PRNGKey(0), _clean_tanh, 0.0, num_steps=0)
