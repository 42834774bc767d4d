"""The data of the post-training stages (:mod:`jaxlab.rl.llm.posttrain`) and GRPO's host side.

* :class:`ProblemIterator`: fresh problems every step, batch ``i`` from ``fold_in(key, i)``;
* :class:`ProblemPool`: a fixed pool of problems drawn by Kimi k1.5's sampling strategies (Kimi Team 2025,
  section 2.3.4; :mod:`jaxlab.rl.llm.problem_sampling`), its per-problem outcome counts part of the iterator
  state, so they are checkpointed with the data position;
* :class:`WithFrozen`: a stage's batches with frozen parameters (the reference policy, the reward model) added;
* :class:`GRPOHost`: wraps a GRPO step built with ``return_rollout``: records the rollout's outcomes in the
  pool and writes its responses as text to ``rollouts.jsonl``.

Each iterator has ``get_state``/``set_state`` (JSON), the protocol of :func:`jaxlab.loop.fit`.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.loop import DataIterator, KeyedBatches
from jaxlab.metrics import MetricsWriter
from jaxlab.rl.llm.problem_sampling import MODES as SAMPLING_MODES
from jaxlab.rl.llm.problem_sampling import ProblemStats, record, sample_problems
from jaxlab.rl.llm.task import LEVELLED_TASKS, Task, TextTask

__all__ = ["GRPOHost", "ProblemIterator", "ProblemPool", "WithFrozen"]


class ProblemIterator(KeyedBatches):
    """Batches ``{"prompts", "answers"}`` of fresh problems; batch ``i`` is drawn from ``fold_in(key, i)``,
    so the position (``index``) is the whole iterator state."""

    def __init__(self, task: Task, batch_size: int, key: jax.Array):
        super().__init__(key)
        self.task, self.batch_size = task, batch_size
        self._draw = _problem_fn(task, batch_size)

    def __next__(self) -> dict:
        prompts, answers = self._draw(self.next_key())
        return {"prompts": prompts, "answers": answers}


class WithFrozen:
    """The batches of ``data`` with frozen parameters added, ``{**next(data), **frozen}``: how the reference
    policy and the reward model reach a ``train_step(state, batch, key)``. The position is ``data``'s (the
    frozen parameters are not part of the iterator state)."""

    def __init__(self, data: DataIterator, **frozen):
        self.data, self.frozen = data, frozen

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {**next(self.data), **self.frozen}

    def get_state(self) -> dict:
        return self.data.get_state()

    def set_state(self, state: dict) -> None:
        self.data.set_state(state)


class ProblemPool:
    """Batches ``{"prompts", "answers"}`` drawn from a fixed pool of problems by Kimi k1.5's sampling strategies
    (:func:`~jaxlab.rl.llm.problem_sampling.sample_problems`), with the pool's per-problem outcomes.

    The pool is ``size`` problems drawn once from ``pool_key``: ``task.sample_levels`` for the tasks with
    difficulty levels, ``LEVELLED_TASKS`` (each level equally often; ``levels`` [size]), else ``task.sample``
    (every problem at level 0). Batch ``i`` draws ``batch_size`` problem indices (``last``, int32 [batch_size])
    from ``fold_in(key, i)`` by ``mode`` at training progress ``i / steps``; :meth:`record` then adds the
    outcomes of their ``group_size`` responses each to ``stats``
    (:class:`~jaxlab.rl.llm.problem_sampling.ProblemStats`). The position and the counts are the iterator state
    (JSON; float32 counts are integers and read back exactly), so the loop checkpoints them with
    the train state and a resumed run draws the problems of an uninterrupted one."""

    def __init__(self, task: Task | TextTask, size: int, batch_size: int, pool_key: jax.Array, key: jax.Array,
                 mode: str = "uniform", steps: int = 1, group_size: int = 1):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode={mode!r} must be one of {SAMPLING_MODES}")
        if task.kind in LEVELLED_TASKS:
            self.prompts, self.answers, self.levels = _pool_fn(task, size)(pool_key)
            self.num_levels = task.num_levels
        else:
            if "curriculum" in mode:
                raise ValueError(f"mode={mode!r} needs difficulty levels, which task {task.kind!r} lacks")
            self.prompts, self.answers = _problem_fn(task, size)(pool_key)
            self.levels, self.num_levels = jnp.zeros((size,), jnp.int32), 1
        self.batch_size, self.key, self.mode, self.steps, self.group_size = batch_size, key, mode, steps, group_size
        self.stats, self.index, self.last = ProblemStats.zeros(size), 0, None
        self._draw = _pool_draw_fn(mode, batch_size, self.num_levels)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.last = self._draw(jax.random.fold_in(self.key, self.index), self.stats, self.levels,
                               jnp.float32(self.index / self.steps))  # [batch_size]
        self.index += 1
        return {"prompts": self.prompts[self.last], "answers": self.answers[self.last]}

    def record(self, correct) -> None:
        """Outcomes [batch_size * group_size] (groups contiguous) of the last batch's responses."""
        self.stats = _record(self.stats, jnp.repeat(self.last, self.group_size), jnp.asarray(correct))

    def stats_by_level(self) -> dict[str, list[float]]:
        """``attempts`` and ``success_rate`` (successes over attempts, 0 for a level never tried) of each
        difficulty level's problems so far, pooled: lists of ``num_levels``."""
        levels = np.asarray(self.levels)
        attempts, successes = (np.bincount(levels, weights=np.asarray(counts, np.float64), minlength=self.num_levels)
                               for counts in (self.stats.attempts, self.stats.successes))  # [num_levels] each
        return {"attempts": attempts.tolist(),
                "success_rate": np.where(attempts > 0, successes / np.maximum(attempts, 1), 0.0).tolist()}

    def get_state(self) -> dict:
        return {"index": self.index, "attempts": np.asarray(self.stats.attempts).tolist(),
                "successes": np.asarray(self.stats.successes).tolist()}

    def set_state(self, state: dict) -> None:
        size = self.stats.attempts.shape[0]
        if "attempts" not in state:
            raise ValueError(f"the checkpoint's data position {state} holds no problem pool: it was written with "
                             "problem_pool=0 (resume with problem_pool=0, or start a new output folder)")
        if len(state["attempts"]) != size:
            raise ValueError(f"the checkpoint's problem pool holds {len(state['attempts'])} problems, not "
                             f"problem_pool={size}")
        self.index = int(state["index"])
        self.stats = ProblemStats(jnp.asarray(state["attempts"], jnp.float32),
                                  jnp.asarray(state["successes"], jnp.float32))


