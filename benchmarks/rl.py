"""Benchmark: deep RL training throughput, end-to-end jit against host-driven loops, every algorithm.

    python benchmarks/rl.py [--quick]

Sections, all in one run on one backend (times after compilation; compile time reported apart):

* ``ppo``: PPO on CartPole-v1 at PureJaxRL's defaults (4 envs x 128 steps, 4 epochs x 4 minibatches,
  5e5 steps, one seed) as one ``jax.jit(train)`` (the public API's call, as PureJaxRL times it; the
  ``scaling`` section runs the vmapped, chunked path of ``jaxlab.rl.train``), env steps/s against the
  reference figure of PureJaxRL's ``ppo.py`` on a 2-core CPU (about 1e5 steps/s).
* ``purejaxrl`` (with ``--purejaxrl FILE``): PureJaxRL's own ``ppo.py`` timed in the same process,
  alternating run by run with ours, at the same settings. ``FILE`` is a copy of that script (not part of
  jaxlab) defining ``make_train(config)`` and a ``CONFIG`` dict of its defaults; PureJaxRL targets gymnax
  0.0.x, so its env step must be adapted to gymnax 1.x's ``(obs, state, reward, terminated, truncated,
  info)`` (``done = terminated | truncated``).
* ``rejax`` (with ``--rejax``): rejax's PPO (``rejax.PPO``, github.com/keraJLi/rejax) timed in the same process,
  alternating run by run with ours, at PureJaxRL's settings on both sides (4 envs x 128 steps, 4 epochs x 4
  minibatches, 2x64 tanh actor and critic, lr 2.5e-4, clip 0.2, GAE 0.95, gamma 0.99, ent 0.01, vf 0.5, max
  grad norm 0.5), one ``jax.jit(train)`` call each, rejax's periodic evaluation switched off. rejax is not a
  jaxlab dependency: run it from a venv holding both, e.g.
  ``python -m venv /tmp/v && /tmp/v/bin/pip install rejax -e .`` (jaxlab's own dependencies, tqdm among them,
  are needed too) then
  ``/tmp/v/bin/python benchmarks/rl.py --rejax``. rejax 0.1.3 targets gymnax 0.0.x; on gymnax 1.x its env steps as
  ``gymnax.wrappers.LegacyStepAPIWrapper`` does (4-tuple steps, ``done = terminated | truncated``).
  The same mode times rejax's ``DQN`` (CartPole-v1), ``SAC`` and ``TD3`` (Pendulum-v1) against jaxlab's at the
  settings of ``REJAX_OFF_POLICY`` (what cannot be matched: ``REJAX_OFF_POLICY_NOTES``).
* ``drivers``: the same PPO driven three ways: the whole run in one jitted ``lax.scan``; one jitted call
  per update from a Python loop; and, for acting alone, a gym-style loop with one jitted call per
  environment step against the same rollout as one jitted ``lax.scan``.
* ``algorithms``: every algorithm at its tuned defaults on its standard env (CartPole-v1 for discrete
  actions, Pendulum-v1 for continuous), one seed.
* ``scaling``: PPO's steps/s against parallel environments (one seed) and seeds (4 envs each), the
  ``rl-throughput`` experiment's measurement.

Results go to ``benchmarks/results/rl-<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import jax

PUREJAXRL_CPU_STEPS_PER_S = 1e5  # PureJaxRL ppo.py, CartPole defaults, one seed, 2-core CPU (reference figure)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and points")
    p.add_argument("--purejaxrl", type=pathlib.Path, default=None,
                   help="a copy of PureJaxRL's ppo.py (adapted to gymnax 1.x) to time alongside jaxlab's PPO")
    p.add_argument("--rejax", action="store_true",
                   help="time rejax's PPO alongside jaxlab's in one process (rejax must be installed)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def bench_public_api(cfg, key, repeats: int) -> dict:
    """``jax.jit(ppo.make_train(cfg))(key)``, the call PureJaxRL's ``ppo.py`` times: the whole run, one seed."""
    from jaxlab.rl import ppo

    train = ppo.make_train(cfg)
    compiled, compile_s = _compile(train, key)
    run_s = _best(lambda: jax.block_until_ready(compiled(key)), repeats)
    steps = train.num_updates * cfg.steps_per_update
    return {"compile_s": compile_s, "run_s": run_s, "env_steps": steps, "steps_per_s": steps / run_s}


