"""The model-based chapters of Zhao, *Mathematical Foundations of Reinforcement Learning*, on its 5x5 grid.

* ``gridworld-optimal`` (Ch. 3): optimal state values and policies of the baseline world
  (``gamma = 0.9``, ``r_boundary = r_forbidden = -1``, ``r_target = 1``) and of the three variants of
  Sec. 3.5 (``gamma = 0.5``, ``gamma = 0``, ``r_forbidden = -10``), drawn as heat maps with arrows.
  The baseline's values are printed in the book (Fig. 3.4(a)); we compare all 25 cells.
* ``gridworld-dp`` (Ch. 4): convergence of value iteration, policy iteration and truncated policy
  iteration, ``||v_k - v*||_inf`` against the iteration ``k`` and against the Bellman sweeps spent.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.tabular.dynamic_programming import dp_history, policy_evaluation, value_iteration
from jaxlab.rl.tabular.gridworld import ACTION_NAMES, book_grid_world
from jaxlab.rl.tabular.plot import plot_grid_worlds

BOOK_SOURCE = "Zhao, Mathematical Foundations of RL (2025), Fig. 3.4(a)"

# The optimal state values of the baseline world as printed in the book (Fig. 3.4(a)), one decimal.
BOOK_OPTIMAL_VALUES = (
    (5.8, 5.6, 6.2, 6.5, 5.8),
    (6.5, 7.2, 8.0, 7.2, 6.5),
    (7.2, 8.0, 10.0, 8.0, 7.2),
    (8.0, 10.0, 10.0, 10.0, 8.0),
    (7.2, 9.0, 10.0, 9.0, 8.1),
)


def _policy_names(pi: jnp.ndarray, shape: tuple[int, int]) -> list[list[str]]:
    """Greedy action name of every cell, ``[rows][cols]``."""
    return np.array(ACTION_NAMES)[np.asarray(pi).argmax(-1)].reshape(shape).tolist()


def _forbidden_entries(env, pi) -> int:
    """Free cells from which the policy's move enters a forbidden cell."""
    landed = env.next_state_table[np.arange(env.num_states), np.asarray(pi).argmax(-1)]
    return int(np.sum(~env.forbidden & env.forbidden[landed]))


# ----------------------------------------------------------------------------------- gridworld-optimal
@dataclasses.dataclass(frozen=True)
class OptimalConfig:
    """The four settings of Sec. 3.5: the baseline, two discount rates and a harsher forbidden reward."""

    gamma: float = 0.9
    """Discount rate of the baseline."""
    small_gammas: tuple[float, ...] = (0.5, 0.0)
    """Shorter-sighted discount rates (baseline rewards)."""
    harsh_r_forbidden: float = -10.0
    """r_forbidden of the last variant (gamma of the baseline)."""
    tol: float = 1e-8
    """Value-iteration tolerance."""

    def __post_init__(self):
        for g in (self.gamma, *self.small_gammas):
            if not 0.0 <= g < 1.0:
                raise ValueError(f"gamma={g} (gamma / small_gammas) must lie in [0, 1)")
        if not self.tol > 0:
            raise ValueError(f"tol={self.tol} must be > 0")


