"""Chapters 9-10: the policy-gradient / actor-critic methods reach (near-)optimal policies.

Tolerances are on ``gap = v* - v_pi`` of the learned policy's greedy version (exact policy evaluation).
The baseline world has a near-tie at row 1, col 2 (three actions within 0.36 of each other), so
on-policy softmax methods, which approach determinism slowly, are held to max gap < 0.4, mean < 0.05."""

import jax
import numpy as np
import pytest

from jaxlab.rl.tabular.common import one_hot_features, uniform_policy
from jaxlab.rl.tabular.policy_gradient import (
    PGConfig,
    a2c,
    deterministic_actor_critic,
    off_policy_actor_critic,
    qac,
    reinforce,
    softmax_policy,
)

from _grid import GAMMA, greedy_gaps, seeds, world_and_v_star


@pytest.fixture(scope="module")
def world():
    return world_and_v_star()


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
    result = jax.vmap(lambda k: fn(k, env, config))(seeds())
    gaps = greedy_gaps(env, v_star, result.pi)
    assert gaps.max() < 0.4 and gaps.mean() < 0.05, gaps
    np.testing.assert_allclose(result.pi, jax.vmap(lambda t: softmax_policy(t, one_hot_features(25)))(result.theta),
                               atol=1e-6)
    assert result.stats.returns.shape == (2, 3000)
