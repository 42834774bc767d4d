"""Linformer and Reformer's LSH attention against their references and the exact attention they approximate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels.attention import attention_reference
from jaxlab.kernels.linformer import linformer_attention, linformer_attention_reference, linformer_projections
from jaxlab.kernels.lsh_attention import lsh_attention, lsh_attention_reference, lsh_hash, lsh_rotations
from jaxlab.xla_options import FAST_COMPILE

B, L, D = 2, 16, 8
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # compiles dominate these tests


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


# --------------------------------------------------------------------------------------------- Linformer


@pytest.mark.parametrize("Hq,Hkv,headwise", [(4, 4, False), (4, 2, True), (4, 1, False)])  # MHA, GQA, MQA
def test_linformer_values_and_gradients_match_reference(Hq, Hkv, headwise):
    # float32: the projected attention runs through dot_product_attention, whose softmax is fp32
    q, k, v = (_normal(i, B, L, h, D).astype(jnp.float32) for i, h in ((0, Hq), (1, Hkv), (2, Hkv)))
    E, F = linformer_projections(jax.random.PRNGKey(0), 5, L, num_heads=Hkv if headwise else None)
    w = _normal(3, B, L, Hq, D).astype(jnp.float32)

    @fast_jit
    def both(q, k, v, E, F):
        outs = [fn(q, k, v, E, F) for fn in (linformer_attention, linformer_attention_reference)]
        grads = [jax.grad(lambda *a, fn=fn: jnp.sum(w * fn(*a)), argnums=(0, 1, 2, 3, 4))(q, k, v, E, F)
                 for fn in (linformer_attention, linformer_attention_reference)]
        return outs, grads

    (out, ref), (g, g_ref) = both(q, k, v, E, F)
    assert out.shape == (B, L, Hq, D)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_linformer_with_identity_projections_is_full_attention():
    q, k, v = (_normal(i, B, L, h, D).astype(jnp.float32) for i, h in ((0, 4), (1, 2), (2, 2)))
    eye = jnp.eye(L)
    np.testing.assert_allclose(linformer_attention(q, k, v, eye, eye), attention_reference(q, k, v), atol=1e-5)


def test_linformer_refuses_causal_and_bad_projections():
    q = k = v = jnp.ones((B, L, 2, D))
    E = jnp.ones((4, L))
    with pytest.raises(ValueError, match="cannot be causal"):
        linformer_attention(q, k, v, E, E, causal=True)
    with pytest.raises(ValueError, match=r"E.shape=\(4, 15\)"):
        linformer_attention(q, k, v, E[:, :-1], E)
    with pytest.raises(ValueError, match=r"F.shape=\(3, 4, 16\)"):
        linformer_attention(q, k, v, E, jnp.ones((3, 4, L)))


# ---------------------------------------------------------------------------------------------- LSH


def _full_shared_qk(qk, v, causal):
    """Softmax attention with keys qk/|qk|, self excluded (causal: the first token, alone, gets its own value)."""
    s = jnp.einsum("blhd,bmhd->bhlm", qk, qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)) / np.sqrt(D)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    mask = (j != i) & ((j <= i) if causal else True)
    out = jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(jnp.where(mask, s, -1e30), -1), v)
    return out.at[:, 0].set(v[:, 0]) if causal else out


def test_lsh_hash_is_the_argmax_of_the_rotations():
    qk = _normal(0, 1, 4, 1, D).astype(jnp.float32)
    R = lsh_rotations(jax.random.PRNGKey(1), D, 6, 2)
    b = lsh_hash(qk, R, 6)
    xr = np.einsum("ld,rdn->rln", np.asarray(qk[0, :, 0]), np.asarray(R))
    np.testing.assert_array_equal(b[:, 0, 0], np.argmax(np.concatenate([xr, -xr], -1), -1))
    assert int(b.max()) < 6


@pytest.mark.parametrize("n_rounds,causal", [(1, False), (3, True)])
def test_lsh_values_and_gradients_match_reference(x64, causal, n_rounds):
    qk, v, w = _normal(0, B, L, 2, D, scale=2.0), _normal(1, B, L, 2, D), _normal(2, B, L, 2, D)
    kw = dict(n_buckets=4, chunk_len=4, n_rounds=n_rounds, causal=causal)
    key = jax.random.PRNGKey(3)

    @fast_jit
    def both(qk, v):
        fns = (lambda a, b: lsh_attention(a, b, key, **kw), lambda a, b: lsh_attention_reference(a, b, key, **kw))
        return ([fn(qk, v) for fn in fns],
                [jax.grad(lambda a, b, fn=fn: jnp.sum(w * fn(a, b)), argnums=(0, 1))(qk, v) for fn in fns])

    (out, ref), (g, g_ref) = both(qk, v)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_with_one_bucket_is_full_shared_qk_attention(x64, causal):
    qk, v = _normal(4, B, L, 2, D), _normal(5, B, L, 2, D)
    key = jax.random.PRNGKey(0)

    @fast_jit
    def run(qk, v):
        kw = dict(n_buckets=1, chunk_len=L, causal=causal)
        quarter = dict(n_buckets=1, chunk_len=L // 4, causal=causal)
        return (_full_shared_qk(qk, v, causal), lsh_attention(qk, v, key, **kw),
                lsh_attention_reference(qk, v, key, **kw),
                lsh_attention(qk, v, key, **quarter), lsh_attention_reference(qk, v, key, **quarter),
                lsh_attention(qk, v, key, n_buckets=1, chunk_len=L // 2, causal=causal))

    full, out, ref, out_quarter, ref_quarter, out_half = run(qk, v)
    np.testing.assert_allclose(out, full, atol=1e-12)
    np.testing.assert_allclose(ref, full, atol=1e-12)
    # chunks of a quarter: the first chunk has no previous one (no wrap-around to the last chunk)
    np.testing.assert_allclose(out_quarter, ref_quarter, atol=1e-12)
    if causal:  # sorted order is position order: two chunks (own and previous) hold every earlier key
        np.testing.assert_allclose(out_half, full, atol=1e-12)


def test_more_hashing_rounds_bring_lsh_closer_to_full_attention():
    qk, v = _normal(6, 4, L, 2, D, scale=1.5).astype(jnp.float32), _normal(7, 4, L, 2, D).astype(jnp.float32)
    full = _full_shared_qk(qk, v, False)

    @fast_jit
    def errors(key):
        return [jnp.mean(jnp.abs(lsh_attention(qk, v, key, n_buckets=8, chunk_len=4, n_rounds=r) - full))
                for r in (1, 4)]

    err = np.mean([errors(jax.random.PRNGKey(s)) for s in range(4)], axis=0)   # over hash draws
    assert err[1] < 0.75 * err[0], err


def test_lsh_bad_arguments_name_the_argument():
    qk = jnp.ones((1, L, 1, D))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="n_buckets=3"):
        lsh_attention(qk, qk, key, n_buckets=3, chunk_len=4)
    with pytest.raises(ValueError, match="chunk_len=5"):
        lsh_attention(qk, qk, key, n_buckets=2, chunk_len=5)
    with pytest.raises(ValueError, match="n_rounds=0"):
        lsh_attention_reference(qk, qk, key, n_buckets=2, chunk_len=4, n_rounds=0)
