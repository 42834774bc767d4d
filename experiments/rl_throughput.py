"""``rl-throughput``: training throughput of end-to-end jitted PPO on CartPole-v1 against the number of
parallel environments and of seeds trained at once (the scaling plot of PureJaxRL, Lu et al. 2022).

Every point is a full PPO run (rollouts, GAE, 4 epochs x 4 minibatches of Adam) at PureJaxRL's CartPole
settings with only ``num_envs`` (and the seed count) changed, timed after compilation: environment steps
per second summed over seeds, the best of ``repeats`` runs. Seeds are trained by ``jax.vmap`` of the
whole run; one seed is the plain ``jax.jit(train)``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxlab.context import RunContext  # noqa: E402
from jaxlab.experiments.rl_train import train_in_chunks  # noqa: E402
from jaxlab.registry import Comparison, ExperimentResult, register_experiment  # noqa: E402
from jaxlab.rl import ppo  # noqa: E402

__all__ = ["ThroughputConfig", "measure_throughput"]


def measure_throughput(cfg: ppo.PPOConfig, seeds: int, key: jax.Array, repeats: int = 2,
                       fast_compile: bool = False) -> dict[str, float]:
    """Compile and time the updates of ``make_train(cfg)`` for ``seeds`` seeds at once (one jitted, vmapped
    ``lax.scan`` over the whole run, as ``train_in_chunks`` runs it; initialisation is not timed). Returns
    compile seconds, the best run's seconds and env steps per second summed over seeds."""
    train = ppo.make_train(cfg)
    states = jax.block_until_ready(jax.jit(jax.vmap(train.init))(jax.random.split(key, seeds)))
    compile_s, best = 0.0, float("inf")
    for _ in range(repeats):  # train_in_chunks keeps the compiled program: only the first run compiles
        _, _, timing = train_in_chunks(train, states, num_chunks=1, fast_compile=fast_compile)
        compile_s = compile_s or timing.compile_s
        best = min(best, timing.run_s)
    steps = train.num_updates * cfg.steps_per_update * seeds
    return {"compile_s": compile_s, "run_s": best, "env_steps": steps, "steps_per_s": steps / best}


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    """Sweeps of the throughput experiment."""

    num_envs: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    """Parallel environments per seed (one seed)."""
    seeds: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Seeds trained at once (4 environments each)."""
    env_steps: int = 1_000_000
    """Environment steps per point, over all seeds (rounded to whole updates, at least 2)."""
    repeats: int = 2
    """Timed runs per point after compilation; the fastest counts."""
    fast_compile: bool = False
    """Compile without XLA backend optimisation (smoke tests only: the timings then mean little)."""

    def __post_init__(self):
        for name in ("num_envs", "seeds"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name}={values} must be non-empty and positive")
        if self.env_steps < 1 or self.repeats < 1:
            raise ValueError(f"env_steps={self.env_steps} and repeats={self.repeats} must be >= 1")

    def ppo_config(self, num_envs: int, seeds: int) -> ppo.PPOConfig:
        """PureJaxRL's CartPole PPO with ``num_envs`` environments, sized to ``env_steps`` over ``seeds``."""
        per_update = num_envs * ppo.PPOConfig.num_steps
        updates = max(self.env_steps // (per_update * seeds), 2)
        return ppo.PPOConfig(env_id="CartPole-v1", num_envs=num_envs, total_timesteps=updates * per_update)


@register_experiment("rl-throughput",
                     description="PPO on CartPole: env steps/s against parallel environments and seeds "
                                 "(end-to-end jit, vmap over seeds)",
                     paper="Lu et al. 2022, Discovered Policy Optimisation (PureJaxRL), Figure 2",
                     quick=ThroughputConfig(num_envs=(4, 64), seeds=(1, 4), env_steps=100_000, repeats=1))
def rl_throughput(cfg: ThroughputConfig, ctx: RunContext) -> ExperimentResult:
    points: dict[tuple[int, int], dict] = {}
    todo = [(n, 1) for n in cfg.num_envs] + [(4, s) for s in cfg.seeds]
    for n, s in ctx.progress(list(dict.fromkeys(todo)), desc="points"):
        points[(n, s)] = measure_throughput(cfg.ppo_config(n, s), s, jax.random.fold_in(ctx.key, n * 1000 + s),
                                            cfg.repeats, cfg.fast_compile)
        ctx.log(f"num_envs={n} seeds={s}: {points[(n, s)]['steps_per_s']:.3g} steps/s")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (xs, pick, xlabel) in zip(axes, [(cfg.num_envs, lambda n: (n, 1), "parallel environments (1 seed)"),
                                             (cfg.seeds, lambda s: (4, s), "seeds (4 environments each)")]):
        ax.plot(xs, [points[pick(x)]["steps_per_s"] for x in xs], "o-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("environment steps / s (all seeds)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"PPO on CartPole-v1, end-to-end jit on {jax.default_backend()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=110)
    plt.close(fig)

    default = points.get((4, 1))
    rows = [{"num_envs": n, "seeds": s, **p} for (n, s), p in points.items()]
    comparisons = ()
    if default is not None:
        label = f"PPO CartPole steps/s, 4 envs x 128 steps, 1 seed ({jax.default_backend()})"
        comparisons = (Comparison(quantity=label, ours=round(default["steps_per_s"])),)
    best = max(points.items(), key=lambda kv: kv[1]["steps_per_s"])
    summary = (f"End-to-end jitted PPO on CartPole-v1 ({jax.default_backend()}): "
               + (f"{default['steps_per_s']:.3g} env steps/s at PureJaxRL's defaults (4 envs, 1 seed); "
                  if default else "")
               + f"the fastest point, {best[0][0]} envs x {best[0][1]} seeds, reaches {best[1]['steps_per_s']:.3g}.")
    return ExperimentResult(metrics={"backend": jax.default_backend(), "points": rows}, comparisons=comparisons,
                            summary=summary)