def _alternate(programs: dict, key, repeats: int) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds, each running every compiled program once in turn (load spikes hit all)."""
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (compiled, _) in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(key))
            times[name].append(time.perf_counter() - t0)
    return times


def bench_against_purejaxrl(path: pathlib.Path, cfg, key, repeats: int) -> dict:
    """PureJaxRL's ``ppo.py`` (loaded from ``path``) and ``jaxlab.rl.ppo`` at the same settings, compiled
    once each and run alternately ``repeats`` times, so that both see the same machine load."""
    import importlib.util

    import numpy as np

    from jaxlab.rl import ppo

    spec = importlib.util.spec_from_file_location("purejaxrl_ppo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {**module.CONFIG, "TOTAL_TIMESTEPS": cfg.total_timesteps, "NUM_ENVS": cfg.num_envs,
              "NUM_STEPS": cfg.rollout_length, "UPDATE_EPOCHS": cfg.num_epochs, "NUM_MINIBATCHES": cfg.num_minibatches}
    programs = {"purejaxrl": _compile(module.make_train(config), key), "jaxlab": _compile(ppo.make_train(cfg), key)}
    times = _alternate(programs, key, repeats)
    steps = cfg.total_timesteps // cfg.steps_per_update * cfg.steps_per_update
    out = {"file": path.name, "env_steps": steps, "repeats": repeats}
    for name, (_, compile_s) in programs.items():
        out[name] = {"compile_s": compile_s, "run_s": times[name],
                     "steps_per_s_median": steps / float(np.median(times[name])),
                     "steps_per_s_best": steps / min(times[name])}
    out["ratio_median"] = out["jaxlab"]["steps_per_s_median"] / out["purejaxrl"]["steps_per_s_median"]
    out["ratio_best"] = out["jaxlab"]["steps_per_s_best"] / out["purejaxrl"]["steps_per_s_best"]
    return out


class _LegacyEnv:
    """A gymnax 1.x env with ``gymnax.wrappers.LegacyStepAPIWrapper``'s step (rejax 0.1.3 expects gymnax 0.0.x's
    ``(obs, state, reward, done, info)``, ``done = terminated | truncated``), every other attribute delegated to
    the env except ``_env`` itself, so that rejax's deep copy of its config does not recurse."""

    def __init__(self, env):
        self._env = env

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        return obs, state, reward, jax.numpy.logical_or(terminated, truncated), info

    def reset(self, key, params=None):
        return self._env.reset(key, params)

    def __getattr__(self, name):
        if name == "_env":
            raise AttributeError(name)
        return getattr(self._env, name)


def bench_against_rejax(cfg, key, repeats: int) -> dict:
    """rejax's ``PPO`` and ``jaxlab.rl.ppo`` at PureJaxRL's settings, compiled once each (``jax.jit(train)``)
    and run alternately ``repeats`` times in this process; wall times (median, best) and jaxlab / rejax."""
    try:
        import rejax
    except ImportError as e:
        raise SystemExit("--rejax needs rejax installed beside jaxlab (pip install rejax; see this module's "
                         f"docstring): {e}") from e
    import importlib.metadata

    import gymnax
    import numpy as np

    from jaxlab.rl import ppo

    env, env_params = gymnax.make(cfg.env_id)
    steps = cfg.total_timesteps // cfg.steps_per_update * cfg.steps_per_update
    algo = rejax.PPO.create(
        env=_LegacyEnv(env), env_params=env_params, total_timesteps=steps, eval_freq=steps,
        skip_initial_evaluation=True, num_envs=cfg.num_envs, num_steps=cfg.rollout_length,
        num_epochs=cfg.num_epochs, num_minibatches=cfg.num_minibatches, learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.max_grad_norm, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_eps=cfg.clip_eps,
        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
        agent_kwargs={"activation": "tanh", "hidden_layer_sizes": (64, 64)})
    algo = algo.replace(eval_callback=lambda algo, ts, rng: ())  # no periodic evaluation inside train
    programs = {"rejax": _compile(algo.train, key), "jaxlab": _compile(ppo.make_train(cfg), key)}
    times = _alternate(programs, key, repeats)
    out = {"rejax_version": importlib.metadata.version("rejax"), "env_steps": steps, "repeats": repeats}
    for name, (_, compile_s) in programs.items():
        out[name] = {"compile_s": compile_s, "run_s": times[name], "run_s_median": float(np.median(times[name])),
                     "run_s_best": min(times[name]), "steps_per_s_median": steps / float(np.median(times[name]))}
    out["time_ratio_median"] = out["jaxlab"]["run_s_median"] / out["rejax"]["run_s_median"]
    out["time_ratio_best"] = out["jaxlab"]["run_s_best"] / out["rejax"]["run_s_best"]
    return out


