"""Diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t``: the one primitive behind linear attention and SSMs.

Every recurrent model in ``jaxlab.kernels`` (chunked linear attention's state passing, Mamba's selective
scan, S4D/S5's recurrent form, FLASH's cross-chunk sums) reduces to this elementwise first-order
recurrence along axis 1. Three algorithms compute it:

* ``"sequential"``: ``lax.scan`` over time, O(L) work and O(L) depth. Fastest on CPU, where each step is
  a short loop iteration and nothing is left idle by the lack of parallelism.
* ``"associative"``: Blelloch's parallel prefix scan with the combine rule
  ``(a1, b1) . (a2, b2) = (a1 * a2, a2 * b1 + b2)`` (``lax.associative_scan``; Martin and Cundy 2018,
  "Parallelizing Linear Recurrent Neural Nets over Sequence Length"; S5, Smith et al. 2023). O(log L) depth:
  the accelerator choice.
* ``"chunked"``: parallel prefix scans inside chunks of ``chunk_size`` steps, a sequential scan over the
  L / C chunk summaries, then one elementwise correction: the two-level layout of blocked GPU kernels.

``"auto"`` picks per backend from measurements (``benchmarks/scans.py``): on CPU ``lax.associative_scan`` is
3-5x slower than a sequential scan at every length we measured, so CPU gets ``"sequential"``; accelerators
get ``"associative"``. :func:`auto_method` is the one ``method="auto"`` policy of every kernel (linear
recurrences, linear attention, S4D/S5, the selective scan).

Vocabulary shared by the kernels: ``method`` is how an op is computed (these algorithms, linear attention's
parallel/chunked/recurrent forms, S4D's FFT convolution), ``discretization`` is how a continuous system
becomes a recurrence (ZOH, bilinear, Euler: ``jaxlab.kernels.s4``, ``jaxlab.kernels.hippo``),
``initial_state`` is the state before the first step, and :func:`segment_starts` marks packed segments.

Gradients come from JAX's autodiff through the chosen algorithm (on CPU this measured faster than a custom
VJP that runs the transposed recurrence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "AUTO_OPS",
    "METHODS",
    "auto_method",
    "carry_mask",
    "linear_recurrence",
    "linear_recurrence_reference",
    "remat_scan",
    "segment_starts",
]

METHODS = ("auto", "associative", "sequential", "chunked")

# The ops whose ``method="auto"`` :func:`auto_method` resolves.
AUTO_OPS = ("linear_recurrence", "linear_attention", "s4d", "ssd")

# Linear attention: the quadratic form up to this length on every backend (benchmarks/scans.py).
AUTO_PARALLEL_MAX_LEN = 256


def auto_method(op: str = "linear_recurrence", length: int | None = None, *, backend: str | None = None,
                differentiated: bool = False) -> str:
    """The method ``method="auto"`` of ``op`` runs at sequence length ``length`` on ``backend``.

    The one policy behind every kernel's ``method="auto"``, from measurements (``benchmarks/scans.py``,
    ``benchmarks/results/scans-<backend>.md``):

    * ``"linear_recurrence"`` (also the selective scan and S5): ``"sequential"`` on CPU (a parallel prefix
      scan measured 3-5x slower there at every length), ``"associative"`` on accelerators.
    * ``"linear_attention"``: ``"parallel"`` (the quadratic form) for ``length <= 256`` everywhere; beyond
      it ``"chunked"`` (matmuls) on accelerators. On CPU the recurrent scan computes the values 2-2.5x
      faster than the chunked form while differentiating it is 3-4x slower, so ``linear_attention`` takes
      its values from ``"recurrent"`` and its gradients from ``"chunked"``: ``differentiated`` selects
      which of the two this returns.
    * ``"s4d"``: ``"fft"``, the O(L log L) convolution, on every backend.
    * ``"ssd"`` (Mamba-2): ``"recurrent"`` on CPU, the step-by-step scan with the state rematerialised per
      chunk of steps (values and gradients 3-4x faster there than the chunked form, whose intra-chunk decay
      tensor is [C, C] per head rather than per group); ``"chunked"`` (matmuls) on accelerators.

    Args:
      op: one of ``AUTO_OPS``.
      length: sequence length L (needed by ``"linear_attention"``).
      backend: "cpu", "gpu", "tpu", ... (default: JAX's default backend).
      differentiated: the method used for gradients rather than values (differs for linear attention).
    """
    if op not in AUTO_OPS:
        raise ValueError(f"op={op!r} must be one of {AUTO_OPS}")
    backend = jax.default_backend() if backend is None else backend
    if op == "s4d":
        return "fft"
    if op == "linear_recurrence":
        return "sequential" if backend == "cpu" else "associative"
    if op == "ssd":
        return "recurrent" if backend == "cpu" else "chunked"
    if length is None:
        raise ValueError("auto_method('linear_attention') needs the sequence length")
    if length <= AUTO_PARALLEL_MAX_LEN:
        return "parallel"
    return "recurrent" if backend == "cpu" and not differentiated else "chunked"


REMAT_CHUNK = 16
"""Steps per rematerialised chunk of :func:`remat_scan` (16 measured best of 8-32 for the selective scan on CPU)."""


def remat_scan(step, init, xs, *, chunk: int = REMAT_CHUNK):
    """``lax.scan(step, init, xs)`` run in chunks of ``chunk`` steps, each under ``jax.checkpoint``.

    The fused recurrences (Mamba's selective scan, the recurrent form of causal decay attention, S4D's
    recurrence) compute each step's inputs, state update and read-out inside ``step``, so no [L, state]
    tensor is materialised; autodiff of a plain scan would still save every step's state for the backward
    pass. Here the backward keeps the carry only at chunk boundaries and recomputes each chunk's steps (the
    recomputation of Mamba's fused kernel, Gu and Dao 2023, section 3.3.2). When ``chunk`` does not divide
    L, the last ``L % chunk`` steps run as one shorter chunk.

    Args:
      step: ``(carry, x_t) -> (carry, y_t)``.
      init: the initial carry.
      xs: a pytree of time-major arrays ``[L, ...]``.
      chunk: steps per chunk.

    Returns:
      (carry after step L - 1, ys [L, ...]).
    """
    L = jax.tree.leaves(xs)[0].shape[0]
    T = min(chunk, L)
    n = L - L % T  # steps in whole chunks

    @jax.checkpoint
    def run_chunk(carry, chunk_xs):
        return lax.scan(step, carry, chunk_xs)

    carry, ys = lax.scan(run_chunk, init, jax.tree.map(lambda x: x[:n].reshape((-1, T) + x.shape[1:]), xs))
    ys = jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), ys)
    if n < L:
        carry, tail = run_chunk(carry, jax.tree.map(lambda x: x[n:], xs))
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
    return carry, ys


def carry_mask(reset: jax.Array | None, batch: int, length: int, dtype) -> jax.Array:
    """[B, L] factors of the state carried into each step of a fused recurrence: 0 where ``reset`` starts a
    segment, else 1; 1 at t = 0 whatever ``reset`` says (the initial state enters the first segment)."""
    if reset is None:
        return jnp.ones((batch, length), dtype)
    return 1.0 - jnp.asarray(reset).at[:, 0].set(False).astype(dtype)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """bool [B, L]: True where a segment starts, from contiguous ``segment_ids`` [B, L]; always True at t = 0.

    The one convention of packed rows (models' positions, every kernel's ``reset``): a row's first token
    starts a segment. Recurrent kernels take these flags as ``reset`` and cut the state flowing from t - 1
    into t where they are True; at t = 0 nothing flows in from the row, and the ``initial_state`` (the state
    carried from the previous piece of the stream) always enters the first segment, so a long packed
    sequence can be processed in pieces by carrying the final state.
    """
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {segment_ids.shape}")
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, ((0, 0), (1, 0)), constant_values=True)


def _validate(a, b, h0, reset, method, chunk_size):
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    a, b = jnp.asarray(a), jnp.asarray(b)
    if b.ndim < 2:
        raise ValueError(f"b must be [B, L, ...], got shape {b.shape}")
    if a.ndim != b.ndim:
        raise ValueError(f"a must have the rank of b (broadcastable to it): a.shape={a.shape}, b.shape={b.shape}")
    try:
        out_shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"a is not broadcastable to b: a.shape={a.shape}, b.shape={b.shape}") from None
    if out_shape[1] != b.shape[1]:
        raise ValueError(f"a and b disagree on the length axis 1: a.shape={a.shape}, b.shape={b.shape}")
    dtype = jnp.result_type(a, b, *([] if h0 is None else [h0]))
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, jnp.float32)
    b = jnp.broadcast_to(b, out_shape).astype(dtype)
    a = a.astype(dtype)
    state_shape = out_shape[:1] + out_shape[2:]
    if h0 is None:
        h0 = jnp.zeros(state_shape, dtype)
    else:
        h0 = jnp.asarray(h0)
        try:
            h0 = jnp.broadcast_to(h0, state_shape).astype(dtype)
        except ValueError:
            raise ValueError(f"initial_state.shape={h0.shape} must be broadcastable to the state shape "
                             f"{state_shape}") from None
    if reset is not None:
        reset = jnp.asarray(reset)
        if reset.dtype != jnp.bool_:
            raise ValueError(f"reset must be a bool array [B, L], got dtype {reset.dtype} (use "
                             "segment_starts for segment ids)")
        if reset.ndim != 2 or reset.shape[1] != b.shape[1] or reset.shape[0] not in (1, b.shape[0]):
            raise ValueError(f"reset.shape={reset.shape} must be [B, L] = {(b.shape[0], b.shape[1])}")
    return a, b, h0, reset


def _apply_reset(a, reset, reverse):
    """Fold segment resets into the decay: a zero decay forgets the state carried across a boundary.

    Forward, the state entering step t >= 1 is dropped where ``reset[t]`` (``reset[:, 0]`` cuts nothing: the
    initial state enters step 0); in reverse the state flows from t+1 to t, so it is dropped where
    ``reset[t+1]`` (t+1 starts the next segment).
    """
    if reverse:
        reset = jnp.pad(reset[:, 1:], ((0, 0), (0, 1)))
    else:
        reset = reset.at[:, 0].set(False)
    mask = reset.reshape(reset.shape + (1,) * (a.ndim - 2))
    return jnp.where(mask, jnp.zeros((), a.dtype), a)


def _combine(left, right):
    """Associative operator of the recurrence: apply ``left`` first, then ``right``."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _sequential(a, b, h0, reverse):
    time_invariant = a.shape[1] != b.shape[1]  # a [B, 1, ...]: one decay for every step, kept out of xs

    def step(h, ab):
        a_t, b_t = ab
        h = (a[:, 0] if time_invariant else a_t) * h + b_t
        return h, h

    xs = (None if time_invariant else jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0))  # time-major [L, B, ...]
    _, h = lax.scan(step, h0, xs, reverse=reverse)
    return jnp.moveaxis(h, 0, 1)


