"""Stochastic approximation (Zhao, Chapter 6): incremental mean estimation, the Robbins-Monro
algorithm, and stochastic / batch / mini-batch gradient descent.

* **Mean estimation** (Sec. 6.1): ``w_{k+1} = w_k - a_k (w_k - x_k)``; with ``a_k = 1/k`` the iterate
  ``w_{k+1}`` is exactly the sample mean of ``x_1, ..., x_k``.
* **Robbins-Monro** (Sec. 6.2) finds a root of ``g(w) = 0`` from noisy observations
  ``g~(w, eta)``, e.g. ``g(w) + eta``: ``w_{k+1} = w_k - a_k g~(w_k, eta_k)``. It converges almost surely when
  ``g`` is increasing with bounded slope, ``sum a_k = inf``, ``sum a_k^2 < inf`` and the noise has
  zero mean and bounded variance (Theorem 6.1); ``a_k = a0 / k^p`` satisfies the step-size conditions
  for ``1/2 < p <= 1``. Mean estimation is the case ``g(w) = w - E[X]``.
* **Gradient descent** (Sec. 6.4) on ``J(w) = E[f(w, X)]`` from ``n`` samples: BGD uses all samples per
  step, ``w_{k+1} = w_k - a_k (1/n) sum_i grad f(w_k, x_i)``; mini-batch GD (MBGD) ``m`` samples drawn
  i.i.d. (with replacement); SGD one sample. SGD is Robbins-Monro applied to ``grad J(w) = 0``.

Step sizes are ``a_k = a0 / k^power`` with ``k = 1, 2, ...`` (``power = 0``: constant). Every function
returns the whole trajectory of iterates ``[K + 1, ...]`` (``w_1`` first) and is jittable and
vmappable over keys.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

__all__ = [
    "gradient_descent",
    "mean_estimation",
    "mean_estimation_gradient_descent",
    "robbins_monro",
    "step_sizes",
]


def _check_schedule(a0: float, power: float, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if not a0 > 0:
        raise ValueError(f"a0={a0} must be > 0")
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power={power} must lie in [0, 1] (Robbins-Monro needs 1/2 < power <= 1)")


def step_sizes(num_steps: int, a0: float = 1.0, power: float = 1.0) -> jax.Array:
    """``a_k = a0 / k^power`` for ``k = 1..num_steps``, ``[K]``."""
    return a0 / jnp.arange(1, num_steps + 1, dtype=jnp.float32) ** power


def _trajectory(w1: jax.Array, ws: jax.Array) -> jax.Array:
    return jnp.concatenate([w1[None], ws])


def mean_estimation(samples: jax.Array, w1: jax.Array | float = 0.0, a0: float = 1.0,
                    power: float = 1.0) -> jax.Array:
    """Incremental mean ``w_{k+1} = w_k - a_k (w_k - x_k)`` over ``samples [K, ...]``; returns
    ``[K + 1, ...]``. With ``a0 = 1, power = 1`` row ``k`` is the mean of the first ``k`` samples."""
    _check_schedule(a0, power, samples.shape[0])
    w1 = jnp.broadcast_to(jnp.asarray(w1, samples.dtype), samples.shape[1:])
    return _mean_estimation(samples, w1, step_sizes(samples.shape[0], a0, power).astype(samples.dtype))


@jax.jit
def _mean_estimation(samples, w1, a):
    def step(w, x_a):
        x, a_k = x_a
        w = w - a_k * (w - x)
        return w, w

    return _trajectory(w1, jax.lax.scan(step, w1, (samples, a))[1])


def robbins_monro(key: jax.Array, g_tilde: Callable[[jax.Array, jax.Array], jax.Array], w1: jax.Array | float,
                  num_steps: int, a0: float = 1.0, power: float = 1.0) -> jax.Array:
    """Robbins-Monro ``w_{k+1} = w_k - a_k g~(w_k, eta_k)``. ``g_tilde(w, eta)`` is one noisy
    observation of ``g(w)`` given a standard-normal draw ``eta`` shaped like ``w`` (e.g.
    ``g(w) + sigma * eta``); the draws are made in one batch before the loop. ``g_tilde`` is a static
    argument of the jit (a hashable callable). Returns the iterates ``[K + 1, ...]``."""
    _check_schedule(a0, power, num_steps)
    w1 = jnp.asarray(w1, jnp.float32)
    eta = jax.random.normal(key, (num_steps * w1.size,)).reshape(num_steps, *w1.shape)  # [K, ...], drawn flat
    return _robbins_monro(g_tilde, w1, eta, step_sizes(num_steps, a0, power))


@partial(jax.jit, static_argnames=("g_tilde",))
def _robbins_monro(g_tilde, w1, eta, a):
    def step(w, eta_a):
        eta_k, a_k = eta_a
        w = w - a_k * g_tilde(w, eta_k)
        return w, w

    return _trajectory(w1, jax.lax.scan(step, w1, (eta, a))[1])


def gradient_descent(key: jax.Array, grad_fn: Callable[[jax.Array, jax.Array], jax.Array], data: jax.Array,
                     w1: jax.Array, batch_size: int, num_steps: int, a0: float = 1.0,
                     power: float = 1.0) -> jax.Array:
    """Minimise ``J(w) = (1/n) sum_i f(w, x_i)`` over ``data [n, ...]`` with ``grad_fn(w, x)`` the
    gradient of ``f`` at one sample. ``batch_size = n``: BGD (every sample, every step); ``1``: SGD;
    in between: MBGD with i.i.d. draws. Returns the iterates ``[K + 1, ...]``."""
    n = data.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must lie in [1, n={n}]")
    _check_schedule(a0, power, num_steps)
    return _gradient_descent(key, grad_fn, data, jnp.asarray(w1, data.dtype), batch_size, num_steps,
                             step_sizes(num_steps, a0, power).astype(data.dtype))


@partial(jax.jit, static_argnames=("grad_fn", "batch_size", "num_steps"))
def _gradient_descent(key, grad_fn, data, w1, batch_size, num_steps, a):
    n = data.shape[0]
    batch_grad = jax.vmap(grad_fn, in_axes=(None, 0))
    full = batch_size == n
    # i.i.d. indices, drawn flat (a [K, m] draw compiles far slower on CPU) by flooring n * U[0, 1).
    u = jax.random.uniform(key, (num_steps * batch_size,)).reshape(num_steps, batch_size)
    idx = jnp.zeros((num_steps, 0), jnp.int32) if full else jnp.minimum((u * n).astype(jnp.int32), n - 1)

    def step(w, idx_a):
        idx_k, a_k = idx_a
        batch = data if full else data[idx_k]  # [m, ...]: all samples (BGD) or i.i.d. draws
        w = w - a_k * batch_grad(w, batch).mean(axis=0)
        return w, w

    return _trajectory(w1, jax.lax.scan(step, w1, (idx, a))[1])


def _mean_gradient(w: jax.Array, x: jax.Array) -> jax.Array:
    """Gradient of ``f(w, x) = ||w - x||^2 / 2``, whose expectation is minimised by ``w = E[X]``."""
    return w - x


def mean_estimation_gradient_descent(key: jax.Array, data: jax.Array, w1: jax.Array, batch_size: int,
                                     num_steps: int, a0: float = 1.0, power: float = 1.0) -> jax.Array:
    """The book's comparison problem (Sec. 6.4): estimate ``E[X]`` by minimising
    ``E[||w - X||^2 / 2]`` with BGD / MBGD / SGD (see :func:`gradient_descent`)."""
    return gradient_descent(key, _mean_gradient, data, w1, batch_size, num_steps, a0, power)
