"""RWKV (WKV-4, WKV-6), RetNet retention and the LRU: every form against its plain reference in float64
(values and gradients), packed segments, carried states and decoding steps, causality by gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels.lru import lru, lru_gamma, lru_lambda, lru_reference, lru_step, ring_init
from jaxlab.kernels.retention import (RETENTION_METHODS, retention, retention_decays, retention_reference,
                                      retention_step)
from jaxlab.kernels.rwkv import (WKV4_METHODS, WKV6_METHODS, WKV4State, wkv4, wkv4_reference, wkv4_step, wkv6,
                                 wkv6_reference, wkv6_step)
from jaxlab.kernels.scan import segment_starts
from jaxlab.xla_options import FAST_COMPILE



def _jit(fn):
    """Each test's numbers come from one compiled program (eager x64 ops would compile one by one)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE)

B, L, H, N, P = 2, 13, 2, 3, 4  # L = 13: chunk size 4 leaves a partial chunk
SEGMENTS = np.array([[0] * 5 + [1] * 6 + [2] * 2, [3] * 13])


def _rng():
    return np.random.default_rng(0)


def _grads(fn, args, seed=1):
    """Value and gradient of <fn(*args), cotangent> w.r.t. every argument (a random cotangent per output)."""
    out = fn(*args)
    cot = jax.tree.map(lambda o: jnp.asarray(np.random.default_rng(seed).standard_normal(o.shape), o.dtype), out)
    loss = lambda *a: sum(jnp.sum(jnp.real(o * c)) for o, c in zip(jax.tree.leaves(fn(*a)),  # noqa: E731
                                                                      jax.tree.leaves(cot)))
    return out, jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def _assert_close(got, want, tol=1e-9, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol, err_msg=what)


# ---- WKV-4 -------------------------------------------------------------------------------------------------
def _wkv4_inputs(rng, scale=1.0):
    k = scale * rng.standard_normal((B, L, N))
    v = rng.standard_normal((B, L, N))
    w = np.exp(rng.standard_normal(N))  # > 0
    u = rng.standard_normal(N)
    state = WKV4State(rng.standard_normal((B, N)), np.abs(rng.standard_normal((B, N))) + 0.5,
                      rng.standard_normal((B, N)))
    return k, v, w, u, state


def test_wkv4_forms_equal_reference_values_and_gradients():
    """Both forms in one compiled program against the reference: with segments and a state, and without."""
    with jax.enable_x64(True):
        k, v, w, u, state = (jax.tree.map(jnp.asarray, x) for x in _wkv4_inputs(_rng()))
        reset = segment_starts(jnp.asarray(SEGMENTS))

        def check(*a):
            out = {"reference": (_grads(lambda k, v, w, u, s: wkv4_reference(k, v, w, u, initial_state=s,
                                                                               segment_ids=jnp.asarray(SEGMENTS)), a),
                                 wkv4_reference(*a[:4]))}
            for m in WKV4_METHODS:
                out[m] = (_grads(lambda k, v, w, u, s: wkv4(k, v, w, u, initial_state=s, reset=reset, method=m), a),
                          wkv4(*a[:4], method=m))
            return out

        out = _jit(check)(k, v, w, u, state)
        assert out["recurrent"][0][0].dtype == jnp.float64
        for m in WKV4_METHODS:
            _assert_close(out[m], out["reference"], what=f"wkv4 {m}")


def test_wkv4_state_carries_and_steps_decode():
    """Two pieces with the carried state, and token-by-token steps, equal one pass; both forms agree."""
    with jax.enable_x64(True):
        k, v, w, u, _ = (jax.tree.map(jnp.asarray, x) for x in _wkv4_inputs(_rng()))

        def run(k, v, w, u):
            whole, final = wkv4(k, v, w, u, return_state=True)
            first, mid = wkv4(k[:, :6], v[:, :6], w, u, method="associative", return_state=True)
            second, final2 = wkv4(k[:, 6:], v[:, 6:], w, u, initial_state=mid, return_state=True)
            s, outs = WKV4State.zeros(B, N, jnp.float64), []
            for t in range(L):
                o, s = wkv4_step(s, k[:, t], v[:, t], w, u)
                outs.append(o)
            # States are e^p (num, den): compare the represented sums.
            sums = lambda a: jnp.stack([a.num * jnp.exp(a.p), a.den * jnp.exp(a.p)])  # noqa: E731
            return (whole, sums(final)), (jnp.concatenate([first, second], 1), sums(final2)), (jnp.stack(outs, 1),
                                                                                                sums(s))

        want, pieces, steps = _jit(run)(k, v, w, u)
        _assert_close(pieces, want, what="two pieces")
        _assert_close(steps, want, what="steps")


