"""The mixers' parts, each against a hand computation or an independent reference: the sliding window's
keys per query (models and kernels agree on ``window=W``), FAVOR+ key features, the causal depthwise
convolution, HiPPO-N's eigenvalues, sinusoidal positions, segment starts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import scan
from jaxlab.kernels.sparse_attention import local_attention
from jaxlab.models import layers
from jaxlab.models.attention import Attention
from jaxlab.models.linear_mixers import favor_key_features
from jaxlab.models.ssm_mixers import causal_conv1d, hippo_n_eigenvalues

L = 11


def _visible_counts(fn, x):
    """Keys each query sees: the number of positions j with a non-zero d out[i] / d x[j] ([L] ints)."""
    jac = jax.jacrev(fn)(x)  # [L, F, L, F']
    return np.asarray((jnp.abs(jac).sum(axis=(1, 3)) > 0).sum(axis=1))


@pytest.mark.parametrize("causal", [True, False])
def test_window_counts_the_same_keys_in_the_model_and_the_kernel(causal):
    """``window=W`` is W keys, the query's own included, for ``Attention`` and ``local_attention`` alike."""
    W = 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((L, 8)), jnp.float32)
    model = Attention(num_heads=2, window=W, causal=causal, rope_base=None, impl="xla")
    params = model.init(jax.random.key(0), x[None])
    model_counts = _visible_counts(lambda x: model.apply(params, x[None])[0][0], x)
    q, k = (jnp.asarray(rng.standard_normal((1, L, 2, 4)), jnp.float32) for _ in range(2))
    kernel_counts = _visible_counts(
        lambda v: local_attention(q, k, v.reshape(1, L, 2, 4), window=W, causal=causal, impl="xla")[0].reshape(L, 8),
        jnp.asarray(rng.standard_normal((L, 8)), jnp.float32))
    i = np.arange(L)
    expected = np.minimum(i + 1, W) if causal else np.minimum(i, W - 1) + np.minimum(L - 1 - i, W - 1) + 1
    np.testing.assert_array_equal(model_counts, expected)
    np.testing.assert_array_equal(kernel_counts, expected)


