"""SSM scans: Mamba's selective scan and Mamba-2's SSD against their sequential definitions; S4D, S5, discretisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import s4, ssm
from jaxlab.kernels.s4 import s4d_kernel, s4d_lambda

Bsz, L, Dm, N = 2, 29, 6, 4  # L = 29: chunk sizes 4 and 8 leave partial chunks
H, P, G = 4, 3, 2
SEGMENTS = jnp.array([[0] * 10 + [1] * 19, [5] * 29])

# Jitted entry points: eagerly, every scan primitive would compile on its own.
s4d = jax.jit(s4.s4d, static_argnames=("mode", "discretization", "method"))
s5 = jax.jit(s4.s5, static_argnames=("method", "return_state"))
discretize = jax.jit(s4.discretize, static_argnames="method")
discretize_diag = jax.jit(s4.discretize_diag, static_argnames="method")


def _normal(rng, *shape, complex_=False):
    x = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0)
    return jnp.asarray(x, jnp.complex64 if complex_ else jnp.float32)


def _mamba_inputs(complex_=False, seed=0):
    """Mamba arguments (u, delta, A, B, C, D, z, delta_bias) and h0, from a local numpy generator."""
    rng = np.random.default_rng(seed)
    A = -jnp.exp(_normal(rng, Dm, N)) + (1j * _normal(rng, Dm, N) if complex_ else 0)
    args = (_normal(rng, Bsz, L, Dm), _normal(rng, Bsz, L, Dm), A, _normal(rng, Bsz, L, N, complex_=complex_),
            _normal(rng, Bsz, L, N, complex_=complex_), _normal(rng, Dm), _normal(rng, Bsz, L, Dm), _normal(rng, Dm))
    return args, _normal(rng, Bsz, Dm, N, complex_=complex_)


@functools.partial(jax.jit, static_argnames="method")
def _selective(args, h0, method):
    kw = dict(delta_softplus=True, h0=h0, segment_ids=SEGMENTS, return_state=True)
    if method == "reference":
        return ssm.selective_scan_reference(*args, **kw)
    return ssm.selective_scan(*args, **kw, method=method)


@pytest.mark.parametrize("complex_", [False, True])
def test_selective_scan_matches_reference(complex_):
    args, h0 = _mamba_inputs(complex_)
    y_ref, h_ref = _selective(args, h0, "reference")
    assert y_ref.dtype == jnp.float32 and h_ref.dtype == (jnp.complex64 if complex_ else jnp.float32)
    for method in ("sequential", "associative", "chunked"):
        y, h = _selective(args, h0, method)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4, err_msg=method)
        np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5, err_msg=method)


@functools.partial(jax.jit, static_argnames="method")
def _selective_grads(args, h0, w, method):
    def loss(args, h0):
        y, h = _selective(args, h0, method)
        return jnp.sum(y * w) + jnp.sum(h)
    return jax.grad(loss, argnums=(0, 1))(args, h0)


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_selective_scan_gradients_match_reference(method):
    args, h0 = _mamba_inputs(seed=1)
    w = _normal(np.random.default_rng(2), Bsz, L, Dm)
    ref = jax.tree.leaves(_selective_grads(args, h0, w, "reference"))
    for g, g_ref in zip(jax.tree.leaves(_selective_grads(args, h0, w, method)), ref):
        np.testing.assert_allclose(g, g_ref, rtol=2e-3, atol=2e-4)


def test_selective_scan_reference_is_mambas_formula():
    """Two steps by hand: delta = softplus(delta + bias); h = exp(delta A) h + delta u B; y = (C h + D u) silu(z)."""
    u, d, A, Bv, Cv, D, z, bias = 0.5, -0.3, -0.7, 1.3, -0.4, 0.2, 0.8, 0.1
    delta = np.log1p(np.exp(d + bias))
    h1 = delta * u * Bv
    h2 = np.exp(delta * A) * h1 + delta * u * Bv
    silu = z / (1 + np.exp(-z))
    expected = [(Cv * h + D * u) * silu for h in (h1, h2)]
    full = lambda x: jnp.full((1, 2, 1), x, jnp.float32)  # noqa: E731
    y = ssm.selective_scan_reference(full(u), full(d), jnp.full((1, 1), A), full(Bv), full(Cv), jnp.array([D]),
                                     full(z), jnp.array([bias]), delta_softplus=True)
    np.testing.assert_allclose(y[0, :, 0], expected, rtol=1e-5)


def _ssd_inputs(seed=0, groups=G):
    rng = np.random.default_rng(seed)
    x = _normal(rng, Bsz, L, H, P)
    dt = jax.nn.softplus(_normal(rng, Bsz, L, H))
    A = -jnp.exp(_normal(rng, H))
    return x, dt, A, _normal(rng, Bsz, L, groups, N), _normal(rng, Bsz, L, groups, N)


@pytest.mark.parametrize("chunk_size,D_shape", [(4, (H,)), (8, (H, P)), (64, None)])
def test_ssd_matches_reference(chunk_size, D_shape):
    rng = np.random.default_rng(3)
    D = None if D_shape is None else _normal(rng, *D_shape)
    kw = dict(D=D, h0=_normal(rng, Bsz, H, N, P), segment_ids=SEGMENTS, return_state=True)
    y_ref, h_ref = ssm.ssd_reference(*_ssd_inputs(), **kw)
    y, h = jax.jit(ssm.ssd, static_argnames=("chunk_size", "return_state"))(*_ssd_inputs(), chunk_size=chunk_size, **kw)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)


def test_ssd_gradients_match_reference():
    inputs = _ssd_inputs(seed=4)
    h0 = _normal(np.random.default_rng(5), Bsz, H, N, P)

    def grads(fn, **kw):
        def loss(inputs, h0):
            y, h = fn(*inputs, h0=h0, segment_ids=SEGMENTS, return_state=True, **kw)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h)
        return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, h0))

    for g, g_ref in zip(grads(ssm.ssd, chunk_size=8), grads(ssm.ssd_reference)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4)


def test_ssd_equals_selective_scan_for_per_head_scalar_A():
    """Mamba-2 is Mamba-1 with A_h shared by a head's P channels and all N states (one group of B, C)."""
    x, dt, A, Bm, Cm = _ssd_inputs(seed=6, groups=1)
    y_ssd = ssm.ssd(x, dt, A, Bm, Cm, chunk_size=8)
    u = x.reshape(Bsz, L, H * P)  # channel (h, p)
    delta = jnp.repeat(dt, P, axis=2)
    A_mamba = jnp.broadcast_to(jnp.repeat(A, P)[:, None], (H * P, N))
    y_mamba = ssm.selective_scan(u, delta, A_mamba, Bm[:, :, 0], Cm[:, :, 0], method="sequential")
    np.testing.assert_allclose(y_ssd.reshape(Bsz, L, H * P), y_mamba, rtol=1e-4, atol=1e-4)


