"""Linformer: softmax attention over keys and values projected along the length axis.

Wang, Li, Khabsa, Fang and Ma 2020, "Linformer: Self-Attention with Linear Complexity", eq. 7:

    head = softmax(scale * q (E k)^T) (F v),     E, F: [k_proj, L]

so the score matrix is [L, k_proj] instead of [L, L]: O(L k_proj) time and memory. The projections are
shared by all heads (the paper's "key-value" / "layerwise" sharing; pass E, F of shape ``[k_proj, L]``) or one
per key/value head (``[Hkv, k_proj, L]``, "headwise"). After projecting, the attention is exact attention over
k_proj pseudo-keys, so it runs through ``jaxlab.kernels.attention.dot_product_attention`` (MHA/GQA/MQA alike,
layout ``[B, L, H, D]``).

Linformer is not causal, as in the paper (an encoder's attention): every projected key ``(E k)_p`` mixes all
L positions, the future included, so no mask over the k_proj pseudo-keys can hide future tokens.
``causal=True`` is refused with an error; a causal mixer should use exact, sliding-window or linear attention.
For the same reason packed rows (segment ids) are not supported: projections mix the documents of a row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlab.kernels.attention import dot_product_attention

__all__ = ["linformer_attention", "linformer_attention_reference", "linformer_projections"]

_NOT_CAUSAL = ("Linformer attention cannot be causal (got causal=True): its projections E, F mix all L positions, "
               "future ones included, into every projected key and value (Wang et al. 2020 use it in encoders)")


def linformer_projections(key, k_proj: int, length: int, *, num_heads: int | None = None, dtype=jnp.float32):
    """Random projections E, F with i.i.d. N(0, 1/k_proj) entries (the paper's Johnson-Lindenstrauss
    argument, Theorem 1): ``[k_proj, L]`` each, or ``[num_heads, k_proj, L]``."""
    if not (isinstance(k_proj, int) and k_proj >= 1 and isinstance(length, int) and length >= 1):
        raise ValueError(f"k_proj={k_proj!r} and length={length!r} must be ints >= 1")
    shape = (k_proj, length) if num_heads is None else (num_heads, k_proj, length)
    kE, kF = jax.random.split(key)
    return tuple(jax.random.normal(kk, shape, dtype) / math.sqrt(k_proj) for kk in (kE, kF))


def _check(q, k, v, E, F, causal):
    if causal:
        raise ValueError(_NOT_CAUSAL)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, L, H, D], got shape {getattr(x, 'shape', None)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"need q [B, L, Hq, D], k = v [B, L, Hkv, D] with Hkv dividing Hq; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    L, Hkv = k.shape[1], k.shape[2]
    E, F = jnp.asarray(E), jnp.asarray(F)
    for name, P in (("E", E), ("F", F)):
        ok = (P.ndim == 2 and P.shape[1] == L) or (P.ndim == 3 and P.shape[0] == Hkv and P.shape[2] == L)
        if not ok:
            raise ValueError(f"{name} must be [k_proj, L] or [Hkv, k_proj, L] with L = {L} (the keys' length) and "
                             f"Hkv = {Hkv}, got {name}.shape={P.shape}")
    if E.shape != F.shape:
        raise ValueError(f"E and F must have the same shape, got E.shape={E.shape}, F.shape={F.shape}")
    return E, F


def _project(P, x):
    if P.ndim == 2:
        return jnp.einsum("pl,blhd->bphd", P.astype(x.dtype), x)          # [B, k_proj, Hkv, D]
    return jnp.einsum("hpl,blhd->bphd", P.astype(x.dtype), x)             # [B, k_proj, Hkv, D]


def linformer_attention(q, k, v, E, F, *, causal: bool = False, scale: float | None = None, impl: str = "xla"):
    """Linformer attention: q ``[B, L, Hq, D]``, k, v ``[B, L, Hkv, D]``, E, F ``[k_proj, L]`` or
    ``[Hkv, k_proj, L]`` -> ``[B, L, Hq, D]``.

    ``scale`` defaults to ``1/sqrt(D)``; ``impl`` is ``dot_product_attention``'s, over the k_proj projected keys.
    ``causal=True`` raises ``ValueError`` (module docstring).
    """
    E, F = _check(q, k, v, E, F, causal)
    return dot_product_attention(q, _project(E, k), _project(F, v), causal=False, scale=scale, impl=impl)


def linformer_attention_reference(q, k, v, E, F, *, causal: bool = False, scale: float | None = None):
    """Linformer by its definition in plain jnp, in the inputs' precision: ``softmax(s q (E k)^T) (F v)`` per head."""
    E, F = _check(q, k, v, E, F, causal)
    B, L, Hq, D = q.shape
    G = Hq // k.shape[2]
    s = 1.0 / math.sqrt(D) if scale is None else scale
    if E.ndim == 2:
        E, F = (jnp.broadcast_to(P, (k.shape[2],) + P.shape) for P in (E, F))
    E, F = (jnp.repeat(P, G, axis=0) for P in (E, F))                      # [Hq, k_proj, L]
    k, v = (jnp.repeat(x, G, axis=2) for x in (k, v))                      # [B, L, Hq, D]
    k_proj = jnp.einsum("hpl,blhd->bhpd", E, k)                            # [B, Hq, k_proj, D]
    v_proj = jnp.einsum("hpl,blhd->bhpd", F, v)                            # [B, Hq, k_proj, D]
    p = jax.nn.softmax(s * jnp.einsum("blhd,bhpd->bhlp", q, k_proj), axis=-1)   # [B, Hq, L, k_proj]
    return jnp.einsum("bhlp,bhpd->blhd", p, v_proj)                       # [B, L, Hq, D]