@register_experiment(
    "gridworld-optimal",
    description="Optimal state values and policies of the book's grid world for four reward/discount settings",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Fig. 3.4 and Sec. 3.5",
    quick_seconds=0.7,
    quick=OptimalConfig(),
)
def gridworld_optimal(cfg: OptimalConfig, ctx: RunContext) -> ExperimentResult:
    settings = [(f"baseline, gamma={cfg.gamma}", book_grid_world(), cfg.gamma)]
    settings += [(f"gamma={g}", book_grid_world(), g) for g in cfg.small_gammas]
    settings += [(f"r_forbidden={cfg.harsh_r_forbidden}, gamma={cfg.gamma}",
                  book_grid_world(r_forbidden=cfg.harsh_r_forbidden), cfg.gamma)]
    metrics, values, policies = {}, [], []
    for label, env, gamma in ctx.progress(settings, desc="setting"):
        P, R = env.tabular_model()
        v, pi = value_iteration(P, R, gamma, tol=cfg.tol)
        residual = float(jnp.abs(policy_evaluation(P, R, pi, gamma) - v).max())  # pi is greedy in v: v_pi = v*
        values.append(v)
        policies.append(pi)
        metrics[label] = {
            "values": np.round(np.asarray(v), 4).reshape(env.shape).tolist(),
            "policy": _policy_names(pi, env.shape),
            "free_cells_entering_forbidden": _forbidden_entries(env, pi),
            "max_abs(v_pi - v*)": residual,
        }
    env = settings[0][1]
    fig = plot_grid_worlds([s[1] for s in settings], values, policies, [s[0] for s in settings], ncols=4)
    fig.savefig(ctx.figure_path, dpi=120)

    v_base = np.asarray(values[0]).reshape(env.shape)
    book = np.array(BOOK_OPTIMAL_VALUES)
    metrics["max_abs_diff_vs_book_fig_3_4a"] = round(float(np.abs(np.round(v_base, 1) - book).max()), 6)
    cells = ((0, 0), (0, 4), (3, 0), (4, 4))
    comparisons = tuple(
        Comparison(f"v*(row {r + 1}, col {c + 1}), baseline", round(float(v_base[r, c]), 2), float(book[r, c]),
                   BOOK_SOURCE)
        for r, c in cells
    ) + (Comparison("max |v* - book| over 25 cells (one decimal)", metrics["max_abs_diff_vs_book_fig_3_4a"], 0.0,
                    BOOK_SOURCE),)
    entries = {k: m["free_cells_entering_forbidden"] for k, m in metrics.items() if isinstance(m, dict)}
    summary = (
        f"Value iteration reproduces the book's optimal values of the baseline grid to the printed decimal "
        f"(largest difference {metrics['max_abs_diff_vs_book_fig_3_4a']:.1f} over 25 cells). With gamma={cfg.gamma} "
        f"the optimal policy cuts through forbidden cells ({entries[settings[0][0]]} free cells step into one); "
        f"a smaller gamma or r_forbidden={cfg.harsh_r_forbidden} makes it avoid them "
        f"({', '.join(f'{k}: {n}' for k, n in list(entries.items())[1:])}); at gamma=0 it is myopic and "
        f"cells far from the target have value 0."
    )
    diff = metrics["max_abs_diff_vs_book_fig_3_4a"]
    others = list(entries.items())[1:]
    myopic = np.asarray(values[1 + list(cfg.small_gammas).index(0.0)]) if 0.0 in cfg.small_gammas else None
    claims = (
        Claim("the baseline's optimal state values equal the book's Fig. 3.4(a) in all 25 cells to its printed "
              "decimal (|round(v*, 1) - book| = 0)", holds=diff == 0.0, evidence=f"largest difference {diff:g}"),
        Claim("the greedy policy of v* is optimal: max |v_pi - v*| <= 1e-4 in every setting",
              holds=max(m["max_abs(v_pi - v*)"] for m in metrics.values() if isinstance(m, dict)) <= 1e-4,
              evidence=", ".join(f"{k}: {m['max_abs(v_pi - v*)']:.1e}" for k, m in metrics.items()
                                 if isinstance(m, dict))),
        Claim(f"with gamma={cfg.gamma} the optimal policy passes through forbidden cells; with a smaller gamma or "
              f"r_forbidden={cfg.harsh_r_forbidden} it avoids them (Sec. 3.5)",
              holds=entries[settings[0][0]] > 0 and all(n == 0 for _, n in others),
              evidence=", ".join(f"{k}: {n} free cells step into one" for k, n in entries.items())),
    )
    if myopic is not None:
        zero_cells = int(np.sum(np.abs(myopic) < 1e-6))
        claims += (Claim("with gamma=0 the policy is myopic: cells with no reward within one step have value 0 "
                         "(the top-left cell among them)", holds=abs(float(myopic[0])) < 1e-6 and zero_cells > 0,
                         evidence=f"v*(row 1, col 1) = {float(myopic[0]):g}; {zero_cells} of 25 cells at 0"),)
    return ExperimentResult(metrics=metrics, comparisons=comparisons, summary=summary, claims=claims)


