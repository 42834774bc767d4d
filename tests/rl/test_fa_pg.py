"""Chapters 8-10: features, the exact TD-linear fixed point, linear Sarsa / Q-learning, and the
policy-gradient / actor-critic methods reaching (near-)optimal policies. (Sampled TD-linear and deep
Q-learning are checked through the ``gridworld-fa`` experiment in test_tabular_experiments.py.)

Tolerances are on ``gap = v* - v_pi`` of the learned policy's greedy version (exact policy evaluation).
The baseline world has a near-tie at row 1, col 2 (three actions within 0.36 of each other), so
on-policy softmax methods, which approach determinism slowly, are held to max gap < 0.4, mean < 0.05."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.envs import book_episodic_grid_world, book_grid_world
from jaxlab.rl.policy_gradient_tabular import (
    PGConfig,
    a2c,
    deterministic_actor_critic,
    off_policy_actor_critic,
    qac,
    reinforce,
    softmax_policy,
)
from jaxlab.rl.tabular import policy_value, value_iteration
from jaxlab.rl.tabular_common import greedy_policy, one_hot_features, uniform_policy
from jaxlab.rl.td import TDConfig, q_learning, sarsa
from jaxlab.rl.value_approximation import (
    fourier_features,
    polynomial_features,
    td_linear_fixed_point,
    visitation_distribution,
)

GAMMA = 0.9


@pytest.fixture(scope="module")
def world():
    env = book_grid_world(start=None)
    v_star, _ = value_iteration(*env.tabular_model(), GAMMA)
    return env, v_star


def _seeds(n=2):
    return jax.random.split(jax.random.PRNGKey(0), n)


def _greedy_gaps(env, v_star, policies):
    return np.stack([np.asarray(v_star - policy_value(env, greedy_policy(pi), GAMMA)) for pi in policies])


def test_features():
    env = book_grid_world()
    poly = polynomial_features(env, 2)
    assert poly.shape == (25, 6)
    np.testing.assert_allclose(poly[:, 0], 1.0)
    np.testing.assert_allclose(poly[env.state_index(0, 4), :3], [1.0, 1.0, -1.0])  # 1, x = col, y = row
    np.testing.assert_allclose(poly[env.state_index(4, 0), 3:], [1.0, -1.0, 1.0])  # x^2, xy, y^2
    four = fourier_features(env, 3)
    assert four.shape == (25, 16)
    np.testing.assert_allclose(four[:, 0], 1.0)
    np.testing.assert_allclose(four[env.state_index(2, 4), 1], np.cos(np.pi * 0.5), atol=1e-6)  # c = (0, 1)
    with pytest.raises(ValueError, match="order"):
        fourier_features(env, -1)


def test_td_linear_fixed_point_is_exact_for_tabular_features(world):
    """The TD-linear fixed point (Sec. 8.2) with one-hot features is v_pi itself; 9 Fourier features
    approximate v_pi well. Sampled TD-linear reaching this fixed point is checked by the ``gridworld-fa``
    smoke test (as is deep Q-learning)."""
    env, _ = world
    P, R = env.tabular_model()
    pi = uniform_policy(25, 5)
    d = visitation_distribution(env, pi, 500)
    np.testing.assert_allclose(d.sum(), 1.0, atol=1e-5)
    assert jnp.all(d > 0)
    v_pi = policy_value(env, pi, GAMMA)
    np.testing.assert_allclose(td_linear_fixed_point(P, R, pi, GAMMA, one_hot_features(25), d), v_pi, atol=1e-4)
    phi = fourier_features(env, 2)
    v_fixed = phi @ td_linear_fixed_point(P, R, pi, GAMMA, phi, d)
    assert float(jnp.sqrt(jnp.mean((v_fixed - v_pi) ** 2))) < 0.3


@pytest.mark.parametrize("name", ["sarsa", "q_learning"])
def test_linear_sarsa_and_q_learning(name):
    """Sec. 8.3 on Chapter 7's episodic world with 16 Fourier features: an optimal path from the start
    (Q-learning: at most two steps longer, value gap < 0.7)."""
    env = book_episodic_grid_world()
    v_star, _ = value_iteration(*env.tabular_model(), GAMMA)
    config = TDConfig(gamma=GAMMA, alpha=0.005, epsilon=0.1, num_episodes=1000, max_episode_steps=200)
    fn = sarsa if name == "sarsa" else q_learning
    result = jax.vmap(lambda k: fn(k, env, config, features=fourier_features(env, 3)))(_seeds())
    gaps = _greedy_gaps(env, v_star, result.q)[:, env.state_index(0, 0)]
    assert np.all(gaps < (1e-4 if name == "sarsa" else 0.7)), gaps


@pytest.mark.parametrize("name", ["reinforce", "qac", "a2c", "off_policy_ac", "dpg"])
def test_policy_gradient_and_actor_critic(world, name):
    env, v_star = world
    uniform = uniform_policy(25, 5)
    cases = {  # 3000 episodes of 30 steps from random cells
        "reinforce": (reinforce, PGConfig(alpha_theta=0.005, num_episodes=3000, max_episode_steps=30)),
        "qac": (qac, PGConfig(alpha_theta=0.02, alpha_w=0.1, num_episodes=3000, max_episode_steps=30)),
        "a2c": (a2c, PGConfig(alpha_theta=0.02, alpha_w=0.1, num_episodes=3000, max_episode_steps=30)),
        "off_policy_ac": (lambda k, e, c: off_policy_actor_critic(k, e, c, uniform),
                          PGConfig(alpha_theta=0.1, alpha_w=0.1, num_episodes=3000, max_episode_steps=30)),
        "dpg": (deterministic_actor_critic,
                PGConfig(alpha_theta=0.005, alpha_w=0.1, num_episodes=3000, max_episode_steps=30)),
    }
    fn, config = cases[name]
    result = jax.vmap(lambda k: fn(k, env, config))(_seeds())
    gaps = _greedy_gaps(env, v_star, result.pi)
    assert gaps.max() < 0.4 and gaps.mean() < 0.05, gaps
    np.testing.assert_allclose(result.pi, jax.vmap(lambda t: softmax_policy(t, one_hot_features(25)))(result.theta),
                               atol=1e-6)
    assert result.stats.returns.shape == (2, 3000)
