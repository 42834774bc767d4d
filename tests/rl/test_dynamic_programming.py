"""Chapters 2-4: Bellman equation on hand-checked MDPs, the Bellman optimality equation, VI = PI =
truncated PI, the book's published optimal values (Fig. 3.4(a)). (Its qualitative claims of Sec. 3.5 are
checked through the ``gridworld-optimal`` experiment in test_tabular_experiments.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.tabular.common import epsilon_greedy_policy, greedy_policy
from jaxlab.rl.tabular.dynamic_programming import (
    action_values,
    bellman_optimality_operator,
    dp_history,
    epsilon_greedy_optimum,
    policy_evaluation,
    policy_iteration,
    policy_value,
    truncated_policy_iteration,
    value_iteration,
)
from jaxlab.rl.tabular.gridworld import GridWorld, book_grid_world

UP, RIGHT, DOWN, LEFT, STAY = range(5)


def _two_by_two():
    """The book's 2x2 example (Sec. 2.4): s1 s2 / s3 s4 with s2 forbidden and s4 the target."""
    return GridWorld(layout=(".#", ".T"), r_boundary=-1.0, r_forbidden=-1.0, r_target=1.0, r_other=0.0)


def _policy(*choices):
    """Stochastic policy from per-state {action: prob} dicts, ``[S, A]``."""
    pi = np.zeros((len(choices), 5))
    for s, probs in enumerate(choices):
        for a, p in probs.items():
            pi[s, a] = p
    return jnp.asarray(pi)


@pytest.mark.parametrize("method", ["closed_form", "iterative"])
def test_bellman_equation_by_hand(method):
    P, R = _two_by_two().tabular_model()
    # s1: right (into the forbidden s2) or down w.p. 1/2; s2 down; s3 right; s4 stay.
    pi = _policy({RIGHT: 0.5, DOWN: 0.5}, {DOWN: 1}, {RIGHT: 1}, {STAY: 1})
    # v4 = 1 / (1 - 0.9) = 10; v3 = v2 = 1 + 0.9 * 10 = 10; v1 = 0.5 (-1 + 9) + 0.5 (0 + 9) = 8.5.
    np.testing.assert_allclose(policy_evaluation(P, R, pi, 0.9, method=method), [8.5, 10, 10, 10], atol=1e-4)
    pi_right = _policy({RIGHT: 1}, {DOWN: 1}, {RIGHT: 1}, {STAY: 1})
    np.testing.assert_allclose(policy_evaluation(P, R, pi_right, 0.9, method=method), [8, 10, 10, 10], atol=1e-4)


def test_single_state_and_gamma_zero():
    env = GridWorld(layout=("T",), r_target=2.0, r_boundary=-1.0)
    P, R = env.tabular_model()
    stay = _policy({STAY: 1})
    np.testing.assert_allclose(policy_evaluation(P, R, stay, 0.5), [4.0], rtol=1e-6)  # 2 / (1 - 0.5)
    np.testing.assert_allclose(policy_evaluation(P, R, _policy({UP: 1}), 0.0), [-1.0])


def test_bellman_optimality_by_hand():
    P, R = _two_by_two().tabular_model()
    v, pi = value_iteration(P, R, 0.9)
    np.testing.assert_allclose(v, [9, 10, 10, 10], atol=1e-5)  # s1 goes down: 0 + 0.9 * 10
    assert int(pi[0].argmax()) == DOWN and int(pi[3].argmax()) == STAY
    np.testing.assert_allclose(bellman_optimality_operator(P, R, v, 0.9), v, atol=1e-5)  # fixed point


# The book's Fig. 3.4(a): optimal state values of the baseline (gamma = 0.9), one decimal.
BOOK_FIG_3_4_A = np.array([
    [5.8, 5.6, 6.2, 6.5, 5.8],
    [6.5, 7.2, 8.0, 7.2, 6.5],
    [7.2, 8.0, 10.0, 8.0, 7.2],
    [8.0, 10.0, 10.0, 10.0, 8.0],
    [7.2, 9.0, 10.0, 9.0, 8.1],
])


def test_book_optimal_values_and_the_three_dp_algorithms_agree():
    """Float32 throughout: the fixed points agree to rounding (1e-5 on values up to 10)."""
    P, R = book_grid_world().tabular_model()
    v_vi, pi_vi = value_iteration(P, R, 0.9)
    v_pi, pi_pi = policy_iteration(P, R, 0.9)
    v_tpi, pi_tpi = truncated_policy_iteration(P, R, 0.9, j_truncate=5)
    np.testing.assert_allclose(np.round(v_vi, 1).reshape(5, 5), BOOK_FIG_3_4_A, atol=1e-6)
    np.testing.assert_allclose(v_pi, v_vi, atol=1e-5)
    np.testing.assert_allclose(v_tpi, v_vi, atol=1e-5)
    for pi in (pi_vi, pi_pi, pi_tpi):  # every returned policy is optimal (ties may pick different actions)
        np.testing.assert_allclose(policy_evaluation(P, R, pi, 0.9), v_vi, atol=1e-5)
        assert jnp.all(pi.sum(-1) == 1) and jnp.all(pi.max(-1) == 1)
    np.testing.assert_allclose(policy_evaluation(P, R, pi_pi, 0.9, "iterative", tol=1e-7), v_vi, atol=1e-5)


