"""``gridworld-td``: TD control (Zhao, *Mathematical Foundations of RL*, Chapter 7) on the episodic grid of
the book's Chapter 7 examples (episodes start at the top-left cell and end at the target;
``r_target = 0``, ``r_forbidden = r_boundary = -10``, ``r_other = -1``, ``gamma = 0.9``,
``alpha = 0.1``, ``epsilon = 0.1``).

Sarsa, Expected Sarsa, n-step Sarsa and on-policy Q-learning learn online; per episode we record its
length and its (undiscounted) return, averaged over vmapped seeds. The shortest path from the start to
the target avoiding forbidden cells has 11 steps (return -10). Off-policy Q-learning learns from the
uniform behaviour policy (same program as the on-policy runs when it runs as many episodes); its greedy policy is compared with the optimal one in every cell.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, ExperimentResult, register_experiment
from jaxlab.rl.tabular.common import greedy_policy, uniform_policy
from jaxlab.rl.tabular.dynamic_programming import policy_evaluation, value_iteration
from jaxlab.rl.tabular.gridworld import book_episodic_grid_world
from jaxlab.rl.tabular.plot import plot_grid_world
from jaxlab.rl.tabular.td import TDConfig, td_control
from jaxlab.validation import check_positive

SHORTEST_PATH = 11  # steps from (row 1, col 1) to the target (row 4, col 3) around the forbidden cells


@dataclasses.dataclass(frozen=True)
class TDExperimentConfig:
    """Sizes of the TD-control study (hyper-parameters default to the book's Sec. 7.2 example)."""

    num_episodes: int = 1000
    """Episodes per run."""
    num_seeds: int = 16
    """Independent runs per method."""
    alpha: float = 0.1
    """Step size."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy policies."""
    gamma: float = 0.9
    """Discount rate."""
    n_step: int = 3
    """n of n-step Sarsa (0 leaves it out)."""
    max_episode_steps: int = 1000
    """Time limit per episode."""
    off_policy_episodes: int = 1000
    """Episodes of off-policy Q-learning from the uniform behaviour policy (0 leaves it out); the
    uniform walk reaches the far cells rarely, so it needs more episodes than the on-policy runs."""
    smoothing: int = 10
    """Episodes in the moving average of the curves."""

    def __post_init__(self):
        check_positive(self, "num_episodes", "num_seeds", "max_episode_steps", "smoothing")
        if self.n_step < 0 or self.off_policy_episodes < 0:
            raise ValueError(f"n_step={self.n_step} and off_policy_episodes={self.off_policy_episodes} must be >= 0")
        if self.n_step == 1:
            raise ValueError(f"n_step={self.n_step} duplicates Sarsa; use >= 2 or 0 to leave n-step Sarsa out")
        # TDConfig validates alpha, epsilon and gamma.
        TDConfig(gamma=self.gamma, alpha=self.alpha, epsilon=self.epsilon)


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Moving average over the last axis (window ``k``, ``valid`` part)."""
    k = min(k, x.shape[-1])
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    return (c[..., k:] - c[..., :-k]) / k


@register_experiment(
    "gridworld-td",
    description="Sarsa, Expected Sarsa, n-step Sarsa and Q-learning on the episodic grid: episode length and return",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Secs. 7.2-7.4",
    quick_seconds=5.3,
    quick=TDExperimentConfig(num_episodes=1000, num_seeds=8),
)
def gridworld_td(cfg: TDExperimentConfig, ctx: RunContext) -> ExperimentResult:
    env = book_episodic_grid_world()
    P, R = env.tabular_model()
    v_star, _ = value_iteration(P, R, cfg.gamma)
    start = env.state_index(0, 0)
    base = TDConfig(gamma=cfg.gamma, alpha=cfg.alpha, epsilon=cfg.epsilon, num_episodes=cfg.num_episodes,
                    max_episode_steps=cfg.max_episode_steps)
    methods = [("Sarsa", "sarsa", base), ("Expected Sarsa", "expected_sarsa", base),
               ("Q-learning (on-policy)", "q_learning", base)]
    if cfg.n_step:
        methods.insert(2, (f"{cfg.n_step}-step Sarsa", "sarsa", dataclasses.replace(base, n_step=cfg.n_step)))
    evaluate = jax.vmap(lambda q: policy_evaluation(P, R, greedy_policy(q), cfg.gamma))
    metrics: dict = {"shortest_path_length": SHORTEST_PATH, "optimal_return": -(SHORTEST_PATH - 1)}
    curves = {}
    for i, (label, method, config) in enumerate(ctx.progress(methods, desc="method")):
        keys = jax.random.split(jax.random.fold_in(ctx.key, i), cfg.num_seeds)
        result = jax.vmap(lambda k: td_control(k, env, config, method))(keys)
        lengths, returns = np.asarray(result.stats.lengths), np.asarray(result.stats.returns)  # [R, E]
        curves[label] = (lengths, returns)
        gap = np.asarray(v_star[start] - evaluate(result.q)[:, start])  # [R]
        tail = max(cfg.num_episodes // 10, 1)
        metrics[label] = {
            "mean_length_first_10_episodes": float(lengths[:, :10].mean()),
            f"mean_length_last_{tail}_episodes": float(lengths[:, -tail:].mean()),
            f"mean_return_last_{tail}_episodes": float(returns[:, -tail:].mean()),
            "fraction_of_seeds_with_optimal_greedy_path": float(np.mean(np.abs(gap) < 1e-4)),
        }

    off = None
    if cfg.off_policy_episodes:
        behaviour = uniform_policy(env.num_states, env.num_actions)
        config = dataclasses.replace(base, num_episodes=cfg.off_policy_episodes)
        keys = jax.random.split(jax.random.fold_in(ctx.key, len(methods)), cfg.num_seeds)
        off = jax.vmap(lambda k: td_control(k, env, config, "q_learning", behaviour=behaviour))(keys)
        v_off = evaluate(off.q)  # [R, S]
        optimal = np.abs(np.asarray(v_star - v_off))[:, ~env.terminal] < 1e-4
        metrics["off-policy Q-learning (uniform behaviour)"] = {
            "fraction_of_cells_with_optimal_greedy_action": float(optimal.mean()),
            "max_abs(max_a q - v*)": float(jnp.abs(off.q.max(-1) - v_star)[:, ~env.terminal].max()),
            "behaviour_steps_per_seed": int(off.stats.lengths[0].sum()),
        }

    fig = Figure(figsize=(15 if off is not None else 10, 4))
    axes = fig.subplots(1, 3 if off is not None else 2)
    for i, (label, (lengths, returns)) in enumerate(curves.items()):
        for ax, y in ((axes[0], lengths), (axes[1], returns)):
            sm = _smooth(y.astype(float), cfg.smoothing)  # [R, E - k + 1]
            x = np.arange(sm.shape[1]) + min(cfg.smoothing, y.shape[1])
            ax.plot(x, sm.mean(0), color=f"C{i}", label=label, lw=1.2)
            ax.fill_between(x, sm.min(0), sm.max(0), color=f"C{i}", alpha=0.15, lw=0)
    axes[0].axhline(SHORTEST_PATH, color="k", ls=":", lw=1, label="shortest path")
    axes[0].set(yscale="log", xlabel="episode", ylabel="episode length",
                title=f"Episode length ({cfg.smoothing}-episode average)")
    axes[1].axhline(-(SHORTEST_PATH - 1), color="k", ls=":", lw=1, label="optimal return")
    axes[1].set(yscale="symlog", xlabel="episode", ylabel="return", title="Undiscounted return")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    if off is not None:
        plot_grid_world(axes[2], env, off.q[0].max(-1), greedy_policy(off.q[0]),
                        title="off-policy Q-learning, seed 0: max_a q, greedy policy")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    tail_key = f"mean_length_last_{max(cfg.num_episodes // 10, 1)}_episodes"
    first = np.mean([metrics[label]["mean_length_first_10_episodes"] for label in curves])
    summary = (
        f"All on-policy methods shorten their episodes from about {first:.0f} steps (first 10 episodes) to near "
        f"the {SHORTEST_PATH}-step shortest path (mean length over the last tenth of the run: "
        + ", ".join(f"{label} {metrics[label][tail_key]:.1f}" for label in curves)
        + "); epsilon = 0.1 exploration keeps them slightly above it."
    )
    if off is not None:
        frac = metrics["off-policy Q-learning (uniform behaviour)"]["fraction_of_cells_with_optimal_greedy_action"]
        summary += f" Off-policy Q-learning from uniform data makes {100 * frac:.0f}% of the cells' greedy actions optimal."
    optimal = {label: metrics[label]["fraction_of_seeds_with_optimal_greedy_path"] for label in curves}
    late = {label: metrics[label][tail_key] for label in curves}
    early = {label: metrics[label]["mean_length_first_10_episodes"] for label in curves}
    claims = (
        Claim(f"every on-policy method ends with a greedy policy on an optimal {SHORTEST_PATH}-step path from the "
              f"start (v_greedy(start) = v*(start)) in >= 3/4 of the seeds (Secs. 7.2-7.4)",
              holds=all(f >= 0.75 for f in optimal.values()),
              evidence=", ".join(f"{label} {f:.2f}" for label, f in optimal.items())),
        Claim(f"episodes shorten to near the {SHORTEST_PATH}-step shortest path: mean length over the last tenth "
              f"of the run < 16 steps for every method, down from the first 10 episodes",
              holds=all(late[label] < 16 and late[label] < early[label] for label in curves),
              evidence=", ".join(f"{label} {early[label]:.0f} -> {late[label]:.1f}" for label in curves)),
    )
    if off is not None:
        o = metrics["off-policy Q-learning (uniform behaviour)"]
        claims += (Claim("off-policy Q-learning from the uniform behaviour policy makes the greedy action optimal in "
                         "every cell, max_a q within 0.5 of v* (Sec. 7.4)",
                         holds=o["fraction_of_cells_with_optimal_greedy_action"] == 1.0
                         and o["max_abs(max_a q - v*)"] < 0.5,
                         evidence=f"{100 * o['fraction_of_cells_with_optimal_greedy_action']:.0f}% of cells optimal, "
                                  f"max |max_a q - v*| = {o['max_abs(max_a q - v*)']:.2g}"),)
    return ExperimentResult(metrics=metrics, summary=summary, claims=claims)
