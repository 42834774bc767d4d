"""``rl-throughput``: training throughput of end-to-end jitted PPO on CartPole-v1 against the number of
parallel environments and of seeds trained at once (the scaling plot of PureJaxRL, Lu et al. 2022).

Every point is a full PPO run (rollouts, GAE, 4 epochs x 4 minibatches of Adam) at PureJaxRL's CartPole
settings with only ``num_envs`` (and the seed count) changed, timed after compilation: environment steps
per second summed over seeds, the best of ``repeats`` runs. Seeds are trained by ``jax.vmap`` of the
whole run; one seed is the plain ``jax.jit(train)``.

The baseline is the gym-style loop CleanRL-like code runs on a gymnax env: per environment step, Python
calls the jitted agent (PPO's action, log-prob and value) and the jitted vectorised ``env.step``, with the
action, observation, reward and done passing through the host as NumPy arrays into a rollout buffer; same
envs and network. It only collects experience and never learns, so the speed-up of the compiled
training loop over it is a lower bound of the one over a loop that also trains.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxlab.context import RunContext
from jaxlab.registry import Claim, Comparison, ExperimentResult, register_experiment
from jaxlab.rl import ppo
from jaxlab.rl.on_policy import ActorCritic
from jaxlab.rl.rollout import env_reset, env_step
from jaxlab.rl.train import init_states, train_in_chunks
from jaxlab.rl.wrappers import make_vec_env

__all__ = ["ThroughputConfig", "measure_python_loop", "measure_throughput"]


def measure_throughput(cfg: ppo.PPOConfig, seeds: int, key: jax.Array, repeats: int = 2,
                       fast_compile: bool = False) -> dict[str, float]:
    """Compile and time the updates of ``make_train(cfg)`` for ``seeds`` seeds at once (one jitted, vmapped
    ``lax.scan`` over the whole run, as ``train_in_chunks`` runs it; initialisation is not timed). Returns
    compile seconds, the best run's seconds and env steps per second summed over seeds."""
    states = jax.block_until_ready(init_states(cfg, jax.random.split(key, seeds), fast_compile))
    compile_s, best = 0.0, float("inf")
    for _ in range(repeats):  # the compiled program is cached (compiled_chunk): only the first run compiles
        _, _, timing = train_in_chunks(cfg, states, num_chunks=1, fast_compile=fast_compile)
        compile_s = compile_s or timing.compile_s
        best = min(best, timing.run_s)
    steps = cfg.num_updates * cfg.steps_per_update * seeds
    return {"compile_s": compile_s, "run_s": best, "env_steps": steps, "steps_per_s": steps / best}


