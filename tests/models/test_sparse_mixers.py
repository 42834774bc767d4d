"""The "sparse" (Sparse Transformer) and "lsh" (Reformer) mixers: the sparse mixer is attention under the
pattern's mask (one head against ``masked_attention_reference``), depends exactly on the keys its pattern
shows (gradients), decodes as its forward pass and keeps packed documents apart; the LSH mixer is causal and
segment-local by gradients, its kernel's segment ids match the reference, and it refuses to decode."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels.lsh_attention import lsh_attention, lsh_attention_reference
from jaxlab.kernels.sparse_attention import masked_attention_reference, sparse_transformer_mask
from jaxlab.models.layers import positions_from_segments
from jaxlab.models.lm import LM, LMConfig, make_mixer
from jaxlab.models.sparse_mixers import LSHAttention, SparseAttention, lsh_layer_key
from jaxlab.xla_options import FAST_COMPILE

B, L, d = 2, 12, 16
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # compiles dominate these tests
PATTERNS = [dict(pattern="strided", stride=3), dict(pattern="fixed", stride=4, summary=2)]


def _x(seed=0, length=L):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, length, d))


def _positions(length=L):
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))


def _sparse(heads=2, kv_heads=None, **pattern):
    mixer = SparseAttention(num_heads=heads, num_kv_heads=kv_heads, max_len=32, **pattern)
    return mixer, nn.unbox(mixer.init(jax.random.PRNGKey(1), _x(), _positions())["params"])


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p["pattern"])
def test_sparse_mixer_is_masked_attention_with_the_pattern(pattern):
    """One head without rotary positions: the projections around masked_attention_reference(mask)."""
    mixer = SparseAttention(num_heads=1, rope_base=None, max_len=32, **pattern)
    x = _x()
    params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, _positions())["params"])
    y, _ = mixer.apply({"params": params}, x, _positions())
    proj = lambda name: jnp.einsum("bld,dhk->blhk", x, params[name]["kernel"])  # noqa: E731  [B, L, 1, d]
    mask = sparse_transformer_mask(L, pattern["stride"], pattern=pattern["pattern"], summary=pattern.get("summary", 1))
    out = masked_attention_reference(proj("query"), proj("key"), proj("value"), mask)
    np.testing.assert_allclose(y, jnp.einsum("blhk,hkd->bld", out, params["out"]["kernel"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p["pattern"])
def test_sparse_mixer_sees_exactly_its_pattern_decodes_and_keeps_documents_apart(pattern):
    mixer, params = _sparse(heads=2, kv_heads=1, **pattern)
    apply = lambda x, pos, seg=None, st=None: mixer.apply({"params": params}, x, pos, seg, st)  # noqa: E731
    seg = jnp.broadcast_to((jnp.arange(L) >= 5).astype(jnp.int32), (B, L))  # documents of 5 and 7 tokens

    @fast_jit
    def run(x):  # one program: forward, its Jacobian, decoding, packed and separate documents
        full, _ = apply(x, _positions())
        jac = jax.jacrev(lambda x: apply(x, _positions())[0][0])(x)  # [L, d, B, L, d]
        y0, state = apply(x[:, :5], _positions()[:, :5], None, mixer.init_state(B, L, d))  # prefill a chunk

        def step(state, xt_t):  # then one token at a time
            x_t, t = xt_t
            y, state = apply(x_t[:, None], jnp.full((B, 1), t, jnp.int32), None, state)
            return state, y[:, 0]

        _, rest = jax.lax.scan(step, state, (jnp.swapaxes(x[:, 5:], 0, 1), jnp.arange(5, L)))
        decoded = jnp.concatenate([y0, jnp.swapaxes(rest, 0, 1)], axis=1)
        packed, _ = apply(x, positions_from_segments(seg), seg)
        second, _ = apply(x[:, 5:], _positions(L - 5))
        return full, jac, decoded, packed, second

    full, jac, decoded, packed, second = run(_x(2))
    # gradients: output t depends on input s exactly where the pattern lets t see s
    sens = np.asarray(jnp.abs(jac[:, :, 0]).sum(axis=(1, 3)))  # [t, s]
    mask = np.asarray(sparse_transformer_mask(L, pattern["stride"], pattern=pattern["pattern"],
                                              summary=pattern.get("summary", 1)))
    np.testing.assert_array_equal(sens > 0, mask)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5, err_msg="decode != forward")
    np.testing.assert_allclose(packed[:, :5], full[:, :5], atol=1e-5, rtol=1e-5, err_msg="packed: 1st document")
    np.testing.assert_allclose(packed[:, 5:], second, atol=1e-5, rtol=1e-5, err_msg="packed: 2nd document")


def test_lsh_kernel_segments_match_the_reference_and_hide_other_documents():
    H, D, Lk = 2, 8, 16
    qk, v = (jax.random.normal(jax.random.PRNGKey(s), (B, Lk, H, D)) for s in (3, 4))
    seg = jnp.array([[0] * 7 + [1] * 9, [5] * 3 + [2] * 13])
    args = dict(n_buckets=4, chunk_len=4, n_rounds=2, causal=True, segment_ids=seg)

    @fast_jit
    def run(qk, v):
        kernel = lambda v: lsh_attention(qk, v, jax.random.PRNGKey(5), **args)  # noqa: E731
        jac = jax.jacrev(lambda v: kernel(v)[0])(v)  # [Lk, H, D, B, Lk, H, D]
        return kernel(v), lsh_attention_reference(qk, v, jax.random.PRNGKey(5), **args), jac

    out, ref, jac = run(qk, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # no value of the other document reaches a token (row 0: tokens 0..6 against 7..15)
    sens = np.asarray(jnp.abs(jac[:, :, :, 0]).sum(axis=(1, 2, 4, 5)))  # [t, s]
    assert sens[:7, 7:].max() == 0 and sens[7:, :7].max() == 0 and np.count_nonzero(sens) > 16
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, L\]"):
        lsh_attention(qk, v, jax.random.PRNGKey(5), **{**args, "segment_ids": seg[:, :8]})


def test_lsh_mixer_is_causal_segment_local_deterministic_and_refuses_to_decode():
    mixer = LSHAttention(num_heads=2, n_buckets=4, chunk_len=4, n_rounds=2)
    x = _x(6, length=10)  # L = 10: padded to 12 inside the mixer
    seg = jnp.broadcast_to((jnp.arange(10) >= 4).astype(jnp.int32), (B, 10))
    pos = positions_from_segments(seg)
    params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, pos, seg)["params"])
    assert set(params) == {"query_key", "value", "out"}  # shared QK; the hashing rotations are not parameters
    f = lambda x: mixer.apply({"params": params}, x, pos, seg)[0]  # noqa: E731
    run = fast_jit(lambda x: (f(x), jax.jacrev(lambda x: f(x)[0])(x)))  # [B, 10, d], [10, d, B, 10, d]
    y, jac = run(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, mixer.apply({"params": params}, x, pos, seg)[0], atol=1e-6)  # same rotations
    sens = np.asarray(jnp.abs(jac[:, :, 0]).sum(axis=(1, 3)))  # [t, s]
    allowed = np.tril(np.ones((10, 10), bool)) & (np.asarray(seg[0])[:, None] == np.asarray(seg[0])[None, :])
    assert sens[~allowed].max() == 0, "a later token or another document reached an output"
    assert np.count_nonzero(sens) > 20  # (a token with one visible key other than itself ignores its own input)
    # every layer hashes with its own rotations; a layer's are fixed
    assert not np.array_equal(lsh_layer_key(("block_0", "mixer")), lsh_layer_key(("block_1", "mixer")))
    np.testing.assert_array_equal(lsh_layer_key(("block_0", "mixer")), lsh_layer_key(("block_0", "mixer")))
    cfg = LMConfig(vocab_size=16, d_model=d, num_layers=1, num_heads=2, mixer="lsh", max_len=16)
    with pytest.raises(NotImplementedError, match="mixer='lsh'"):
        LM(cfg).init_cache(1, 8)
    with pytest.raises(NotImplementedError, match="mixer='lsh'"):
        make_mixer(cfg, parent=None).init_state(1, 8, d)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="sparse", sparse_pattern="dilated"), "sparse_pattern='dilated'"),
    (dict(mixer="sparse", sparse_pattern="fixed", sparse_stride=4, sparse_summary=5), "sparse_summary=5"),
    (dict(mixer="sparse", sparse_stride=0), "sparse_stride=0"),
    (dict(mixer="lsh", lsh_buckets=3), "lsh_buckets=3"),
    (dict(mixer="lsh", lsh_chunk=0), "lsh_chunk=0"),
    (dict(mixer="lsh", lsh_rounds=0), "lsh_rounds=0"),
    (dict(mixer="linear", feature_map="favor", feature_redraw=0), "feature_redraw=0"),
    (dict(mixer="linear", feature_map="elu", feature_redraw=10), "feature_redraw=10"),
    (dict(mixer="attention", feature_map="favor", feature_redraw=10), "feature_redraw=10"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kwargs)
