"""The grid world: layout validation, the book's reward conventions, the exact model against samples,
gymnax API conformance (6-tuple step, auto-reset, jit/vmap, wrappers), and its plots."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from gymnax.wrappers.purerl import LogWrapper

from jaxlab.rl.tabular.gridworld import BOOK_LAYOUT, GridWorld, book_episodic_grid_world, book_grid_world
from jaxlab.rl.tabular.plot import plot_grid_world, plot_grid_worlds

UP, RIGHT, DOWN, LEFT, STAY = range(5)


@pytest.mark.parametrize(
    "layout, match",
    [
        ((".....", "....."), "no target"),
        ((".T..", "..."), "ragged"),
        (("..T", ".x."), "unknown layout character 'x' at row 1, column 1"),
        ((), "at least one row"),
        (("",), "non-empty"),
    ],
)
def test_bad_layouts_raise(layout, match):
    with pytest.raises(ValueError, match=match):
        GridWorld(layout=layout)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slip=1.5), "slip"),
        (dict(obs_type="pixels"), "obs_type"),
        (dict(start=(7, 0)), "outside"),
        (dict(start=(3, 2), episodic=True), "target"),
        (dict(r_other=float("nan")), "r_other"),
        (dict(max_steps_in_episode=0), "max_steps_in_episode"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridWorld(BOOK_LAYOUT, **kwargs)


def test_book_conventions_in_the_model():
    env = GridWorld(layout=BOOK_LAYOUT, r_boundary=-1.0, r_forbidden=-2.0, r_target=1.0, r_other=0.5)
    P, R = env.tabular_model()
    assert P.shape == (25, 5, 25) and R.shape == (25, 5)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-6)
    s = env.state_index
    # Off the grid: stay in place, r_boundary.
    assert P[s(0, 0), UP, s(0, 0)] == 1 and R[s(0, 0), UP] == -1.0 and R[s(0, 0), LEFT] == -1.0
    # Into a forbidden cell (row 2, col 2 in the book's 1-indexing) is allowed and pays r_forbidden.
    assert P[s(0, 1), DOWN, s(1, 1)] == 1 and R[s(0, 1), DOWN] == -2.0
    # Staying on a forbidden cell pays r_forbidden, staying on the target r_target.
    assert R[s(1, 1), STAY] == -2.0 and R[s(3, 2), STAY] == 1.0 and P[s(3, 2), STAY, s(3, 2)] == 1
    # Entering the target (row 4, col 3) from below pays r_target; other moves r_other.
    assert P[s(4, 2), UP, s(3, 2)] == 1 and R[s(4, 2), UP] == 1.0 and R[s(0, 0), RIGHT] == 0.5
    assert env.target.sum() == 1 and env.forbidden.sum() == 6


def test_episodic_target_is_absorbing_and_terminal():
    env = book_episodic_grid_world()
    P, R = env.tabular_model()
    t = env.state_index(3, 2)
    assert jnp.all(P[t, :, t] == 1) and jnp.all(R[t] == 0)
    s_next, r, terminated = env.transition(jax.random.PRNGKey(0), env.state_index(4, 2), UP)
    assert int(s_next) == t and float(r) == 0.0 and bool(terminated)


def test_arbitrary_layout_with_two_targets():
    env = GridWorld(layout="T.#....\n...#..T\n", r_target=2.0)
    assert env.shape == (2, 7) and env.num_states == 14 and env.target.sum() == 2
    P, R = env.tabular_model()
    assert R[env.state_index(1, 5), RIGHT] == 2.0 and P[env.state_index(0, 1), LEFT, 0] == 1


def test_slip_model_matches_sampled_transitions():
    env = GridWorld(layout=("...", ".T.", "#.."), slip=0.4)
    P, R = env.tabular_model()
    s, a, n = env.state_index(1, 0), RIGHT, 20_000
    sample = jax.jit(jax.vmap(env.transition, in_axes=(0, None, None)))
    s_next, r, _ = sample(jax.random.split(jax.random.PRNGKey(1), n), s, a)
    empirical = jnp.bincount(s_next, length=env.num_states) / n
    np.testing.assert_allclose(empirical, P[s, a], atol=0.015)
    np.testing.assert_allclose(r.mean(), R[s, a], atol=0.03)
    # The intended move keeps 1 - slip + slip / 5 of the mass.
    np.testing.assert_allclose(P[s, a, env.state_index(1, 1)], 0.6 + 0.08, atol=1e-6)


def test_equal_configurations_share_jit_caches():
    a, b = book_grid_world(), book_grid_world()
    assert a == b and hash(a) == hash(b)
    assert a != book_grid_world(slip=0.1)


@pytest.mark.parametrize("obs_type, shape", [("one_hot", (25,)), ("coords", (2,)), ("index", ())])
def test_gymnax_reset_and_observation_spaces(obs_type, shape):
    env = book_grid_world(obs_type=obs_type)
    obs, state = env.reset(jax.random.PRNGKey(0))
    assert obs.shape == shape
    assert bool(env.observation_space(env.default_params).contains(obs))
    assert int(state.position) == 0 and int(state.time) == 0
    assert env.action_space(env.default_params).n == 5 and env.num_actions == 5


def test_gymnax_step_autoresets_on_termination():
    env = book_episodic_grid_world(obs_type="coords", start=(4, 2))
    params = env.default_params
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    out = env.step(jax.random.PRNGKey(1), state, UP, params)
    assert len(out) == 6
    obs, state, reward, terminated, truncated, info = out
    assert bool(terminated) and not bool(truncated) and float(reward) == 0.0
    np.testing.assert_array_equal(info["final_observation"], [3, 2])  # landed on the target ...
    np.testing.assert_array_equal(obs, [4, 2])  # ... and the returned observation is the reset one
    assert int(state.time) == 0 and int(state.position) == env.state_index(4, 2)


def test_gymnax_truncation_jit_and_vmap():
    env = book_grid_world(max_steps_in_episode=3)
    params = env.default_params
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    actions = jnp.array([RIGHT, DOWN, STAY, LEFT])
    for t in range(3):
        obs, state, reward, terminated, truncated, info = step(keys, state, actions, params)
    assert obs.shape == (4, 25) and reward.shape == (4,)
    assert jnp.all(truncated) and not jnp.any(terminated) and jnp.all(state.time == 0)
    # The final observations before the reset: 3 x right -> (0, 3); 3 x down -> (3, 0); stay; left bumps.
    np.testing.assert_array_equal(jnp.argmax(info["final_observation"], -1), [3, 15, 0, 0])


def test_gymnax_log_wrapper_counts_episode_returns():
    env = LogWrapper(book_episodic_grid_world(start=(4, 2)))
    obs, state = env.reset(jax.random.PRNGKey(0))
    obs, state, reward, terminated, truncated, info = env.step(jax.random.PRNGKey(1), state, RIGHT)
    obs, state, reward, terminated, truncated, info = env.step(jax.random.PRNGKey(2), state, LEFT)
    assert not bool(terminated)
    obs, state, reward, terminated, truncated, info = env.step(jax.random.PRNGKey(3), state, UP)
    assert bool(info["returned_episode"]) and int(info["returned_episode_lengths"]) == 3
    assert float(info["returned_episode_returns"]) == -2.0  # -1 (other), -1 (other), 0 (target)


def test_plotting_draws_values_and_arrows():
    env = book_grid_world()
    pi = jnp.full((25, 5), 0.2)
    fig, ax = plt.subplots()
    image = plot_grid_world(ax, env, values=jnp.arange(25.0), policy=pi, title="uniform")
    assert image is not None and len(ax.texts) == 25  # one number per cell
    assert len(ax.patches) >= 25 * 5  # four arrows and a circle per cell, plus forbidden/target cells
    plt.close(fig)
    fig = plot_grid_worlds(env, [None, jnp.zeros(25)], [pi, None], ["a", "b"])
    assert len(fig.axes) >= 2
    plt.close(fig)


def test_importing_the_plots_keeps_the_active_backend(tmp_path):
    """A notebook's backend survives ``import jaxlab.rl.tabular.plot`` (run from ``tmp_path`` so the source
    folder ``jaxlab/`` does not shadow the installed package)."""
    code = ("import matplotlib; matplotlib.use('svg'); import jaxlab.rl.tabular.plot; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
