"""SSM scans: Mamba's selective scan and Mamba-2's SSD against their sequential definitions; S4D, S5, discretisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxlab.kernels import s4, ssm
from jaxlab.kernels.s4 import s4d_kernel, s4d_lambda
from jaxlab.kernels.scan import auto_method, linear_recurrence, segment_starts

Bsz, L, Dm, N = 2, 29, 6, 4  # L = 29: chunk sizes 4 and 8 leave partial chunks
H, P, G = 4, 3, 2
SEGMENTS = jnp.array([[0] * 10 + [1] * 19, [5] * 29])

# Each test compiles one program holding everything it compares (eagerly, every primitive would compile on
# its own; compiles dominate the test time).


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


SCAN_METHODS = ("sequential", "associative", "chunked")


def _selective(args, h0, method):
    kw = dict(delta_softplus=True, initial_state=h0, segment_ids=SEGMENTS, return_state=True)
    if method == "reference":
        return ssm.selective_scan_reference(*args, **kw)
    return ssm.selective_scan(*args, **kw, method=method)


@functools.partial(jax.jit, static_argnames="methods")
def _selective_all(args, h0, methods):
    """The reference and the methods in one program (compiles dominate the test time)."""
    return {m: _selective(args, h0, m) for m in ("reference",) + methods}


# The methods are linear_recurrence's (compared one by one in test_scan.py); each runs here on real or complex.
@pytest.mark.parametrize("complex_,methods",
                         [(False, ("sequential", "chunked")), (True, ("sequential", "associative"))])
def test_selective_scan_matches_reference(complex_, methods):
    args, h0 = _mamba_inputs(complex_)
    outs = _selective_all(args, h0, methods)
    y_ref, h_ref = outs.pop("reference")
    assert y_ref.dtype == jnp.float32 and h_ref.dtype == (jnp.complex64 if complex_ else jnp.float32)
    for method, (y, h) in outs.items():
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4, err_msg=method)
        np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-5, err_msg=method)


@jax.jit
def _selective_grads(args, h0, w):
    def loss(method, args, h0):
        y, h = _selective(args, h0, method)
        return jnp.sum(y * w) + jnp.sum(h)

    return {m: jax.grad(functools.partial(loss, m), argnums=(0, 1))(args, h0)
            for m in ("reference", "sequential", "chunked")}


def test_selective_scan_gradients_match_reference():
    args, h0 = _mamba_inputs(seed=1)
    grads = _selective_grads(args, h0, _normal(np.random.default_rng(2), Bsz, L, Dm))
    ref = jax.tree.leaves(grads.pop("reference"))
    for method, out in grads.items():
        for g, g_ref in zip(jax.tree.leaves(out), ref):
            np.testing.assert_allclose(g, g_ref, rtol=2e-3, atol=2e-4, err_msg=method)


@jax.jit
def _selective_causality(args):
    t0 = 17

    def out_t0(u, delta, B, C):
        return jnp.sum(ssm.selective_scan(u, delta, args[2], B, C, delta_softplus=True)[:, t0])

    return [jnp.abs(g).sum(axis=(0, 2)) for g in jax.grad(out_t0, argnums=(0, 1, 2, 3))(*args[:2], *args[3:5])]


def test_selective_scan_is_causal_by_gradients():
    args, _ = _mamba_inputs(seed=3)
    *inputs, dC = _selective_causality(args)  # d y_17 / d (u, delta, B, C) per position
    for per_position in inputs:
        assert jnp.all(per_position[18:] == 0) and jnp.all(per_position[:18] > 0)
    assert jnp.all(dC.at[17].set(0) == 0) and dC[17] > 0  # y_t reads C_t only


def test_selective_scan_reference_is_mambas_formula():
    """Two steps by hand: delta = softplus(delta + bias); h = exp(delta A) h + delta u B; y = (C h + D u) silu(z)."""
    u, d, A, Bv, Cv, D, z, bias = 0.5, -0.3, -0.7, 1.3, -0.4, 0.2, 0.8, 0.1
    delta = np.log1p(np.exp(d + bias))
    h1 = delta * u * Bv
    h2 = np.exp(delta * A) * h1 + delta * u * Bv
    silu = z / (1 + np.exp(-z))
    expected = [(Cv * h + D * u) * silu for h in (h1, h2)]
    full = lambda x: jnp.full((1, 2, 1), x, jnp.float32)  # noqa: E731
    y = jax.jit(ssm.selective_scan_reference, static_argnames="delta_softplus")(
        full(u), full(d), jnp.full((1, 1), A), full(Bv), full(Cv), jnp.array([D]), full(z), jnp.array([bias]),
        delta_softplus=True)
    np.testing.assert_allclose(y[0, :, 0], expected, rtol=1e-5)


def _ssd_inputs(seed=0, groups=G):
    rng = np.random.default_rng(seed)
    x = _normal(rng, Bsz, L, H, P)
    dt = jax.nn.softplus(_normal(rng, Bsz, L, H))
    A = -jnp.exp(_normal(rng, H))
    return x, dt, A, _normal(rng, Bsz, L, groups, N), _normal(rng, Bsz, L, groups, N)


SSD_CASES = ((4, (H,)), (8, (H, P)), (64, None))  # (chunk size, D shape): partial chunks, one chunk > L


@functools.partial(jax.jit, static_argnames="method")
def _ssd_all(inputs, Ds, h0, method):
    kw = dict(initial_state=h0, segment_ids=SEGMENTS, return_state=True)
    return [(ssm.ssd(*inputs, chunk_size=c, D=D, method=method, **kw), ssm.ssd_reference(*inputs, D=D, **kw))
            for (c, _), D in zip(SSD_CASES, Ds)]


@pytest.mark.parametrize("method", ["chunked", "recurrent"])
def test_ssd_matches_reference(method):
    rng = np.random.default_rng(3)
    Ds = [None if shape is None else _normal(rng, *shape) for _, shape in SSD_CASES]
    for (chunk_size, _), ((y, h), (y_ref, h_ref)) in zip(SSD_CASES, _ssd_all(_ssd_inputs(), Ds,
                                                                             _normal(rng, Bsz, H, N, P), method)):
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4, err_msg=f"{method} {chunk_size=}")
        np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4, err_msg=f"{method} {chunk_size=}")


@jax.jit
def _ssd_grads(inputs, h0):
    def loss(fn, inputs, h0):
        y, h = fn(*inputs, initial_state=h0, segment_ids=SEGMENTS, return_state=True)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h)

    fns = [functools.partial(ssm.ssd, chunk_size=8, method=m) for m in ("chunked", "recurrent")]
    return [jax.grad(functools.partial(loss, fn), argnums=(0, 1))(inputs, h0) for fn in (*fns, ssm.ssd_reference)]


def test_ssd_gradients_match_reference():
    *grads, ref = _ssd_grads(_ssd_inputs(seed=4), _normal(np.random.default_rng(5), Bsz, H, N, P))
    for method, grad in zip(("chunked", "recurrent"), grads):
        for g, g_ref in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4, err_msg=method)


def test_ssd_auto_method():
    assert auto_method("ssd", backend="cpu") == "recurrent" and auto_method("ssd", backend="gpu") == "chunked"
    with pytest.raises(ValueError, match="method"):
        ssm.ssd(*_ssd_inputs(), method="parallel")


@jax.jit
def _ssd_and_selective(x, dt, A, Bm, Cm):
    """Mamba-2 is Mamba-1 with A_h shared by a head's P channels and all N states (one group of B, C)."""
    y_ssd = ssm.ssd(x, dt, A, Bm, Cm, chunk_size=8)
    u = x.reshape(Bsz, L, H * P)  # channel (h, p)
    delta = jnp.repeat(dt, P, axis=2)
    A_mamba = jnp.broadcast_to(jnp.repeat(A, P)[:, None], (H * P, N))
    y_mamba = ssm.selective_scan(u, delta, A_mamba, Bm[:, :, 0], Cm[:, :, 0], method="sequential")
    return y_ssd.reshape(Bsz, L, H * P), y_mamba