def measure_python_loop(cfg: ppo.PPOConfig, rollout_length: int, key: jax.Array, repeats: int = 2) -> dict[str, float]:
    """Env steps per second of a gym-style Python loop over ``rollout_length`` steps of ``cfg.num_envs`` envs.

    The loop CleanRL-like code runs with a gymnax env and a jitted agent: the agent and the environment
    are separate jitted calls, the action goes to the environment as a NumPy array and the environment's
    observation, reward and done come back to the host, into a Python rollout buffer, every step (as
    ``gym.Env.step`` returns them). Compiled once before timing; the best of ``repeats`` loops counts.
    """
    env, env_params = make_vec_env(cfg.env_id, cfg.num_envs)
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    k_env, k_net, key = jax.random.split(key, 3)
    carry = env_reset(env, env_params, k_env)
    params = ac.init(k_net, carry.obs)

    @jax.jit
    def act(params, obs, key):                      # obs [E, obs_dim] -> action, log-prob, value [E]
        action, log_prob = ac.policy(params["actor"], obs).sample_and_log_prob(seed=key)
        return action, log_prob, ac.value(params["critic"], obs)

    @jax.jit
    def step_env(carry, action, key):               # the vectorised env.step(action)
        carry, transition = env_step(env, env_params, carry, action, key)
        return carry, carry.obs, transition.reward, transition.terminated

    def loop(carry, key, steps):
        buffer, obs = [], np.asarray(carry.obs)
        for _ in range(steps):
            key, k_act, k_env = jax.random.split(key, 3)
            action, log_prob, value = act(params, obs, k_act)
            action = np.asarray(action)
            carry, obs, reward, done = step_env(carry, action, k_env)
            obs, reward, done = np.asarray(obs), np.asarray(reward), np.asarray(done)
            buffer.append((obs, action, reward, done, np.asarray(log_prob), np.asarray(value)))
        return buffer

    t0 = time.perf_counter()
    loop(carry, key, 2)  # compiles both calls
    compile_s, best = time.perf_counter() - t0, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(carry, key, rollout_length)
        best = min(best, time.perf_counter() - t0)
    steps = rollout_length * cfg.num_envs
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
    loop_steps: int = 5_000
    """Steps of the gym-style Python loop baseline (4 environments each, one seed)."""

    def __post_init__(self):
        for name in ("num_envs", "seeds"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name}={values} must be non-empty and positive")
        if self.env_steps < 1 or self.repeats < 1 or self.loop_steps < 1:
            raise ValueError(f"env_steps={self.env_steps}, repeats={self.repeats} and loop_steps={self.loop_steps} "
                             f"must be >= 1")

    def ppo_config(self, num_envs: int, seeds: int) -> ppo.PPOConfig:
        """PureJaxRL's CartPole PPO with ``num_envs`` environments, sized to ``env_steps`` over ``seeds``."""
        per_update = num_envs * ppo.PPOConfig.rollout_length
        updates = max(self.env_steps // (per_update * seeds), 2)
        return ppo.PPOConfig(env_id="CartPole-v1", num_envs=num_envs, total_timesteps=updates * per_update)


@register_experiment("rl-throughput",
                     description="PPO on CartPole: env steps/s against parallel environments and seeds "
                                 "(end-to-end jit, vmap over seeds)",
                     paper="Lu et al. 2022, Discovered Policy Optimisation (PureJaxRL), Figure 2",
                     quick_seconds=20,
                     quick=ThroughputConfig(num_envs=(4, 64), seeds=(1, 4), env_steps=100_000, repeats=1),
                     timed=True)
def rl_throughput(cfg: ThroughputConfig, ctx: RunContext) -> ExperimentResult:
    points: dict[tuple[int, int], dict] = {}
    todo = [(n, 1) for n in cfg.num_envs] + [(4, s) for s in cfg.seeds]
    for n, s in ctx.progress(list(dict.fromkeys(todo)), desc="points"):
        points[(n, s)] = measure_throughput(cfg.ppo_config(n, s), s, jax.random.fold_in(ctx.key, n * 1000 + s),
                                            cfg.repeats, cfg.fast_compile)
        ctx.log(f"num_envs={n} seeds={s}: {points[(n, s)]['steps_per_s']:.3g} steps/s")
    loop = measure_python_loop(cfg.ppo_config(4, 1), cfg.loop_steps, jax.random.fold_in(ctx.key, 999_999), cfg.repeats)
    ctx.log(f"gym-style Python loop, 4 envs: {loop['steps_per_s']:.3g} steps/s")

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, (xs, pick, xlabel) in zip(axes, [(cfg.num_envs, lambda n: (n, 1), "parallel environments (1 seed)"),
                                             (cfg.seeds, lambda s: (4, s), "seeds (4 environments each)")]):
        ax.plot(xs, [points[pick(x)]["steps_per_s"] for x in xs], "o-", label="end-to-end jit (PPO training)")
        ax.axhline(loop["steps_per_s"], color="C3", ls="--", lw=1,
                   label="gym-style Python loop, 4 envs (acting only)")
        ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("environment steps / s (all seeds)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"PPO on CartPole-v1, end-to-end jit on {jax.default_backend()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.figure_path, dpi=110)

    default = points.get((4, 1))
    rows = [{"num_envs": n, "seeds": s, **p} for (n, s), p in points.items()]
    comparisons = ()
    if default is not None:
        label = f"PPO CartPole steps/s, 4 envs x 128 steps, 1 seed ({jax.default_backend()})"
        comparisons = (Comparison(quantity=label, ours=round(default["steps_per_s"])),
                       Comparison(quantity="gym-style Python loop of jitted steps, 4 envs, steps/s",
                                  ours=round(loop["steps_per_s"])))
    best = max(points.items(), key=lambda kv: kv[1]["steps_per_s"])
    env_curve = [points[(n, 1)]["steps_per_s"] for n in sorted(cfg.num_envs)]
    seed_curve = [points[(4, s)]["steps_per_s"] for s in sorted(cfg.seeds)]
    claims = [
        Claim("throughput rises with the number of parallel environments (1 seed)",
              holds=all(a < b for a, b in zip(env_curve, env_curve[1:])),
              evidence=", ".join(f"{n} envs {v:.3g}" for n, v in zip(sorted(cfg.num_envs), env_curve))),
        Claim("throughput rises with the number of seeds trained at once by vmap (4 environments each)",
              holds=all(a < b for a, b in zip(seed_curve, seed_curve[1:])),
              evidence=", ".join(f"{s} seeds {v:.3g}" for s, v in zip(sorted(cfg.seeds), seed_curve))),
    ]
    speedup = None
    if default is not None:
        speedup = default["steps_per_s"] / loop["steps_per_s"]
        claims.insert(0, Claim(
            "the end-to-end compiled training loop runs >= 5x the env steps/s of a gym-style Python loop of jitted "
            "single steps (4 envs, 1 seed)", holds=speedup >= 5.0,
            evidence=f"{default['steps_per_s']:.3g} vs {loop['steps_per_s']:.3g} steps/s: {speedup:.1f}x"))
    summary = (f"End-to-end jitted PPO on CartPole-v1 ({jax.default_backend()}): "
               + (f"{default['steps_per_s']:.3g} env steps/s at PureJaxRL's defaults (4 envs, 1 seed), "
                  f"{speedup:.1f}x the {loop['steps_per_s']:.3g} of a Python loop of jitted steps that only acts; "
                  if default else "")
               + f"the fastest point, {best[0][0]} envs x {best[0][1]} seeds, reaches {best[1]['steps_per_s']:.3g}.")
    return ExperimentResult(metrics={"backend": jax.default_backend(), "points": rows, "python_loop": loop,
                                     "speedup_over_python_loop": speedup},
                            comparisons=comparisons, summary=summary, claims=tuple(claims))