def test_wkv4_is_stable_in_float32():
    """Keys of size 200 overflow exp in float32; the stable forms stay finite and match float64."""
    k, v, w, u, _ = _wkv4_inputs(_rng(), scale=200.0)
    with jax.enable_x64(True):
        want = np.asarray(_jit(wkv4_reference)(*(jnp.asarray(x) for x in (k, v, w, u))))
    with np.errstate(over="ignore"):
        assert not np.all(np.isfinite(np.exp(np.float32(k))))
    f32 = [jnp.asarray(x, jnp.float32) for x in (k, v, w, u)]
    got = _jit(lambda *a: {m: wkv4(*a, method=m) for m in WKV4_METHODS})(*f32)
    for method, o in got.items():
        o = np.asarray(o)
        assert o.dtype == np.float32 and np.all(np.isfinite(o)), method
        np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-4, err_msg=method)


# ---- WKV-6 -------------------------------------------------------------------------------------------------
def _wkv6_inputs(rng):
    r, k = rng.standard_normal((2, B, L, H, N))
    v = rng.standard_normal((B, L, H, P))
    log_decay = -np.exp(rng.standard_normal((B, L, H, N)))  # Finch: -exp(d_t)
    u = rng.standard_normal((H, N))
    state = rng.standard_normal((B, H, N, P))
    return r, k, v, log_decay, u, state


def test_wkv6_forms_equal_reference_values_and_gradients():
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x) for x in _wkv6_inputs(_rng()))
        seg = jnp.asarray(SEGMENTS)
        reset = segment_starts(seg)

        def check(*a):
            out = {"reference": (_grads(lambda *a: wkv6_reference(*a[:5], initial_state=a[5], segment_ids=seg,
                                                                   return_state=True), a),
                                 _grads(lambda *a: wkv6_reference(*a[:5]), a[:5]))}
            for m in WKV6_METHODS:
                out[m] = (_grads(lambda *a: wkv6(*a[:5], initial_state=a[5], reset=reset, method=m, chunk_size=4,
                                                 return_state=True), a),
                          _grads(lambda *a: wkv6(*a, method=m, chunk_size=4), a[:5]))
            return out

        out = _jit(check)(*args)
        assert out["chunked"][0][0][0].dtype == jnp.float64
        for m in WKV6_METHODS:
            _assert_close(out[m], out["reference"], what=f"wkv6 {m}")


def test_wkv6_steps_decode_and_strong_decay_in_float32():
    r, k, v, log_decay, u, state = _wkv6_inputs(_rng())
    with jax.enable_x64(True):
        def run(r, k, v, g, u, S):
            whole = wkv6(r, k, v, g, u, initial_state=S, return_state=True, chunk_size=4)
            outs = []
            for t in range(L):
                o, S = wkv6_step(S, r[:, t], k[:, t], v[:, t], g[:, t], u)
                outs.append(o)
            return whole, (jnp.stack(outs, 1), S)

        whole, steps = _jit(run)(*(jnp.asarray(x) for x in (r, k, v, log_decay, u, state)))
        _assert_close(steps, whole)
        # Decays of e^-40 per step: exp(-G_i) of a naive chunked form would overflow float32 within a chunk.
        strong = (log_decay * 40.0).astype(np.float32)
        want = np.asarray(_jit(wkv6_reference)(*(jnp.asarray(x) for x in (r, k, v, strong, u))))
    got = np.asarray(_jit(lambda *a: wkv6(*a, chunk_size=8))(*(jnp.asarray(x, jnp.float32)
                                                                  for x in (r, k, v, strong, u))))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- retention ---------------------------------------------------------------------------------------------