def test_ssd_equals_selective_scan_for_per_head_scalar_A():
    y_ssd, y_mamba = _ssd_and_selective(*_ssd_inputs(seed=6, groups=1))
    np.testing.assert_allclose(y_ssd, y_mamba, rtol=1e-4, atol=1e-4)


def _s4d_params(init, seed=0, H4=3, N4=4):
    rng = np.random.default_rng(seed)
    Lam = jnp.broadcast_to(s4d_lambda(N4, init), (H4, N4)) * jnp.asarray(rng.uniform(0.5, 1.5, (H4, 1)))
    complex_ = init != "real"
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), H4)), jnp.float32)
    return Lam, _normal(rng, H4, N4, complex_=complex_), _normal(rng, H4, N4, complex_=complex_), dt, _normal(rng, H4)


S4D_CASES = (("lin", "zoh", "sequential"), ("inv", "bilinear", "chunked"))


@jax.jit
def _s4d_all(u, params):
    out = []
    for (_, discretization, method), (Lam, Bp, Cp, dt, D) in zip(S4D_CASES, params):
        fft = s4.s4d(u, Lam, Bp, Cp, dt, D, discretization=discretization, method="fft")
        out.append((fft, [s4.s4d(u, Lam, Bp, Cp, dt, D, method=method, discretization=discretization)]))
    return out


