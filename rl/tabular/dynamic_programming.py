"""Model-based tabular RL (Zhao, Chapters 2-4): the Bellman equation, the Bellman optimality equation,
value iteration, policy iteration and truncated policy iteration.

The model is ``P [S, A, S]`` (``P[s, a, s'] = p(s'|s, a)``) and ``R [S, A]`` (``R[s, a] = E[r|s, a]``),
policies are ``pi [S, A]`` tables and values ``v [S]``. Matrix-vector form (Sec. 2.5):

    r_pi(s)      = sum_a pi(a|s) R(s, a)                              # [S]
    P_pi(s, s')  = sum_a pi(a|s) P(s, a, s')                          # [S, S]
    v_pi         = r_pi + gamma P_pi v_pi                             # Bellman equation
    q(s, a)      = R(s, a) + gamma sum_s' P(s, a, s') v(s')           # action values (Sec. 2.8)
    v*           = max_pi (r_pi + gamma P_pi v*)                      # Bellman optimality equation (Sec. 3.3)

Every function is jittable (loops are ``lax.while_loop`` / ``lax.scan``) and works in float32 or,
under ``jax_enable_x64``, float64.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxlab.rl.tabular.common import epsilon_greedy_policy, greedy_policy

__all__ = [
    "action_values",
    "bellman_operator",
    "bellman_optimality_operator",
    "dp_history",
    "epsilon_greedy_optimum",
    "policy_evaluation",
    "policy_improvement",
    "policy_iteration",
    "policy_model",
    "policy_value",
    "truncated_policy_iteration",
    "value_iteration",
]

_METHODS = ("closed_form", "iterative")


def _check_model(P: jax.Array, R: jax.Array, pi: jax.Array | None = None) -> None:
    if P.ndim != 3 or P.shape[0] != P.shape[2] or R.shape != P.shape[:2]:
        raise ValueError(f"P.shape={P.shape} must be [S, A, S] and R.shape={R.shape} must be [S, A]")
    if pi is not None and pi.shape != R.shape:
        raise ValueError(f"pi.shape={pi.shape} must be [S, A]={R.shape}")


def _check_gamma(gamma: float | jax.Array) -> None:
    if isinstance(gamma, jax.core.Tracer):
        return
    if not 0.0 <= float(gamma) < 1.0:
        raise ValueError(f"gamma={float(gamma)} must lie in [0, 1)")


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def policy_model(P: jax.Array, R: jax.Array, pi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P_pi [S, S], r_pi [S])``: the Markov chain and the expected reward induced by ``pi``."""
    P_pi = jnp.einsum("sa,sat->st", pi, P)  # [S, S]
    r_pi = jnp.einsum("sa,sa->s", pi, R)  # [S]
    return P_pi, r_pi


def bellman_operator(P: jax.Array, R: jax.Array, pi: jax.Array, v: jax.Array, gamma: float) -> jax.Array:
    """``T_pi v = r_pi + gamma P_pi v``; its fixed point is ``v_pi``."""
    P_pi, r_pi = policy_model(P, R, pi)
    return r_pi + gamma * P_pi @ v


def action_values(P: jax.Array, R: jax.Array, v: jax.Array, gamma: float) -> jax.Array:
    """``q(s, a) = R(s, a) + gamma sum_s' P(s, a, s') v(s')``, ``[S, A]``."""
    return R + gamma * jnp.einsum("sat,t->sa", P, v)


def bellman_optimality_operator(P: jax.Array, R: jax.Array, v: jax.Array, gamma: float) -> jax.Array:
    """``f(v) = max_pi (r_pi + gamma P_pi v) = max_a q(s, a)``: a gamma-contraction whose fixed point is
    ``v*`` (Sec. 3.3-3.4)."""
    return jnp.max(action_values(P, R, v, gamma), axis=-1)


def policy_improvement(q: jax.Array, pi: jax.Array | None = None) -> jax.Array:
    """Greedy policy of ``q [S, A]``. With a current policy ``pi`` its action is kept wherever it is
    greedy up to rounding, so policy iteration cannot cycle between equally good policies (Sutton and
    Barto 2018, Exercise 4.4)."""
    new = greedy_policy(q)
    if pi is None:
        return new
    tie_tol = 64 * jnp.finfo(q.dtype).eps * (1.0 + jnp.max(jnp.abs(q)))
    current = jnp.sum(pi * q, axis=-1)  # [S] value of the current (deterministic) choice
    keep = current >= jnp.max(q, axis=-1) - tie_tol  # [S]
    return jnp.where(keep[:, None], pi, new)