def test_retention_decays_are_the_papers_schedule():
    np.testing.assert_array_equal(np.asarray(retention_decays(4)), 1 - 2.0 ** -np.arange(5, 9))


def test_retention_forms_equal_reference_values_and_gradients():
    rng = _rng()
    with jax.enable_x64(True):
        q, k = (jnp.asarray(x) for x in rng.standard_normal((2, B, L, H, N)))
        v = jnp.asarray(rng.standard_normal((B, L, H, P)))
        decay = jnp.asarray([0.9, 0.6])
        seg = jnp.asarray(SEGMENTS)

        def check(q, k, v):
            out = {"reference": (_grads(lambda *a: retention_reference(*a, decay, segment_ids=seg), (q, k, v)),
                                 retention_reference(q, k, v))}
            for m in RETENTION_METHODS:
                run = lambda q, k, v, **kw: retention(q, k, v, method=m, chunk_size=4, **kw)  # noqa: E731
                whole, final = run(q, k, v, return_state=True)
                a, mid = run(q[:, :6], k[:, :6], v[:, :6], return_state=True)
                b, end = run(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=mid, return_state=True)
                assert end.z is None
                out[m] = (_grads(lambda *a: run(*a, decay=decay, segment_ids=seg), (q, k, v)), whole)
                out[m + " pieces"] = ((jnp.concatenate([a, b], 1), end.kv), (whole, final.kv))
            return out

        out = _jit(check)(q, k, v)
        assert out["parallel"][0][0].dtype == jnp.float64
        for m in RETENTION_METHODS:
            _assert_close(out[m], out["reference"], what=m)
            _assert_close(*out[m + " pieces"], what=f"{m}: two pieces with the carried state")


def test_retention_step_decodes():
    rng = _rng()
    q, k = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, B, L, H, N)))
    v = jnp.asarray(rng.standard_normal((B, L, H, P)), jnp.float32)

    def run(q, k, v):
        whole, final = retention(q, k, v, method="parallel", return_state=True)
        state, outs = jax.tree.map(jnp.zeros_like, final), []
        for t in range(L):
            o, state = retention_step(state, q[:, t], k[:, t], v[:, t])
            outs.append(o)
        return (whole, final.kv), (jnp.stack(outs, 1), state.kv)

    want, got = _jit(run)(q, k, v)
    _assert_close(got, want, tol=1e-5)


# ---- LRU ---------------------------------------------------------------------------------------------------
def _lru_params(rng, Hx=3, Nm=5):
    nu_log, theta_log = ring_init(jax.random.PRNGKey(0), Nm, 0.5, 0.99)
    c = lambda *s: rng.standard_normal(s) + 1j * rng.standard_normal(s)  # noqa: E731
    return (np.asarray(nu_log, np.float64), np.asarray(theta_log, np.float64), c(Nm, Hx) / math.sqrt(2 * Hx),
            c(Hx, Nm) / math.sqrt(Nm), rng.standard_normal(Hx))


def test_lru_forms_equal_reference_values_and_gradients():
    """The parallel and sequential scans against the Python loop (with segments and a state); decoding steps."""
    rng = _rng()
    with jax.enable_x64(True):
        params = tuple(jnp.asarray(p) for p in _lru_params(rng))
        x = jnp.asarray(rng.standard_normal((B, L, 3)))
        h0 = jnp.asarray(rng.standard_normal((B, 5)) + 1j * rng.standard_normal((B, 5)))
        reset = segment_starts(jnp.asarray(SEGMENTS))

        def check(x, *p):
            out = {"reference": _grads(lambda x, *p: lru_reference(x, *p, initial_state=h0, reset=reset), (x, *p))}
            for m in ("associative", "sequential"):  # the paper's parallel scan; lax.scan
                out[m] = _grads(lambda x, *p: lru(x, *p, initial_state=h0, reset=reset, method=m,
                                                  return_state=True), (x, *p))
            s, ys = h0, []
            for t in range(L):
                y_t, s = lru_step(s, x[:, t], *p)
                ys.append(y_t)
            steps = (jnp.stack(ys, 1), s)
            return out, steps, lru(x, *p, initial_state=h0, return_state=True)

        out, steps, whole = _jit(check)(x, *params)
        assert out["associative"][0][0].dtype == jnp.float64 and out["associative"][0][1].dtype == jnp.complex128
        for m in ("associative", "sequential"):
            _assert_close(out[m], out["reference"], what=m)
        _assert_close(steps, whole, what="decoding steps")


