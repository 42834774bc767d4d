"""RetNet's retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models", Section 2), in its three equal forms.

Per head h with decay gamma_h, retention is causal linear attention without normalisation whose weights
decay with distance::

    parallel (eq. 5):   Retention(X) = (Q K^T * D) V,   D_nm = gamma^(n-m) for n >= m, else 0
    recurrent (eq. 6):  S_n = gamma S_{n-1} + K_n^T V_n,   Retention(X_n) = Q_n S_n
    chunkwise (eq. 7):  R_i = K_[i]^T (V_[i] * zeta) + gamma^C R_{i-1},
                        Retention(X_[i]) = (Q_[i] K_[i]^T * D) V_[i] + (Q_[i] R_{i-1}) * xi

Multi-scale retention (Section 2.2) gives each head its own decay, ``gamma_h = 1 - 2^(-5-h)``
(:func:`retention_decays`; h = 0, 1, ...). The recurrent and chunkwise forms are
``kernels.linear_attention`` with ``decay=gamma, normalize=False`` ("recurrent" and "chunked", the same
block decomposition as eq. 7); the parallel form is written here with the D matrix, and
:func:`retention_reference` is the same definition with D as integer powers of gamma rather than exponentials
of log gamma.

The paper's position encoding (the rotation ``Theta_n = e^{i n theta}`` of Q and K, xPos) is applied to q
and k by the caller (``models.rnn_mixers.RetNet`` rotates them by position); the kernel itself is
position-free, as ``linear_attention``. The retention-score normalisations of Section 2.4 (scaling the rows of
D, dividing by ``max(|Q K^T D| 1, 1)``) exist for half-precision range and are not applied: the mixer's
GroupNorm over each head removes the scale.

Shapes: q, k [B, L, H, Dk], v [B, L, H, Dv]; packed rows through ``segment_ids`` [B, L] (each segment's
retention starts from zero; the ``initial_state`` enters the first); the state is the kernel's
``LinearAttentionState`` with ``z=None``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlab.kernels.linear_attention import LinearAttentionState, linear_attention, linear_attention_step

__all__ = ["RETENTION_METHODS", "retention", "retention_decays", "retention_reference", "retention_step"]

RETENTION_METHODS = ("parallel", "chunkwise", "recurrent")


def retention_decays(num_heads: int):
    """The paper's multi-scale decays ``gamma_h = 1 - 2^(-5-h)``, h = 0..H-1: float32 [H] in [31/32, 1)."""
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))


def _check(q, k, v, decay, segment_ids):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"need q, k [B, L, H, Dk] and v [B, L, H, Dv]; got q {q.shape}, k {k.shape}, v {v.shape}")
    B, L, H, _ = q.shape
    if jnp.shape(decay) != (H,):
        raise ValueError(f"decay must be [H] = ({H},), got shape {jnp.shape(decay)}")
    if segment_ids is not None and jnp.shape(segment_ids) != (B, L):
        raise ValueError(f"segment_ids must be [B, L] = {(B, L)}, got shape {jnp.shape(segment_ids)}")


