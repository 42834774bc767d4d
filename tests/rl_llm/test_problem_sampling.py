"""Kimi k1.5's problem sampling: outcome counts, prioritised probabilities and frequencies, the curriculum."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.rl.llm.problem_sampling import (ProblemStats, curriculum_level, prioritized_probs, record,
                                            sample_problems, sampling_probs)


def _stats():
    # problem 0: 1 of 2 right; 1: never tried; 2: 1 of 1; 3: 0 of 1
    return record(ProblemStats.zeros(4), jnp.array([0, 0, 2, 3]), jnp.array([True, False, True, False]))


def test_record_counts_repeated_problems_and_rates():
    stats = _stats()
    np.testing.assert_array_equal(stats.attempts, [2, 0, 1, 1])
    np.testing.assert_array_equal(stats.successes, [1, 0, 1, 0])
    np.testing.assert_allclose(stats.success_rate, [0.5, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="same"):
        record(stats, jnp.array([0, 1]), jnp.array([True]))
    with pytest.raises(ValueError, match="num_problems"):
        ProblemStats.zeros(0)


def test_prioritized_probs_by_hand():
    stats = _stats()  # 1 - s = [0.5, 1, 0, 1]
    np.testing.assert_allclose(prioritized_probs(stats), np.array([0.5, 1, 0, 1]) / 2.5, rtol=1e-6)
    np.testing.assert_allclose(prioritized_probs(stats, floor=0.1), np.array([0.5, 1, 0.1, 1]) / 2.6, rtol=1e-6)
    solved = record(ProblemStats.zeros(2), jnp.array([0, 1]), jnp.array([1, 1]))
    np.testing.assert_allclose(prioritized_probs(solved), [0.5, 0.5])  # nothing left to prefer: uniform


def test_prioritized_sampling_frequencies():
    stats = _stats()
    idx = sample_problems(jax.random.key(0), stats, 40_000, mode="prioritized")
    freq = np.bincount(np.asarray(idx), minlength=4) / idx.shape[0]
    np.testing.assert_allclose(freq, np.array([0.5, 1, 0, 1]) / 2.5, atol=0.01)
    assert freq[2] == 0  # a solved problem is never drawn without a floor


def test_curriculum_opens_one_level_per_stage():
    levels = [int(curriculum_level(p, 3)) for p in (0.0, 0.33, 0.34, 0.66, 0.67, 0.99, 1.0, 1.5)]
    assert levels == [0, 0, 1, 1, 2, 2, 2, 2]
    lv = jnp.array([0, 0, 1, 2])
    np.testing.assert_allclose(sampling_probs(ProblemStats.zeros(4), "curriculum", levels=lv, progress=0.0),
                               [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(sampling_probs(ProblemStats.zeros(4), "curriculum", levels=lv, progress=0.4),
                               [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    solved0 = record(ProblemStats.zeros(4), jnp.array([0]), jnp.array([1]))
    np.testing.assert_allclose(sampling_probs(solved0, "curriculum+prioritized", levels=lv, progress=0.4),
                               [0, 0.5, 0.5, 0])
    both = record(ProblemStats.zeros(4), jnp.array([0, 1]), jnp.array([1, 1]))  # every open problem solved
    np.testing.assert_allclose(sampling_probs(both, "curriculum+prioritized", levels=lv, progress=0.0),
                               [0.5, 0.5, 0, 0])


def test_sampling_runs_jitted_with_a_traced_clock_and_rejects_bad_modes():
    lv = jnp.array([0, 1, 1, 2])

    @functools.partial(jax.jit, static_argnums=3)
    def draw(key, stats, progress, n):
        return sample_problems(key, stats, n, mode="curriculum", levels=lv, num_levels=3, progress=progress)

    early = draw(jax.random.key(1), ProblemStats.zeros(4), 0.1, 64)
    assert set(np.asarray(early).tolist()) == {0}
    assert set(np.asarray(draw(jax.random.key(1), ProblemStats.zeros(4), 0.9, 256)).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="mode="):
        sampling_probs(ProblemStats.zeros(4), "hardest-first")
    with pytest.raises(ValueError, match="needs levels"):
        sampling_probs(ProblemStats.zeros(4), "curriculum")
