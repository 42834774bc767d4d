"""``rl-classic-control``: learning curves of every deep RL algorithm of ``jaxlab.rl`` on gymnax's
CartPole-v1, Acrobot-v1 and Pendulum-v1, mean and spread over seeds, against environment steps and
against wall-clock time.

Each (algorithm, env) pair trains all its seeds in one ``jit(vmap(train))`` program, run in chunks
so that the wall-clock of every chunk is known (compilation is timed apart); ``workers`` runs train at
the same time from separate threads. The final return is the mean episode return over the last 10% of
updates, per seed; each claim is on its mean over seeds, with the targets the library is tuned for: on
CartPole in 5e5 steps, PPO, DQN and TRPO >= 475 (500 is the maximum) and A2C and REINFORCE >= 400; on
Acrobot PPO >= -100; on Pendulum in 2e5 steps DDPG, TD3 and SAC >= -250. The quick size trains the
runs with targets (all but the untargeted Acrobot ones) at the full step budget, with 2 seeds.
"""

from __future__ import annotations

import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl.off_policy import OffPolicyConfig
from jaxlab.rl.train import (ALGORITHMS, algorithm_config, final_return, init_states, plot_curves,
                             train_in_chunks)

STANDARD_TIMESTEPS = {"CartPole-v1": 500_000, "Acrobot-v1": 500_000, "Pendulum-v1": 200_000}
"""Environment steps per seed of a full run."""

TARGETS = {("ppo", "CartPole-v1"): 475.0, ("dqn", "CartPole-v1"): 475.0, ("trpo", "CartPole-v1"): 475.0,
           ("a2c", "CartPole-v1"): 400.0, ("reinforce", "CartPole-v1"): 400.0, ("ppo", "Acrobot-v1"): -100.0,
           ("ddpg", "Pendulum-v1"): -250.0, ("td3", "Pendulum-v1"): -250.0, ("sac", "Pendulum-v1"): -250.0}
"""Mean final return each full-size run is expected to reach."""

DEFAULT_RUNS = ("ppo/CartPole-v1", "dqn/CartPole-v1", "trpo/CartPole-v1", "a2c/CartPole-v1",
                "reinforce/CartPole-v1", "ppo/Acrobot-v1", "dqn/Acrobot-v1", "trpo/Acrobot-v1", "a2c/Acrobot-v1",
                "reinforce/Acrobot-v1", "ddpg/Pendulum-v1", "td3/Pendulum-v1", "sac/Pendulum-v1")


