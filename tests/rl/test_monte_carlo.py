"""Chapter 5: Monte Carlo control reaches optimal policies on the book's grid under fixed seeds, vmapped
over seeds. (MC epsilon-greedy against the best epsilon-greedy policy is checked through the
``gridworld-mc`` experiment in test_tabular_experiments.py.)

Tolerances are on ``gap = v* - v_pi`` (``v_pi`` by exact policy evaluation of the learned greedy
policy)."""

import jax
import numpy as np
import pytest

from jaxlab.rl.tabular.dynamic_programming import policy_value, value_iteration
from jaxlab.rl.tabular.gridworld import book_grid_world
from jaxlab.rl.tabular.monte_carlo import MCBasicConfig, MCConfig, mc_basic, mc_epsilon_greedy, mc_exploring_starts

GAMMA = 0.9


@pytest.fixture(scope="module")
def world():
    env = book_grid_world(start=None)  # episodes start anywhere, so every state is learned
    v_star, _ = value_iteration(*env.tabular_model(), GAMMA)
    return env, v_star


def _seeds(n=2):
    return jax.random.split(jax.random.PRNGKey(0), n)


def _gaps(env, v_star, policies):
    return np.stack([np.asarray(v_star - policy_value(env, pi, GAMMA)) for pi in policies])


def test_mc_basic_is_exact_on_the_deterministic_grid(world):
    env, v_star = world
    config = MCBasicConfig(gamma=GAMMA, episode_length=15, num_iterations=8)
    result = jax.vmap(lambda k: mc_basic(k, env, config))(_seeds())
    assert np.abs(_gaps(env, v_star, result.pi)).max() < 1e-4


def test_mc_exploring_starts(world):
    """Exploring starts, first visits, constant step 0.2 (forgets the returns of earlier policies): optimal.
    MC epsilon-greedy against the best epsilon-greedy policy is checked by the ``gridworld-mc`` smoke test."""
    env, v_star = world
    es = MCConfig(gamma=GAMMA, episode_length=40, num_episodes=6000, step_size=0.2)
    result = jax.vmap(lambda k: mc_exploring_starts(k, env, es))(_seeds())
    assert np.abs(_gaps(env, v_star, result.pi)).max() < 1e-4
    eps = MCConfig(gamma=GAMMA, episode_length=40, num_episodes=6000, epsilon=0.2, exploring_starts=False)
    with pytest.raises(ValueError, match="epsilon"):
        mc_exploring_starts(_seeds()[0], env, eps)
    with pytest.raises(ValueError, match="epsilon"):
        mc_epsilon_greedy(_seeds()[0], env, es)
