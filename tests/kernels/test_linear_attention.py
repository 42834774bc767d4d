"""Linear attention: chunked and recurrent forms against the quadratic definition; decoding; FAVOR+."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import linear_attention as la
from jaxlab.kernels.feature_maps import favor_projection, relu_features
from jaxlab.kernels.linear_attention import (
    LinearAttentionState,
    elu_plus_one,
    favor_features,
    linear_attention_reference,
    linear_attention_step,
)

B, L, H, Dk, Dv = 2, 37, 3, 5, 6  # L = 37: chunk size 8 leaves a partial chunk


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.fixture
def inputs():
    """From a local numpy generator: jax.random would compile once per new shape."""
    rng = np.random.default_rng(0)
    q = elu_plus_one(_normal(rng, (B, L, H, Dk)))
    k = elu_plus_one(_normal(rng, (B, L, H, Dk)))
    v = _normal(rng, (B, L, H, Dv))
    state = LinearAttentionState(jnp.abs(_normal(rng, (B, H, Dk, Dv))), jnp.abs(_normal(rng, (B, H, Dk))))
    return q, k, v, state


DECAY = jnp.array([1.0, 0.9, 0.5])
SEGMENTS = jnp.array([[0] * 10 + [1] * 20 + [2] * 7, [4] * 37])
# (causal, normalize, decay, segments, initial state): a sample of the combinations.
CASES = [
    (True, True, False, False, False),
    (True, True, True, True, True),
    (True, False, True, False, True),
    (False, True, True, True, False),
]


def _kwargs(causal, normalize, decay, segments, with_state, state):
    kw = dict(causal=causal, normalize=normalize, decay=DECAY if decay else None,
              segment_ids=SEGMENTS if segments else None)
    if with_state:
        kw.update(initial_state=state, return_state=True)
    return kw


def _loop(q, k, v, *, causal=True, normalize=True, decay=None, segment_ids=None, initial_state=None,
          return_state=False, eps=1e-6):
    """The definition written out in float64 numpy, independently of the kernel module.

    Causal: per token t, zero (S, z) where a segment starts at t >= 1, then S = g S + k_t v_t^T,
    z = g z + k_t, o_t = q_t S / (q_t z + eps) (Katharopoulos et al. eq. 16-18 with RetNet's decay g).
    Non-causal: o_i = sum_j w_ij v_j over j in i's segment, w_ij = g^|i-j| q_i . k_j (double loop).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    Bn, Ln, Hn, Dkn = q.shape
    g = np.ones(Hn) if decay is None else np.asarray(decay, np.float64)
    ids = np.zeros((Bn, Ln), int) if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros(v.shape)
    if not causal:
        den = np.zeros((Bn, Ln, Hn))
        for i in range(Ln):
            for j in range(Ln):
                same = (ids[:, i] == ids[:, j])[:, None]  # [B, 1]
                w = same * g ** abs(i - j) * np.einsum("bhd,bhd->bh", q[:, i], k[:, j])  # [B, H]
                o[:, i] += w[..., None] * v[:, j]
                den[:, i] += w
        return o / (den[..., None] + eps) if normalize else o
    S = np.zeros((Bn, Hn, Dkn, v.shape[-1])) if initial_state is None else np.asarray(initial_state.kv, np.float64)
    z = np.zeros((Bn, Hn, Dkn)) if initial_state is None else np.asarray(initial_state.z, np.float64)
    for t in range(Ln):
        if t > 0:
            keep = (ids[:, t] == ids[:, t - 1]).astype(np.float64)  # [B]
            S, z = S * keep[:, None, None, None], z * keep[:, None, None]
        S = g[:, None, None] * S + np.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        z = g[:, None] * z + k[:, t]
        o[:, t] = np.einsum("bhd,bhde->bhe", q[:, t], S)
        if normalize:
            o[:, t] /= np.einsum("bhd,bhd->bh", q[:, t], z)[..., None] + eps
    return (o, LinearAttentionState(S, z if normalize else None)) if return_state else o


@functools.partial(jax.jit, static_argnames=("causal", "normalize", "decay", "segments", "with_state"))
def _all_methods(q, k, v, state, *, causal, normalize, decay, segments, with_state):
    """Every method in one program (compiles dominate the test time)."""
    kw = _kwargs(causal, normalize, decay, segments, with_state, state)
    out = {m: la.linear_attention(q, k, v, method=m, chunk_size=8, **kw) for m in ("chunked", "recurrent", "parallel")}
    out["reference"] = linear_attention_reference(q, k, v, **kw)
    return out


@pytest.mark.parametrize("causal,normalize,decay,segments,with_state", CASES)
def test_methods_match_reference(inputs, causal, normalize, decay, segments, with_state):
    """Every method (and linear_attention_reference, which "parallel" runs) against the explicit loop."""
    q, k, v, state = inputs
    outs = _all_methods(q, k, v, state, causal=causal, normalize=normalize, decay=decay, segments=segments,
                        with_state=with_state)
    ref = _loop(q, k, v, **_kwargs(causal, normalize, decay, segments, with_state, state))
    for method, out in outs.items():
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            scale = jnp.max(jnp.abs(r))  # unnormalised outputs and states grow with L
            np.testing.assert_allclose(o / scale, r / scale, atol=2e-6, err_msg=method)


@jax.jit
def _all_grads(q, k, v, decay, state, w):
    def loss(fn, q, k, v, decay, state):
        o, s = fn(q, k, v, decay=decay, segment_ids=SEGMENTS, initial_state=state, return_state=True)
        return jnp.sum(o * w) + jnp.sum(s.kv) + jnp.sum(s.z)

    fns = {"reference": linear_attention_reference,
           **{m: functools.partial(la.linear_attention, method=m, chunk_size=8) for m in ("chunked", "recurrent")}}
    return {name: jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4))(q, k, v, decay, state)
            for name, fn in fns.items()}