def _associative(a, b, h0, reverse):
    a = jnp.broadcast_to(a, a.shape[:1] + b.shape[1:2] + a.shape[2:])  # the scan needs a per-step a
    # Fold h0 into the first step (last when reversed): h_0 = a_0 h0 + b_0.
    edge = -1 if reverse else 0
    b = b.at[:, edge].add(a[:, edge] * h0)
    return lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)[1]


def _chunked(a, b, h0, chunk_size):
    """Parallel scans inside chunks of C steps, a sequential scan over chunk summaries, one correction."""
    B, L = b.shape[:2]
    C = min(chunk_size, L)
    pad = -L % C
    a = jnp.broadcast_to(a, a.shape[:1] + (L,) + a.shape[2:])
    if pad:  # identity steps (a = 1, b = 0) at the end leave the real steps untouched
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (b.ndim - 2)
        a, b = jnp.pad(a, widths, constant_values=1), jnp.pad(b, widths)
    nc = (L + pad) // C
    a = a.reshape(a.shape[0], nc, C, *a.shape[2:])
    b = b.reshape(B, nc, C, *b.shape[2:])  # [B, nc, C, ...]
    # Within each chunk from a zero state: cumulative decay P and local state h_loc.
    P, h_loc = lax.associative_scan(_combine, (a, b), axis=2)
    # State entering each chunk: a recurrence over the nc chunk summaries.
    h_end = _sequential(P[:, :, -1], h_loc[:, :, -1], h0, reverse=False)  # [B, nc, ...]
    h_in = jnp.concatenate([h0[:, None], h_end[:, :-1]], axis=1)
    h = h_loc + P * h_in[:, :, None]
    return h.reshape(B, nc * C, *b.shape[3:])[:, :L]