def _s4d_params(init, seed=0, H4=3, N4=4):
    rng = np.random.default_rng(seed)
    Lam = jnp.broadcast_to(s4d_lambda(N4, init), (H4, N4)) * jnp.asarray(rng.uniform(0.5, 1.5, (H4, 1)))
    complex_ = init != "real"
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), H4)), jnp.float32)
    return Lam, _normal(rng, H4, N4, complex_=complex_), _normal(rng, H4, N4, complex_=complex_), dt, _normal(rng, H4)


@pytest.mark.parametrize("init,discretization", [("lin", "zoh"), ("inv", "bilinear"), ("real", "zoh")])
def test_s4d_fft_convolution_equals_recurrence(init, discretization):
    Lam, Bp, Cp, dt, D = _s4d_params(init)
    u = _normal(np.random.default_rng(7), Bsz, 40, 3)
    y_fft = s4d(u, Lam, Bp, Cp, dt, D, discretization=discretization)
    for method in ("sequential", "associative"):
        y_rec = s4d(u, Lam, Bp, Cp, dt, D, mode="recurrent", method=method, discretization=discretization)
        np.testing.assert_allclose(y_fft, y_rec, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y_fft))))


def test_s4d_kernel_is_the_vandermonde_product():
    Lam, Bp, Cp, dt, _ = _s4d_params("lin", H4=1, N4=3)
    Lam_bar, B_bar = (np.asarray(x) for x in discretize_diag(Lam, Bp, dt[:, None]))
    expected = [2 * np.real(np.sum(np.asarray(Cp) * B_bar * Lam_bar**l)) for l in range(6)]
    np.testing.assert_allclose(s4d_kernel(Lam, Bp, Cp, dt, 6)[0], expected, rtol=1e-5, atol=1e-6)


