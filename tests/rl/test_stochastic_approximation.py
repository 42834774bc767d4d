"""Chapter 6: incremental mean = sample mean, Robbins-Monro finds the root of a noisy increasing
function, BGD / MBGD / SGD converge to the mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.tabular.stochastic_approximation import (
    gradient_descent,
    mean_estimation,
    mean_estimation_gradient_descent,
    robbins_monro,
    step_sizes,
)


def _clean_tanh(w, eta):
    return jnp.tanh(w - 1.0)


def test_incremental_mean_and_robbins_monro_by_hand():
    """a_1 = 1 forgets w_1; row k is the mean of the first k samples. Noise-free Robbins-Monro on
    tanh(w - 1) from w_1 = 3 with a_k = 1/k decreases monotonically towards the root. (Convergence under
    noise, and BGD / MBGD / SGD, are checked through the ``sa-mean`` experiment's smoke test.)"""
    x = jnp.array([[2.0], [4.0], [9.0]])
    np.testing.assert_allclose(mean_estimation(x, w1=100.0)[:, 0], [100.0, 2.0, 3.0, 5.0], rtol=1e-6)
    w = robbins_monro(jax.random.PRNGKey(0), _clean_tanh, 3.0, num_steps=200)
    assert w.shape == (201,)
    np.testing.assert_allclose(w[1], 3.0 - np.tanh(2.0), rtol=1e-6)
    assert jnp.all(jnp.diff(w) <= 0) and 1.0 < float(w[-1]) < 1.2


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