def linear_recurrence(a, b, initial_state=None, *, reset=None, reverse=False, method="auto", chunk_size=64):
    """Elementwise linear recurrence along axis 1: ``h_t = a_t * h_{t-1} + b_t``.

    Args:
      a: decays [B, L, ...], real or complex, of b's rank and broadcastable to it (e.g. [B, L, H, 1, 1]
        against b [B, L, H, N, P]; size-1 batch or length axes broadcast too).
      b: inputs [B, L, ...].
      initial_state: state before the first step [B, ...] (default zeros); with ``reverse`` the state after
        the last.
      reset: bool [B, L]; True where a segment starts (``segment_starts``): the state carried from t - 1
        into step t is zeroed, so packed sequences do not leak into each other; ``reset[:, 0]`` cuts
        nothing (the initial state always enters step 0). With ``reverse``, segments are scanned back to
        front and the state entering t from t+1 is zeroed where ``reset[t + 1]``.
      reverse: run from the end: ``h_t = a_t * h_{t+1} + b_t``.
      method: "sequential" | "associative" | "chunked" | "auto" (see the module docstring).
      chunk_size: chunk length C of the "chunked" method (any C; L need not be a multiple).

    Returns:
      h [B, L, ...] in the promoted dtype of (a, b, initial_state); ``h[:, -1]`` (``h[:, 0]`` reversed) is the
      final state.
    """
    a, b, h0, reset = _validate(a, b, initial_state, reset, method, chunk_size)
    if reset is not None:
        a = _apply_reset(a, reset, reverse)
    if method == "auto":
        method = auto_method("linear_recurrence")
    if method == "sequential":
        return _sequential(a, b, h0, reverse)
    if method == "associative":
        return _associative(a, b, h0, reverse)
    if reverse:  # chunked: run forward on the time-reversed sequence
        return jnp.flip(_chunked(jnp.flip(a, 1), jnp.flip(b, 1), h0, chunk_size), 1)
    return _chunked(a, b, h0, chunk_size)


def linear_recurrence_reference(a, b, initial_state=None, *, reset=None, reverse=False):
    """The definition, one Python-loop step per time index (use for short sequences only).

    Forward: for t = 0..L-1, zero the state if ``reset[t]`` and t >= 1, then ``h = a_t * h + b_t``.
    Reverse: for t = L-1..0, ``h = a_t * h + b_t``, then zero the state handed to t-1 if ``reset[t]``.
    """
    a, b, h0, reset = _validate(a, b, initial_state, reset, "sequential", 1)
    L = b.shape[1]
    a = jnp.broadcast_to(a, b.shape)
    h, out = h0, [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        if reset is not None and not reverse and t > 0:
            h = jnp.where(reset[:, t].reshape((-1,) + (1,) * (h.ndim - 1)), 0, h)
        h = a[:, t] * h + b[:, t]
        out[t] = h
        if reset is not None and reverse:
            h = jnp.where(reset[:, t].reshape((-1,) + (1,) * (h.ndim - 1)), 0, h)
    return jnp.stack(out, axis=1)
