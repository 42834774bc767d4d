"""GAU and FLASH mixed-chunk attention against the quadratic reference; causality; awkward lengths; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import gau

B, L, S, E = 2, 23, 8, 5  # L = 23: chunk size 8 leaves a partial chunk


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, L, d)), jnp.float32) for d in (S, S, S, S, E)]


@jax.jit
def _forward_and_grads(quad_q, quad_k, lin_q, lin_k, v, bias, w):
    args = (quad_q, quad_k, lin_q, lin_k, v)

    def loss(fn, *args):
        return jnp.sum(fn(*args, chunk_size=8, bias=bias) * w)

    out = {"fast": gau.mixed_chunk_attention(*args, chunk_size=8, bias=bias),
           "ref": gau.mixed_chunk_attention_reference(*args, chunk_size=8, bias=bias),
           "one_chunk": gau.mixed_chunk_attention(*args, chunk_size=64),  # C >= L: GAU over the whole sequence
           "gau_causal": gau.gau_attention(quad_q, quad_k, v, causal=True, scale=1.0 / L)}
    grads = {name: jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=tuple(range(5)))(*args)
             for name, fn in (("fast", gau.mixed_chunk_attention), ("ref", gau.mixed_chunk_attention_reference))}
    # causality: d out[:, t0] / d inputs vanishes for positions after t0
    t0 = 12
    causal = jax.grad(lambda *a: jnp.sum(gau.mixed_chunk_attention(*a, chunk_size=8)[:, t0]),
                      argnums=tuple(range(5)))(*args)
    return out, grads, causal


def test_mixed_chunk_matches_reference_and_is_causal():
    args = _inputs()
    bias = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((B, L, E)), jnp.float32)
    out, grads, causal = _forward_and_grads(*args, bias, w)
    np.testing.assert_allclose(out["fast"], out["ref"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["one_chunk"], out["gau_causal"], rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads["fast"], grads["ref"]):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    per_position = [jnp.abs(g).sum(axis=(0, 2)) for g in causal]
    for p in per_position[1:]:  # keys and values: nothing from the future
        assert jnp.all(p[13:] == 0)
    assert jnp.all(per_position[4][:8] > 0)  # every value of earlier chunks contributes (linear part)
    assert jnp.all(per_position[0].at[12].set(0) == 0)  # only its own quadratic query


def test_gau_attention_definition():
    q, k, _, _, v = _inputs(3)
    out = gau.gau_attention(q, k, v)  # non-causal, scale 1/L
    logits = np.einsum("bis,bjs->bij", q, k) / L
    expected = np.einsum("bij,bje->bie", np.maximum(logits, 0) ** 2, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    qq, qk, lq, lk, v = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        gau.mixed_chunk_attention(qq, qk, lq, lk, v, chunk_size=0)
    with pytest.raises(ValueError, match="lin_q"):
        gau.mixed_chunk_attention(qq, qk, lq[..., :3], lk, v)
    with pytest.raises(ValueError, match="bias"):
        gau.mixed_chunk_attention(qq, qk, lq, lk, v, chunk_size=8, bias=jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="v"):
        gau.gau_attention(qq, qk, v[:, :5])