def test_gradients_match_reference(inputs):
    q, k, v, state = inputs
    grads = _all_grads(q, k, v, DECAY, state, _normal(np.random.default_rng(3), v.shape))
    ref = jax.tree.leaves(grads.pop("reference"))
    for method, out in grads.items():
        for g, g_ref in zip(jax.tree.leaves(out), ref):
            np.testing.assert_allclose(g, g_ref, rtol=2e-4, atol=2e-4, err_msg=method)


@jax.jit
def _pieces_then_decoding(q, k, v, state):
    kw = dict(decay=DECAY, initial_state=state, return_state=True, method="chunked", chunk_size=8)
    whole, s_whole = la.linear_attention(q, k, v, segment_ids=SEGMENTS, **kw)
    cut, steps_from = 15, 30
    o1, s1 = la.linear_attention(*(x[:, :cut] for x in (q, k, v)), segment_ids=SEGMENTS[:, :cut], **kw)
    kw["initial_state"] = s1
    o2, s = la.linear_attention(*(x[:, cut:steps_from] for x in (q, k, v)), segment_ids=SEGMENTS[:, cut:steps_from],
                                **kw)
    outs = [o1, o2]
    s = jax.tree.map(lambda x: x.at[0].set(0), s)  # sequence 0 starts a new segment at 30: a fresh state
    for t in range(steps_from, L):
        o_t, s = linear_attention_step(s, q[:, t], k[:, t], v[:, t], decay=DECAY)
        outs.append(o_t[:, None])
    return (whole, s_whole), (jnp.concatenate(outs, 1), s)


def test_pieces_and_decoding_continue_the_full_forward(inputs):
    """A packed sequence in two calls (boundary inside a segment), then token-by-token decoding steps,
    carrying the returned state, equals one call over the whole sequence (decay linear attention == its
    recurrence)."""
    (whole, s_whole), (pieces, s) = _pieces_then_decoding(*inputs)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@jax.jit
def _packed_and_alone(q, k, v):
    kw = dict(decay=DECAY, method="chunked", chunk_size=8)
    alone = []
    for lo, hi in ((0, 10), (10, 30), (30, 37)):  # each segment as the only nonzero tokens of a sequence
        only = ((jnp.arange(L) >= lo) & (jnp.arange(L) < hi))[None, :, None, None]
        alone.append(la.linear_attention(*(x * only for x in (q, k, v)), **kw)[0, lo:hi])
    return la.linear_attention(q, k, v, segment_ids=SEGMENTS, **kw)[0], jnp.concatenate(alone)