# Off-policy settings shared by both sides of the rejax rows (rejax 0.1.3 fixes 64x64 hidden layers for DQN and TD3).
REJAX_OFF_POLICY = {
    "dqn": {"env_id": "CartPole-v1", "num_envs": 10, "buffer_size": 10_000, "batch_size": 128, "learning_starts": 10_000,
            "learning_rate": 2.5e-4, "hidden_sizes": (64, 64), "target_update_interval": 1_000, "max_grad_norm": 10.0},
    "sac": {"env_id": "Pendulum-v1", "num_envs": 8, "buffer_size": 100_000, "batch_size": 128, "learning_starts": 10_000,
            "learning_rate": 1e-3, "hidden_sizes": (64, 64), "tau": 0.005},
    "td3": {"env_id": "Pendulum-v1", "num_envs": 8, "buffer_size": 100_000, "batch_size": 128, "learning_starts": 10_000,
            "learning_rate": 1e-3, "hidden_sizes": (64, 64), "tau": 0.005, "exploration_noise": 0.1,
            "target_noise": 0.2, "target_noise_clip": 0.5, "policy_delay": 2},
}


def _off_policy_pair(algo: str, total: int):
    """``(jaxlab train, rejax algorithm, env steps)`` for one row of ``REJAX_OFF_POLICY``, both sides at its settings:
    one env step of every env then one gradient step per iteration, gamma 0.99, ReLU networks, no learning-rate
    decay, rejax's periodic evaluation off. The settings that cannot be matched are listed in ``REJAX_OFF_POLICY_NOTES``."""
    import gymnax
    import rejax

    from jaxlab.rl.train import algorithm_config

    s = REJAX_OFF_POLICY[algo]
    env, env_params = gymnax.make(s["env_id"])
    common = dict(env=_LegacyEnv(env), env_params=env_params, total_timesteps=total, eval_freq=total,
                  skip_initial_evaluation=True, num_envs=s["num_envs"], buffer_size=s["buffer_size"],
                  fill_buffer=s["learning_starts"], batch_size=s["batch_size"], learning_rate=s["learning_rate"],
                  gamma=0.99, num_epochs=1)
    overrides = {k: v for k, v in s.items() if k != "env_id"}
    if algo == "dqn":
        cfg = algorithm_config("dqn", s["env_id"], total, {**overrides, "anneal_lr": False, "layer_norm": False,
                                                            "huber_loss": False, "tau": 1.0, "epsilon_start": 1.0,
                                                            "epsilon_end": 0.05, "exploration_fraction": 0.5})
        agent = rejax.DQN.create(**common, max_grad_norm=s["max_grad_norm"], target_update_freq=s["target_update_interval"],
                                 polyak=0.0, eps_start=1.0, eps_end=0.05, exploration_fraction=0.5, ddqn=True,
                                 agent_kwargs={"activation": "relu"})
    elif algo == "sac":
        cfg = algorithm_config("sac", s["env_id"], total, overrides)
        agent = rejax.SAC.create(**common, polyak=1.0 - s["tau"], target_update_freq=1, hidden_layer_sizes=s["hidden_sizes"],
                                 agent_kwargs={"activation": "relu"})
    else:
        cfg = algorithm_config("td3", s["env_id"], total, overrides)
        agent = rejax.TD3.create(**common, polyak=1.0 - s["tau"], target_update_freq=1,
                                 exploration_noise=s["exploration_noise"], target_noise=s["target_noise"],
                                 target_noise_clip=s["target_noise_clip"], policy_delay=s["policy_delay"],
                                 actor_kwargs={"activation": "relu"}, critic_kwargs={"activation": "relu"})
    from jaxlab.rl.train import ALGORITHMS

    train = ALGORITHMS[algo][0].make_train(cfg)
    agent = agent.replace(eval_callback=lambda algo, ts, rng: ())  # no periodic evaluation inside train
    return train, agent, train.num_updates * cfg.steps_per_update


REJAX_OFF_POLICY_NOTES = (
    "DQN: rejax clips each gradient element at 10 (`optax.clip`), jaxlab the global norm at 10; rejax's loss is "
    "`optax.l2_loss` (half the squared error), jaxlab's the squared error. SAC: rejax clips the actor's log-std "
    "into [-10, 2], jaxlab squashes it into [-5, 2] with a tanh; rejax steps one Adam over both critics' stacked "
    "parameters, as jaxlab. TD3: rejax collects `policy_delay` env steps per iteration and then updates the critics "
    "`policy_delay` times and the actor once, jaxlab updates the critics after every env step and the actor every "
    "`policy_delay` of them. Both sides act uniformly at random until `learning_starts` env steps; the gradient steps "
    "taken are the same on both sides (checked from the optimizers' counts, within 2 at the start of learning).")


