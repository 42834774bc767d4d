"""Sparse attention patterns: masks by definition, the fast paths against the dense masked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import sparse_attention as sa

B, L, Hq, Hkv, D = 2, 19, 4, 2, 8  # L = 19 is not a multiple of the stride; GQA


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, L, h, D)), jnp.float32) for h in (Hq, Hkv, Hkv)]


def test_masks_by_definition():
    i, j = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
    # window=3: three keys, the query's own included (i - 2 .. i), on each side without causal
    np.testing.assert_array_equal(sa.local_mask(7, 3), (j <= i) & (i - j <= 2))
    np.testing.assert_array_equal(sa.local_mask(7, 3, causal=False), np.abs(i - j) <= 2)
    np.testing.assert_array_equal(sa.local_mask(7, 3).sum(axis=1), [1, 2, 3, 3, 3, 3, 3])  # keys per query
    np.testing.assert_array_equal(sa.local_mask(7, 1), np.eye(7, dtype=bool))
    np.testing.assert_array_equal(sa.strided_mask(7, 3), (j <= i) & ((i - j) % 3 == 0))
    np.testing.assert_array_equal(sa.fixed_mask(7, 3, 1), (j <= i) & ((i // 3 == j // 3) | (j % 3 == 2)))
    merged = sa.sparse_transformer_mask(7, 3)
    np.testing.assert_array_equal(merged, sa.local_mask(7, 3) | sa.strided_mask(7, 3))


@jax.jit
def _fast_and_reference(q, k, v, segment_ids):
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
    ref = lambda mask: sa.masked_attention_reference(q, k, v, mask & same)  # noqa: E731
    return {
        "local": (sa.local_attention(q, k, v, window=3, segment_ids=segment_ids, impl="xla"),
                  ref(sa.local_mask(L, 3))),
        "local_bidirectional": (sa.local_attention(q, k, v, window=2, causal=False, impl="xla",
                                                   segment_ids=segment_ids), ref(sa.local_mask(L, 2, causal=False))),
        "strided": (sa.strided_attention(q, k, v, stride=4, segment_ids=segment_ids, impl="xla"),
                    ref(sa.strided_mask(L, 4))),
        "strided_bidirectional": (sa.strided_attention(q, k, v, stride=5, causal=False, impl="xla"),
                                  sa.masked_attention_reference(q, k, v, sa.strided_mask(L, 5, causal=False))),
    }


def test_fast_paths_match_masked_reference():
    segment_ids = jnp.array([[0] * 11 + [1] * 8, [3] * 19])
    for name, (fast, ref) in _fast_and_reference(*_qkv(), segment_ids).items():
        assert fast.shape == (B, L, Hq, D)
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bad_inputs_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window"):
        sa.local_mask(5, 0)
    with pytest.raises(ValueError, match="stride"):
        sa.strided_mask(5, 0)
    with pytest.raises(ValueError, match="summary"):
        sa.fixed_mask(8, 2, summary=3)
    with pytest.raises(ValueError, match="pattern"):
        sa.sparse_transformer_mask(8, 2, pattern="random")
    with pytest.raises(ValueError, match="window"):
        sa.local_attention(q, k, v, window=1.5)
    with pytest.raises(ValueError, match="segment_ids"):
        sa.strided_attention(q, k, v, stride=2, segment_ids=jnp.zeros((B, L - 1), jnp.int32))