def test_favor_key_features_by_hand():
    """phi(k) = exp(W k' - |k'|^2 / 2) / sqrt(m), k' = k / D^(1/4), per key alone (no stabiliser)."""
    rng = np.random.default_rng(1)
    B, Lk, H, D, m = 2, 5, 3, 4, 6
    k = rng.standard_normal((B, Lk, H, D))
    W = rng.standard_normal((m, D))
    phi = np.asarray(favor_key_features(jnp.asarray(k, jnp.float32), jnp.asarray(W, jnp.float32)))
    expected = np.empty((B, Lk, H, m))
    for b, t, h, r in np.ndindex(B, Lk, H, m):
        kp = k[b, t, h] / D**0.25
        expected[b, t, h, r] = math.exp(float(W[r] @ kp) - float(kp @ kp) / 2) / math.sqrt(m)
    np.testing.assert_allclose(phi, expected, rtol=1e-5, atol=1e-7)
    # causal: a key's features do not depend on any other position
    alone = favor_key_features(jnp.asarray(k[:, 2:3], jnp.float32), jnp.asarray(W, jnp.float32))
    np.testing.assert_allclose(phi[:, 2:3], alone, rtol=1e-6)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_favor_mixer_output_not_vanishing(head_dim):
    """The FAVOR+ mixer's output is as large as elu+1's, within 10x: a key stabiliser of ~exp(-D/2) sent
    it to ~1e-8 at D = 32 (the features below the normaliser's eps) while elu's stayed ~0.2."""
    from jaxlab.models.linear_mixers import LinearAttention

    H, L = 2, 16
    x = jax.random.normal(jax.random.key(0), (1, L, H * head_dim))

    def output_size(feature_map):
        mixer = LinearAttention(num_heads=H, feature_map=feature_map, num_features=2 * head_dim)
        y, _ = mixer.apply(mixer.init(jax.random.key(1), x), x)
        return float(jnp.mean(jnp.abs(y)))

    elu, favor = output_size("elu"), output_size("favor")
    assert favor > elu / 10 and favor < elu * 10, (favor, elu)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_favor_causal_estimates_softmax(head_dim):
    """Causal FAVOR+ (per-row query stabiliser, unstabilised causal keys) estimates causal softmax attention
    on small-norm inputs; the error falls as the features grow, and output i has no gradient from inputs > i."""
    from jaxlab.kernels.feature_maps import favor_features, orthogonal_gaussian
    from jaxlab.kernels.linear_attention import linear_attention

    L = 12
    q, k, v = (jax.random.normal(jax.random.key(i), (1, L, 1, head_dim)) * s for i, s in enumerate((0.3, 0.3, 1.0)))
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) / head_dim**0.5
    scores = jnp.where(jnp.tril(jnp.ones((L, L), bool)), scores, -jnp.inf)
    exact = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(scores, axis=-1), v)

    @jax.jit
    def errors(Ws):
        def error(W):
            phi_q, phi_k = favor_features(q, W, is_query=True), favor_key_features(k, W)
            approx = [linear_attention(phi_q[..., :m], phi_k[..., :m], v, causal=True, method="parallel")
                      for m in (16, 128, 1024)]
            return jnp.stack([jnp.sqrt(jnp.mean((a - exact) ** 2)) for a in approx])

        return jnp.mean(jax.vmap(error)(Ws), axis=0)

    Ws = jnp.stack([orthogonal_gaussian(jax.random.key(10 + i), 1024, head_dim) for i in range(4)])
    errs = [float(e) for e in errors(Ws)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.35 * errs[0], errs
    assert errs[2] < 0.1, errs

    def row(x, i):  # output i of the causal FAVOR+ attention as a function of all inputs
        phi_q, phi_k = favor_features(x, Ws[0, :64], is_query=True), favor_key_features(x, Ws[0, :64])
        return jnp.sum(linear_attention(phi_q, phi_k, x, causal=True, method="parallel")[:, i])

    grad = jax.grad(row)(q, 5)
    assert jnp.all(grad[:, 6:] == 0) and jnp.any(grad[:, :6] != 0)


def test_causal_conv1d_against_numpy_convolve():
    rng = np.random.default_rng(2)
    B, C, K = 2, 3, 4
    x, w, b = rng.standard_normal((B, L, C)), rng.standard_normal((K, C)), rng.standard_normal(C)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    y, state = causal_conv1d(f32(x), f32(w), f32(b))
    # y_t = b + sum_j w_j x_{t-K+1+j}: np.convolve with the taps reversed, first L outputs
    expected = np.stack([np.stack([np.convolve(x[n, :, c], w[::-1, c])[:L] + b[c] for c in range(C)], -1)
                         for n in range(B)])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, x[:, L - K + 1:], rtol=1e-6)
    # two pieces with the carried state equal the whole
    y1, s1 = causal_conv1d(f32(x[:, :5]), f32(w), f32(b))
    y2, _ = causal_conv1d(f32(x[:, 5:]), f32(w), f32(b), state=s1)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), expected, rtol=1e-5, atol=1e-5)
    # packed segments: each convolves alone (zeros before its start)
    ids = np.array([[0] * 6 + [1] * 5] * B)
    y_seg, _ = causal_conv1d(f32(x), f32(w), f32(b), segment_ids=jnp.asarray(ids))
    alone = [np.stack([np.stack([np.convolve(x[n, lo:hi, c], w[::-1, c])[:hi - lo] + b[c] for c in range(C)], -1)
                       for n in range(B)]) for lo, hi in ((0, 6), (6, L))]
    np.testing.assert_allclose(y_seg, np.concatenate(alone, 1), rtol=1e-5, atol=1e-5)


def test_hippo_n_eigenvalues_against_numpy_eigvals():
    """HiPPO-N = HiPPO-LegS + P P^T (P_n = sqrt(n + 1/2)), built here from its entries, eigvals by numpy."""
    N = 8
    A = np.zeros((N, N))
    for n, k in np.ndindex(N, N):
        if n > k:
            A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
        elif n == k:
            A[n, k] = -(n + 1)
    P = np.sqrt(np.arange(N) + 0.5)
    eig = np.linalg.eigvals(A + np.outer(P, P))
    eig = np.sort_complex(eig[eig.imag > 0] * -1j) * 1j  # positive imaginary parts, by increasing imaginary part
    got = hippo_n_eigenvalues(N)
    assert got.shape == (N // 2,) and got.dtype == np.complex64
    np.testing.assert_allclose(got, eig, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.real, -0.5, atol=1e-5)  # the normal part is -1/2 I + skew-symmetric
    with pytest.raises(ValueError, match="even"):
        hippo_n_eigenvalues(5)


def test_sinusoidal_positions_by_the_formula():
    """Vaswani et al. 2017, section 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d))."""
    d = 6
    positions = jnp.asarray([[0, 1, 2, 7], [5, 50, 3, 0]])
    pe = np.asarray(layers.sinusoidal_positions(positions, d))
    assert pe.shape == (2, 4, d)
    for b, t in np.ndindex(2, 4):
        p = int(positions[b, t])
        for i in range(d // 2):
            np.testing.assert_allclose(pe[b, t, 2 * i], math.sin(p / 10000 ** (2 * i / d)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(pe[b, t, 2 * i + 1], math.cos(p / 10000 ** (2 * i / d)), rtol=1e-5, atol=1e-6)


def test_segment_starts_is_one_function_true_at_t0():
    assert layers.segment_starts is scan.segment_starts  # the models' and the kernels' convention is one
    ids = jnp.asarray([[4, 4, 1, 1, 1, 9], [2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(layers.segment_starts(ids), [[1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layers.positions_from_segments(ids), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
