"""Chapter 8: features, the exact TD-linear fixed point, linear Sarsa / Q-learning, and the grid-world
deep Q-learning config. (Sampled TD-linear and deep Q-learning runs are checked through the
``gridworld-fa`` experiment in test_tabular_experiments.py.)

Tolerances are on ``gap = v* - v_pi`` of the learned policy's greedy version (exact policy evaluation)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.tabular.common import one_hot_features, uniform_policy
from jaxlab.rl.tabular.dynamic_programming import policy_value, value_iteration
from jaxlab.rl.tabular.gridworld import book_episodic_grid_world, book_grid_world
from jaxlab.rl.tabular.td import TDConfig, q_learning, sarsa
from jaxlab.rl.tabular.value_approximation import (
    GridDQNConfig,
    fourier_features,
    polynomial_features,
    td_linear_fixed_point,
    visitation_distribution,
)

from _grid import GAMMA, greedy_gaps, seeds, world_and_v_star


@pytest.fixture(scope="module")
def world():
    return world_and_v_star()


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
    result = jax.vmap(lambda k: fn(k, env, config, features=fourier_features(env, 3)))(seeds())
    gaps = greedy_gaps(env, v_star, result.q)[:, env.state_index(0, 0)]
    assert np.all(gaps < (1e-4 if name == "sarsa" else 0.7)), gaps


def test_grid_dqn_config_shares_deep_dqn_field_names():
    """Fields that mean the same as deep RL's ``DQNConfig`` carry its names; invalid values name the field."""
    from jaxlab.rl.dqn import DQNConfig

    shared = {"gamma", "num_envs", "learning_rate", "anneal_lr", "batch_size", "buffer_size", "hidden_sizes",
              "activation", "layer_norm", "target_update_interval"}
    assert shared <= {f.name for f in dataclasses.fields(GridDQNConfig)}
    assert shared <= {f.name for f in dataclasses.fields(DQNConfig)}
    assert GridDQNConfig().learning_updates == 3000 - 13 + 1  # 8 envs fill a batch of 100 at iteration 13
    for field, value in [("hidden_sizes", ()), ("activation", "swish"), ("buffer_size", 0),
                         ("target_update_interval", 0), ("num_envs", 20_000)]:
        with pytest.raises(ValueError, match=field):
            GridDQNConfig(**{field: value})