class GRPOHost:
    """A GRPO stage's jitted step (built with ``return_rollout``) seen from the host: it takes the rollout out of
    the step's metrics, records its outcomes in the problem pool (if any) and writes up to ``log_rollouts`` of
    its responses to ``path`` (``rollouts.jsonl``: one record per response, ``{"step", "time", "prompt",
    "response", "reward", "correct", "length"}``, plus ``"problem"`` and ``"level"`` from a pool; the first call
    drops the file's records past the step it starts from, so a resumed run logs each step once)."""

    def __init__(self, step, task: Task | TextTask, group_size: int, pool: ProblemPool | None,
                 path: pathlib.Path, log_rollouts: int):
        self.step, self.task, self.group_size, self.pool = step, task, group_size, pool
        self.path, self.log_rollouts, self.writer = path, log_rollouts, None

    def __call__(self, state, batch, key):
        step = int(state.step) + 1
        if self.log_rollouts and self.writer is None:
            self.writer = MetricsWriter(self.path, keep_through=step - 1)
        state, metrics = self.step(state, batch, key)
        rollout = jax.device_get(metrics.pop("rollout"))
        if self.pool is not None:
            self.pool.record(rollout["correct"])
        if self.log_rollouts:
            prompts = np.asarray(batch["prompts"])
            last = None if self.pool is None else np.asarray(self.pool.last)
            levels = None if self.pool is None else np.asarray(self.pool.levels)
            for i in range(min(self.log_rollouts, len(rollout["reward"]))):
                problem = i // self.group_size
                record = {"prompt": self.task.text(prompts[problem], until_eos=False),
                          "response": self.task.text(rollout["response"][i]),
                          "reward": float(rollout["reward"][i]), "correct": bool(rollout["correct"][i] > 0.5),
                          "length": int(rollout["length"][i])}
                if last is not None:
                    record.update(problem=int(last[problem]), level=int(levels[last[problem]]))
                self.writer.write(step, record)
        return state, metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- cached compiled pieces (one compile per configuration and shape, reused across runs) ------------
@functools.lru_cache(maxsize=16)
def _problem_fn(task: Task, n: int):
    return jax.jit(lambda key: task.sample(key, n))


@functools.lru_cache(maxsize=16)
def _pool_fn(task: Task, n: int):
    return jax.jit(lambda key: task.sample_levels(key, n))


@functools.lru_cache(maxsize=16)
def _pool_draw_fn(mode: str, n: int, num_levels: int):
    return jax.jit(lambda key, stats, levels, progress: sample_problems(key, stats, n, mode, levels=levels,
                                                                         num_levels=num_levels, progress=progress))


_record = jax.jit(record)