def _parallel(q, k, v, decay, segment_ids, initial_state, return_state):
    """Eq. 5 with the state terms: o = (Q K^T * D) V (+ gamma^(n+1) Q_n S_0 in the first segment)."""
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q, k, v, gamma = (jnp.asarray(x, dtype) for x in (q, k, v, decay))
    B, L, H, _ = q.shape
    n = jnp.arange(L)
    dist = n[:, None] - n[None, :]  # [L, L], n - m
    log_g = jnp.log(gamma)[:, None, None]  # [H, 1, 1]
    D = jnp.where(dist >= 0, jnp.exp(log_g * jnp.maximum(dist, 0)), 0.0)  # [H, L, L]
    D = jnp.broadcast_to(D, (B, H, L, L))
    first = last = jnp.ones((B, L), bool)
    if segment_ids is not None:
        D = D * (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        first, last = segment_ids == segment_ids[:, :1], segment_ids == segment_ids[:, -1:]
    o = jnp.einsum("bhnm,bmhe->bnhe", jnp.einsum("bnhd,bmhd->bhnm", q, k) * D, v)  # [B, L, H, Dv]
    if initial_state is not None:
        g_in = jnp.exp(log_g[:, 0, 0] * (n[:, None] + 1)) * first[..., None]  # [B, L, H]
        o = o + g_in[..., None] * jnp.einsum("bnhd,bhde->bnhe", q, initial_state.kv.astype(dtype))
    if not return_state:
        return o
    g_out = jnp.exp(log_g[:, 0, 0] * (L - 1 - n[:, None])) * last[..., None]  # [B, L, H], gamma^(L-1-m)
    S = jnp.einsum("bmh,bmhd,bmhe->bhde", g_out, k, v)
    if initial_state is not None:
        whole = (first & last).all(axis=1)[:, None, None, None]
        S = S + whole * jnp.exp(log_g[:, 0, 0] * L)[:, None, None] * initial_state.kv.astype(dtype)
    return o, LinearAttentionState(S, None)


def retention(q, k, v, decay=None, *, segment_ids=None, method="chunkwise", chunk_size=64, initial_state=None,
              return_state=False):
    """Causal retention ``o_n = sum_{m <= n} gamma_h^(n-m) (q_n . k_m) v_m`` per head.

    Args:
      q, k: [B, L, H, Dk] (already rotated by position when the caller uses xPos/rotary).
      v: [B, L, H, Dv].
      decay: gamma [H] in (0, 1] (default :func:`retention_decays`).
      segment_ids: [B, L] contiguous ids of packed sequences; retention stays within a segment.
      method: "parallel" (eq. 5, O(L^2)), "chunkwise" (eq. 7) or "recurrent" (eq. 6).
      chunk_size: C of the chunkwise form (L need not be a multiple).
      initial_state: ``LinearAttentionState`` (kv [B, H, Dk, Dv], z None) before the first token.
      return_state: also return the state after the last token.

    Returns:
      o [B, L, H, Dv] (float32, or the inputs' wider dtype); (o, state) with ``return_state``.
    """
    if method not in RETENTION_METHODS:
        raise ValueError(f"method={method!r} must be one of {RETENTION_METHODS}")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    decay = retention_decays(q.shape[2]) if decay is None else jnp.asarray(decay)
    _check(q, k, v, decay, segment_ids)
    if initial_state is not None and initial_state.z is not None:
        raise ValueError("initial_state.z must be None: retention has no normaliser")
    if method == "parallel":
        return _parallel(q, k, v, decay, segment_ids, initial_state, return_state)
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return linear_attention(q, k, v, causal=True, decay=decay.astype(dtype), normalize=False,
                            segment_ids=segment_ids, method="chunked" if method == "chunkwise" else "recurrent",
                            chunk_size=chunk_size, initial_state=initial_state, return_state=return_state)


def retention_step(state: LinearAttentionState, q_t, k_t, v_t, decay=None):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv] -> (o_t [B, H, Dv], new state)."""
    decay = retention_decays(q_t.shape[1]) if decay is None else decay
    return linear_attention_step(state, q_t, k_t, v_t, decay=decay, normalize=False)


def retention_reference(q, k, v, decay=None, *, segment_ids=None):
    """The parallel form as written in the paper: ``D_nm = gamma^(n-m)`` (an integer power; n >= m, same
    segment), ``o = (Q K^T * D) V``; plain jnp, in the inputs' precision."""
    B, L, H, _ = q.shape
    gamma = retention_decays(H).astype(q.dtype) if decay is None else jnp.asarray(decay, q.dtype)
    n = jnp.arange(L)
    dist = n[:, None] - n[None, :]  # [L, L], n - m
    D = jnp.where(dist >= 0, gamma[:, None, None] ** jnp.maximum(dist, 0), 0.0)  # [H, L, L]
    mask = jnp.ones((B, 1, L, L), bool) if segment_ids is None else (
        segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k) * D * mask  # [B, H, L, L]
    return jnp.einsum("bhnm,bmhe->bnhe", scores, v)