def test_lru_ring_init_and_normalisation():
    for r_min, r_max, max_phase in [(0.0, 1.0, 2 * math.pi), (0.9, 0.999, math.pi / 10), (0.4, 0.5, 1.0)]:
        nu_log, theta_log = ring_init(jax.random.PRNGKey(3), 4096, r_min, r_max, max_phase)
        lam = np.asarray(lru_lambda(nu_log, theta_log))
        mod, phase = np.abs(lam), np.exp(np.asarray(theta_log))
        mod64 = np.exp(-np.exp(np.asarray(nu_log, np.float64)))
        assert np.all((mod >= r_min - 1e-6) & (mod <= r_max + 1e-6)), (r_min, r_max, mod.min(), mod.max())
        assert np.all((phase > 0) & (phase <= max_phase * (1 + 1e-6)))
        # Uniform on the ring: |lambda|^2 uniform in [r_min^2, r_max^2] (mean in the middle).
        assert abs(np.mean(mod ** 2) - (r_min ** 2 + r_max ** 2) / 2) < 0.02 * (r_max ** 2 - r_min ** 2) + 1e-3
        np.testing.assert_allclose(np.asarray(lru_gamma(nu_log)), np.sqrt(1 - mod64 ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="r_min=0.9, r_max=0.5"):
        ring_init(jax.random.PRNGKey(0), 4, 0.9, 0.5)


# ---- causality ---------------------------------------------------------------------------------------------
def test_every_kernel_is_causal_by_gradients():
    """d out[t] / d inputs[s] is zero for s > t, nonzero for s <= t (one segment, decays well below 1)."""
    rng = _rng()
    k4, v4, w4, u4 = (jnp.asarray(x, jnp.float32) for x in _wkv4_inputs(rng)[:4])
    r6, k6, v6, g6, u6, _ = (jnp.asarray(x, jnp.float32) for x in _wkv6_inputs(rng))
    q, k = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, B, L, H, N)))
    lp = tuple(jnp.asarray(p, jnp.complex64 if np.iscomplexobj(p) else jnp.float32) for p in _lru_params(rng))
    x3 = jnp.asarray(rng.standard_normal((B, L, 3)), jnp.float32)
    cases = {
        "wkv4 associative": (lambda k, v: wkv4(k, v, w4, u4, method="associative"), (k4, v4)),
        "wkv6 chunked": (lambda r, k, v, g: wkv6(r, k, v, g, u6, chunk_size=4), (r6, k6, v6, g6)),
        "retention chunkwise": (lambda q, k, v: retention(q, k, v, chunk_size=4), (q, k, v6)),
        "lru associative": (lambda x: lru(x, *lp, method="associative"), (x3,)),
    }

    def sensitivity(fn, args):  # [t, s]: sum over batch and features of |d out[:, t] / d args[:, s]|
        jac = jax.jacrev(lambda *a: jnp.sum(fn(*a).reshape(B, L, -1), axis=(0, 2)), argnums=tuple(range(len(args))))
        return sum(jnp.abs(j).reshape(L, B, L, -1).sum(axis=(1, 3)) for j in jac(*args))

    sens = _jit(lambda: {name: sensitivity(fn, args) for name, (fn, args) in cases.items()})()
    future = np.triu(np.ones((L, L), bool), k=1)
    for name, s in sens.items():
        s = np.asarray(s)
        assert np.all(s[future] == 0), f"{name}: outputs depend on later inputs (max {s[future].max()})"
        assert np.all(s[~future] > 0), f"{name}: some earlier input has no effect"