def test_s4d_fft_convolution_equals_recurrence():
    u = _normal(np.random.default_rng(7), Bsz, 40, 3)
    results = _s4d_all(u, [_s4d_params(init) for init, _, _ in S4D_CASES])
    for case, (y_fft, recurrent) in zip(S4D_CASES, results):
        for y_rec in recurrent:
            np.testing.assert_allclose(y_fft, y_rec, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y_fft))),
                                       err_msg=str(case))


@jax.jit
def _s4d_recurrence_forms(u, Lam_bar, B_bar, Cp, h0, w):
    """The fused recurrence and the linear_recurrence over the materialised [B, L, H, N] input, with packed
    segments and an initial state: outputs, final states and their gradients."""
    reset = segment_starts(SEGMENTS)

    def fused(u, h0):
        return s4.s4d_recurrence(u, Lam_bar, B_bar, Cp, initial_state=h0, reset=reset)

    def materialised(u, h0):
        h = linear_recurrence(Lam_bar[None, None], B_bar * u[..., None], initial_state=h0, reset=reset)
        return 2 * jnp.real(jnp.einsum("blhn,hn->blh", h, Cp)), h[:, -1]

    def loss(f, u, h0):
        y, last = f(u, h0)
        return jnp.sum(y * w) + jnp.sum(jnp.abs(last) ** 2)

    return {name: (f(u, h0), jax.grad(functools.partial(loss, f), argnums=(0, 1))(u, h0))
            for name, f in (("fused", fused), ("materialised", materialised))}