def policy_evaluation(P: jax.Array, R: jax.Array, pi: jax.Array, gamma: float, method: str = "closed_form",
                      *, tol: float = 1e-10, max_iters: int = 100_000) -> jax.Array:
    """State values ``v_pi [S]`` of policy ``pi`` (Sec. 2.7).

    ``method="closed_form"`` solves ``(I - gamma P_pi) v = r_pi``; ``method="iterative"`` runs
    ``v_{k+1} = r_pi + gamma P_pi v_k`` from ``v_0 = 0`` until ``max|v_{k+1} - v_k| <= tol`` or
    ``max_iters`` (rounding may stop float32 progress above a tiny ``tol``; the cap then ends it).
    """
    _check_model(P, R, pi)
    _check_gamma(gamma)
    if method not in _METHODS:
        raise ValueError(f"method={method!r} must be one of {_METHODS}")
    _check_positive(max_iters=max_iters)
    if method == "closed_form":
        return _evaluate_closed_form(P, R, pi, gamma)
    return _evaluate_iterative(P, R, pi, gamma, tol, max_iters)


@jax.jit
def _evaluate_closed_form(P, R, pi, gamma):
    P_pi, r_pi = policy_model(P, R, pi)
    return jnp.linalg.solve(jnp.eye(P.shape[0], dtype=P_pi.dtype) - gamma * P_pi, r_pi)


@partial(jax.jit, static_argnames=("max_iters",))
def _evaluate_iterative(P, R, pi, gamma, tol, max_iters):
    P_pi, r_pi = policy_model(P, R, pi)
    return _fixed_point(lambda v: r_pi + gamma * P_pi @ v, jnp.zeros_like(r_pi), tol, max_iters)


def _fixed_point(f, v0, tol, max_iters):
    """Iterate ``v <- f(v)`` until ``max|f(v) - v| <= tol`` or ``max_iters`` applications."""

    def cond(c):
        _, delta, k = c
        return (delta > tol) & (k < max_iters)

    def body(c):
        v, _, k = c
        v_new = f(v)
        return v_new, jnp.max(jnp.abs(v_new - v)), k + 1

    v, _, _ = jax.lax.while_loop(cond, body, (v0, jnp.asarray(jnp.inf, v0.dtype), 0))
    return v


