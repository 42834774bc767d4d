"""Smoke tests of the tabular-RL experiments (``gridworld-*``, ``sa-mean``) at tiny sizes: each writes its
figure and returns JSON-able metrics whose numbers make sense (known answers where there are some)."""

import json

import numpy as np
import pytest

from jaxlab.context import RunContext
from jaxlab.experiments import gridworld_dp, gridworld_fa, gridworld_mc, gridworld_td, sa_mean
from jaxlab.registry import Claim, get_experiment


def _run(name, cfg, tmp_path):
    exp = get_experiment(name)
    assert isinstance(cfg, exp.config_cls)
    result = exp.fn(cfg, RunContext(name, tmp_path, quick=True, show_progress=False))
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert result.summary
    assert result.claims and all(isinstance(c, Claim) for c in result.claims)
    return result, json.loads(json.dumps(result.metrics))  # JSON-able


def test_gridworld_optimal(tmp_path):
    result, m = _run("gridworld-optimal", gridworld_dp.OptimalConfig(), tmp_path)
    assert result.reproduces, result.claims
    assert m["max_abs_diff_vs_book_fig_3_4a"] == 0.0  # the book's Fig. 3.4(a) to the printed decimal
    base = m["baseline, gamma=0.9"]
    np.testing.assert_allclose(base["values"][3][2], 10.0, atol=1e-3)  # target: 1 / (1 - 0.9)
    assert base["policy"][3][2] == "stay" and base["free_cells_entering_forbidden"] > 0
    assert m["gamma=0.5"]["free_cells_entering_forbidden"] == 0
    assert m["r_forbidden=-10.0, gamma=0.9"]["free_cells_entering_forbidden"] == 0
    assert m["gamma=0.0"]["values"][0][0] == 0.0
    assert all(c.published is not None and abs(c.ours - c.published) <= 0.05 for c in result.comparisons)


def test_gridworld_dp(tmp_path):
    result, m = _run("gridworld-dp", gridworld_dp.DPConfig(num_iters=100, j_truncates=(1, 5)), tmp_path)
    assert result.reproduces, result.claims
    k = {label: m[label]["iterations_to_tolerance"] for label in
         ("value iteration", "truncated PI, j=5", "policy iteration")}
    assert k["policy iteration"] <= k["truncated PI, j=5"] < k["value iteration"] <= 100, k
    assert all(m[label]["final_error"] < 1e-3 for label in k)


def test_sa_mean(tmp_path):
    """Incremental mean = sample mean; Robbins-Monro finds the root w* = 1 of tanh(w - 1) under noise
    (and decreases monotonically to it without noise); BGD / MBGD / SGD converge to the mean, a
    mini-batch of m cutting SGD's gradient noise by about sqrt(m)."""
    cfg = sa_mean.SAConfig(num_steps=2000, num_seeds=8, batch_sizes=(1, 10, 100))
    result, m = _run("sa-mean", cfg, tmp_path)
    assert result.reproduces, result.claims
    assert m["max_abs(w_K+1 - sample mean), a_k = 1/k"] < 1e-4
    assert m["mean_estimation_final_abs_error"]["a_k = 1/k"] < 0.1
    assert 1.0 < m["robbins_monro_noise_free_final_w"] < 1.01
    rm = m["robbins_monro_final_abs_error"]
    assert rm["a_k = 1/k"] < 0.1 and rm["a_k = 1/k"] < rm["a_k = 0.1"]
    gd = m["gradient_descent_final_distance"]
    assert gd["BGD"] < 1e-4 and gd["SGD"] < 1.0 and gd["MBGD, m=10"] < 0.6 * gd["SGD"], gd


def test_gridworld_mc(tmp_path):
    """MC epsilon-greedy approaches the best epsilon-greedy policy (Sec. 5.4); the best epsilon-greedy
    policy's greedy version is optimal for epsilon = 0.1 but not for 0.5 (Sec. 5.6)."""
    cfg = gridworld_mc.MCExperimentConfig(epsilons=(0.1, 0.5), num_episodes=6000, num_chunks=2, num_seeds=2)
    result, m = _run("gridworld-mc", cfg, tmp_path)
    assert result.reproduces, result.claims
    small, large = m["epsilon=0.1"], m["epsilon=0.5"]
    assert large["mean_v*_eps (best epsilon-greedy policy)"] < small["mean_v*_eps (best epsilon-greedy policy)"] \
        < small["mean_v*"]
    assert small["greedy_version_of_best_eps_greedy_is_optimal"]
    assert not large["greedy_version_of_best_eps_greedy_is_optimal"]
    for eps in (small, large):
        gaps = eps["mean_gap_to_v*_eps_per_chunk"]
        assert -1e-3 < gaps[-1] < 0.15, gaps  # mean over states of v*_eps - v_learned


