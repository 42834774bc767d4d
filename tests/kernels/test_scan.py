"""linear_recurrence: every algorithm against the step-by-step definition (outputs and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab.kernels import scan
from jaxlab.kernels.scan import auto_method, segment_starts

# Each test compiles one program holding the reference and every method (compiles dominate the runtime).
linear_recurrence = scan.linear_recurrence
linear_recurrence_reference = scan.linear_recurrence_reference

METHODS = ("sequential", "associative", "chunked")
B, L = 2, 13  # L is prime: no chunk size below divides it


def _inputs(seed=0, *, complex_=False, a_shape=(B, L, 3, 1), b_shape=(B, L, 3, 4)):
    """Test data from a local numpy generator (no jax.random: each new shape would cost a compile)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.6, 1.0, a_shape)
    b = rng.standard_normal(b_shape)
    h0 = rng.standard_normal((b_shape[0],) + b_shape[2:])
    if complex_:
        a = a * np.exp(1j * rng.uniform(0, np.pi, a_shape))
        b = b + 1j * rng.standard_normal(b_shape)
        h0 = h0 * (1 - 0.5j)
    reset = rng.uniform(size=(b_shape[0], L)) < 0.25
    dtype = np.complex64 if complex_ else np.float32
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(h0, dtype), jnp.asarray(reset)


# (complex, reverse, with reset, with h0, chunk_size): a sample of the combinations, each method on each.
CASES = [
    (False, False, True, True, 5),
    (False, True, True, True, 1),
    (True, False, True, True, 4),
    (True, True, False, False, 64),
]


@functools.partial(jax.jit, static_argnames=("reverse", "chunk_size"))
def _all_methods(a, b, h0, reset, *, reverse, chunk_size):
    """The reference and every method in one program (one compile per case instead of four)."""
    kw = dict(initial_state=h0, reset=reset, reverse=reverse)
    ref = linear_recurrence_reference(a, b, **kw)
    return ref, {m: scan.linear_recurrence(a, b, **kw, method=m, chunk_size=chunk_size) for m in METHODS}


@pytest.mark.parametrize("complex_,reverse,with_reset,with_h0,chunk_size", CASES)
def test_matches_reference(complex_, reverse, with_reset, with_h0, chunk_size):
    a, b, h0, reset = _inputs(complex_=complex_)
    ref, outs = _all_methods(a, b, h0 if with_h0 else None, reset if with_reset else None, reverse=reverse,
                             chunk_size=chunk_size)
    assert ref.dtype == (jnp.complex64 if complex_ else jnp.float32)
    for method, out in outs.items():
        assert out.shape == b.shape and out.dtype == ref.dtype
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=method)


@functools.partial(jax.jit, static_argnames="reverse")
def _all_grads(a, b, h0, reset, w, reverse):
    def loss(fn, **kw):
        return lambda a, b, h0: jnp.sum(jnp.real(fn(a, b, h0, reset=reset, reverse=reverse, **kw) * w))

    ref = jax.grad(loss(linear_recurrence_reference), argnums=(0, 1, 2))(a, b, h0)
    return ref, {m: jax.grad(loss(scan.linear_recurrence, method=m, chunk_size=4), argnums=(0, 1, 2))(a, b, h0)
                 for m in METHODS}


def test_gradients_match_reference():
    """Complex and reversed (the forward direction's gradient is the flipped one of a reversed scan)."""
    a, b, h0, reset = _inputs(complex_=True)
    a, b, reset = a[:, :7], b[:, :7], reset[:, :7]  # 7 steps: the unrolled reference's gradient compiles quickly
    w = jnp.asarray(np.random.default_rng(9).standard_normal(b.shape), jnp.float32)  # a generic cotangent
    ref, grads = _all_grads(a, b, h0, reset, w, True)
    for method, out in grads.items():
        for g, g_ref in zip(out, ref):
            assert g.shape == g_ref.shape
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4, err_msg=method)


