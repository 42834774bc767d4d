"""Chapter 7: TD(0) matches the Bellman solution; the n-step machinery is checked by hand; arguments are
validated. (Sarsa, Expected Sarsa, n-step Sarsa and on-/off-policy Q-learning finding the optimal path
are checked through the ``gridworld-td`` experiment in test_tabular_experiments.py, which runs exactly
that setting; linear-feature TD control in test_value_approximation.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.tabular.common import uniform_policy
from jaxlab.rl.tabular.dynamic_programming import policy_value
from jaxlab.rl.tabular.gridworld import GridWorld, book_grid_world
from jaxlab.rl.tabular.td import TDConfig, n_step_sarsa, q_learning, sarsa, td_control, td_state_values

GAMMA = 0.9
RIGHT = 1


@pytest.fixture(scope="module")
def env():
    return book_grid_world(start=None)  # episodes start anywhere, so every state is learned


def _seeds(n=2):
    return jax.random.split(jax.random.PRNGKey(0), n)


def test_td0_state_values_match_the_bellman_solution(env):
    pi = uniform_policy(env.num_states, env.num_actions)
    config = TDConfig(gamma=GAMMA, alpha=0.01, num_episodes=200, max_episode_steps=500)
    result = jax.vmap(lambda k: td_state_values(k, env, pi, config))(_seeds())
    v_pi = policy_value(env, pi, GAMMA)
    err = jnp.abs(result.v - v_pi)
    assert float(jnp.sqrt(jnp.mean(err**2))) < 0.15 and float(err.max()) < 0.5
    assert result.stats.lengths.shape == (2, 200) and jnp.all(result.stats.lengths == 500)


def test_n_step_returns_by_hand():
    """Corridor s0 s1 s2 T, rewards -1 per move and 0 into T, greedy (epsilon 0) on q(., right) = 5,
    alpha = 1, n = 2: q(s0, R) = -1 + 0.9 (-1) + 0.81 * 5 = 2.15 (main update), q(s1, R) = -1 + 0.9 * 0
    (terminal bootstrap 0), q(s2, R) = 0 (flushed one-step return at the episode's end)."""
    env = GridWorld(layout=("...T",), r_boundary=-1.0, r_forbidden=-1.0, r_target=0.0, r_other=-1.0,
                    episodic=True)
    w0 = jnp.zeros((5, 4)).at[RIGHT].set(5.0)
    config = TDConfig(gamma=0.9, alpha=1.0, epsilon=0.0, num_episodes=1, max_episode_steps=10, n_step=2)
    result = n_step_sarsa(jax.random.PRNGKey(0), env, config, w0=w0)
    np.testing.assert_allclose(result.q[:3, RIGHT], [2.15, -1.0, 0.0], atol=1e-6)
    assert int(result.stats.lengths[0]) == 3 and float(result.stats.returns[0]) == -2.0
    np.testing.assert_allclose(result.q[:, [0, 2, 3, 4]], 0.0)


def test_td_arguments_are_validated(env):
    with pytest.raises(ValueError, match="n_step"):
        q_learning(_seeds()[0], env, TDConfig(n_step=2))
    with pytest.raises(ValueError, match="on-policy"):
        td_control(_seeds()[0], env, TDConfig(), "sarsa", behaviour=uniform_policy(25, 5))
    with pytest.raises(ValueError, match="alpha"):
        TDConfig(alpha=0.0)
    with pytest.raises(ValueError, match="features.shape"):
        sarsa(_seeds()[0], env, TDConfig(), features=jnp.ones((3, 2)))