@dataclasses.dataclass(frozen=True)
class ClassicControlConfig:
    """Runs and sizes of the classic-control learning curves."""

    runs: tuple[str, ...] = DEFAULT_RUNS
    """ALGO/ENV pairs to train (each with the algorithm's tuned defaults)."""
    seeds: int = 4
    """Seeds per run, trained together with vmap."""
    timesteps_fraction: float = 1.0
    """Fraction of each env's standard budget (CartPole, Acrobot 5e5 steps; Pendulum 2e5)."""
    chunks: int = 20
    """Timed pieces of each run (the wall-clock axis has this resolution)."""
    fast_compile: bool = False
    """Compile without XLA backend optimisation (faster to compile, slower to run: for short runs)."""
    workers: int = 1
    """Runs trained at the same time, each from its own thread (on CPU, XLA runs one of these small
    programs on about one core, so 2 workers use 2 cores; the wall-clock axes then show shared cores)."""

    def __post_init__(self):
        if not self.runs:
            raise ValueError(f"runs={self.runs} must name at least one ALGO/ENV pair")
        for run in self.runs:
            algo, _, env = run.partition("/")
            if algo not in ALGORITHMS or env not in STANDARD_TIMESTEPS:
                raise ValueError(f"run {run!r} must be ALGO/ENV with ALGO in {sorted(ALGORITHMS)} "
                                 f"and ENV in {sorted(STANDARD_TIMESTEPS)}")
            self.run_config(run)  # action-space mismatches raise here
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be >= 1")
        if not 0.0 < self.timesteps_fraction <= 1.0:
            raise ValueError(f"timesteps_fraction={self.timesteps_fraction} must be in (0, 1]")
        if self.chunks < 1:
            raise ValueError(f"chunks={self.chunks} must be >= 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")

    def run_config(self, run: str):
        """The algorithm config of ``run``. In shortened runs, replay warm-up is capped at a quarter of
        the budget so that off-policy agents still learn."""
        algo, _, env = run.partition("/")
        total = max(int(STANDARD_TIMESTEPS[env] * self.timesteps_fraction), 1)
        cfg = algorithm_config(algo, env, total)
        if hasattr(cfg, "learning_starts") and cfg.learning_starts > total // 4:
            cfg = dataclasses.replace(cfg, learning_starts=total // 4)
        return cfg


def _smooth(x: np.ndarray, returns: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Window means of ``returns [S, U]`` at ``<= points`` positions of ``x [U]``."""
    U = returns.shape[1]
    w = max(U // points, 1)
    n = U // w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # windows before the first finished episode
        r = np.nanmean(returns[:, : n * w].reshape(returns.shape[0], n, w), axis=2)  # [S, n]
    return x[w - 1: n * w: w], r


def _seed_mean(returns: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(returns, axis=0)


@register_experiment("rl-classic-control",
                     description="learning curves of PPO, DQN, TRPO, A2C, REINFORCE, DDPG, TD3, SAC on CartPole, "
                                 "Acrobot and Pendulum (gymnax), mean and spread over seeds",
                     paper="Lu et al. 2022, Discovered Policy Optimisation (PureJaxRL); Schulman et al. 2017; "
                           "Mnih et al. 2015; Haarnoja et al. 2018; Fujimoto et al. 2018",
                     quick_seconds=189,
                     quick=ClassicControlConfig(
                         runs=("ppo/CartPole-v1", "dqn/CartPole-v1", "trpo/CartPole-v1", "a2c/CartPole-v1",
                               "reinforce/CartPole-v1", "ppo/Acrobot-v1", "ddpg/Pendulum-v1", "td3/Pendulum-v1",
                               "sac/Pendulum-v1"),
                         seeds=2, chunks=4, workers=2))
def rl_classic_control(cfg: ClassicControlConfig, ctx: RunContext) -> ExperimentResult:
    envs = list(dict.fromkeys(run.partition("/")[2] for run in cfg.runs))
    by_steps: dict[str, dict] = {env: {} for env in envs}
    by_time: dict[str, dict] = {env: {} for env in envs}

    def train_run(i: int, run: str):
        config = cfg.run_config(run)
        states = init_states(config, jax.random.split(jax.random.fold_in(ctx.key, i), cfg.seeds), cfg.fast_compile)
        _, metrics, timing = train_in_chunks(config, states, num_chunks=cfg.chunks, fast_compile=cfg.fast_compile)
        return config.num_updates, metrics, timing

    # Off-policy runs (a gradient step per few env steps: the slowest) start first, so that the last run to
    # finish is a short one.
    order = sorted(range(len(cfg.runs)),
                   key=lambda i: not issubclass(ALGORITHMS[cfg.runs[i].partition("/")[0]][1], OffPolicyConfig))
    done: dict[str, tuple] = {}
    with ThreadPoolExecutor(cfg.workers) as pool:
        futures = {pool.submit(train_run, i, cfg.runs[i]): cfg.runs[i] for i in order}
        for future in ctx.progress(as_completed(futures), total=len(futures), desc="runs"):
            run = futures[future]
            done[run] = future.result()
            timing = done[run][2]
            ctx.log(f"{run}: {timing.run_s:.1f}s (+{timing.compile_s:.1f}s compile)")

    results, comparisons = {}, []
    for run in cfg.runs:
        algo, _, env = run.partition("/")
        num_updates, metrics, timing = done[run]
        returns, env_steps = metrics["episode_return"], metrics["env_steps"][0]  # [S, U], [U]
        final = final_return(returns)
        per_chunk = -(-num_updates // cfg.chunks)
        counts = np.minimum(per_chunk, num_updates - per_chunk * np.arange(len(timing.chunk_s)))
        t_update = np.repeat(np.asarray(timing.chunk_s) / counts, counts)  # [U] seconds per update
        by_steps[env][algo] = _smooth(env_steps, returns)
        by_time[env][algo] = _smooth(np.cumsum(t_update), returns)
        target = TARGETS.get((algo, env))
        mean_final = float(np.nanmean(final)) if np.isfinite(final).any() else None
        results[run] = {
            "final_return_mean": mean_final, "final_return_seeds": final, "target": target,
            "target_met": None if target is None or mean_final is None else bool(mean_final >= target),
            "env_steps": int(env_steps[-1]), "seeds": cfg.seeds, "compile_s": timing.compile_s,
            "run_s": timing.run_s, "steps_per_s": float(env_steps[-1]) * cfg.seeds / max(timing.run_s, 1e-9),
            "curve_env_steps": by_steps[env][algo][0], "curve_mean_return": _seed_mean(by_steps[env][algo][1])}
        label = f"{algo.upper()} {env} final return" + (f" (target >= {target:g})" if target is not None else "")
        comparisons.append(Comparison(quantity=label, ours=round(mean_final, 1) if mean_final is not None else "n/a"))
        ctx.log(f"{run}: final return {mean_final} over {cfg.seeds} seeds")

    fig = Figure(figsize=(5 * len(envs), 7.5))
    axes = fig.subplots(2, len(envs), squeeze=False)
    for j, env in enumerate(envs):
        plot_curves(axes[0, j], by_steps[env], "environment steps (per seed)", f"{env}: mean, min-max over seeds")
        plot_curves(axes[1, j], by_time[env], "wall-clock seconds (all seeds, after compilation)", env)
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=110)

    claims = tuple(
        Claim(f"{run.partition('/')[0].upper()} on {run.partition('/')[2]}: mean final return over seeds "
              f">= {r['target']:g}", holds=bool(r["target_met"]),
              evidence=("no finished episode" if r["final_return_mean"] is None else
                        f"{r['final_return_mean']:.1f} (seeds: "
                        + ", ".join(f"{x:.0f}" for x in np.asarray(r["final_return_seeds"], float)) + ")")
                       + f" after {r['env_steps']:,} steps")
        for run, r in results.items() if r["target"] is not None)
    met = sum(c.holds for c in claims)
    size = ("at the full step budget" if cfg.timesteps_fraction == 1.0
            else f"at {cfg.timesteps_fraction:g} of the step budget")
    summary = (f"{len(cfg.runs)} runs {size} with {cfg.seeds} seeds each, every run one jit(vmap) program; "
               f"{met} of {len(claims)} runs reach their target mean final return (last 10% of updates): "
               + ", ".join(f"{run} {r['final_return_mean']:.0f}" if r["final_return_mean"] is not None
                           else f"{run} n/a" for run, r in results.items() if r["target"] is not None) + ".")
    return ExperimentResult(metrics={"runs": results, "config": dataclasses.asdict(cfg)},
                            comparisons=tuple(comparisons), summary=summary, claims=claims)
