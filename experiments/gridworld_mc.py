"""``gridworld-mc``: MC epsilon-greedy (Zhao, *Mathematical Foundations of RL*, Secs. 5.4-5.6) on the
book's baseline grid for several epsilon.

For each epsilon, ``num_seeds`` runs (vmapped) of MC epsilon-greedy learn action values from episodes
that start anywhere on the grid; every ``num_episodes / num_chunks`` episodes we evaluate exactly
(closed-form Bellman solution) the learned epsilon-greedy policy and its greedy version. The yardsticks
are the best epsilon-greedy policy ``v*_eps`` (what the algorithm converges to; value iteration on the
epsilon-softened MDP) and the optimal ``v*``. The book's point (Sec. 5.6): the larger epsilon, the more
exploration, the lower ``v*_eps``, and for large epsilon the greedy version of the best epsilon-greedy
policy is no longer optimal (it stops being "consistent" with the optimal policy).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, ExperimentResult, register_experiment
from jaxlab.rl.tabular.common import greedy_policy
from jaxlab.rl.tabular.dynamic_programming import (
    epsilon_greedy_optimum,
    policy_evaluation,
    value_iteration,
)
from jaxlab.rl.tabular.gridworld import book_grid_world
from jaxlab.rl.tabular.monte_carlo import MCConfig, MCResult, mc_epsilon_greedy
from jaxlab.rl.tabular.plot import plot_grid_world
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class MCExperimentConfig:
    """Sizes of the MC epsilon-greedy study."""

    epsilons: tuple[float, ...] = (0.1, 0.2, 0.5)
    """Exploration rates to compare."""
    gamma: float = 0.9
    """Discount rate."""
    num_episodes: int = 20_000
    """Episodes per run."""
    episode_length: int = 40
    """Steps per episode (returns are truncated there; 0.9^40 < 0.015)."""
    num_chunks: int = 10
    """Evaluation points along the run."""
    num_seeds: int = 4
    """Independent runs per epsilon."""

    def __post_init__(self):
        if not self.epsilons or not all(0.0 < e <= 1.0 for e in self.epsilons):
            raise ValueError(f"epsilons={self.epsilons} must be non-empty and lie in (0, 1]")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        check_positive(self, "num_episodes", "episode_length", "num_chunks", "num_seeds")
        if self.num_episodes % self.num_chunks:
            raise ValueError(f"num_episodes={self.num_episodes} must be a multiple of num_chunks={self.num_chunks}")


@register_experiment(
    "gridworld-mc",
    description="MC epsilon-greedy on the book's grid world for several epsilon, against the best epsilon-greedy policy",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Secs. 5.4-5.6",
    quick_seconds=3.5,
    quick=MCExperimentConfig(num_episodes=4000, num_chunks=4, num_seeds=2),
)
def gridworld_mc(cfg: MCExperimentConfig, ctx: RunContext) -> ExperimentResult:
    env = book_grid_world(start=None)  # episodes start in every cell, so every state is learned
    P, R = env.tabular_model()
    v_star, _ = value_iteration(P, R, cfg.gamma)
    evaluate = jax.jit(jax.vmap(lambda pi: policy_evaluation(P, R, pi, cfg.gamma)))  # [R, S, A] -> [R, S]
    chunk = cfg.num_episodes // cfg.num_chunks
    episodes = chunk * np.arange(1, cfg.num_chunks + 1)
    metrics: dict = {"episodes": episodes.tolist()}
    curves, finals = {}, {}
    for i, eps in enumerate(ctx.progress(cfg.epsilons, desc="epsilon")):
        config = MCConfig(gamma=cfg.gamma, episode_length=cfg.episode_length, num_episodes=chunk, epsilon=eps,
                          exploring_starts=False)
        v_eps, pi_eps = epsilon_greedy_optimum(P, R, cfg.gamma, eps)
        v_eps_greedy = policy_evaluation(P, R, greedy_policy(pi_eps), cfg.gamma)
        zeros = jnp.zeros((cfg.num_seeds, env.num_states, env.num_actions))
        state = MCResult(zeros, zeros, zeros)
        gap_eps, gap_greedy = [], []
        for c, key in enumerate(jax.random.split(jax.random.fold_in(ctx.key, i), cfg.num_chunks)):
            state = jax.vmap(lambda k, init: mc_epsilon_greedy(k, env, config, init))(
                jax.random.split(key, cfg.num_seeds), state)
            v_learned = evaluate(state.pi)  # [R, S] value of the learned epsilon-greedy policy
            v_greedy = evaluate(jax.vmap(greedy_policy)(state.q))
            gap_eps.append(np.asarray(jnp.mean(v_eps - v_learned, axis=-1)))  # [R]
            gap_greedy.append(np.asarray(jnp.mean(v_star - v_greedy, axis=-1)))
        curves[eps] = (np.stack(gap_eps, 1), np.stack(gap_greedy, 1))  # [R, C] each
        finals[eps] = (state, v_learned)
        optimal_cells = np.abs(np.asarray(v_star - v_greedy)) < 1e-4  # [R, S]
        metrics[f"epsilon={eps}"] = {
            "mean_v*_eps (best epsilon-greedy policy)": float(v_eps.mean()),
            "mean_v*": float(v_star.mean()),
            "greedy_version_of_best_eps_greedy_is_optimal": bool(jnp.abs(v_eps_greedy - v_star).max() < 1e-4),
            "mean_gap_to_v*_eps_per_chunk": np.stack(gap_eps, 1).mean(0).tolist(),
            "mean_greedy_gap_to_v*_per_chunk": np.stack(gap_greedy, 1).mean(0).tolist(),
            "final_fraction_of_cells_greedy_optimal": float(optimal_cells.mean()),
            "final_mean_v_learned": float(v_learned.mean()),
        }

    n = len(cfg.epsilons)
    fig = Figure(figsize=(3.0 * n + 4.5, 3.4))
    grid = fig.add_gridspec(1, n + 1, width_ratios=[1.4] + [1] * n)
    ax = fig.add_subplot(grid[0])
    for i, (eps, (ge, gg)) in enumerate(curves.items()):
        ax.plot(episodes, ge.mean(0), "o-", color=f"C{i}", label=f"eps={eps}: v*_eps - v_pi")
        ax.plot(episodes, gg.mean(0), "s--", color=f"C{i}", label=f"eps={eps}: v* - v_greedy")
    ax.set(xlabel="episodes", ylabel="mean value gap over states", title="MC epsilon-greedy", yscale="symlog")
    ax.legend(fontsize=6)
    for i, (eps, (state, v_learned)) in enumerate(finals.items()):
        plot_grid_world(fig.add_subplot(grid[i + 1]), env, v_learned[0], state.pi[0],
                        title=f"learned, eps={eps} (seed 0)")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    summary = (
        "MC epsilon-greedy approaches the best epsilon-greedy policy (final mean gap to v*_eps: "
        + ", ".join(f"eps={e}: {metrics[f'epsilon={e}']['mean_gap_to_v*_eps_per_chunk'][-1]:.3f}" for e in cfg.epsilons)
        + "). Its value falls as epsilon grows (mean v*_eps: "
        + ", ".join(f"{metrics[f'epsilon={e}']['mean_v*_eps (best epsilon-greedy policy)']:.2f}" for e in cfg.epsilons)
        + f" vs v* {float(v_star.mean()):.2f}), the exploration/exploitation trade-off of Sec. 5.6."
    )
    m = {e: metrics[f"epsilon={e}"] for e in cfg.epsilons}
    eps_sorted = sorted(cfg.epsilons)
    v_eps_mean = [m[e]["mean_v*_eps (best epsilon-greedy policy)"] for e in eps_sorted]
    gaps = {e: m[e]["mean_gap_to_v*_eps_per_chunk"][-1] for e in cfg.epsilons}
    claims = (
        Claim("MC epsilon-greedy approaches the best epsilon-greedy policy: final mean gap "
              "mean_s(v*_eps - v_pi) < 0.15 for every epsilon (Sec. 5.4)",
              holds=all(-1e-3 < g < 0.15 for g in gaps.values()),
              evidence=", ".join(f"eps={e}: {g:.3f}" for e, g in gaps.items())),
        Claim("the best epsilon-greedy policy's value falls as epsilon grows and stays below v* (Sec. 5.6)",
              holds=all(a > b for a, b in zip(v_eps_mean, v_eps_mean[1:])) and v_eps_mean[0] < float(v_star.mean()),
              evidence="mean v*_eps " + ", ".join(f"eps={e}: {v:.2f}" for e, v in zip(eps_sorted, v_eps_mean))
                       + f"; mean v* {float(v_star.mean()):.2f}"),
    )
    consistent = {e: m[e]["greedy_version_of_best_eps_greedy_is_optimal"] for e in cfg.epsilons}
    if 0.1 in consistent and 0.5 in consistent:
        claims += (Claim("the greedy version of the best epsilon-greedy policy is optimal for epsilon = 0.1 and not "
                         "for epsilon = 0.5 (consistency, Sec. 5.6)", holds=consistent[0.1] and not consistent[0.5],
                         evidence=", ".join(f"eps={e}: {'optimal' if c else 'not optimal'}"
                                            for e, c in consistent.items())),)
    return ExperimentResult(metrics=metrics, summary=summary, claims=claims)
