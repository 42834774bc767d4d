"""What every deep RL algorithm shares: the validated base config and the ``Train`` function object.

An algorithm module defines ``<Algo>Config(RLConfig)`` and ``make_train(cfg) -> Train``. A ``Train``
is a pure function of a PRNG key, so ``jax.jit(train)(key)`` trains one agent and
``jax.jit(jax.vmap(train))(keys)`` many seeds at once. It is split into ``init`` (key -> state) and
``update`` (state -> state, metrics) so a driver can run it in chunks, checkpoint the state between
chunks and resume: ``train.run(state, n)`` scans ``n`` updates and feeds an optional ``JitProgress``
bar from inside the jitted loop with the (unbatched) update index.

Every update returns at least ``episode_return`` (mean return of the episodes completed in that
update), ``episode_length``, ``episodes`` and ``env_steps`` (cumulative env steps). Randomness of
update ``i`` comes from ``fold_in(state.key, i)``, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from jaxlab.optim import OptimizerConfig, make_optimizer
from jaxlab.rl.networks import ACTIVATIONS
from jaxlab.rl.wrappers import ActionSpec, check_action_space, make_env
from jaxlab.validation import check, check_greater, check_positive, check_range

__all__ = ["RLConfig", "Train"]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Fields every algorithm has. Subclasses set ``ALGO``, the action spaces they support and
    ``steps_per_update``, and may override defaults."""

    ALGO: ClassVar[str] = "RL"
    ACTION_SPACES: ClassVar[tuple[str, ...]] = ("discrete", "continuous")

    env_id: str = "CartPole-v1"
    """gymnax environment id, or a probe id (Bandit-probe, TimeLimitBandit-probe, Survival-probe,
    Continuous-probe, ContinuousTimeLimit-probe)."""
    total_timesteps: int = 500_000
    """Environment steps in all, summed over the parallel environments."""
    num_envs: int = 4
    """Environments stepped in parallel."""
    gamma: float = 0.99
    """Discount factor."""
    learning_rate: float = 2.5e-4
    """Adam step size."""
    max_grad_norm: float = 0.5
    """Gradients are clipped to this global norm (0 disables clipping)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of every network."""
    activation: str = "tanh"
    """Hidden activation: tanh, relu, elu or gelu."""

    def __post_init__(self):
        check_positive(self, "total_timesteps")
        check_positive(self, "num_envs")
        check_range(self, "gamma", 0.0, 1.0)
        check_greater(self, "learning_rate")
        check_positive(self, "max_grad_norm", minimum=0)
        check(len(self.hidden_sizes) >= 1 and min(self.hidden_sizes) >= 1,
                f"hidden_sizes={self.hidden_sizes} must be non-empty and positive")
        check(self.activation in ACTIVATIONS,
                f"activation={self.activation!r} must be one of {sorted(ACTIVATIONS)}")
        check_action_space(self.env_id, self.ALGO, self.ACTION_SPACES)  # unknown ids raise here too
        check(self.num_updates >= 1,
                f"total_timesteps={self.total_timesteps} must be >= one update's "
                f"steps_per_update={self.steps_per_update}")

    @property
    def steps_per_update(self) -> int:
        """Environment steps of one update (over all envs)."""
        raise NotImplementedError

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    def make_env(self):
        """``(env, params)`` of the (unwrapped) environment."""
        return make_env(self.env_id)

    @property
    def action_spec(self) -> ActionSpec:
        return ActionSpec.from_env(*self.make_env())

    def optimizer(self, learning_rate: float | None = None, anneal_steps: int | None = None,
                  ) -> optax.GradientTransformation:
        """Adam (``eps=1e-5`` as in PPO codebases) after global-norm clipping at ``max_grad_norm`` (0: none),
        from the spine's factory; ``learning_rate`` defaults to the config's, and ``anneal_steps`` decays
        it linearly to 0 over that many optimizer steps."""
        lr = self.learning_rate if learning_rate is None else learning_rate
        return make_optimizer(OptimizerConfig(lr=lr, algorithm="adam", b2=0.999, eps=1e-5,
                                              clip_norm=self.max_grad_norm, decay_steps=anneal_steps,
                                              schedule="linear", min_lr_ratio=0.0))


@dataclasses.dataclass(frozen=True)
class Train:
    """A pure training function of a PRNG key: ``train(key) -> {"state": ..., "metrics": {name: [U]}}``.

    Attributes:
      init: ``key -> state``; the state is a pytree with integer ``step`` (updates done) and base ``key``.
      update: ``state -> (state, metrics)``, one update (rollout or env steps plus learning).
      num_updates: ``U``, updates of a full run.
      config: the algorithm's config.
    """

    init: Callable[[jax.Array], Any]
    update: Callable[[Any], tuple[Any, dict[str, jax.Array]]]
    num_updates: int
    config: Any = None

    def run(self, state: Any, num_updates: int, start: int | jax.Array = 0,
            progress: Any = None) -> tuple[Any, dict[str, jax.Array]]:
        """``num_updates`` updates with ``lax.scan``; metrics ``[num_updates]``.

        ``progress`` (a ``jaxlab.metrics.JitProgress``) is fed the update index ``start + i``; keep
        ``start`` unbatched (``in_axes=None`` under ``vmap``) so its host callback stays a branch.
        """

        def body(state, i):
            if progress is not None:
                progress.update(i)
            return self.update(state)

        return jax.lax.scan(body, state, start + jnp.arange(num_updates))

    def __call__(self, key: jax.Array) -> dict[str, Any]:
        state, metrics = self.run(self.init(key), self.num_updates)
        return {"state": state, "metrics": metrics}