BOUNDS = (0, 4, 5, 11, L)  # segments of length 4, 1, 6, 2


@functools.partial(jax.jit, static_argnames="reverse")
def _segments(a, b, reverse):
    reset = jnp.zeros((B, L), bool).at[:, jnp.array(BOUNDS[1:-1])].set(True)
    packed = scan.linear_recurrence(a, b, reset=reset, reverse=reverse, method="chunked", chunk_size=3)
    alone = [linear_recurrence_reference(a[:, lo:hi], b[:, lo:hi], reverse=reverse)
             for lo, hi in zip(BOUNDS[:-1], BOUNDS[1:])]
    return packed, jnp.concatenate(alone, axis=1)


@pytest.mark.parametrize("reverse", [False, True])
def test_reset_equals_running_segments_separately(reverse):
    a, b, _, _ = _inputs()
    packed, alone = _segments(a, b, reverse)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


@jax.jit
def _pieces_and_broadcast(a, b, h0, a_shared, b_shared):
    whole = scan.linear_recurrence(a, b, h0)
    first = scan.linear_recurrence(a[:, :6], b[:, :6], h0)
    second = scan.linear_recurrence(a[:, 6:], b[:, 6:], first[:, -1])
    # a [1, 1, N]: one decay for every batch element and step, against b [B, L, N]
    ref = linear_recurrence_reference(jnp.broadcast_to(a_shared, b_shared.shape), b_shared, h0[..., 0, :])
    shared = {m: scan.linear_recurrence(a_shared, b_shared, h0[..., 0, :], method=m) for m in METHODS}
    return whole, jnp.concatenate([first, second], axis=1), ref, shared


def test_pieces_with_carried_state_and_broadcast_decay():
    a, b, h0, _ = _inputs()
    a_shared, b_shared, _, _ = _inputs(1, a_shape=(1, 1, 4), b_shape=(B, L, 4))
    whole, pieces, ref, shared = _pieces_and_broadcast(a, b, h0, a_shared, b_shared)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
    for method, out in shared.items():
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=method)


def test_segment_starts_are_true_at_t0():
    ids = jnp.array([[3, 3, 1, 1, 1, 7], [0, 0, 0, 0, 0, 0]])
    expected = [[True, False, True, False, False, True], [True] + [False] * 5]
    np.testing.assert_array_equal(segment_starts(ids), expected)


@jax.jit
def _start_at_t0(a, b, h0, reset):
    ref = linear_recurrence_reference(a, b, h0, reset=reset)
    return ref, {m: scan.linear_recurrence(a, b, h0, reset=reset, method=m, chunk_size=4) for m in METHODS}


def test_initial_state_enters_the_first_segment_despite_the_start_at_t0():
    """reset[:, 0] (True under segment_starts) cuts nothing: the initial state still flows into step 0."""
    a, b, h0, _ = _inputs()
    reset = segment_starts(jnp.asarray(np.repeat([[0] * 5 + [1] * 8], B, axis=0)))
    ref, outs = _start_at_t0(a, b, h0, reset)
    np.testing.assert_allclose(ref[:, 0], a[:, 0] * h0 + b[:, 0], rtol=1e-5, atol=1e-6)  # by hand: h_0 = a_0 h0 + b_0
    np.testing.assert_allclose(ref[:, 5], b[:, 5], rtol=1e-5, atol=1e-6)  # the start at t = 5 drops the carried state
    for method, out in outs.items():
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=method)


