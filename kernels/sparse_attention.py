"""Fixed sparse attention patterns (Tay, Dehghani, Bahri and Metzler 2022, "Efficient Transformers: A Survey",
Section 3.2.1; Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse Transformers").

* local / sliding window: query i sees ``window`` = W keys, its own included: i - W < j <= i causally,
  |i - j| < W otherwise (Image Transformer, Longformer; ``window`` as in ``dot_product_attention``);
* strided: query i sees keys j with (i - j) % stride == 0 (Sparse Transformer's second head);
* fixed: query i sees its own block of ``stride`` tokens plus the last ``summary`` tokens of every block
  (Sparse Transformer's "fixed" pattern, A1 and A2);
* ``sparse_transformer_mask``: the union of a factorised pattern's two heads in one attention.

Every pattern is a boolean mask [L, L] for ``masked_attention_reference`` (dense, the reference), and the two
with regular structure have sub-quadratic paths through the exact attention kernel: ``local_attention`` is
``dot_product_attention(window=...)`` (its tiled implementations skip key blocks outside the band) and
``strided_attention`` regroups the sequence by residue mod ``stride`` so each residue class is an ordinary
causal attention of length L / stride, batched: O(L^2 / stride) work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.kernels.attention import dot_product_attention

__all__ = [
    "fixed_mask",
    "local_attention",
    "local_mask",
    "masked_attention_reference",
    "sparse_transformer_mask",
    "strided_attention",
    "strided_mask",
]


def _positive(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _grid(L):
    i = jnp.arange(L)
    return i[:, None], i[None, :]  # query index [L, 1], key index [1, L]


def local_mask(L: int, window: int, *, causal: bool = True) -> jax.Array:
    """[L, L] bool: W = ``window`` keys per query, its own included: i - W < j <= i (causal) or |i - j| < W."""
    _positive("L", L)
    _positive("window", window)
    i, j = _grid(L)
    return (i - j < window) & ((j <= i) if causal else (j - i < window))


def strided_mask(L: int, stride: int, *, causal: bool = True) -> jax.Array:
    """[L, L] bool: key j visible to query i when (i - j) % stride == 0 (and j <= i when causal)."""
    _positive("L", L)
    _positive("stride", stride)
    i, j = _grid(L)
    return ((i - j) % stride == 0) & ((j <= i) if causal else True)


def fixed_mask(L: int, stride: int, summary: int = 1, *, causal: bool = True) -> jax.Array:
    """[L, L] bool, Sparse Transformer's fixed pattern: same block of ``stride`` tokens, or j among the last
    ``summary`` tokens of its block (and j <= i when causal)."""
    _positive("L", L)
    _positive("stride", stride)
    _positive("summary", summary)
    if summary > stride:
        raise ValueError(f"summary={summary} must be <= stride={stride}")
    i, j = _grid(L)
    pattern = (i // stride == j // stride) | (j % stride >= stride - summary)
    return pattern & ((j <= i) if causal else True)


def sparse_transformer_mask(L: int, stride: int, *, pattern: str = "strided", summary: int = 1,
                            causal: bool = True) -> jax.Array:
    """Union of a factorised pattern's two heads (Child et al. 2019, Section 4.2, "merged head").

    "strided": the last ``stride`` tokens, the query's own included (local, window stride) or every
    stride-th token;
    "fixed": ``fixed_mask``.
    """
    if pattern == "strided":
        return local_mask(L, stride, causal=causal) | strided_mask(L, stride, causal=causal)
    if pattern == "fixed":
        return fixed_mask(L, stride, summary, causal=causal)
    raise ValueError(f"pattern={pattern!r} must be 'strided' or 'fixed'")


def masked_attention_reference(q, k, v, mask, *, scale=None):
    """Softmax attention under an arbitrary bool mask [L, L] or [B, L, L], in fp32; rows with no key give 0.

    q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] with Hq % Hkv == 0 -> [B, Lq, Hq, D] in q's dtype.
    """
    B, Lq, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or Hq % Hkv or jnp.shape(mask)[-2:] != (Lq, k.shape[1]):
        raise ValueError(f"need q [B, Lq, Hq, D], k, v [B, Lk, Hkv, D] and mask [.., Lq, Lk]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}, mask {jnp.shape(mask)}")
    scale = D**-0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
    qg = f32(q).reshape(B, Lq, Hkv, Hq // Hkv, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, f32(k)) * scale  # [B, Hkv, G, Lq, Lk]
    mask = jnp.broadcast_to(mask, (B, Lq, k.shape[1]))[:, None, None]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1, where=mask)
    p = jnp.where(mask, p, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, f32(v))
    return out.reshape(B, Lq, Hq, D).astype(q.dtype)


def local_attention(q, k, v, *, window: int, causal: bool = True, segment_ids=None, **kwargs):
    """Sliding-window attention: the band of ``local_mask`` via ``dot_product_attention(window=window)``.

    ``window`` = W keys per query, its own included (the same W as ``local_mask`` and the models'
    ``Attention(window=W)``). q [B, L, Hq, D], k, v [B, L, Hkv, D]; ``kwargs`` (impl, softcap, scale, block
    sizes, ...) pass through.
    """
    _positive("window", window)
    return dot_product_attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids, **kwargs)


def strided_attention(q, k, v, *, stride: int, causal: bool = True, segment_ids=None, **kwargs):
    """Attention restricted to ``strided_mask``: each residue class mod ``stride`` attends within itself.

    Token t goes to class t % stride at index t // stride; the classes become a batch of ``stride``
    sequences of length ceil(L / stride) for ``dot_product_attention`` (padding, if stride does not divide
    L, sits at the end of the classes and is hidden by segment ids). q [B, L, Hq, D], k, v [B, L, Hkv, D];
    ``segment_ids`` [B, L] (packed sequences) and ``kwargs`` (impl, scale, ...) as in ``dot_product_attention``.
    """
    _positive("stride", stride)
    B, L = q.shape[:2]
    if k.shape[1] != L:
        raise ValueError(f"strided attention is self-attention: q has L={L}, k has {k.shape[1]}")
    n = -(-L // stride)
    pad = n * stride - L

    def padded(x, fill=0):  # [B, L, ...] -> [B, n * stride, ...]
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)

    def to_classes(x):  # [B, n * stride, ...] -> [B * stride, n, ...]
        x = x.reshape(B, n, stride, *x.shape[2:])
        return jnp.swapaxes(x, 1, 2).reshape(B * stride, n, *x.shape[3:])

    if segment_ids is not None or pad:  # padding gets an id no real token has
        ids = jnp.zeros((B, L), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        if ids.shape != (B, L):
            raise ValueError(f"segment_ids must be [B, L] = {(B, L)}, got shape {ids.shape}")
        segment_ids = to_classes(padded(ids, fill=jnp.iinfo(jnp.int32).min))
    out = dot_product_attention(*(to_classes(padded(x)) for x in (q, k, v)), causal=causal,
                                segment_ids=segment_ids, **kwargs)  # [B * stride, n, Hq, D]
    out = jnp.swapaxes(out.reshape(B, stride, n, *out.shape[2:]), 1, 2)
    return out.reshape(B, n * stride, *out.shape[3:])[:, :L]