# ---------------------------------------------------------------------------------------- gridworld-dp
@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Sizes of the dynamic-programming convergence study (baseline world)."""

    gamma: float = 0.9
    """Discount rate."""
    num_iters: int = 150
    """Iterations recorded per algorithm."""
    j_truncates: tuple[int, ...] = (1, 3, 6, 100)
    """Truncated-PI evaluation sweeps per iteration (1 is value iteration); policy iteration is added."""
    tolerance: float = 1e-3
    """Error ``||v_k - v*||_inf`` counted as converged."""

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma} must lie in [0, 1)")
        if self.num_iters < 1:
            raise ValueError(f"num_iters={self.num_iters} must be >= 1")
        if not self.j_truncates or min(self.j_truncates) < 1:
            raise ValueError(f"j_truncates={self.j_truncates} must be non-empty and >= 1")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance={self.tolerance} must be > 0")


@register_experiment(
    "gridworld-dp",
    description="Convergence of value iteration, policy iteration and truncated policy iteration on the grid",
    paper="Zhao 2025, Mathematical Foundations of Reinforcement Learning, Ch. 4 (Sec. 4.3, truncated PI)",
    quick_seconds=1.6,
    quick=DPConfig(num_iters=100),
)
def gridworld_dp(cfg: DPConfig, ctx: RunContext) -> ExperimentResult:
    env = book_grid_world()
    P, R = env.tabular_model()
    v_star, _ = value_iteration(P, R, cfg.gamma, tol=1e-7)
    methods = [(f"truncated PI, j={j}" if j > 1 else "value iteration", j) for j in cfg.j_truncates]
    methods.append(("policy iteration", None))
    metrics, curves = {"v_star": np.round(np.asarray(v_star), 4).tolist()}, {}
    for label, j in ctx.progress(methods, desc="algorithm"):
        vs = dp_history(P, R, cfg.gamma, cfg.num_iters, j_truncate=j)  # [K + 1, S]
        err = np.asarray(jnp.abs(vs - v_star).max(-1))  # [K + 1]
        below = np.flatnonzero(err <= cfg.tolerance)
        k_conv = int(below[0]) if below.size else None
        curves[label] = err
        metrics[label] = {
            "j_truncate": j,
            "iterations_to_tolerance": k_conv,
            "evaluation_sweeps_to_tolerance": None if k_conv is None or j is None else k_conv * j,
            "final_error": float(err[-1]),
            "error_every_10": err[::10].tolist(),
        }

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for label, err in curves.items():
        axes[0].semilogy(np.arange(err.size), np.maximum(err, 1e-7), label=label)
    axes[0].axhline(cfg.tolerance, color="0.6", ls=":", lw=1)
    axes[0].set(xlabel="iteration k", ylabel="||v_k - v*||_inf", title="Convergence per iteration")
    axes[0].legend(fontsize=8)
    labels = [m[0] for m in methods]
    iters = [metrics[label]["iterations_to_tolerance"] or np.nan for label in labels]
    axes[1].bar(np.arange(len(labels)), iters, color=[f"C{i}" for i in range(len(labels))])
    axes[1].set_xticks(np.arange(len(labels)), labels, rotation=20, fontsize=8)
    axes[1].set(ylabel=f"iterations to error <= {cfg.tolerance:g}", title="Iterations needed")
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=120)

    k = {label: metrics[label]["iterations_to_tolerance"] for label in labels}
    summary = (
        f"All schemes converge to the same v*. Iterations to reach error {cfg.tolerance:g}: "
        + ", ".join(f"{label} {n}" for label, n in k.items())
        + ". As the book argues (Sec. 4.3), truncated PI sits between value iteration (j=1) and policy "
        "iteration (exact evaluation): more evaluation sweeps per iteration, fewer iterations."
    )
    finals = {label: metrics[label]["final_error"] for label in labels}
    by_j = sorted(methods, key=lambda m: float("inf") if m[1] is None else m[1])  # policy iteration last
    order = [k[label] for label, _ in by_j]
    ordered = None not in order and all(a >= b for a, b in zip(order, order[1:]))
    claims = (
        Claim(f"value iteration, truncated PI (every j) and policy iteration all converge to v*: "
              f"||v_k - v*||_inf <= {cfg.tolerance:g} within {cfg.num_iters} iterations",
              holds=all(e <= cfg.tolerance for e in finals.values()),
              evidence=", ".join(f"{label} {e:.1e}" for label, e in finals.items())),
        Claim("iterations to converge fall as evaluation sweeps per iteration grow: value iteration >= truncated PI "
              "(j ascending) >= policy iteration (Sec. 4.3)", holds=ordered,
              evidence=", ".join(f"{label} {k[label]}" for label, _ in by_j)),
    )
    return ExperimentResult(metrics=metrics, summary=summary, claims=claims)
