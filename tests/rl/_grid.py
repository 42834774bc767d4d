"""Shared by the grid-world policy-gradient and value-approximation tests: the book's grid world with its
optimal values, seeds, and the value gap of a learned policy's greedy version."""

import jax
import numpy as np

from jaxlab.rl.tabular.common import greedy_policy
from jaxlab.rl.tabular.dynamic_programming import policy_value, value_iteration
from jaxlab.rl.tabular.gridworld import book_grid_world

GAMMA = 0.9


def world_and_v_star():
    env = book_grid_world(start=None)
    v_star, _ = value_iteration(*env.tabular_model(), GAMMA)
    return env, v_star


def seeds(n=2):
    return jax.random.split(jax.random.PRNGKey(0), n)


def greedy_gaps(env, v_star, policies):
    """``v* - v_pi`` of each policy's greedy version (exact evaluation): [R, S]."""
    return np.stack([np.asarray(v_star - policy_value(env, greedy_policy(pi), GAMMA)) for pi in policies])