def test_segments_equal_separate_sequences(inputs):
    """Packed segments give what each segment gives alone."""
    packed, alone = _packed_and_alone(*inputs[:3])
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_causality_by_gradients(inputs):
    q, k, v, _ = inputs
    t0 = 17

    def out_t0(q, k, v):
        return jnp.sum(la.linear_attention(q, k, v, decay=DECAY, method="chunked", chunk_size=8)[:, t0])

    dq, dk, dv = (jnp.abs(g).sum(axis=(0, 2, 3)) for g in jax.jit(jax.grad(out_t0, argnums=(0, 1, 2)))(q, k, v))
    assert jnp.all(dq.at[t0].set(0) == 0) and dq[t0] > 0  # o_t0 reads only its own query
    for per_position in (dk, dv):
        assert jnp.all(per_position[t0 + 1:] == 0)  # nothing from the future
        assert jnp.all(per_position[: t0 + 1] > 0)  # everything from the past


def _naive(q, k, v, dtype):
    """Causal normalised linear attention computed entirely in ``dtype``."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    w = jnp.einsum("bihd,bjhd->bhij", q, k) * jnp.tril(jnp.ones((L, L), dtype))
    return jnp.einsum("bhij,bjhe->bihe", w, v) / (jnp.einsum("bhij->bih", w)[..., None] + 1e-6)


@jax.jit
def _bf16_errors(q, k, v):
    ref = _naive(q, k, v, jnp.float32)
    naive_err = jnp.max(jnp.abs(_naive(q, k, v, jnp.bfloat16).astype(jnp.float32) - ref))
    out = la.linear_attention(q, k, v, method="chunked", chunk_size=8)
    return out.dtype == jnp.bfloat16, jnp.max(jnp.abs(out.astype(jnp.float32) - ref)), naive_err


def test_bf16_error_at_most_twice_naive_bf16(inputs):
    is_bf16, err, naive_err = _bf16_errors(*(x.astype(jnp.bfloat16) for x in inputs[:3]))
    assert is_bf16 and err <= 2 * naive_err


FAVOR_D = 16
# One compiled draw of the largest projection; smaller feature counts use its leading rows (still a valid
# FAVOR+ draw: whole orthogonal blocks of i.i.d.-norm rows). ``step`` selects a redraw.
_draw = jax.jit(lambda key, step: favor_projection(key, 512, FAVOR_D, step=step, redraw_every=4))


def test_favor_error_falls_with_features():
    """FAVOR+ estimates softmax attention; its error shrinks as the number of random features grows."""
    rng = np.random.default_rng(1)
    q, k = (0.5 * _normal(rng, (1, 64, 1, FAVOR_D)) for _ in range(2))
    v = _normal(rng, (1, 64, 1, FAVOR_D))
    exact = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k) / FAVOR_D**0.5), v)

    @jax.jit
    def errors(Ws):  # [draws, 512, D] -> mean RMS error with 8, 64 and 512 features
        def error(W):
            # The first m features of a 512-feature draw are an m-feature draw: their 1/sqrt(m) factor and the
            # stabilisers cancel in normalised attention, so one feature computation serves every m.
            phi_q, phi_k = favor_features(q, W, is_query=True), favor_features(k, W, is_query=False)
            approx = [la.linear_attention(phi_q[..., :m], phi_k[..., :m], v, causal=False, method="parallel")
                      for m in (8, 64, 512)]
            return jnp.stack([jnp.sqrt(jnp.mean((a - exact) ** 2)) for a in approx])

        return jnp.mean(jax.vmap(error)(Ws), axis=0)

    Ws = jnp.stack([_draw(jax.random.PRNGKey(0), 4 * seed) for seed in range(4)])  # four independent redraws
    errors = [float(e) for e in errors(Ws)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.35 * errors[0], errors  # Monte Carlo: ~1/sqrt(m), 8x fewer -> ~1/8 here


@jax.jit
def _feature_checks(x, W):
    return dict(
        elu=elu_plus_one(x), relu=relu_features(x), relu_random=relu_features(x, W[:12]),
        keys=favor_features(x, W[:12], is_query=False, causal=True),
        keys_later_changed=favor_features(x.at[:, 3:].mul(10.0), W[:12], is_query=False, causal=True),
        queries=favor_features(x, W[:12], is_query=True))


def test_feature_maps():
    x = _normal(np.random.default_rng(2), (1, 5, 2, FAVOR_D))
    key = jax.random.PRNGKey(0)
    r = _feature_checks(x, _draw(key, 0))
    assert jnp.all(r["elu"] > 0) and jnp.all(r["relu"] >= 0) and jnp.all(r["relu_random"] >= 0)
    assert r["relu_random"].shape == (1, 5, 2, 12)
    # causal keys: no stabiliser shared across positions, so later keys leave earlier features alone
    np.testing.assert_array_equal(r["keys"][:, :3], r["keys_later_changed"][:, :3])
    assert jnp.all(r["queries"] > 0) and jnp.all(r["queries"] <= 1 / np.sqrt(12) + 1e-6)
    # redraw: a new projection every `redraw_every` steps, a pure function of (key, step)
    np.testing.assert_array_equal(_draw(key, 0), _draw(key, 3))
    assert not jnp.allclose(_draw(key, 0), _draw(key, 4))
    block = _draw(key, 0)[:FAVOR_D]  # one block: orthogonal rows with chi-distributed norms
    gram = block @ block.T
    np.testing.assert_allclose(gram - jnp.diag(jnp.diag(gram)), 0, atol=1e-3)


def test_bad_inputs_raise(inputs):
    q, k, v, state = inputs
    cases = [
        (dict(method="fft"), "method"),
        (dict(decay=jnp.ones(2)), "decay"),
        (dict(decay=jnp.array([1.0, 0.0, 0.5])), "decay"),
        (dict(segment_ids=jnp.zeros((B, L - 1), jnp.int32)), "segment_ids"),
        (dict(causal=False, return_state=True), "causal"),
        (dict(initial_state=LinearAttentionState(state.kv, None)), "initial_state.z"),
        (dict(chunk_size=0), "chunk_size"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            la.linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="Dk"):
        la.linear_attention(q, k[..., :4], v)
    # decoding with a state of another batch size or a decay for one head would broadcast silently
    with pytest.raises(AssertionError):
        linear_attention_step(LinearAttentionState(state.kv[:1], state.z[:1]), q[:, 0], k[:, 0], v[:, 0])
    with pytest.raises(AssertionError):
        linear_attention_step(state, q[:, 0], k[:, 0], v[:, 0], decay=DECAY[:1])


def test_auto_on_cpu_values_and_gradients_match_reference():
    """At L > 256 on CPU, auto takes its values from the recurrent form and its VJP from the chunked one."""
    if jax.default_backend() != "cpu":
        pytest.skip("the split policy is CPU's")
    rng = np.random.default_rng(5)
    n = 260
    q, k = (elu_plus_one(_normal(rng, (1, n, 2, 4))) for _ in range(2))
    v, ct = _normal(rng, (1, n, 2, 3)), _normal(rng, (1, n, 2, 3))
    state = LinearAttentionState(jnp.abs(_normal(rng, (1, 2, 4, 3))), jnp.abs(_normal(rng, (1, 2, 4))))
    segments = jnp.asarray(np.repeat([[0, 1]], [100, 160], axis=1))

    def loss(method, q, k, v, state):
        o, s = la.linear_attention(q, k, v, decay=DECAY[:2], segment_ids=segments, initial_state=state,
                                   return_state=True, method=method)
        return jnp.sum(o * ct) + jnp.sum(s.kv) + jnp.sum(s.z), o

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True), static_argnums=0)
    (g_auto, o_auto), (g_ref, o_ref) = grad("auto", q, k, v, state), grad("parallel", q, k, v, state)
    np.testing.assert_allclose(o_auto, o_ref, rtol=1e-4, atol=1e-4)
    for g, g_r in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(g, g_r, rtol=2e-4, atol=2e-4)
    jaxpr = str(jax.make_jaxpr(functools.partial(loss, "auto"))(q, k, v, state))
    assert "custom_vjp" in jaxpr