def test_discretizations():
    rng = np.random.default_rng(8)
    lam = jnp.array([-0.5, -1.0, -2.0])
    Bm = _normal(rng, 3, 2)
    for method in ("zoh", "bilinear"):  # a diagonal dense A discretises like the diagonal rule
        A_bar, B_bar = discretize(jnp.diag(lam), Bm, 0.1, method)
        lam_bar, b_bar = discretize_diag(lam, Bm, 0.1, method)
        np.testing.assert_allclose(A_bar, jnp.diag(lam_bar), atol=1e-6)
        np.testing.assert_allclose(B_bar, b_bar, atol=1e-6)
    A = _normal(rng, 4, 4) - 3 * jnp.eye(4)
    b = _normal(rng, 4)
    A_bar, B_bar = discretize(A, b, 0.05)  # ZOH: A_bar = e^{dt A}, B_bar = A^{-1} (e^{dt A} - I) B
    expm = jax.scipy.linalg.expm(0.05 * A)
    np.testing.assert_allclose(A_bar, expm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B_bar, jnp.linalg.solve(A, (expm - jnp.eye(4)) @ b), rtol=1e-4, atol=1e-6)
    A_bar, B_bar = discretize(A, b, 0.05, "bilinear")
    np.testing.assert_allclose((jnp.eye(4) - 0.025 * A) @ A_bar, jnp.eye(4) + 0.025 * A, atol=1e-5)
    lam_bar, gamma = discretize_diag(jnp.array([0.0]), jnp.ones(1), 0.1)  # the Lambda -> 0 limit of ZOH
    np.testing.assert_allclose((lam_bar[0], gamma[0]), (1.0, 0.1), rtol=1e-6)


def test_s5_scan_equals_its_convolution():
    """S5's parallel scan against y_k = Re sum_l C Lambda_bar^l B_bar u_{k-l} (MIMO kernel), plus D u."""
    rng = np.random.default_rng(9)
    Ps, Hs, Ls = 4, 3, 12
    Lam = s4d_lambda(Ps, "lin") * 0.3
    Bm, Cm = _normal(rng, Ps, Hs, complex_=True), _normal(rng, Hs, Ps, complex_=True)
    dt, D = jnp.full((Ps,), 0.1), _normal(rng, Hs)
    u = _normal(rng, Bsz, Ls, Hs)
    lam_bar, B_bar = (np.asarray(x) for x in discretize_diag(Lam, Bm, dt))
    kernel = np.stack([(np.asarray(Cm) * lam_bar**l) @ B_bar for l in range(Ls)])  # [L, H_out, H_in], numpy
    un = np.asarray(u)
    expected = np.stack([2 * np.real(sum(un[:, t - l] @ kernel[l].T for l in range(t + 1))) + np.asarray(D) * un[:, t]
                         for t in range(Ls)], axis=1)
    for method in ("associative", "sequential"):
        y, last = s5(u, Lam, Bm, Cm, dt, D, method=method, return_state=True)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    # a second piece continues from the returned state
    y1, h1 = s5(u[:, :5], Lam, Bm, Cm, dt, D, return_state=True)
    y2, h2 = s5(u[:, 5:], Lam, Bm, Cm, dt, D, h0=h1, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, last, rtol=1e-5, atol=1e-6)


def test_hippo_legs_is_reexported():
    from jaxlab.kernels.hippo import hippo_legs as original
    from jaxlab.kernels.ssm import hippo_legs

    assert hippo_legs is original


def test_bad_inputs_raise():
    (u, delta, A, Bm, Cm, D, z, bias), _ = _mamba_inputs()
    with pytest.raises(ValueError, match="A must be"):
        ssm.selective_scan(u, delta, A[:3], Bm, Cm)
    with pytest.raises(ValueError, match="B must have shape"):
        ssm.selective_scan(u, delta, A, Bm[:, :, :2], Cm)
    with pytest.raises(ValueError, match="method"):
        ssm.selective_scan(u, delta, A, Bm, Cm, method="cuda")
    with pytest.raises(ValueError, match="segment_ids"):
        ssm.selective_scan(u, delta, A, Bm, Cm, segment_ids=jnp.zeros((Bsz, L + 1), jnp.int32))
    x, dt, A2, B2, C2 = _ssd_inputs()
    with pytest.raises(ValueError, match="divisible"):
        ssm.ssd(x, dt, A2, B2[:, :, :1].repeat(3, axis=2), C2[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="h0"):
        ssm.ssd(x, dt, A2, B2, C2, h0=jnp.zeros((Bsz, H, P, N)))  # the state is [B, H, N, P]
    with pytest.raises(ValueError, match="D must be"):
        ssm.ssd(x, dt, A2, B2, C2, D=jnp.ones(P))
    with pytest.raises(ValueError, match="chunk_size"):
        ssm.ssd(x, dt, A2, B2, C2, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        s4.discretize_diag(A2, A2, 0.1, "euler")
    with pytest.raises(ValueError, match="init"):
        s4d_lambda(4, "legs")
    with pytest.raises(ValueError, match="mode"):
        s4.s4d(u, *_s4d_params("lin", H4=Dm)[:4], mode="conv")