def test_affine_reward_invariance():
    """Theorem 3.6: rewards a r + b give values a v* + b / (1 - gamma) and the same optimal policy."""
    a, b, gamma = 2.0, 3.0, 0.9
    env = book_grid_world()
    env2 = book_grid_world(r_boundary=a * -1 + b, r_forbidden=a * -1 + b, r_target=a * 1 + b, r_other=b)
    P, R = env.tabular_model()
    v, pi = value_iteration(P, R, gamma)
    v2, pi2 = value_iteration(*env2.tabular_model(), gamma)
    np.testing.assert_allclose(v2, a * v + b / (1 - gamma), rtol=1e-5)
    np.testing.assert_allclose(policy_evaluation(P, R, pi2, gamma), v, atol=1e-5)  # pi2 is optimal too


def test_dp_history_schemes():
    P, R = book_grid_world().tabular_model()
    v_star, _ = value_iteration(P, R, 0.9)
    vi = dp_history(P, R, 0.9, num_iters=100, j_truncate=1)
    pi_hist = dp_history(P, R, 0.9, num_iters=100, j_truncate=None)  # sizes shared with gridworld-dp's test
    assert vi.shape == (101, 25)
    # Value iteration's iterates are exactly v_{k+1} = max_a q(v_k).
    np.testing.assert_allclose(vi[1], bellman_optimality_operator(P, R, vi[0], 0.9), atol=1e-6)
    # Contraction: error shrinks at least geometrically; policy iteration is monotone and converges fast.
    err = jnp.abs(vi - v_star).max(-1)
    assert jnp.all(err[1:] <= 0.9 * err[:-1] + 1e-5)
    assert jnp.all(jnp.diff(pi_hist[1:], axis=0) >= -1e-5)
    np.testing.assert_allclose(pi_hist[-1], v_star, atol=1e-4)


def test_epsilon_greedy_optimum_is_consistent():
    env = book_grid_world()
    P, R = env.tabular_model()
    v_star, _ = value_iteration(P, R, 0.9)
    v0, pi0 = epsilon_greedy_optimum(P, R, 0.9, 0.0)
    np.testing.assert_allclose(v0, v_star, atol=1e-5)
    v_eps, pi_eps = epsilon_greedy_optimum(P, R, 0.9, 0.2)
    np.testing.assert_allclose(policy_value(env, pi_eps, 0.9), v_eps, atol=1e-4)
    # No epsilon-greedy policy does better, e.g. the epsilon-greedy version of the optimal policy.
    q_star = action_values(P, R, v_star, 0.9)
    assert jnp.all(policy_value(env, epsilon_greedy_policy(q_star, 0.2), 0.9) <= v_eps + 1e-4)
    assert jnp.all(v_eps < v_star)


def test_jit_and_vmap_over_gamma():
    P, R = book_grid_world().tabular_model()
    vs, pis = jax.jit(jax.vmap(lambda g: value_iteration(P, R, g)))(jnp.array([0.0, 0.5, 0.9]))
    np.testing.assert_allclose(vs[2], value_iteration(P, R, 0.9)[0], atol=1e-5)
    np.testing.assert_allclose(vs[0], R.max(-1), atol=1e-6)
    assert pis.shape == (3, 25, 5)
    assert jnp.all(greedy_policy(action_values(P, R, vs[1], 0.5)) == pis[1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda P, R, pi: policy_evaluation(P, R, pi, 1.0), "gamma"),
        (lambda P, R, pi: policy_evaluation(P, R, pi, 0.9, method="exact"), "method"),
        (lambda P, R, pi: policy_evaluation(P, R, pi[:3], 0.9), r"pi.shape"),
        (lambda P, R, pi: value_iteration(P[:, :, :3], R, 0.9), r"P.shape"),
        (lambda P, R, pi: truncated_policy_iteration(P, R, 0.9, j_truncate=0), "j_truncate"),
    ],
)
def test_bad_inputs_raise(call, match):
    P, R = _two_by_two().tabular_model()
    with pytest.raises(ValueError, match=match):
        call(P, R, jnp.full((4, 5), 0.2))
