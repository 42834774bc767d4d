"""GAU's squared-ReLU attention and FLASH's mixed-chunk attention (Hua, Dai, Liu and Le 2022,
"Transformer Quality in Linear Time").

The gated attention unit replaces softmax by A = relu(q k^T / n + b)^2 over one shared low-dimensional head.
FLASH makes it linear in L by splitting the sequence into chunks of C tokens (the paper's groups, Section 3.2
and Code 6):

    o_i = sum_{j in chunk(i), j <= i} relu(quad_q_i . quad_k_j / C + b_ij)^2 v_j      (quadratic, local)
        + sum_{j in earlier chunks} (lin_q_i . lin_k_j / C) v_j                      (linear, global)

with four per-dimension scale/offset transforms of one shared Z giving quad_q, quad_k, lin_q, lin_k. The
cross-chunk sum is an exclusive prefix sum of per-chunk states lin_k^T v / C, run by ``linear_recurrence``.
Cost O(L C (S + E) + L S E) against O(L^2 (S + E)) for GAU over the whole sequence.

Shapes: q, k [B, L, S] (S the shared query/key width), v [B, L, E].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.kernels.scan import linear_recurrence

__all__ = ["gau_attention", "mixed_chunk_attention", "mixed_chunk_attention_reference"]


def _check(q, k, v, names=("q", "k")):
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"need {names[0]}, {names[1]} [B, L, S] and v [B, L, E]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")


def _relu2(logits, mask):
    return jnp.square(jax.nn.relu(logits)) * mask


def gau_attention(q, k, v, *, causal=False, bias=None, scale=None):
    """GAU attention o = relu(scale q k^T + bias)^2 v (Hua et al. 2022, eq. 4 and Code 1).

    Args:
      q, k: [B, L, S]; v: [B, L, E].
      causal: only keys j <= i.
      bias: relative-position bias broadcastable to [B, L, L], added before the ReLU.
      scale: logit scale; default 1 / L, the paper's 1/n.

    Returns:
      [B, L, E] in the promoted dtype of q, k, v.
    """
    _check(q, k, v)
    L = q.shape[1]
    scale = 1.0 / L if scale is None else scale
    logits = jnp.einsum("bis,bjs->bij", q, k) * scale  # [B, L, L]
    if bias is not None:
        logits = logits + bias
    mask = jnp.tril(jnp.ones((L, L), bool)) if causal else jnp.ones((L, L), bool)
    return jnp.einsum("bij,bje->bie", _relu2(logits, mask), v)


def _check_mixed(quad_q, quad_k, lin_q, lin_k, v, chunk_size, bias):
    _check(quad_q, quad_k, v, ("quad_q", "quad_k"))
    _check(lin_q, lin_k, v, ("lin_q", "lin_k"))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if bias is not None:
        C = min(chunk_size, quad_q.shape[1])
        try:
            jnp.broadcast_shapes(jnp.shape(bias), (C, C))
        except ValueError:
            raise ValueError(f"bias.shape={jnp.shape(bias)} must broadcast to the chunk's [C, C] = {(C, C)}") from None


def mixed_chunk_attention(quad_q, quad_k, lin_q, lin_k, v, *, chunk_size=256, bias=None):
    """FLASH's causal mixed-chunk attention (Hua et al. 2022, Section 3.2 and Code 6).

    Args:
      quad_q, quad_k: [B, L, S] for relu^2 attention inside each chunk.
      lin_q, lin_k: [B, L, S] for linear attention across chunks.
      v: [B, L, E].
      chunk_size: C; the last chunk is padded when C does not divide L (padding is causally invisible).
      bias: [C, C] relative-position bias inside a chunk (broadcastable), added before the ReLU.

    Returns:
      [B, L, E] in the promoted dtype of the inputs.
    """
    _check_mixed(quad_q, quad_k, lin_q, lin_k, v, chunk_size, bias)
    B, L, S = quad_q.shape
    E = v.shape[-1]
    C = min(chunk_size, L)
    pad = -L % C
    nc = (L + pad) // C
    chunks = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, nc, C, x.shape[-1])  # noqa: E731
    quad_q, quad_k, lin_q, lin_k, v = map(chunks, (quad_q, quad_k, lin_q, lin_k, v))  # [B, nc, C, .]

    logits = jnp.einsum("bcis,bcjs->bcij", quad_q, quad_k) / C  # [B, nc, C, C]
    if bias is not None:
        logits = logits + bias
    quadratic = jnp.einsum("bcij,bcje->bcie", _relu2(logits, jnp.tril(jnp.ones((C, C), bool))), v)

    kv = jnp.einsum("bcjs,bcje->bcse", lin_k, v) / C  # [B, nc, S, E], each chunk's linear state
    kv_prefix = linear_recurrence(jnp.ones((1, nc, 1, 1), kv.dtype), kv)  # inclusive prefix sum over chunks
    kv_before = jnp.concatenate([jnp.zeros_like(kv[:, :1]), kv_prefix[:, :-1]], axis=1)  # chunks before c
    linear = jnp.einsum("bcis,bcse->bcie", lin_q, kv_before)
    return (quadratic + linear).reshape(B, nc * C, E)[:, :L]


def mixed_chunk_attention_reference(quad_q, quad_k, lin_q, lin_k, v, *, chunk_size=256, bias=None):
    """The same weights as one [L, L] matrix in fp32: relu^2 on the causal block diagonal, linear below it."""
    _check_mixed(quad_q, quad_k, lin_q, lin_k, v, chunk_size, bias)
    dtype = jnp.result_type(quad_q, quad_k, lin_q, lin_k, v, jnp.float32)
    quad_q, quad_k, lin_q, lin_k, v = (x.astype(dtype) for x in (quad_q, quad_k, lin_q, lin_k, v))
    L = quad_q.shape[1]
    C = min(chunk_size, L)
    pos = jnp.arange(L)
    chunk, offset = pos // C, pos % C
    same_chunk = chunk[:, None] == chunk[None, :]
    causal = pos[:, None] >= pos[None, :]
    logits = jnp.einsum("bis,bjs->bij", quad_q, quad_k) / C  # [B, L, L]
    if bias is not None:
        bias = jnp.broadcast_to(jnp.asarray(bias, dtype), jnp.broadcast_shapes(jnp.shape(bias), (C, C)))
        logits = logits + bias[..., offset[:, None], offset[None, :]]
    w_quad = _relu2(logits, same_chunk & causal)
    w_lin = jnp.einsum("bis,bjs->bij", lin_q, lin_k) / C * (chunk[:, None] > chunk[None, :])
    return jnp.einsum("bij,bje->bie", w_quad + w_lin, v)