def bench_off_policy_against_rejax(totals: dict[str, int], key, repeats: int) -> list[dict]:
    """DQN (CartPole-v1), SAC and TD3 (Pendulum-v1), jaxlab's and rejax's at the settings of ``REJAX_OFF_POLICY``,
    each pair compiled once (``jax.jit(train)``) and run alternately ``repeats`` times in this process."""
    import numpy as np

    rows = []
    for algo, total in totals.items():
        train, agent, steps = _off_policy_pair(algo, total)
        programs = {"rejax": _compile(agent.train, key), "jaxlab": _compile(train, key)}
        times = _alternate(programs, key, repeats)
        row = {"algo": algo, "env": REJAX_OFF_POLICY[algo]["env_id"], "env_steps": steps, "repeats": repeats,
               "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in REJAX_OFF_POLICY[algo].items()}}
        for name, (_, compile_s) in programs.items():
            row[name] = {"compile_s": compile_s, "run_s": times[name], "run_s_median": float(np.median(times[name])),
                         "run_s_best": min(times[name]), "steps_per_s_median": steps / float(np.median(times[name]))}
        row["time_ratio_median"] = row["jaxlab"]["run_s_median"] / row["rejax"]["run_s_median"]
        row["time_ratio_best"] = row["jaxlab"]["run_s_best"] / row["rejax"]["run_s_best"]
        print(f"  {algo:4s} rejax {row['rejax']['run_s_median']:.2f} s  jaxlab {row['jaxlab']['run_s_median']:.2f} s "
              f"(medians), time ratio jaxlab/rejax {row['time_ratio_median']:.2f}", flush=True)
        rows.append(row)
    return rows


def bench_drivers(cfg, key, updates: int, repeats: int) -> dict:
    """Whole run in one jit vs one jitted call per update; acting: lax.scan rollout vs one call per env step."""
    from jaxlab.rl import ppo
    from jaxlab.rl.on_policy import ActorCritic
    from jaxlab.rl.rollout import env_reset, env_step, rollout
    from jaxlab.rl.wrappers import make_vec_env

    cfg = dataclasses.replace(cfg, total_timesteps=updates * cfg.steps_per_update)
    train = ppo.make_train(cfg)
    steps = updates * cfg.steps_per_update
    whole, _ = _compile(train, key)
    t_whole = _best(lambda: jax.block_until_ready(whole(key)), repeats)

    init, update = jax.jit(train.init), jax.jit(train.update)
    jax.block_until_ready(update(init(key)))  # compile

    def per_update():
        state = init(key)
        for _ in range(updates):
            state, _ = update(state)
        jax.block_until_ready(state)

    t_per_update = _best(per_update, repeats)

    # Acting only: the same policy and env stack, one scan vs one dispatch per env step.
    env, params = make_vec_env(cfg.env_id, cfg.num_envs)
    ac = ActorCritic.from_config(cfg, cfg.action_spec)
    carry = env_reset(env, params, key)
    actor_params = ac.init(key, carry.obs)["actor"]

    def act(obs, k):
        return ac.policy(actor_params, obs).sample(seed=k), None

    scan_rollout, _ = _compile(lambda c, k: rollout(env, params, c, act, k, steps // cfg.num_envs), carry, key)
    t_scan = _best(lambda: jax.block_until_ready(scan_rollout(carry, key)), repeats)

    @jax.jit
    def one_step(c, k):
        k_act, k_env = jax.random.split(k)
        return env_step(env, params, c, act(c.obs, k_act)[0], k_env)[0]

    jax.block_until_ready(one_step(carry, key))
    host_steps = min(steps // cfg.num_envs, 2_000)  # the slow loop is timed on fewer steps

    def host_loop():
        c = carry
        for k in jax.random.split(key, host_steps):
            c = one_step(c, k)
        jax.block_until_ready(c)

    t_host = _best(host_loop, repeats)
    return {
        "updates": updates, "env_steps": steps,
        "train_whole_jit_steps_per_s": steps / t_whole,
        "train_jit_per_update_steps_per_s": steps / t_per_update,
        "act_scan_steps_per_s": steps / t_scan,
        "act_jit_per_env_step_steps_per_s": host_steps * cfg.num_envs / t_host,
    }


def bench_algorithms(total: dict[str, int], key, repeats: int) -> list[dict]:
    from jaxlab.rl.train import ALGORITHMS, algorithm_config

    rows = []
    for name, (module, config_cls) in ALGORITHMS.items():
        env_id = config_cls.env_id  # the default: CartPole-v1, or Pendulum-v1 for DDPG, TD3 and SAC
        cfg = algorithm_config(name, env_id, total[env_id])
        train = module.make_train(cfg)
        compiled, compile_s = _compile(train, key)
        run_s = _best(lambda: jax.block_until_ready(compiled(key)), repeats)
        steps = train.num_updates * cfg.steps_per_update
        rows.append({"algo": name, "env": env_id, "env_steps": steps, "num_envs": cfg.num_envs,
                     "compile_s": compile_s, "run_s": run_s, "steps_per_s": steps / run_s})
        print(f"  {name:9s} {env_id:12s} {steps / run_s:12,.0f} steps/s  (compile {compile_s:.1f}s)", flush=True)
    return rows


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    from jaxlab.process_setup import setup_process

    setup_process()  # both sides run as the jaxlab command runs (inline CPU dispatch, freed memory kept)
    from jaxlab.experiments.rl_throughput import ThroughputConfig, measure_throughput
    from jaxlab.rl import ppo

    backend = jax.default_backend()
    key = jax.random.PRNGKey(0)
    repeats = 2 if args.quick else 3
    result = {"backend": backend, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "machine": platform.machine(), "quick": args.quick, "cpu_count": os.cpu_count(),
              "cpus_allowed": len(os.sched_getaffinity(0)),
              "load_average_start": os.getloadavg()[0]}

    ppo_cfg = ppo.PPOConfig(env_id="CartPole-v1", total_timesteps=100_352 if args.quick else 499_712)
    print("ppo (PureJaxRL defaults)", flush=True)
    p = bench_public_api(ppo_cfg, key, repeats)
    result["ppo"] = {**p, "purejaxrl_cpu_reference_steps_per_s": PUREJAXRL_CPU_STEPS_PER_S,
                     "ratio_to_reference": p["steps_per_s"] / PUREJAXRL_CPU_STEPS_PER_S}
    print(f"  {p['steps_per_s']:,.0f} steps/s (compile {p['compile_s']:.1f}s)", flush=True)

    if args.purejaxrl is not None:
        print("purejaxrl (same process, alternating runs)", flush=True)
        result["purejaxrl"] = bench_against_purejaxrl(args.purejaxrl, ppo_cfg, key, 3 if args.quick else 7)
        c = result["purejaxrl"]
        print(f"  purejaxrl {c['purejaxrl']['steps_per_s_median']:,.0f}  "
              f"jaxlab {c['jaxlab']['steps_per_s_median']:,.0f} steps/s (medians), ratio {c['ratio_median']:.2f}",
              flush=True)

    if args.rejax:
        print("rejax PPO (same process, alternating runs)", flush=True)
        result["rejax"] = bench_against_rejax(ppo_cfg, key, 3 if args.quick else 5)
        c = result["rejax"]
        print(f"  rejax {c['rejax']['run_s_median']:.2f} s  jaxlab {c['jaxlab']['run_s_median']:.2f} s (medians), "
              f"time ratio jaxlab/rejax {c['time_ratio_median']:.2f}", flush=True)
        print("rejax DQN, SAC, TD3 (same process, alternating runs)", flush=True)
        totals = ({"dqn": 20_480, "sac": 20_480, "td3": 20_480} if args.quick else
                  {"dqn": 102_400, "sac": 40_960, "td3": 40_960})
        result["rejax_off_policy"] = bench_off_policy_against_rejax(totals, key, 3 if args.quick else 5)

    print("drivers", flush=True)
    result["drivers"] = bench_drivers(ppo.PPOConfig(env_id="CartPole-v1"), key, 40 if args.quick else 200, repeats)
    print("  " + json.dumps({k: round(v) for k, v in result["drivers"].items()}), flush=True)

    print("algorithms", flush=True)
    budget = {"CartPole-v1": 20_480 if args.quick else 102_400, "Pendulum-v1": 20_480 if args.quick else 51_200}
    result["algorithms"] = bench_algorithms(budget, key, 1 if args.quick else 2)

    print("scaling", flush=True)
    sweep = ThroughputConfig(num_envs=(4, 16, 64) if args.quick else (1, 4, 16, 64, 256),
                             seeds=(1, 4) if args.quick else (1, 4, 16),
                             env_steps=100_000 if args.quick else 500_000, repeats=1 if args.quick else 2)
    rows = []
    for n, s in dict.fromkeys([(n, 1) for n in sweep.num_envs] + [(4, s) for s in sweep.seeds]):
        r = measure_throughput(sweep.ppo_config(n, s), s, key, sweep.repeats)
        rows.append({"num_envs": n, "seeds": s, **r})
        print(f"  num_envs={n:5d} seeds={s:3d} {r['steps_per_s']:12,.0f} steps/s", flush=True)
    result["scaling"] = rows
    result["load_average_end"] = os.getloadavg()[0]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rl-{backend}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"rl-{backend}.md").write_text(_markdown(result))
    print(f"wrote {args.out / f'rl-{backend}.json'} and .md")
    return 0


SPEED_NOTES = [
    "### What was changed for speed",
    "",
    "Found by profiling the compiled train program of `ppo.make_train` against rejax's (the thunks XLA:CPU runs "
    "per update, counted from the compiled HLO and weighted by loop trip counts; `jax.profiler` traces; "
    "`perf record` of the executing thread), then timed side by side in one process. At these sizes the program "
    "is a long chain of tiny kernels: per update, the 128-step rollout ran about 22,000 of the 26,000 thunks "
    "(rejax 25,200 in all), 80 of them per step in one rolled threefry loop (gymnax's reset noise, drawn every "
    "step for the auto-reset) that jaxlab and rejax share; the learning phase is dominated by the dots of the "
    "64-wide MLPs' forward and backward passes (the weight-gradient dots of 128-row minibatches, 10-20 us each), "
    "equal on both sides; the per-epoch permutation sort costs about 55 us (see the shuffle below).",
    "",
    "Kept (each gives the same numbers as before, bit for bit; `tests/rl_deep/test_presampled.py`):",
    "",
    "* The rollout's keys are split for every step in one PRNG call before the scan (`rollout.step_keys`) instead "
    "of one `split` per step inside it.",
    "* The categorical policy's Gumbel noise is drawn for the whole rollout in one call before the scan "
    "(`policies.categorical_gumbel`, through `ActorCritic.action_noise`), and each step samples with "
    "`policies.categorical_sample_and_log_prob`: log-softmax, argmax of noise plus log-probabilities and a "
    "gather, instead of distrax's `sample_and_log_prob` (softmax and validity reductions, a one-hot log-prob). "
    "Same action and log-probability as distrax with the same key, non-finite rows included "
    "(`rollout.rollout_steps` takes the per-step policy inputs).",
    "",
    "Together: 16% fewer thunks per update (26.1M -> 21.9M for the run; rejax 25.2M) and the rollout-only "
    "program about 14% faster, but the whole run only 3-5% faster: the thunks removed were the cheap ones. "
    "Before and after in one process (5 alternating runs of 499,712 env steps, 1-minute load 1.7 on 2 cores): "
    "rejax 3.05 s, jaxlab before 3.29 s (1.08x rejax), after 3.20 s (1.05x). What keeps PPO behind rejax: the "
    "critic runs on both ends of every transition (8 rows a step, for the time-limit bootstrap; rejax evaluates 4 "
    "and treats truncation as termination), the per-minibatch metrics, the global-norm clip and the annealed "
    "learning rate; the env step and the learning phase's dots are the same work on both sides. DQN, SAC and "
    "TD3 changed only by the key split (the same before and after, within noise).",
    "",
    "Then, timed with the process pinned to one core (`taskset -c 0`), so that jobs on the other core do not "
    "reach the timings (the runs above, unpinned under a load of 1.5-3, took ~3.1 s; on the quiet machine one "
    "core and two give about the same times, 1.78-1.81 s):",
    "",
    "* **The envs' auto-reset draws made before the scan** (`wrappers.VecEnv.draw_steps`): gymnax's step draws a "
    "reset state from a fresh key at every step (the threefry loop above, and `reset_env`), kept only where the "
    "episode ends. `VecEnv.step` also takes that randomness drawn ahead (`StepDraw`, the same key splits), and "
    "`rollout_steps` draws all T steps' in one batched call; transitions equal bit for bit "
    "(`tests/rl_deep/test_presampled.py`). On one core the threefry loop was serial work: PPO 1.05x -> 0.97x "
    "rejax's time. (On two cores it had overlapped with the policy and critic kernels, so it had cost little "
    "there.) Split by epochs (1 against 4) on one core: rejax's rollout + GAE 0.73 s and 0.286 s per epoch; "
    "jaxlab's rollout + GAE 0.50-0.57 s and 0.31 s per epoch: the remaining cost is the learning phase.",
    "* **`optax.flatten` around PPO's Adam** (tried before at 0-3% on two cores and set aside for changing the "
    "optimizer state's layout): on one core 1.84 -> 1.78 s (in-step critic) and 1.76 -> 1.69 s (critic after "
    "the rollout), so kept.",
    "",
    "* **The critic over the whole rollout after the scan** (`OnPolicyConfig.values_in_rollout=False`, now the "
    "default; it had once been measured ~1.3x slower, under another process's load): one call on the `[2T, E]` "
    "observations instead of one per step. On one core 1.76 against 1.84 s; on the quiet two cores 1.69 against "
    "1.78 s (rejax 1.79 s). A2C ~3% and TRPO ~1% faster the same way.",
    "* **PPO's metrics summed in the minibatch loop's carry** instead of stacked as its outputs (one fused add "
    "per minibatch instead of one write per metric; the same means): 1.63 -> 1.58 s on one core.",
    "* **The minibatch shuffle by `on_policy.random_permutation`** instead of `jax.random.permutation`: the "
    "same rounds of random sort keys, but each round sorts one packed uint32 array (the key in the high bits, "
    "the position in the low ones) rather than a key-value pair, which XLA:CPU runs through its generic "
    "comparator sort. The shuffle of PPO's 512 rows: 26 against 55 us (2 rounds; 205 against 1,084 us at "
    "4,096 rows); with the per-epoch shuffle replaced by a fixed one the learning phase had run 17% faster, so "
    "the sort was its largest cost after the dots. The learning phase alone: 1.23 -> 1.12 ms per update. A "
    "different permutation for the same key, so runs are not bit for bit those before.",
    "",
    "Measured and left: GAE by `kernels.scan.linear_recurrence`'s associative or chunked form instead of the "
    "sequential scan (no change: the 128-step scan is cheap); one gather of every batch field packed into one "
    "array per epoch (no change); the actor's and the critic's gradients taken by two `grad` calls (no change); "
    "the minibatch loop unrolled (2: no change; all 16 minibatch steps of an update: 18% slower); XLA:CPU "
    "options (`--xla_cpu_use_thunk_runtime=false` is no longer honoured, `--xla_cpu_multi_thread_eigen=false` and "
    "`--xla_cpu_use_xnnpack=false` 4% slower, YNNPACK fusions off 25% slower).",
    "",
    "Where it stands: pinned to one core, the table's ratio. Unpinned on the quiet two cores, 5 alternating "
    "runs gave rejax 1.90 s and jaxlab 1.70 s (0.89x; before the shuffle change 1.85 and 1.80 s, 0.97x); "
    "jaxlab alone in its process had run 1.69 s on two cores against 1.63 s on one: the second core only adds "
    "hand-offs between XLA:CPU's threads at these kernel sizes.",
    "",
    "Tried and not kept (measured with one core pinned, alternating runs in one process): writing each step's "
    "transition as one array per dtype (fewer in-place updates per step, no measurable change); every epoch's "
    "permutation drawn in one `vmap`ped call (the batched "
    "sort was 12% slower in the learning phase); unrolling the rollout scan 2-8 times (fewer thunks, no faster, "
    "slower to compile); one block-diagonal network for actor and critic (the dots' cost grows with the weight "
    "matrix, so 3 wider dots cost as much as 6 narrow ones); matrix products of 8 rows or fewer written as "
    "multiply-and-reduce (2-3% faster, but it ties the network code to XLA:CPU's current dot library).",
    "",
]


def _markdown(r: dict) -> str:
    p, d = r["ppo"], r["drivers"]
    lines = [
        f"# Deep RL throughput on {r['backend']} ({r['device']})",
        "",
        f"jax {r['jax']}{', --quick' if r['quick'] else ''}. Env steps per second after compilation, best of "
        "repeats; one seed unless stated. The process is set up as the `jaxlab` command sets itself up "
        "(`jaxlab.process_setup`: CPU computations inline rather than on JAX's asynchronous dispatch threads, freed "
        "memory kept for reuse), for every program timed here, rejax's included.",
        "",
        f"Host: {r.get('cpu_count')} CPU cores, 1-minute load average {r.get('load_average_start', float('nan')):.1f} "
        f"at the start and {r.get('load_average_end', float('nan')):.1f} at the end (other processes share the "
        "cores when it exceeds the core count, and every number here drops in proportion)"
        + (f"; this process pinned to {r['cpus_allowed']} of them (`taskset`), so the other cores' load does not "
           "reach it." if r.get("cpus_allowed", r.get("cpu_count")) != r.get("cpu_count") else "."),
        "",
        "## PPO on CartPole-v1 at PureJaxRL's defaults (4 envs x 128 steps, 4 epochs x 4 minibatches)",
        "",
        "Against the quoted figure for PureJaxRL's ppo.py on a 2-core CPU (another machine; the same-machine "
        "comparison, when run, follows).",
        "",
        "| env steps | compile s | run s | steps/s | quoted steps/s (PureJaxRL ppo.py, 2-core CPU) | ratio |",
        "|---|---|---|---|---|---|",
        f"| {p['env_steps']:,} | {p['compile_s']:.1f} | {p['run_s']:.2f} | {p['steps_per_s']:,.0f} | "
        f"{p['purejaxrl_cpu_reference_steps_per_s']:,.0f} | {p['ratio_to_reference']:.2f} |",
        "",
    ]
    if "purejaxrl" in r:
        c = r["purejaxrl"]
        lines += [
            "### Against PureJaxRL's ppo.py on this machine (same process, runs alternating)",
            "",
            f"{len(c['jaxlab']['run_s'])} runs of each, {c['env_steps']:,} env steps per run; PureJaxRL's script "
            "(luchris429/purejaxrl, not part of jaxlab) with its env step adapted to gymnax 1.x.",
            "",
            "| program | compile s | steps/s (median) | steps/s (best) |",
            "|---|---|---|---|",
            *[f"| {name} | {c[name]['compile_s']:.1f} | {c[name]['steps_per_s_median']:,.0f} | "
              f"{c[name]['steps_per_s_best']:,.0f} |" for name in ("purejaxrl", "jaxlab")],
            f"| **jaxlab / PureJaxRL** | | **{c['ratio_median']:.2f}** | **{c['ratio_best']:.2f}** |",
            "",
        ]
    if "rejax" in r:
        c = r["rejax"]
        lines += [
            "### Against rejax's PPO on this machine (same process, runs alternating)",
            "",
            f"rejax {c['rejax_version']} (not part of jaxlab), {c['repeats']} runs of each, {c['env_steps']:,} env "
            "steps per run, one `jax.jit(train)` call each, compile excluded. Both at PureJaxRL's settings: 4 envs x "
            "128 steps, 4 epochs x 4 minibatches, 2x64 tanh actor and critic, lr 2.5e-4, clip 0.2, GAE 0.95, gamma "
            "0.99, ent 0.01, vf 0.5, max grad norm 0.5. What differs: rejax 0.1.3 keeps the learning rate "
            "constant (jaxlab anneals it linearly, PureJaxRL's default) and steps actor and critic with two "
            "optimizers, each clipping its own gradient norm (jaxlab: one Adam over both, one global norm); "
            "rejax's periodic evaluation is switched off.",
            "",
            "| program | compile s | run s (median) | run s (best) | steps/s (median) |",
            "|---|---|---|---|---|",
            *[f"| {name} | {c[name]['compile_s']:.1f} | {c[name]['run_s_median']:.2f} | {c[name]['run_s_best']:.2f} | "
              f"{c[name]['steps_per_s_median']:,.0f} |" for name in ("rejax", "jaxlab")],
            f"| **time jaxlab / rejax** | | **{c['time_ratio_median']:.2f}** | **{c['time_ratio_best']:.2f}** | |",
            "",
        ]
    if "rejax_off_policy" in r:
        rows = r["rejax_off_policy"]
        lines += [
            "### DQN, SAC and TD3 against rejax's (same process, runs alternating)",
            "",
            f"{rows[0]['repeats']} runs of each, one `jax.jit(train)` call each, compile excluded, rejax's periodic "
            "evaluation off. Both sides: one env step of every env then one gradient step per iteration, gamma 0.99, "
            "64x64 ReLU networks (rejax 0.1.3 fixes 64x64 for DQN and TD3), Adam without learning-rate decay, replay "
            "and batch sizes as listed, uniform random actions for the first 10,000 env steps. DQN: double DQN, "
            "epsilon 1 -> 0.05 over half the run, target copied every 1,000 env steps, no LayerNorm. SAC: two critics, "
            "Polyak 0.005, learned temperature from 1 towards -dim(A). TD3: exploration noise 0.1, target noise 0.2 "
            "clipped at 0.5, policy delay 2, Polyak 0.005. Not matched: " + REJAX_OFF_POLICY_NOTES,
            "",
            "| algorithm | env | envs | replay / batch | env steps | rejax run s (median) | jaxlab run s (median) | "
            "jaxlab / rejax (median) | (best) |",
            "|---|---|---|---|---|---|---|---|---|",
            *[f"| {x['algo']} | {x['env']} | {x['settings']['num_envs']} | {x['settings']['buffer_size']:,} / "
              f"{x['settings']['batch_size']} | {x['env_steps']:,} | {x['rejax']['run_s_median']:.2f} | "
              f"{x['jaxlab']['run_s_median']:.2f} | **{x['time_ratio_median']:.2f}** | {x['time_ratio_best']:.2f} |"
              for x in rows],
            "",
        ]
    lines += SPEED_NOTES
    lines += [
        f"## Drivers of the same PPO ({d['updates']} updates)",
        "",
        "| driver | steps/s | ratio |",
        "|---|---|---|",
        f"| train: whole run in one jit (lax.scan) | {d['train_whole_jit_steps_per_s']:,.0f} | 1.00 |",
        f"| train: one jitted call per update (Python loop) | {d['train_jit_per_update_steps_per_s']:,.0f} | "
        f"{d['train_jit_per_update_steps_per_s'] / d['train_whole_jit_steps_per_s']:.2f} |",
        f"| act only: rollout as one jitted lax.scan | {d['act_scan_steps_per_s']:,.0f} | 1.00 |",
        f"| act only: one jitted call per env step (gym-style loop) | {d['act_jit_per_env_step_steps_per_s']:,.0f} | "
        f"{d['act_jit_per_env_step_steps_per_s'] / d['act_scan_steps_per_s']:.3f} |",
        "",
        "## Every algorithm at its tuned defaults",
        "",
        "| algorithm | env | envs | env steps | compile s | run s | steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {a['algo']} | {a['env']} | {a['num_envs']} | {a['env_steps']:,} | {a['compile_s']:.1f} | "
              f"{a['run_s']:.2f} | {a['steps_per_s']:,.0f} |" for a in r["algorithms"]]
    lines += ["", "Off-policy runs act randomly (and do not learn) for their first `learning_starts` steps "
              "(1e4), part of these short runs.", "",
              "## PPO scaling over parallel environments and seeds", "",
              "| envs per seed | seeds | env steps | compile s | run s | steps/s (all seeds) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['num_envs']} | {s['seeds']} | {s['env_steps']:,} | {s['compile_s']:.1f} | {s['run_s']:.2f} | "
              f"{s['steps_per_s']:,.0f} |" for s in r["scaling"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
