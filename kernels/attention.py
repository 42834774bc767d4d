"""Exact softmax attention behind one function, from the plain definition to FlashAttention.

``dot_product_attention(q, k, v, ...)`` computes, per batch and query head h (key/value head
``h // (Hq // Hkv)``, so MHA, GQA and MQA share one code path)::

    s   = softcap(scale * q k^T)          # [Lq, Lk]; softcap(x) = c * tanh(x / c)
    out = softmax(s masked) v             # rows with no visible key give zeros

with the causal / local-window / segment-id masks of ``jaxlab.kernels.attention_masks`` (causal is
bottom-right aligned: query i sits at key position ``i + Lk - Lq``). Implementations:

* ``"reference"``: :func:`attention_reference`, the definition in fp32 (materialises [Lq, Lk]).
* ``"xla"``: the same dense computation in the input dtype with fp32 accumulation and softmax.
* ``"blockwise"``: online softmax over key/value tiles in pure JAX with a recomputing ``custom_vjp``
  (Rabe & Staats 2021; Dao et al. 2022), O(L) memory on every backend.
* ``"pallas"``: FlashAttention-2 forward and backward Pallas kernels (Dao 2023); compiled on NVIDIA
  GPUs, interpreted elsewhere.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` where its semantics match.
* ``"auto"``: the fastest of these that supports the call on the current backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlab.kernels.attention_blockwise import blockwise_attention
from jaxlab.kernels.attention_masks import AttentionArgs, check_attention_args, dense_mask, softcap_logits
from jaxlab.kernels.flash_pallas import flash_attention

__all__ = ["IMPLEMENTATIONS", "attention_reference", "auto_tile", "cudnn_unsupported", "dot_product_attention",
           "select_impl"]

IMPLEMENTATIONS = ("reference", "xla", "blockwise", "pallas", "cudnn", "auto")

# Off GPU, "auto" materialises the scores while they stay below this many bytes and streams over
# tiles beyond it. On CPU the tiled pass wins in time as well as memory from about 1 MiB of fp32
# scores on (training step, forward and backward: 0.58x the dense time at B=16, H=4, L=256 and
# 0.49x at B=16, H=4, L=128 with one tile; benchmarks/attention.py), since each tile's scores stay
# in cache and tiles above the causal diagonal are skipped.
AUTO_DENSE_SCORE_BYTES = 2**20
# Tile edge of "auto"'s tiled pass off GPU: the power of two (64 to 256) whose [B, H, b, b] fp32 score
# tile is closest to this many bytes (about a core's L2); a length of at most two tiles is one tile,
# since each extra tile costs a loop step that small tiles do not repay.
AUTO_TILE_SCORE_BYTES = 2**20


def _masked_softmax(s, mask):
    """Softmax over the last axis restricted to ``mask`` (None: no mask); rows with no visible key give 0.

    Hidden logits become the dtype's most negative finite value rather than -inf, so a fully hidden
    row stays finite (uniform) before it is zeroed, and its gradient is exactly zero, not NaN.
    """
    if mask is None:
        return jax.nn.softmax(s, axis=-1)
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(s.dtype).min), axis=-1)
    return p * jnp.any(mask, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _dense_attention(q, k, v, args: AttentionArgs, compute_dtype=None):
    """Attention with the full [Lq, Lk] score matrix.

    ``compute_dtype=None`` (impl "xla"): matmuls take the input dtype and accumulate in fp32, the
    softmax runs in fp32. Otherwise every operation (matmuls, softmax) runs in ``compute_dtype``;
    fp32 is the reference, bf16 gives the naive low-precision baseline the tests compare against.
    """
    B, Lq, Hq, D = q.shape
    _, Lk, Hkv, _ = k.shape
    out_dtype = q.dtype
    acc = jnp.float32 if compute_dtype is None else compute_dtype
    if compute_dtype is not None:
        q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    qg = q.reshape(B, Lq, Hkv, Hq // Hkv, D)  # [B, Lq, Hkv, G, D]
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc)  # [B, Hkv, G, Lq, Lk]
    s = softcap_logits(s * jnp.asarray(args.scale, acc), args.softcap)
    mask = dense_mask(args)[:, :, None] if args.mask.needs_mask(kv_padded_len=Lk, segments=args.segments) else None
    p = _masked_softmax(s, mask)  # mask [B|1, 1, 1, Lq, Lk]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=acc)
    return out.reshape(B, Lq, Hq, D).astype(out_dtype)


def attention_reference(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None, scale=None):
    """The definition of attention in plain jnp with fp32 scores, softmax and outputs.

    Args:
      q: [B, Lq, Hq, D] queries; k, v: [B, Lk, Hkv, D] keys and values, ``Hq % Hkv == 0``.
      causal: query i sees keys ``j <= i + Lk - Lq`` (bottom-right aligned).
      segment_ids: int [B, L] (needs Lq == Lk) or a pair (q_ids [B, Lq], kv_ids [B, Lk]).
      window: W, a sliding window of W keys, the query's own included: query i sees keys j with
        ``|p_i - j| <= W - 1`` (with ``causal``: the W keys ``p_i - W + 1 .. p_i``).
      softcap: logits -> softcap * tanh(logits / softcap), after scaling.
      scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
      [B, Lq, Hq, D] in the dtype of q; rows without a visible key are zero.
    """
    args = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                                softcap=softcap, scale=scale, impl="reference")
    return _dense_attention(q, k, v, args, compute_dtype=jnp.float32)


# ---- cuDNN ---------------------------------------------------------------------------------------
def _cudnn_max_head_dim() -> int:
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError):
        return 128
    return 256 if major >= 9 else 128


def _backend() -> str:
    return jax.default_backend()


def cudnn_unsupported(q, args: AttentionArgs) -> str | None:
    """Why the cuDNN fused kernel cannot compute this call with our semantics (None if it can)."""
    if _backend() != "gpu":
        return f"backend {_backend()!r} (cuDNN needs a CUDA GPU)"
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        return f"q.dtype={q.dtype} (cuDNN takes float16/bfloat16)"
    D = q.shape[-1]
    if D % 8 or D > _cudnn_max_head_dim():
        return f"head dim D={D} (cuDNN needs a multiple of 8, at most {_cudnn_max_head_dim()})"
    if args.softcap is not None:
        return f"softcap={args.softcap}"
    if args.segments:
        return "segment_ids"
    spec = args.mask
    if (spec.causal or spec.band is not None) and spec.q_len != spec.kv_len:
        name = "causal" if spec.causal else "window"
        return f"{name} with Lq={spec.q_len} != Lk={spec.kv_len} (cuDNN aligns masks top-left)"
    if spec.band is not None and not spec.causal and spec.band[1] != 0:
        return f"window={spec.band[1] + 1} without causal (cuDNN has no right window without causal)"
    return None


def _cudnn_attention(q, k, v, args: AttentionArgs):
    reason = cudnn_unsupported(q, args)
    if reason is not None:
        raise ValueError(f"impl='cudnn' does not support {reason}; use impl='pallas' or 'auto'")
    spec = args.mask
    # A (left, 0) band is causal plus a left band, which is what cuDNN's sliding window means.
    local = None if spec.band is None else (spec.band[0], 0)
    return jax.nn.dot_product_attention(q, k, v, scale=args.scale, is_causal=spec.causal or local is not None,
                                        local_window_size=local, implementation="cudnn")


# ---- dispatch ------------------------------------------------------------------------------------
def select_impl(q, k, args: AttentionArgs) -> str:
    """The implementation ``impl="auto"`` uses for this call on the default backend."""
    if _backend() == "gpu":
        return "cudnn" if cudnn_unsupported(q, args) is None else "pallas"
    B, Lq, Hq, _ = q.shape
    score_bytes = 4 * B * Hq * Lq * k.shape[1]
    return "xla" if score_bytes <= AUTO_DENSE_SCORE_BYTES else "blockwise"


def auto_tile(batch: int, num_heads: int, length: int) -> int:
    """Tile edge (along a length of ``length``) of the tiled pass that ``impl="auto"`` runs off GPU:
    see ``AUTO_TILE_SCORE_BYTES``."""
    edge = math.sqrt(AUTO_TILE_SCORE_BYTES / (4 * batch * num_heads))
    edge = min((64, 128, 256), key=lambda b: abs(math.log2(b / edge)))
    return length if length <= 2 * edge else edge


def dot_product_attention(q, k, v, *, causal=False, segment_ids=None, window=None, softcap=None, scale=None,
                          impl="auto", block_q=None, block_k=None, interpret=None):
    """Exact multi-head attention; see :func:`attention_reference` for the arguments' meaning.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with ``Hq % Hkv == 0`` (MHA, GQA, MQA).
      causal, segment_ids, window, softcap, scale: as in :func:`attention_reference`.
      impl: "reference" | "xla" | "blockwise" | "pallas" | "cudnn" | "auto".
      block_q, block_k: tile sizes of "blockwise" and "pallas" (ignored by the dense impls).
      interpret: Pallas interpret mode; default True unless the default backend is a GPU.

    Returns:
      [B, Lq, Hq, D] in the dtype of q. Rows with no visible key are zero, with zero gradient.

    Raises:
      ValueError: naming the argument, for bad shapes/options or an option ``impl`` cannot honour.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got impl={impl!r}")
    args = check_attention_args(q, k, v, causal=causal, segment_ids=segment_ids, window=window,
                                softcap=softcap, scale=scale, impl=impl)
    if impl == "auto":
        impl = select_impl(q, k, args)
        if impl == "blockwise":
            block_q = auto_tile(q.shape[0], q.shape[2], q.shape[1]) if block_q is None else block_q
            block_k = auto_tile(q.shape[0], q.shape[2], k.shape[1]) if block_k is None else block_k
    if impl == "reference":
        return _dense_attention(q, k, v, args, compute_dtype=jnp.float32)
    if impl == "xla":
        return _dense_attention(q, k, v, args)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, args, block_q=block_q, block_k=block_k)
    if impl == "pallas":
        return flash_attention(q, k, v, args, block_q=block_q, block_k=block_k, interpret=interpret)
    return _cudnn_attention(q, k, v, args)