def test_auto_policy():
    """The one ``method="auto"`` policy of every kernel."""
    assert auto_method(backend="cpu") == "sequential"  # lax.associative_scan measured 3-5x slower on CPU
    assert auto_method("linear_recurrence", backend="gpu") == "associative"
    for backend in ("cpu", "gpu"):
        assert auto_method("linear_attention", 256, backend=backend) == "parallel"
        assert auto_method("s4d", 4096, backend=backend) == "fft"
    assert auto_method("linear_attention", 4096, backend="gpu") == "chunked"
    assert auto_method("linear_attention", 4096, backend="gpu", differentiated=True) == "chunked"
    # CPU: recurrent values (2-2.5x faster), chunked gradients (3-4x faster than the recurrent scan's)
    assert auto_method("linear_attention", 4096, backend="cpu") == "recurrent"
    assert auto_method("linear_attention", 4096, backend="cpu", differentiated=True) == "chunked"
    with pytest.raises(ValueError, match="op="):
        auto_method("attention")
    with pytest.raises(ValueError, match="length"):
        auto_method("linear_attention")


@functools.partial(jax.jit, static_argnames=("reverse", "chunk_size"))
def _fuzz_case(a, b, h0, reset, *, reverse, chunk_size):
    kw = dict(reset=reset, reverse=reverse)
    return (linear_recurrence_reference(a, b, h0, **kw),
            {m: scan.linear_recurrence(a, b, h0, **kw, method=m, chunk_size=chunk_size) for m in METHODS})


@settings(max_examples=5, deadline=None)
@given(length=st.integers(1, 24), chunk_size=st.integers(1, 30), reverse=st.booleans(), seed=st.integers(0, 99))
def test_methods_agree_for_sampled_lengths_and_chunks(length, chunk_size, reverse, seed):
    """Shape fuzzing: every method equals the definition for any length, chunk size (dividing L or not) and
    direction, with segment starts and an initial state."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.5, 1.0, (2, length, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, length, 3)), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    reset = jnp.asarray(rng.uniform(size=(2, length)) < 0.2)
    ref, outs = _fuzz_case(a, b, h0, reset, reverse=reverse, chunk_size=chunk_size)
    for method, out in outs.items():
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=method)


def test_bad_inputs_raise():
    a, b = jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="method"):
        linear_recurrence(a, b, method="blelloch")
    with pytest.raises(ValueError, match="rank"):
        linear_recurrence(jnp.ones((2, 5)), b)
    with pytest.raises(ValueError, match="broadcastable"):
        linear_recurrence(jnp.ones((2, 5, 2)), b)
    with pytest.raises(ValueError, match="length axis"):
        linear_recurrence(a, jnp.ones((2, 1, 3)))  # b shorter than a
    with pytest.raises(ValueError, match="initial_state"):
        linear_recurrence(a, b, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="bool"):
        linear_recurrence(a, b, reset=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="reset.shape"):
        linear_recurrence(a, b, reset=jnp.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_recurrence(a, b, method="chunked", chunk_size=0)
    with pytest.raises(ValueError, match="b must be"):
        linear_recurrence(jnp.ones(5), jnp.ones(5))


@jax.jit
def _remat_scan_and_scan(h0, xs):
    def step(h, x):
        h = jnp.tanh(h * x[0] + x[1])
        return h, jnp.tanh(h).sum(-1)

    def loss(scan_fn, h0, xs):
        h, ys = scan_fn(step, h0, xs)
        return jnp.sum(h ** 2) + jnp.sum(jnp.sin(ys))

    forms = {"scan": jax.lax.scan, "remat": functools.partial(scan.remat_scan, chunk=4)}
    return {name: (f(step, h0, xs), jax.grad(functools.partial(loss, f), argnums=(0, 1))(h0, xs))
            for name, f in forms.items()}


def test_remat_scan_equals_scan_values_and_gradients():
    """L = 11 steps in chunks of 4 (the last one 3 steps): the same carry, outputs and gradients as lax.scan."""
    rng = np.random.default_rng(0)
    h0 = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    xs = tuple(jnp.asarray(rng.standard_normal((11, 2, 3)), jnp.float32) for _ in range(2))
    out = _remat_scan_and_scan(h0, xs)
    assert out["remat"][0][1].shape == (11, 2)
    for a, b in zip(jax.tree.leaves(out["remat"]), jax.tree.leaves(out["scan"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
