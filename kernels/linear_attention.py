"""Linear attention with optional per-head decay (RetNet retention), in parallel, chunked and recurrent form.

Katharopoulos et al. 2020 ("Transformers are RNNs") replace softmax(q . k) by a feature-map product, so
causal attention becomes the recurrence S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. RetNet (Sun et al. 2023)
decays the state by gamma_h per step; Mamba-2's SSD (Dao and Gu 2024) lets the decay vary per token. All are

    S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t                  (state S [N, P])

computed here by ``causal_decay_attention``, the shared core of ``linear_attention`` and ``ssm.ssd``, in:

* "recurrent": one ``lax.scan`` step per token (the decoding form; O(L N P) time, O(N P) state).
* "chunked": SSD's block decomposition (Dao and Gu 2024, Section 6): quadratic attention with a decay mask
  inside chunks of C tokens, a ``linear_recurrence`` over the L / C chunk states, and each chunk reading its
  incoming state. O(L C (N + P) + L N P) time with matmuls; L need not be a multiple of C.
* "parallel" (``linear_attention`` only): the quadratic definition, ``linear_attention_reference``.

Normalisation (o_i / sum_j w_ij) runs through the same core by appending a column of ones to v, so the
normaliser is the last column of the state. Feature maps live in ``jaxlab.kernels.feature_maps``.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.kernels.feature_maps import elu_plus_one, favor_features, favor_projection, relu_features
from jaxlab.kernels.scan import auto_method, carry_mask, linear_recurrence, remat_scan, segment_starts

__all__ = [
    "LinearAttentionState",
    "causal_decay_attention",
    "elu_plus_one",
    "favor_features",
    "favor_projection",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "relu_features",
]

METHODS = ("auto", "parallel", "chunked", "recurrent")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearAttentionState:
    """Recurrent state of causal linear attention after the last token (a frozen dataclass pytree, as every
    mixer state in ``jaxlab.models``).

    kv: [B, H, Dk, Dv], sum_j decay^(t-j) k_j v_j^T.
    z: [B, H, Dk], sum_j decay^(t-j) k_j (the normaliser's state); None when ``normalize=False``.
    """

    kv: jax.Array
    z: jax.Array | None


# ----------------------------------------------------------------------------------------------------------
# Shared core: causal linear attention with a per-token, per-head scalar decay.


def _chunked(q, k, v, log_a, h0, reset, C):
    B, L, G, N = q.shape
    H, P = v.shape[2:]
    R = H // G  # heads per group of (q, k)
    C = min(C, L)
    pad = -L % C
    if pad:  # zero tokens with no decay at the end: outputs and final state unchanged
        q, k, v, log_a = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, log_a))
        reset = None if reset is None else jnp.pad(reset, ((0, 0), (0, pad)))
    nc = (L + pad) // C
    # Head-major layout: the batched matmuls below then have their batch axes leading (much faster on CPU).
    q = q.reshape(B, nc, C, G, N).transpose(0, 3, 1, 2, 4)  # [B, G, nc, C, N]
    k = k.reshape(B, nc, C, G, N).transpose(0, 3, 1, 2, 4)
    v = v.reshape(B, nc, C, G, R, P).transpose(0, 3, 4, 1, 2, 5)  # [B, G, R, nc, C, P]
    cs = jnp.cumsum(log_a.reshape(B, nc, C, G, R).transpose(0, 3, 4, 1, 2), axis=-1)  # [B, G, R, nc, C]
    cs_last = cs[..., -1]  # [B, G, R, nc], log decay over the whole chunk

    # Segments: seg[i] counts resets in the chunk up to i; 0 means "continues the previous chunk's segment".
    causal = jnp.tril(jnp.ones((C, C), bool))
    if reset is None:
        same_seg, carry_in, to_end, chunk_open = causal, 1.0, 1.0, 1.0
    else:
        seg = jnp.cumsum(reset.reshape(B, 1, 1, nc, C), axis=-1)  # [B, 1, 1, nc, C]
        same_seg = causal & (seg[..., :, None] == seg[..., None, :])  # [B, 1, 1, nc, C, C]
        carry_in = seg == 0
        to_end = seg == seg[..., -1:]
        chunk_open = seg[..., -1] == 0  # [B, 1, 1, nc]

    # 1. Inside chunks: (q_i . k_j) exp(cs_i - cs_j) for j <= i in the same segment.
    decay = jnp.exp(jnp.where(same_seg, cs[..., :, None] - cs[..., None, :], -jnp.inf))  # [B, G, R, nc, C, C]
    scores = jnp.einsum("bgcin,bgcjn->bgcij", q, k)  # [B, G, nc, C, C]
    o = jnp.einsum("bgrcij,bgrcjp->bgrcip", scores[:, :, None] * decay, v)  # [B, G, R, nc, C, P]

    # 2. Each chunk's contribution to the state at its end.
    w_end = jnp.exp(cs_last[..., None] - cs) * to_end  # [B, G, R, nc, C]
    states = jnp.einsum("bgcjn,bgrcjp->bgrcnp", k, w_end[..., None] * v)  # [B, G, R, nc, N, P]

    # 3. State passing across chunks: h_c = exp(cs_last_c) h_{c-1} + states_c (cut at segment starts), run as
    #    one recurrence along the chunk axis per (batch, head). Only L / C steps of a large state: the parallel
    #    scan measured faster here than a sequential one even on CPU (benchmarks/scans.py).
    a = jnp.broadcast_to(jnp.exp(cs_last) * chunk_open, (B, G, R, nc)).reshape(B * H, nc, 1, 1)
    h_end = linear_recurrence(a, states.reshape(B * H, nc, N, P), h0.reshape(B * H, N, P),
                              method="associative")  # [B H, nc, N, P]
    h_end = h_end.reshape(B, G, R, nc, N, P)
    h_in = jnp.concatenate([h0.reshape(B, G, R, 1, N, P), h_end[:, :, :, :-1]], axis=3)  # state entering chunk

    # 4. Each token reads the state entering its chunk, decayed to its position.
    w_in = jnp.exp(cs) * carry_in  # [B, G, R, nc, C]
    o = o + w_in[..., None] * jnp.einsum("bgcin,bgrcnp->bgrcip", q, h_in)
    o = o.transpose(0, 3, 4, 1, 2, 5).reshape(B, nc * C, H, P)[:, :L]  # [B, L, H, P]
    return o, h_end[:, :, :, -1].reshape(B, H, N, P)


def _recurrent(q, k, v, log_a, h0, reset):
    """The step-by-step form; the backward recomputes the states per chunk of steps (``scan.remat_scan``)
    rather than saving every step's [B, H, N, P] state."""
    B, L, G, N = q.shape
    H, P = v.shape[2:]
    R = H // G

    def step(S, x):  # S [B, G, R, N, P]
        q_t, k_t, v_t, a_t, keep_t = x
        a_t = jnp.exp(a_t) * keep_t[:, None, None]  # [B, G, R]
        S = a_t[..., None, None] * S + jnp.einsum("bgn,bgrp->bgrnp", k_t, v_t)
        return S, jnp.einsum("bgn,bgrnp->bgrp", q_t, S)

    xs = (q, k, v.reshape(B, L, G, R, P), log_a.reshape(B, L, G, R), carry_mask(reset, B, L, log_a.dtype))
    S, o = remat_scan(step, h0.reshape(B, G, R, N, P), tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return jnp.moveaxis(o, 0, 1).reshape(B, L, H, P), S.reshape(B, H, N, P)


def causal_decay_attention(q, k, v, log_decay, *, initial_state=None, reset=None, method="chunked", chunk_size=64):
    """Causal linear attention with a scalar decay per token and head (RetNet, Mamba-2 SSD).

    S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T (S zeroed before t >= 1 where ``reset[t]``), o_t = S_t^T q_t.

    Args:
      q, k: [B, L, G, N]; head h of v reads group h // (H / G) (G = H for linear attention; SSD's B/C groups).
      v: [B, L, H, P] with H % G == 0.
      log_decay: [B, L, H], log of the decay applied before token t's update (<= 0 for a contraction).
      initial_state: state before the first token [B, H, N, P] (default zeros); it enters the first segment.
      reset: bool [B, L], True where a packed segment starts (``scan.segment_starts``); ``reset[:, 0]`` cuts
        nothing.
      method: "chunked" or "recurrent".
      chunk_size: C of the chunked form.

    Returns:
      (o [B, L, H, P], S_L [B, H, N, P]) in the promoted dtype of the inputs.
    """
    B, L, G, N = q.shape
    H, P = v.shape[2:]
    if k.shape != q.shape or v.shape[:2] != (B, L) or H % G or log_decay.shape != (B, L, H):
        raise ValueError(f"shapes must be q, k [B, L, G, N], v [B, L, H, P] with H % G == 0 and log_decay "
                         f"[B, L, H]; got q {q.shape}, k {k.shape}, v {v.shape}, log_decay {log_decay.shape}")
    if method not in ("chunked", "recurrent"):
        raise ValueError(f"method={method!r} must be 'chunked' or 'recurrent'")
    dtype = jnp.result_type(q, k, v, log_decay)
    h0 = (jnp.zeros((B, H, N, P), dtype) if initial_state is None
          else jnp.broadcast_to(initial_state, (B, H, N, P)).astype(dtype))
    if reset is not None:  # no state flows into t = 0 from within the row: the initial state enters there
        reset = jnp.asarray(reset).at[:, 0].set(False)
    if method == "recurrent":
        return _recurrent(q, k, v, log_decay, h0, reset)
    return _chunked(q, k, v, log_decay, h0, reset, chunk_size)


# ----------------------------------------------------------------------------------------------------------
# Linear attention API.


def _check_decay(decay, H):
    if decay is None:
        return
    if jnp.shape(decay) != (H,):
        raise ValueError(f"decay must be [H] = ({H},), got shape {jnp.shape(decay)}")
    try:  # value check when the decay is concrete (skipped under tracing)
        values = np.asarray(decay)
    except jax.errors.TracerArrayConversionError:
        return
    if not np.all((values > 0) & (values <= 1)):
        raise ValueError(f"decay must lie in (0, 1], got {values}")


def _validate(q, k, v, causal, decay, segment_ids, method, chunk_size, initial_state, return_state, normalize):
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"need q, k [B, L, H, Dk] and v [B, L, H, Dv]; got q {q.shape}, k {k.shape}, v {v.shape}")
    B, L, H, Dk = q.shape
    _check_decay(decay, H)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if segment_ids is not None and jnp.shape(segment_ids) != (B, L):
        raise ValueError(f"segment_ids must be [B, L] = {(B, L)}, got shape {jnp.shape(segment_ids)}")
    if not causal and (initial_state is not None or return_state):
        raise ValueError("initial_state/return_state need causal=True: non-causal attention has no recurrent state")
    if initial_state is not None:
        kv, z = initial_state.kv, initial_state.z
        if jnp.shape(kv) != (B, H, Dk, v.shape[-1]):
            raise ValueError(f"initial_state.kv must be {(B, H, Dk, v.shape[-1])}, got {jnp.shape(kv)}")
        if normalize and (z is None or jnp.shape(z) != (B, H, Dk)):
            raise ValueError(f"normalize=True needs initial_state.z of shape {(B, H, Dk)}, got "
                             f"{None if z is None else jnp.shape(z)}")


def _causal_core(q, k, v, log_a, h0, reset, *, method, grad_method, chunk_size):
    """``causal_decay_attention`` whose values come from ``method`` and whose VJP from ``grad_method``."""
    def run(m):
        return lambda q, k, v, log_a, h0, reset: causal_decay_attention(
            q, k, v, log_a, initial_state=h0, reset=reset, method=m, chunk_size=chunk_size)
    if grad_method == method:
        return run(method)(q, k, v, log_a, h0, reset)
    mixed = jax.custom_vjp(run(method))
    mixed.defvjp(lambda *args: jax.vjp(run(grad_method), *args), lambda vjp, ct: vjp(ct))
    return mixed(q, k, v, log_a, h0, reset)


def linear_attention(q, k, v, *, causal=True, decay=None, normalize=True, eps=1e-6, segment_ids=None,
                     method="auto", chunk_size=64, initial_state=None, return_state=False):
    """Linear attention o_i = sum_j w_ij v_j with w_ij = decay_h^|i-j| (q_i . k_j).

    Args:
      q, k: [B, L, H, Dk], already feature-mapped (``elu_plus_one``, ``favor_features``, ...).
      v: [B, L, H, Dv].
      causal: sum over j <= i; otherwise over all j (the decay then weighs both directions by |i - j|).
      decay: [H] in (0, 1] (RetNet's gamma); None means 1.
      normalize: divide by sum_j w_ij + eps (Katharopoulos et al.); off for RetNet-style retention.
      segment_ids: [B, L] contiguous ids of packed sequences; tokens attend within their segment only.
      method: "parallel" (the quadratic form), "chunked", "recurrent" or "auto" (``scan.auto_method``; on
        CPU it is reverse-mode only: forward-mode ``jax.jvp`` needs an explicit method).
      chunk_size: C of the chunked form.
      initial_state: ``LinearAttentionState`` before the first token (flows into the first segment).
      return_state: also return the ``LinearAttentionState`` after the last token (causal only).

    Returns:
      o [B, L, H, Dv] in the inputs' dtype; (o, state) when ``return_state``.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _validate(q, k, v, causal, decay, segment_ids, method, chunk_size, initial_state, return_state, normalize)
    B, L, H, Dk = q.shape
    Dv = v.shape[-1]
    grad_method = method
    if method == "auto":
        method = auto_method("linear_attention", L)
        grad_method = auto_method("linear_attention", L, differentiated=True)
    if method == "parallel":
        return linear_attention_reference(q, k, v, causal=causal, decay=decay, normalize=normalize, eps=eps,
                                          segment_ids=segment_ids, initial_state=initial_state,
                                          return_state=return_state)
    out_dtype = jnp.result_type(q, k, v)
    dtype = jnp.promote_types(out_dtype, jnp.float32)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if normalize:  # the normaliser sum_j w_ij rides along as an extra value column of ones
        v = jnp.concatenate([v, jnp.ones((B, L, H, 1), dtype)], axis=-1)
    log_a = jnp.zeros((B, L, H), dtype) if decay is None else jnp.broadcast_to(jnp.log(decay).astype(dtype),
                                                                                  (B, L, H))
    h0 = None
    if initial_state is not None:
        h0 = initial_state.kv.astype(dtype)
        if normalize:
            h0 = jnp.concatenate([h0, initial_state.z.astype(dtype)[..., None]], axis=-1)
    reset = None if segment_ids is None else segment_starts(segment_ids)
    core = functools.partial(_causal_core, method=method, grad_method=grad_method, chunk_size=chunk_size)
    o, S = core(q, k, v, log_a, h0, reset)
    if not causal:  # add the anti-causal half (a causal pass over the reversed sequence) minus the diagonal
        flip = lambda x: jnp.flip(x, axis=1)  # noqa: E731
        reset_rev = None if segment_ids is None else segment_starts(flip(segment_ids))
        o_rev, _ = core(flip(q), flip(k), flip(v), flip(log_a), None, reset_rev)
        o = o + flip(o_rev) - jnp.einsum("blhd,blhd->blh", q, k)[..., None] * v
    if normalize:
        o = o[..., :Dv] / (o[..., Dv:] + eps)
    o = o.astype(out_dtype)
    if not return_state:
        return o
    return o, LinearAttentionState(S[..., :Dv], S[..., Dv] if normalize else None)


def linear_attention_step(state: LinearAttentionState, q_t, k_t, v_t, *, decay=None, normalize=True, eps=1e-6):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv] -> (o_t [B, H, Dv], new state).

    Continues ``linear_attention(..., return_state=True)`` token by token with the same numbers.
    """
    # A state of another batch, head count or feature size (or a size-1 decay) would broadcast silently.
    chex.assert_rank([q_t, k_t, v_t, state.kv], [3, 3, 3, 4])
    chex.assert_equal_shape([q_t, k_t])
    chex.assert_shape(state.kv, (*q_t.shape, v_t.shape[-1]))
    chex.assert_shape(v_t, q_t.shape[:2] + v_t.shape[-1:])
    if normalize:
        chex.assert_shape(state.z, q_t.shape)
    if decay is not None:
        chex.assert_shape(decay, q_t.shape[1:2])
    d = 1.0 if decay is None else jnp.asarray(decay)[:, None, None]  # [H, 1, 1]
    kv = d * state.kv + jnp.einsum("bhd,bhe->bhde", k_t, v_t)
    o_t = jnp.einsum("bhd,bhde->bhe", q_t, kv)
    z = None
    if normalize:
        z = d[..., 0] * state.z + k_t
        o_t = o_t / (jnp.einsum("bhd,bhd->bh", q_t, z)[..., None] + eps)
    return o_t, LinearAttentionState(kv, z)


def linear_attention_reference(q, k, v, *, causal=True, decay=None, normalize=True, eps=1e-6, segment_ids=None,
                               initial_state=None, return_state=False):
    """The quadratic definition in fp32: W = (Q K^T) * decay^|i-j| * mask, o = W V (/ (W 1 + eps))."""
    out_dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(x, jnp.promote_types(out_dtype, jnp.float32)) for x in (q, k, v))
    B, L, H, _ = q.shape
    i = jnp.arange(L)
    dist = i[:, None] - i[None, :]  # [L, L], i - j
    gamma = jnp.ones((H,), q.dtype) if decay is None else jnp.asarray(decay, q.dtype)
    weights = gamma[:, None, None] ** jnp.abs(dist)  # [H, L, L]
    mask = jnp.broadcast_to(dist >= 0 if causal else True, (B, L, L))
    first = last = jnp.ones((B, L), bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        first = segment_ids == segment_ids[:, :1]  # tokens the initial state reaches
        last = segment_ids == segment_ids[:, -1:]  # tokens in the final state
    w = jnp.einsum("bihd,bjhd->bhij", q, k) * weights * mask[:, None]  # [B, H, L, L]
    num = jnp.einsum("bhij,bjhe->bihe", w, v)
    den = jnp.einsum("bhij->bih", w)
    if initial_state is not None:
        g = (gamma[None, :] ** (i[:, None] + 1)) * first[..., None]  # [B, L, H], decay from the state to i
        num = num + g[..., None] * jnp.einsum("bihd,bhde->bihe", q, initial_state.kv)
        if normalize:
            den = den + g * jnp.einsum("bihd,bhd->bih", q, initial_state.z)
    o = num / (den[..., None] + eps) if normalize else num
    o = o.astype(out_dtype)
    if not return_state:
        return o
    g = (gamma[None, :] ** (L - 1 - i[:, None])) * last[..., None]  # [B, L, H], decay from j to the end
    kv = jnp.einsum("bjh,bjhd,bjhe->bhde", g, k, v)
    z = jnp.einsum("bjh,bjhd->bhd", g, k) if normalize else None
    if initial_state is not None:
        g0 = (gamma ** L)[None, :] * (first & last).all(axis=1)[:, None]  # [B, H]; one segment throughout
        kv = kv + g0[..., None, None] * initial_state.kv
        if normalize:
            z = z + g0[..., None] * initial_state.z
    return o, LinearAttentionState(kv, z)