def test_gridworld_td_methods_find_the_optimal_path(tmp_path):
    """The book's Sarsa setting (Sec. 7.2: alpha = 0.1, epsilon = 0.1, episodes from the top-left cell),
    1000 episodes, 4 seeds: the greedy policy's value at the start equals v*(start), i.e. it follows an
    optimal 11-step path, and late episodes are near-optimal in length. Constant-step estimates keep
    fluctuating near-ties between paths, so 3 of 4 seeds must end on an optimal path. Off-policy Q-learning from the uniform behaviour policy (Sec. 7.4) recovers the optimal
    greedy action in every cell. The one-step methods share one compiled program."""
    cfg = gridworld_td.TDExperimentConfig(num_episodes=1000, num_seeds=4, n_step=3, off_policy_episodes=1000)
    result, m = _run("gridworld-td", cfg, tmp_path)
    assert result.reproduces, result.claims
    assert m["shortest_path_length"] == 11 and m["optimal_return"] == -10
    for label in ("Sarsa", "Expected Sarsa", "3-step Sarsa", "Q-learning (on-policy)"):
        r = m[label]
        assert r["fraction_of_seeds_with_optimal_greedy_path"] >= 0.75, (label, r)
        assert r["mean_length_last_100_episodes"] < 16 and r["mean_length_first_10_episodes"] > 28, (label, r)
        assert -20 < r["mean_return_last_100_episodes"] <= -10, (label, r)
    off = m["off-policy Q-learning (uniform behaviour)"]
    assert off["fraction_of_cells_with_optimal_greedy_action"] == 1.0 and off["max_abs(max_a q - v*)"] < 0.5, off


def test_gridworld_fa(tmp_path):
    """TD-linear (Sec. 8.2) hovers around its exact fixed point; deep Q-learning (Sec. 8.4: uniform
    behaviour, replay, target network) makes the greedy action optimal in every cell."""
    cfg = gridworld_fa.FAConfig(orders=(1, 3), num_episodes=100, num_chunks=2, num_seeds=2, dqn_updates=1000,
                                dqn_log_every=100, dqn_anneal_lr=False)  # the quick size
    result, m = _run("gridworld-fa", cfg, tmp_path)
    assert result.reproduces, result.claims
    td = m["td_linear"]
    assert td["steps"] == [25_000, 50_000]
    for name in ("polynomial, order 1", "polynomial, order 3", "Fourier, order 1", "Fourier, order 3"):
        r = td[name]
        assert r["rmse_per_chunk"][-1] < 0.3 and 0 < r["fixed_point_rmse"] < 0.25, (name, r)
        assert r["final_rms_distance_to_fixed_point"] < 0.15, (name, r)
    assert td["Fourier, order 3"]["fixed_point_rmse"] < td["Fourier, order 1"]["fixed_point_rmse"]
    assert td["polynomial, order 3"]["fixed_point_rmse"] < td["polynomial, order 1"]["fixed_point_rmse"]
    dqn = m["deep_q_learning"]
    assert len(dqn["env_steps"]) == 10 and dqn["final_fraction_greedy_optimal"] == 1.0, dqn
    assert dqn["final_rmse"] < 0.2 < 5.0 < dqn["rmse_max_q_vs_v*"][0], dqn
    first, last = dqn["td_loss_first_and_last_100_updates"]
    assert last < first, dqn


@pytest.mark.parametrize("make", [
    lambda: gridworld_dp.DPConfig(j_truncates=(0,)),
    lambda: gridworld_mc.MCExperimentConfig(num_episodes=10, num_chunks=3),
    lambda: gridworld_td.TDExperimentConfig(n_step=1),
    lambda: gridworld_fa.FAConfig(orders=()),
    lambda: sa_mean.SAConfig(batch_sizes=(0,)),
])
def test_configs_validate(make):
    with pytest.raises(ValueError):
        make()