def test_s4d_recurrence_with_segments_and_state():
    Lam, Bp, Cp, dt, _ = _s4d_params("lin", H4=3, N4=4)
    Lam_bar, B_bar = s4.discretize_diag(Lam, Bp, dt[:, None])
    rng = np.random.default_rng(8)
    u, w = _normal(rng, Bsz, L, 3), _normal(rng, Bsz, L, 3)  # L = 29: a partial chunk of remat_scan's 16
    out = _s4d_recurrence_forms(u, Lam_bar, B_bar, Cp, _normal(rng, Bsz, 3, 4, complex_=True), w)
    for a, b in zip(jax.tree.leaves(out["fused"]), jax.tree.leaves(out["materialised"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_s4d_kernel_is_the_vandermonde_product():
    Lam, Bp, Cp, dt, _ = _s4d_params("lin", H4=1, N4=3)
    kernel, (Lam_bar, B_bar) = jax.jit(lambda *a: (s4d_kernel(*a, 6), s4.discretize_diag(a[0], a[1], a[3][:, None])))(
        Lam, Bp, Cp, dt)
    Lam_bar, B_bar = np.asarray(Lam_bar), np.asarray(B_bar)
    expected = [2 * np.real(np.sum(np.asarray(Cp) * B_bar * Lam_bar**l)) for l in range(6)]
    np.testing.assert_allclose(kernel[0], expected, rtol=1e-5, atol=1e-6)


@jax.jit
def _discretizations(lam, Bm, A, b):
    out = {}
    for method in ("zoh", "bilinear"):  # a diagonal dense A discretises like the diagonal rule
        out[method] = (s4.discretize(jnp.diag(lam), Bm, 0.1, discretization=method),
                       s4.discretize_diag(lam, Bm, 0.1, discretization=method))
    out["dense_zoh"] = s4.discretize(A, b, 0.05)
    out["dense_bilinear"] = s4.discretize(A, b, 0.05, "bilinear")
    out["zero_limit"] = s4.discretize_diag(jnp.array([0.0]), jnp.ones(1), 0.1)  # the Lambda -> 0 limit of ZOH
    return out


def test_discretizations():
    rng = np.random.default_rng(8)
    lam = jnp.array([-0.5, -1.0, -2.0])
    A, b = _normal(rng, 4, 4) - 3 * jnp.eye(4), _normal(rng, 4)
    r = _discretizations(lam, _normal(rng, 3, 2), A, b)
    for method in ("zoh", "bilinear"):
        (A_bar, B_bar), (lam_bar, b_bar) = r[method]
        np.testing.assert_allclose(A_bar, jnp.diag(lam_bar), atol=1e-6)
        np.testing.assert_allclose(B_bar, b_bar, atol=1e-6)
    A_bar, B_bar = r["dense_zoh"]  # A_bar = e^{dt A}, B_bar = A^{-1} (e^{dt A} - I) B, checked with scipy
    expm = scipy.linalg.expm(0.05 * np.asarray(A, np.float64))
    np.testing.assert_allclose(A_bar, expm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B_bar, np.linalg.solve(A, (expm - np.eye(4)) @ np.asarray(b)), rtol=1e-4, atol=1e-6)
    A_bar, _ = r["dense_bilinear"]
    np.testing.assert_allclose((jnp.eye(4) - 0.025 * A) @ A_bar, jnp.eye(4) + 0.025 * A, atol=1e-5)
    lam_bar, gamma = r["zero_limit"]
    np.testing.assert_allclose((lam_bar[0], gamma[0]), (1.0, 0.1), rtol=1e-6)


@jax.jit
def _s5_all(u, Lam, Bm, Cm, dt, D):
    whole = {m: s4.s5(u, Lam, Bm, Cm, dt, D, method=m, return_state=True) for m in ("associative", "sequential")}
    y1, h1 = s4.s5(u[:, :5], Lam, Bm, Cm, dt, D, return_state=True)  # a second piece continues from the state
    y2, h2 = s4.s5(u[:, 5:], Lam, Bm, Cm, dt, D, initial_state=h1, return_state=True)
    return whole, (jnp.concatenate([y1, y2], 1), h2), s4.discretize_diag(Lam, Bm, dt)


def test_s5_scan_equals_its_convolution():
    """S5's parallel scan against y_k = Re sum_l C Lambda_bar^l B_bar u_{k-l} (MIMO kernel), plus D u."""
    rng = np.random.default_rng(9)
    Ps, Hs, Ls = 4, 3, 12
    Lam = s4d_lambda(Ps, "lin") * 0.3
    Bm, Cm = _normal(rng, Ps, Hs, complex_=True), _normal(rng, Hs, Ps, complex_=True)
    dt, D = jnp.full((Ps,), 0.1), _normal(rng, Hs)
    u = _normal(rng, Bsz, Ls, Hs)
    whole, (y_pieces, h_pieces), (lam_bar, B_bar) = _s5_all(u, Lam, Bm, Cm, dt, D)
    lam_bar, B_bar = np.asarray(lam_bar), np.asarray(B_bar)
    kernel = np.stack([(np.asarray(Cm) * lam_bar**l) @ B_bar for l in range(Ls)])  # [L, H_out, H_in], numpy
    un = np.asarray(u)
    expected = np.stack([2 * np.real(sum(un[:, t - l] @ kernel[l].T for l in range(t + 1))) + np.asarray(D) * un[:, t]
                         for t in range(Ls)], axis=1)
    for method, (y, last) in whole.items():
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=method)
    np.testing.assert_allclose(y_pieces, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_pieces, last, rtol=1e-5, atol=1e-6)


def _s4_fast_and_reference(u, s4d_params, s5_params, s5_ids, s5_x0):
    """S4D (FFT and associative scan) and S5 (parallel scan, packed, with an initial state) against their
    step-by-step references: outputs and gradients with respect to every input, one program."""
    Lam4, B4, C4, dt4, D4 = s4d_params
    Lam5, B5, C5, dt5, D5 = s5_params

    def s4d_loss(fn, **kw):
        return lambda u, Lam, B, C, dt, D: jnp.sum(jnp.sin(fn(u, Lam, B, C, dt, D, discretization="bilinear", **kw)))

    def s5_loss(fn, **kw):
        def loss(u, Lam, B, C, dt, D, x0):
            y, last = fn(u, Lam, B, C, dt, D, initial_state=x0, segment_ids=s5_ids, return_state=True, **kw)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.abs(last) ** 2), y
        return loss

    args4, args5 = (u, Lam4, B4, C4, dt4, D4), (u, Lam5, B5, C5, dt5, D5, s5_x0)
    out = {}
    for name, fn in (("s4d_fft", s4d_loss(s4.s4d, method="fft")), ("s4d_associative",
                     s4d_loss(s4.s4d, method="associative")), ("s4d_reference", s4d_loss(s4.s4d_reference))):
        out[name] = (fn(*args4), jax.grad(fn, argnums=range(6))(*args4))
    for name, fn in (("s5", s5_loss(s4.s5, method="associative")), ("s5_reference", s5_loss(s4.s5_reference))):
        (value, y), grads = jax.value_and_grad(fn, argnums=range(7), has_aux=True)(*args5)
        out[name] = ((value, y), grads)
    return out


def test_s4d_and_s5_match_their_references_in_fp64():
    """The fast paths of kernels/s4.py against plain recurrences, in float64 (values and gradients to 1e-9)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        c128 = lambda x: jnp.asarray(x, jnp.complex128)  # noqa: E731
        f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        cnormal = lambda *shape: c128(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))  # noqa: E731
        H4, N4, P5, Ls = 3, 4, 4, 17
        Lam4 = c128(-0.5 + 1j * np.pi * np.arange(N4)) * c128(rng.uniform(0.5, 1.5, (H4, 1)))
        s4d_params = (Lam4, cnormal(H4, N4), cnormal(H4, N4), f64(rng.uniform(1e-2, 1e-1, H4)),
                      f64(rng.standard_normal(H4)))
        s5_params = (c128(-0.3 + 1j * np.arange(P5)), cnormal(P5, H4), cnormal(H4, P5), f64(rng.uniform(0.05, 0.2, P5)),
                     f64(rng.standard_normal(H4)))
        u = f64(rng.standard_normal((Bsz, Ls, H4)))
        ids = jnp.asarray([[0] * 6 + [1] * 11, [2] * Ls])
        out = jax.jit(_s4_fast_and_reference)(u, s4d_params, s5_params, ids, cnormal(Bsz, P5))
        assert out["s4d_reference"][0].dtype == jnp.float64
        for name, ref in (("s4d_fft", "s4d_reference"), ("s4d_associative", "s4d_reference"), ("s5", "s5_reference")):
            for got, want in zip(jax.tree.leaves(out[name]), jax.tree.leaves(out[ref])):
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=name)
        (_, y5), _ = out["s5_reference"]  # the start at t = 6 cuts the state: row 0 from t = 6 on equals
        fresh = s4.s5_reference(u[:1, 6:], *s5_params)  # S5 run on that segment alone, from zeros
        np.testing.assert_allclose(y5[:1, 6:], fresh, rtol=1e-9, atol=1e-9)


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
    with pytest.raises(ValueError, match="initial_state"):
        ssm.ssd(x, dt, A2, B2, C2, initial_state=jnp.zeros((Bsz, H, P, N)))  # the state is [B, H, N, P]
    with pytest.raises(ValueError, match="D must be"):
        ssm.ssd(x, dt, A2, B2, C2, D=jnp.ones(P))
    with pytest.raises(ValueError, match="chunk_size"):
        ssm.ssd(x, dt, A2, B2, C2, chunk_size=0)
    with pytest.raises(ValueError, match="discretization"):
        s4.discretize_diag(A2, A2, 0.1, "euler")
    with pytest.raises(ValueError, match="init"):
        s4d_lambda(4, "legs")
    with pytest.raises(ValueError, match="method"):
        s4.s4d(u, *_s4d_params("lin", H4=Dm)[:4], method="conv")
    with pytest.raises(AssertionError):  # one skip weight for every channel would broadcast silently
        s4.s4d(u, *_s4d_params("lin", H4=Dm)[:4], D=jnp.ones(1))
