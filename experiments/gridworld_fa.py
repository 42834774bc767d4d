"""``gridworld-fa``: value function approximation (Zhao, *Mathematical Foundations of RL*, Chapter 8) on the
book's baseline grid (continuing, ``gamma = 0.9``).

* **TD-linear** (Sec. 8.2) evaluates the uniform policy from episodes that start in random cells,
  with polynomial and Fourier features of several orders. We
  plot the RMS error of ``phi(s)^T w`` against the true ``v_pi`` (closed-form Bellman solution)
  against the steps taken; the dotted floor of each feature set is the RMS error of the TD fixed point
  ``Phi^T D (I - gamma P_pi) Phi w = Phi^T D r_pi`` (``D`` the visitation distribution), which more
  features push down. All feature sets are zero-padded to one width, so one compiled program (vmapped
  over feature sets and seeds) runs them all.
* **Deep Q-learning** (Sec. 8.4): a one-hidden-layer network learns ``q*`` off-policy from the
  uniform behaviour policy, with replay and a target network; we plot the RMS error of
  ``max_a q(s, a)`` against ``v*`` and the fraction of cells whose greedy action is optimal.
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
from jaxlab.rl.tabular.gridworld import book_grid_world
from jaxlab.rl.tabular.td import TDConfig, td_state_values
from jaxlab.rl.tabular.value_approximation import (
    GridDQNConfig,
    deep_q_learning,
    fourier_features,
    polynomial_features,
    td_linear_fixed_point,
    visitation_distribution,
)
from jaxlab.validation import check_positive


@dataclasses.dataclass(frozen=True)
class FAConfig:
    """Sizes of the function-approximation study."""

    gamma: float = 0.9
    """Discount rate."""
    orders: tuple[int, ...] = (1, 2, 3)
    """Orders of the polynomial and Fourier feature sets."""
    td_alpha: float = 0.002
    """TD-linear step size."""
    episode_length: int = 500
    """Steps per TD-linear episode."""
    num_episodes: int = 300
    """TD-linear episodes per run."""
    num_chunks: int = 15
    """Evaluation points along the TD-linear runs."""
    num_seeds: int = 4
    """Independent runs (TD-linear and deep Q-learning)."""
    dqn_updates: int = 3000
    """Deep Q-learning iterations (each adds one transition per environment and makes one gradient step)."""
    dqn_log_every: int = 100
    """Iterations between evaluations of the network."""
    dqn_target_update_interval: int = 10
    """Gradient steps between copies of the online network into the target network (each copy is one
    Bellman backup of the target, so a short period propagates values faster at these sizes)."""
    dqn_anneal_lr: bool = True
    """Decay deep Q-learning's learning rate linearly to 0 over the run. At a constant rate the error
    rises again after about 1500 iterations (some seeds lose a cell's greedy action by 3000); over
    1000 iterations the constant rate converges on every seed and annealing stops learning too early."""

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        if not self.orders or min(self.orders) < 1:
            raise ValueError(f"orders={self.orders} must be non-empty and >= 1")
        if not self.td_alpha > 0:
            raise ValueError(f"td_alpha={self.td_alpha} must be > 0")
        check_positive(self, "episode_length", "num_episodes", "num_chunks", "num_seeds", "dqn_updates",
                             "dqn_log_every")
        if self.num_episodes % self.num_chunks:
            raise ValueError(f"num_episodes={self.num_episodes} must be a multiple of num_chunks={self.num_chunks}")
        self.dqn_config()  # validates the deep Q-learning fields

    def dqn_config(self) -> GridDQNConfig:
        return GridDQNConfig(gamma=self.gamma, num_updates=self.dqn_updates, log_every=self.dqn_log_every,
                             target_update_interval=self.dqn_target_update_interval, anneal_lr=self.dqn_anneal_lr)


def _rms(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.sqrt(jnp.mean(x**2, axis=axis))


def _feature_sets(env, orders) -> dict[str, jax.Array]:
    sets = {f"polynomial, order {k}": polynomial_features(env, k) for k in orders}
    sets |= {f"Fourier, order {k}": fourier_features(env, k) for k in orders}
    return sets


@register_experiment(
    "gridworld-fa",
    description="TD-linear (polynomial / Fourier features) and deep Q-learning on the grid: value error against steps",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Secs. 8.2 and 8.4",
    quick_seconds=6.7,
    quick=FAConfig(num_episodes=100, num_chunks=5, num_seeds=2, dqn_updates=1000, dqn_anneal_lr=False),
)
def gridworld_fa(cfg: FAConfig, ctx: RunContext) -> ExperimentResult:
    env = book_grid_world(start=None)  # episodes start in every cell
    P, R = env.tabular_model()
    pi = uniform_policy(env.num_states, env.num_actions)
    v_pi = policy_evaluation(P, R, pi, cfg.gamma)
    v_star, _ = value_iteration(P, R, cfg.gamma)
    metrics: dict = {}

    # ---- TD-linear: every feature set zero-padded to width F, vmapped over (feature set, seed).
    sets = _feature_sets(env, cfg.orders)
    F = max(phi.shape[1] for phi in sets.values())
    phis = jnp.stack([jnp.pad(phi, ((0, 0), (0, F - phi.shape[1]))) for phi in sets.values()])  # [K, S, F]
    d = visitation_distribution(env, pi, cfg.episode_length)
    v_fixed = {name: phi @ td_linear_fixed_point(P, R, pi, cfg.gamma, phi, d) for name, phi in sets.items()}
    floors = {name: float(_rms(v - v_pi)) for name, v in v_fixed.items()}
    chunk = cfg.num_episodes // cfg.num_chunks
    config = TDConfig(gamma=cfg.gamma, alpha=cfg.td_alpha, num_episodes=chunk, max_episode_steps=cfg.episode_length)

    @jax.jit
    def run_chunk(keys, phis, w):  # keys [K, R, 2], phis [K, S, F], w [K, R, F] -> w, v [K, R, S]
        def one(key, phi, w0):
            result = td_state_values(key, env, pi, config, features=phi, w0=w0)
            return result.w, result.v

        return jax.vmap(jax.vmap(one, in_axes=(0, None, 0)))(keys, phis, w)

    K, Rn = len(sets), cfg.num_seeds
    w = jnp.zeros((K, Rn, F))
    td_err = []
    for c in ctx.progress(range(cfg.num_chunks), desc="TD-linear chunk"):
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(ctx.key, 0), c), K * Rn).reshape(K, Rn, -1)
        w, v = run_chunk(keys, phis, w)
        td_err.append(np.asarray(_rms(v - v_pi)))  # [K, R]
    td_err = np.stack(td_err, -1)  # [K, R, C]
    to_fixed = np.asarray(_rms(v - jnp.stack(list(v_fixed.values()))[:, None]))  # [K, R] final v_hat vs v_TD
    td_steps = (chunk * cfg.episode_length * np.arange(1, cfg.num_chunks + 1)).tolist()
    metrics["td_linear"] = {
        "steps": td_steps,
        **{name: {"features": int(sets[name].shape[1]), "rmse_per_chunk": td_err[i].mean(0).tolist(),
                  "final_rmse": float(td_err[i, :, -1].mean()), "fixed_point_rmse": floors[name],
                  "final_rms_distance_to_fixed_point": float(to_fixed[i].mean())}
           for i, name in enumerate(sets)},
    }

    # ---- Deep Q-learning from the uniform behaviour policy.
    dqn = cfg.dqn_config()
    # A Python loop over seeds: the vmapped program takes about twice as long to compile on CPU as the
    # single-seed one, far more than the runs themselves.
    keys = jax.random.split(jax.random.fold_in(ctx.key, 1), cfg.num_seeds)
    runs = [deep_q_learning(k, env, dqn) for k in ctx.progress(keys, desc="deep Q-learning seed")]
    q_hist = jnp.stack([r.q_history for r in runs])  # [R, U / log_every, S, A]
    dqn_err = np.asarray(_rms(q_hist.max(-1) - v_star))  # [R, U / log_every]
    greedy = jax.vmap(jax.vmap(greedy_policy))(q_hist)
    v_greedy = jax.vmap(jax.vmap(lambda p: policy_evaluation(P, R, p, cfg.gamma)))(greedy)
    dqn_opt = np.asarray(jnp.mean(jnp.abs(v_greedy - v_star) < 1e-4, axis=-1))  # [R, U / log_every]
    dqn_steps = (dqn.num_envs * cfg.dqn_log_every * np.arange(1, q_hist.shape[1] + 1)).tolist()
    metrics["deep_q_learning"] = {
        "env_steps": dqn_steps,
        "rmse_max_q_vs_v*": dqn_err.mean(0).tolist(),
        "fraction_of_cells_greedy_optimal": dqn_opt.mean(0).tolist(),
        "final_rmse": float(dqn_err[:, -1].mean()),
        "final_fraction_greedy_optimal": float(dqn_opt[:, -1].mean()),
        "td_loss_first_and_last_100_updates": [float(np.nanmean([r.losses[:100] for r in runs])),
                                               float(np.nanmean([r.losses[-100:] for r in runs]))],
    }

    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for i, name in enumerate(sets):
        color = f"C{i}"
        axes[0].plot(td_steps, td_err[i].mean(0), "o-", ms=3, color=color, label=f"{name} ({sets[name].shape[1]})")
        axes[0].axhline(floors[name], color=color, ls=":", lw=1)
    axes[0].set(yscale="log", xlabel="steps", ylabel="RMS error of v_hat vs v_pi",
                title="TD-linear, uniform policy (dotted: TD fixed point)")
    axes[0].legend(fontsize=7)
    ax2 = axes[1]
    ax2.plot(dqn_steps, dqn_err.mean(0), color="C0", label="RMS error of max_a q vs v*")
    ax2.fill_between(dqn_steps, dqn_err.min(0), dqn_err.max(0), color="C0", alpha=0.2, lw=0)
    ax2.set(yscale="log", xlabel="environment steps", ylabel="RMS error", title="Deep Q-learning, uniform behaviour")
    twin = ax2.twinx()
    twin.plot(dqn_steps, dqn_opt.mean(0), color="C3", label="cells with optimal greedy action")
    twin.set(ylabel="fraction of cells", ylim=(0, 1.05))
    ax2.legend(loc="upper center", fontsize=7)
    twin.legend(loc="center right", fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    td = metrics["td_linear"]
    summary = (
        "TD-linear converges to its fixed point; richer features lower that floor (final RMS error "
        + ", ".join(f"{name}: {td[name]['final_rmse']:.2f} (fixed point {td[name]['fixed_point_rmse']:.2f})"
                    for name in sets)
        + f"). Deep Q-learning from uniform data reaches RMS error {metrics['deep_q_learning']['final_rmse']:.3f} "
        f"on max_a q with {100 * metrics['deep_q_learning']['final_fraction_greedy_optimal']:.0f}% of cells "
        "greedy-optimal."
    )
    dq = metrics["deep_q_learning"]
    orders = sorted(cfg.orders)
    floors_by = {kind: [td[f"{kind}, order {k}"]["fixed_point_rmse"] for k in orders]
                 for kind in ("polynomial", "Fourier")}
    to_fp = {name: td[name]["final_rms_distance_to_fixed_point"] for name in sets}
    claims = (
        Claim("TD-linear converges to its TD fixed point: final RMS distance of phi^T w to it < 0.15 for every "
              "feature set (Sec. 8.2)", holds=all(d < 0.15 for d in to_fp.values()),
              evidence=f"worst {max(to_fp, key=to_fp.get)}: {max(to_fp.values()):.3f}"),
        Claim("richer features lower the error floor: the TD fixed point's RMS error against v_pi falls as the "
              "polynomial and the Fourier order grow", holds=all(a > b for f in floors_by.values()
                                                               for a, b in zip(f, f[1:])),
              evidence="; ".join(f"{kind} orders {orders}: " + ", ".join(f"{x:.3f}" for x in f)
                                 for kind, f in floors_by.items())),
        Claim("deep Q-learning from the uniform behaviour policy makes the greedy action optimal in every cell with "
              "RMS error of max_a q against v* < 0.2 (Sec. 8.4)",
              holds=dq["final_fraction_greedy_optimal"] == 1.0 and dq["final_rmse"] < 0.2,
              evidence=f"{100 * dq['final_fraction_greedy_optimal']:.0f}% of cells optimal, RMS error "
                       f"{dq['rmse_max_q_vs_v*'][0]:.2f} -> {dq['final_rmse']:.3f}"),
    )
    return ExperimentResult(metrics=metrics, summary=summary, claims=claims)
