"""Which problems an RL iteration trains on: uniform, curriculum, or prioritised by failure (Kimi k1.5).

Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning with LLMs", section 2.3.4 (sampling strategies):

* **curriculum sampling**: train on easy problems first and move to hard ones; here a problem set with a
  difficulty level per problem (e.g. the number of digits) is opened level by level, stage ``j`` of
  ``num_levels`` equal stages of training drawing from the levels ``<= j`` (:func:`curriculum_level`);
* **prioritised sampling**: keep each problem's success rate ``s_i`` and draw problems in proportion to
  ``1 - s_i``, so the ones the policy fails get more of the updates (:func:`prioritized_probs`); a problem
  never tried counts as failed (``s_i = 0``), and ``floor`` keeps solved problems from vanishing.

The problem set is a fixed pool of ``N`` problems (its prompts and answers held by the caller); the state is
:class:`ProblemStats`, per-problem attempt and success counts, updated from each batch's rewards by
:func:`record` (a scatter-add, so it runs inside a jitted step). Everything is a pure function of its
arguments and a PRNG key:

    stats = ProblemStats.zeros(N)
    idx = sample_problems(key, stats, n, mode="prioritized", levels=levels, progress=step / steps)  # [n]
    ... rewards [n] of the responses to problems idx ...
    stats = record(stats, idx, rewards > 0.5)

GRPO's driver uses them through :class:`jaxlab.rl.llm.posttrain.ProblemPool` (``--problem-sampling``,
``--problem-pool``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["MODES", "ProblemStats", "curriculum_level", "prioritized_probs", "record", "sample_problems",
           "sampling_probs"]

MODES = ("uniform", "curriculum", "prioritized", "curriculum+prioritized")
"""How :func:`sample_problems` weighs the pool."""


@struct.dataclass
class ProblemStats:
    """Per-problem outcomes so far: ``attempts`` [N] and ``successes`` [N] (float32 counts)."""

    attempts: jax.Array
    successes: jax.Array

    @classmethod
    def zeros(cls, num_problems: int) -> ProblemStats:
        if not isinstance(num_problems, int) or num_problems < 1:
            raise ValueError(f"num_problems={num_problems!r} must be a positive int")
        return cls(jnp.zeros((num_problems,), jnp.float32), jnp.zeros((num_problems,), jnp.float32))

    @property
    def success_rate(self) -> jax.Array:
        """``s_i = successes_i / attempts_i`` [N]; 0 for a problem never tried."""
        return jnp.where(self.attempts > 0, self.successes / jnp.maximum(self.attempts, 1.0), 0.0)


def record(stats: ProblemStats, idx: jax.Array, correct: jax.Array) -> ProblemStats:
    """Add the outcomes ``correct`` [n] (bool or 0/1) of attempts at problems ``idx`` [n] (repeats allowed:
    a GRPO group's G responses to one problem count G attempts)."""
    if idx.shape != correct.shape or idx.ndim != 1:
        raise ValueError(f"idx {idx.shape} and correct {correct.shape} must be the same [n] shape")
    return ProblemStats(stats.attempts.at[idx].add(1.0), stats.successes.at[idx].add(correct.astype(jnp.float32)))


def curriculum_level(progress: float | jax.Array, num_levels: int) -> jax.Array:
    """The hardest level open at ``progress`` in [0, 1] of training: level ``j`` opens at ``j / num_levels``
    (int32 in [0, num_levels - 1]; the first level from the start, every level in the last stage)."""
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels={num_levels!r} must be a positive int")
    level = jnp.floor(jnp.clip(progress, 0.0, 1.0) * num_levels).astype(jnp.int32)
    return jnp.minimum(level, num_levels - 1)


def prioritized_probs(stats: ProblemStats, floor: float = 0.0) -> jax.Array:
    """Sampling probabilities [N] proportional to ``max(1 - s_i, floor)`` (uniform if every problem is solved
    and ``floor`` is 0)."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor={floor!r} must be in [0, 1]")
    weight = jnp.maximum(1.0 - stats.success_rate, floor)  # [N]
    total = jnp.sum(weight)
    return jnp.where(total > 0, weight / jnp.maximum(total, 1e-30), 1.0 / weight.shape[0])


def sampling_probs(stats: ProblemStats, mode: str = "uniform", *, levels: jax.Array | None = None,
                   num_levels: int | None = None, progress: float | jax.Array = 1.0,
                   floor: float = 0.0) -> jax.Array:
    """The distribution [N] over the pool that :func:`sample_problems` draws from.

    Args:
      mode: one of :data:`MODES`.
      levels: int [N] difficulty level of each problem, 0 the easiest (needed by the curriculum modes).
      num_levels: levels in the schedule (default ``max(levels) + 1``, which needs concrete ``levels``).
      progress: fraction of training done, in [0, 1] (the curriculum's clock).
      floor: :func:`prioritized_probs`'s floor.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    N = stats.attempts.shape[0]
    probs = prioritized_probs(stats, floor) if "prioritized" in mode else jnp.full((N,), 1.0 / N)
    if "curriculum" in mode:
        if levels is None or levels.shape != (N,):
            raise ValueError(f"mode={mode!r} needs levels [N={N}], got "
                             f"{None if levels is None else levels.shape}")
        if num_levels is None:
            num_levels = int(jnp.max(levels)) + 1
        open_ = levels <= curriculum_level(progress, num_levels)  # [N]
        probs = jnp.where(open_, probs, 0.0)
        # every open problem solved with floor 0 leaves no mass: fall back to uniform over the open ones
        probs = jnp.where(jnp.sum(probs) > 0, probs, open_.astype(jnp.float32))
        probs = probs / jnp.sum(probs)
    return probs


def sample_problems(key: jax.Array, stats: ProblemStats, n: int, mode: str = "uniform", **kwargs) -> jax.Array:
    """``n`` problem indices int32 [n] drawn with replacement from :func:`sampling_probs` (same arguments)."""
    probs = sampling_probs(stats, mode, **kwargs)
    return jax.random.choice(key, probs.shape[0], (n,), replace=True, p=probs).astype(jnp.int32)