def value_iteration(P: jax.Array, R: jax.Array, gamma: float, tol: float = 1e-8, max_iters: int = 10_000,
                    v0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Value iteration (Sec. 4.1): ``pi_{k+1} = greedy(q(v_k))``, ``v_{k+1} = max_a q(v_k)(s, a)`` until
    ``max|v_{k+1} - v_k| <= tol``. Returns ``(v [S], greedy one-hot pi [S, A])``."""
    _check_model(P, R)
    _check_gamma(gamma)
    _check_positive(max_iters=max_iters)
    v0 = jnp.zeros(P.shape[0], R.dtype) if v0 is None else v0
    return _value_iteration(P, R, gamma, tol, max_iters, v0)


@partial(jax.jit, static_argnames=("max_iters",))
def _value_iteration(P, R, gamma, tol, max_iters, v0):
    v = _fixed_point(lambda v: bellman_optimality_operator(P, R, v, gamma), v0, tol, max_iters)
    return v, greedy_policy(action_values(P, R, v, gamma))


def policy_iteration(P: jax.Array, R: jax.Array, gamma: float, max_iters: int = 1_000,
                     pi0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Policy iteration (Sec. 4.2): exact evaluation ``v_{pi_k}`` (closed form), then
    ``pi_{k+1} = greedy(q(v_{pi_k}))``, until the policy is stable. ``pi0`` defaults to the greedy
    policy of the immediate reward. Returns ``(v* [S], pi* [S, A])``."""
    _check_model(P, R, pi0)
    _check_gamma(gamma)
    _check_positive(max_iters=max_iters)
    pi0 = greedy_policy(R) if pi0 is None else pi0
    return _policy_iteration(P, R, gamma, max_iters, pi0)


@partial(jax.jit, static_argnames=("max_iters",))
def _policy_iteration(P, R, gamma, max_iters, pi0):
    def cond(c):
        _, _, stable, k = c
        return (~stable) & (k < max_iters)

    def body(c):
        pi, _, _, k = c
        v = _evaluate_closed_form(P, R, pi, gamma)
        new_pi = policy_improvement(action_values(P, R, v, gamma), pi)
        return new_pi, v, jnp.all(new_pi == pi), k + 1

    v0 = jnp.zeros(P.shape[0], R.dtype)
    pi, v, _, _ = jax.lax.while_loop(cond, body, (pi0, v0, jnp.asarray(False), 0))
    return v, pi


def truncated_policy_iteration(P: jax.Array, R: jax.Array, gamma: float, j_truncate: int = 5,
                               tol: float = 1e-8, max_iters: int = 10_000,
                               v0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Truncated policy iteration (Sec. 4.3): ``pi_{k+1} = greedy(q(v_k))``, then ``j_truncate`` sweeps
    ``v <- r_pi + gamma P_pi v`` started from ``v_k`` give ``v_{k+1}``; stops when
    ``max|v_{k+1} - v_k| <= tol``. ``j_truncate = 1`` is value iteration, ``j_truncate -> inf`` policy
    iteration. Returns ``(v [S], greedy one-hot pi [S, A])``."""
    _check_model(P, R)
    _check_gamma(gamma)
    _check_positive(j_truncate=j_truncate, max_iters=max_iters)
    v0 = jnp.zeros(P.shape[0], R.dtype) if v0 is None else v0
    return _truncated_policy_iteration(P, R, gamma, j_truncate, tol, max_iters, v0)


def _truncated_step(P, R, gamma, v, j_truncate):
    """One truncated-PI iteration: improvement on ``v``, then ``j_truncate`` Bellman sweeps from ``v``."""
    P_pi, r_pi = policy_model(P, R, greedy_policy(action_values(P, R, v, gamma)))
    return jax.lax.fori_loop(0, j_truncate, lambda _, u: r_pi + gamma * P_pi @ u, v)


@partial(jax.jit, static_argnames=("max_iters",))
def _truncated_policy_iteration(P, R, gamma, j_truncate, tol, max_iters, v0):
    v = _fixed_point(lambda v: _truncated_step(P, R, gamma, v, j_truncate), v0, tol, max_iters)
    return v, greedy_policy(action_values(P, R, v, gamma))


def dp_history(P: jax.Array, R: jax.Array, gamma: float, num_iters: int, j_truncate: int | None = 1,
               v0: jax.Array | None = None) -> jax.Array:
    """The iterates ``v_0, v_1, ..., v_K`` (``[K + 1, S]``) of the common scheme of Chapter 4:
    ``pi_{k+1} = greedy(q(v_k))``, ``v_{k+1} = T_{pi_{k+1}}^j v_k`` with ``j = j_truncate``
    (``1``: value iteration; ``None``: exact evaluation, i.e. policy iteration)."""
    _check_model(P, R)
    _check_gamma(gamma)
    _check_positive(num_iters=num_iters, **({} if j_truncate is None else {"j_truncate": j_truncate}))
    v0 = jnp.zeros(P.shape[0], R.dtype) if v0 is None else v0
    return _dp_history(P, R, gamma, num_iters, j_truncate, v0)


@partial(jax.jit, static_argnames=("num_iters", "j_truncate"))
def _dp_history(P, R, gamma, num_iters, j_truncate, v0):
    def step(v, _):
        if j_truncate is None:
            v = _evaluate_closed_form(P, R, greedy_policy(action_values(P, R, v, gamma)), gamma)
        else:
            v = _truncated_step(P, R, gamma, v, j_truncate)
        return v, v

    _, vs = jax.lax.scan(step, v0, None, length=num_iters)
    return jnp.concatenate([v0[None], vs])


def epsilon_greedy_optimum(P: jax.Array, R: jax.Array, gamma: float, epsilon: float,
                           tol: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """The best epsilon-greedy policy and its value ``(v [S], pi [S, A])``: what MC epsilon-greedy and
    on-policy Sarsa converge to (Sec. 5.4). Choosing greedy action ``a`` under an epsilon-greedy policy
    executes ``a`` w.p. ``1 - epsilon`` and a uniform action otherwise, i.e. it is action ``a`` of the
    MDP ``P_eps = (1 - epsilon) P + epsilon mean_a' P``, ``R_eps`` likewise; value iteration solves it."""
    _check_model(P, R)
    P_eps = (1.0 - epsilon) * P + epsilon * P.mean(axis=1, keepdims=True)  # [S, A, S]
    R_eps = (1.0 - epsilon) * R + epsilon * R.mean(axis=1, keepdims=True)  # [S, A]
    v, _ = value_iteration(P_eps, R_eps, gamma, tol)
    return v, epsilon_greedy_policy(action_values(P_eps, R_eps, v, gamma), epsilon)


def policy_value(env, pi: jax.Array, gamma: float) -> jax.Array:
    """``v_pi [S]`` of ``pi`` on ``env``'s exact model (the yardstick for every learned policy)."""
    P, R = env.tabular_model()
    return policy_evaluation(P, R, pi, gamma, method="closed_form")
