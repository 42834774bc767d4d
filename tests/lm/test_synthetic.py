"""Synthetic task generators: shapes, vocabulary layout, and that every answer is recoverable from the input."""

import jax
import numpy as np
import pytest

from jaxlab.models.synthetic import MARKER, NOISE, TRIGGER, induction_heads, mqar, selective_copying


def _np(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_mqar_answers_follow_their_keys_in_the_context(key):
    B, L, K, V = 16, 64, 6, 40
    b = _np(mqar(key, B, L, K, V))
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (B, L)
    assert b["inputs"].min() >= 0 and b["inputs"].max() < V
    assert (b["mask"].sum(axis=1) == K).all()
    for row in range(B):
        ctx = b["inputs"][row, :2 * K]
        keys, values = ctx[0::2], ctx[1::2]
        assert len(set(keys)) == K and (keys >= 1).all() and (keys < V // 2).all()  # keys: lower half
        assert len(set(values)) == K and (values >= V // 2).all()  # values: upper half
        lookup = dict(zip(keys, values))
        queries = np.flatnonzero(b["mask"][row])
        assert (queries >= 2 * K).all() and ((queries - 2 * K) % 2 == 0).all()
        for t in queries:
            assert b["targets"][row, t] == lookup[b["inputs"][row, t]]  # the answer is recoverable
        assert sorted(b["inputs"][row, queries]) == sorted(keys)  # every key is queried once


def test_mqar_query_gaps_follow_a_power_law(key):
    b = _np(mqar(key, 512, 256, 4, 64, power_a=0.01))  # 124 possible gaps
    gaps = (np.flatnonzero(b["mask"].ravel()) % 256 - 8) // 2
    assert gaps.min() >= 0 and gaps.max() < 124
    # P(g) ~ (g + 1)^-0.99 (uniform gaps would give 8% and 52%)
    assert np.mean(gaps < 10) > 0.3 and np.mean(gaps >= 60) < 0.25


def test_mqar_fills_the_query_region_with_zeros_or_noise(key):
    B, L, K, V = 32, 64, 4, 16
    zero, noise = _np(mqar(key, B, L, K, V, random_non_queries=False)), _np(mqar(key, B, L, K, V))
    # same draws of pairs and query positions; only the filler differs
    for name in ("targets", "mask"):
        np.testing.assert_array_equal(zero[name], noise[name])
    filler = ~zero["mask"] & (np.arange(L) >= 2 * K)  # [B, L]: query region outside the queries
    np.testing.assert_array_equal(zero["inputs"][~filler], noise["inputs"][~filler])
    assert (zero["inputs"][filler] == 0).all()  # token 0 is never a key or a value
    # Zoology's random fill: every token of the vocabulary, so queried keys also appear as noise at V=16
    assert len(np.unique(noise["inputs"][filler])) == V
    with pytest.raises(ValueError, match="random_non_queries=1"):
        mqar(key, 2, 64, 4, 16, random_non_queries=1)


def test_selective_copying_targets_are_the_data_tokens_in_order(key):
    B, L, T, V = 8, 40, 5, 10
    b = _np(selective_copying(key, B, L, T, V))
    assert b["inputs"].shape == (B, L) and (b["mask"].sum(axis=1) == T).all()
    for row in range(B):
        ctx = b["inputs"][row, :L - T]
        data = ctx[ctx != NOISE]
        assert len(data) == T and (data >= 2).all() and (data < V).all()
        assert (b["inputs"][row, L - T:] == MARKER).all()
        np.testing.assert_array_equal(b["targets"][row, L - T:], data)
        assert not b["mask"][row, :L - T].any()


def test_induction_heads_answer_follows_the_first_trigger(key):
    B, L, V = 32, 24, 16
    b = _np(induction_heads(key, B, L, V))
    assert (b["mask"].sum(axis=1) == 1).all() and b["mask"][:, -1].all()
    for row in range(B):
        x = b["inputs"][row]
        triggers = np.flatnonzero(x == TRIGGER)
        assert len(triggers) == 2 and triggers[-1] == L - 1 and triggers[0] <= L - 3
        assert b["targets"][row, -1] == x[triggers[0] + 1] != TRIGGER


def test_bad_arguments_name_the_field(key):
    with pytest.raises(ValueError, match="seq_len=10 must be >= 4 \\* num_kv_pairs"):
        mqar(key, 2, 10, 4, 64)
    with pytest.raises(ValueError, match="vocab_size=8 has 3 keys"):
        mqar(key, 2, 64, 4, 8)
    with pytest.raises(ValueError, match="seq_len=6 must be >= 2 \\* num_tokens"):
        selective_copying(key, 2, 6, 4, 10)
    with pytest.raises(ValueError, match="vocab_size=2"):
        induction_heads(key, 2, 16, 2)
