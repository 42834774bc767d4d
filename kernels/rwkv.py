"""RWKV's WKV operator: RWKV-4's per-channel form and RWKV-6's (Finch) matrix-valued form.

**WKV-4** (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", eq. 14). Per channel, with a
time decay ``w > 0`` and a bonus ``u`` for the current token::

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})

a softmax-like average of the values. The sums are the state ``S_t = e^{-w} S_{t-1} + e^{k_t} (v_t, 1)``
(numerator, denominator), which overflows in exp as it stands; RWKV-4's kernel keeps it as
``S = e^p (num, den)`` with a running exponent ``p`` (:class:`WKV4State`, the paper's ``aa, bb, pp``). Forms:

* "recurrent": one ``lax.scan`` step per token with that stable update (the decoding form, :func:`wkv4_step`).
* "associative": the recurrence ``S_t = a S_{t-1} + b_t`` as a parallel prefix scan (Blelloch; the combine
  rule of ``kernels.scan``) carried in log space: an element ``(log a, p, num, den)`` stands for the affine
  map ``S -> a S + e^p (num, den)``, and combining rescales both sides to the larger exponent. O(log L) depth.
* :func:`wkv4_reference`: the definition as a masked softmax over an [L, L] score matrix.

**WKV-6** (Peng et al. 2024, "Eagle and Finch", eq. 19-20). Per head a matrix state ``S [N, P]`` with a
data-dependent per-channel decay ``w_t = exp(log_decay_t)`` [N] and a bonus ``u`` [N]::

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),     S_t = diag(w_t) S_{t-1} + k_t v_t^T

i.e. ``o_t = sum_{i<t} (r_t . (k_i * prod_{s=i+1}^{t-1} w_s)) v_i + (r_t . (u * k_t)) v_t``: linear attention
with a decay per key channel. Forms:

* "recurrent": one ``lax.scan`` step per token (:func:`wkv6_step` for decoding).
* "chunked": chunks of C tokens (Yang et al. 2024, "Gated Linear Attention", Section 3.3, without the
  secondary chunking): inside a chunk the [C, C] scores are formed channel by channel with the decay
  exponents ``G_{t-1} - G_i <= 0`` (never a positive exponent, so float32 is safe for any decay, at L C N
  memory per head), the chunk states pass through ``scan.linear_recurrence``, and each token reads the state
  entering its chunk decayed to its position.
* :func:`wkv6_reference`: the definition with every decay product summed explicitly (O(L^3 N)).

Shapes use ``kernels.linear_attention``'s vocabulary: WKV-4 k, v [B, L, D] (D channels); WKV-6 r, k
[B, L, H, N], v [B, L, H, P], log_decay [B, L, H, N]. Packed rows: ``reset`` bool [B, L] from
``scan.segment_starts`` cuts the state entering t where ``reset[t]`` (``reset[:, 0]`` cuts nothing: the
``initial_state`` enters the first segment, as in every recurrent kernel).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.kernels.scan import linear_recurrence

__all__ = [
    "WKV4State",
    "WKV4_METHODS",
    "WKV6_METHODS",
    "wkv4",
    "wkv4_reference",
    "wkv4_step",
    "wkv6",
    "wkv6_reference",
    "wkv6_step",
]

WKV4_METHODS = ("recurrent", "associative")
WKV6_METHODS = ("recurrent", "chunked")

EMPTY = -1e38
"""The exponent ``p`` of an empty WKV-4 state (RWKV-4's ``pp = -1e38``): ``e^{p - x} = 0`` for every finite x."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WKV4State:
    """WKV-4 state ``e^p (num, den)`` after the last token, each [B, D] float32 (RWKV-4's aa, bb, pp).

    num: sum_i e^{-(t-i) w + k_i - p} v_i;  den: the same sum without v;  p: the shared exponent.
    """

    num: jax.Array
    den: jax.Array
    p: jax.Array

    @classmethod
    def zeros(cls, batch: int, channels: int, dtype=jnp.float32) -> WKV4State:
        z = jnp.zeros((batch, channels), dtype)
        return cls(z, z, jnp.full((batch, channels), EMPTY, dtype))


# ----------------------------------------------------------------------------------------------------------
# WKV-4


def _check_wkv4(k, v, w, u, initial_state, reset, method):
    if method not in WKV4_METHODS:
        raise ValueError(f"method={method!r} must be one of {WKV4_METHODS}")
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, L, D] of one shape, got k {k.shape}, v {v.shape}")
    B, L, D = k.shape
    if jnp.shape(w) != (D,) or jnp.shape(u) != (D,):
        raise ValueError(f"w and u must be [D] = ({D},), got w {jnp.shape(w)}, u {jnp.shape(u)}")
    if initial_state is not None and any(jnp.shape(x) != (B, D) for x in jax.tree.leaves(initial_state)):
        raise ValueError(f"initial_state fields must be [B, D] = {(B, D)}, got "
                         f"{[jnp.shape(x) for x in jax.tree.leaves(initial_state)]}")
    if reset is not None and (jnp.shape(reset) != (B, L) or jnp.asarray(reset).dtype != jnp.bool_):
        raise ValueError(f"reset must be bool [B, L] = {(B, L)}, got {jnp.shape(reset)} {jnp.asarray(reset).dtype}")


def wkv4_step(state: WKV4State, k_t, v_t, w, u):
    """One token: k_t, v_t [B, D] -> (wkv_t [B, D], new state). RWKV-4's stable update, verbatim."""
    ww = u + k_t  # exponent of the current token's bonus term
    p = jnp.maximum(state.p, ww)
    e1, e2 = jnp.exp(state.p - p), jnp.exp(ww - p)
    out = (e1 * state.num + e2 * v_t) / (e1 * state.den + e2)
    ww = state.p - w  # the state decayed by one step
    p = jnp.maximum(ww, k_t)
    e1, e2 = jnp.exp(ww - p), jnp.exp(k_t - p)
    return out, WKV4State(e1 * state.num + e2 * v_t, e1 * state.den + e2, p)


def _wkv4_recurrent(k, v, w, u, h0, reset):
    def step(state, x):
        k_t, v_t, r_t = x
        state = WKV4State(*(jnp.where(r_t[:, None], z, s) for z, s in
                            zip((0.0, 0.0, EMPTY), (state.num, state.den, state.p))))
        return wkv4_step(state, k_t, v_t, w, u)[::-1]

    xs = (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(reset, 1, 0))  # time-major [L, B, D]
    final, out = lax.scan(lambda s, x: step(s, x), h0, xs)
    return jnp.moveaxis(out, 0, 1), final


def _log_combine(left, right):
    """``(log a, p, num, den)`` of applying the affine map ``left`` and then ``right`` (stable in exp)."""
    la_l, p_l, n_l, d_l = left
    la_r, p_r, n_r, d_r = right
    carried = la_r + p_l  # exponent of right's decay applied to left's offset (-inf across a reset)
    p = jnp.maximum(carried, p_r)
    e1, e2 = jnp.exp(carried - p), jnp.exp(p_r - p)
    return la_l + la_r, p, e1 * n_l + e2 * n_r, e1 * d_l + e2 * d_r


def _wkv4_associative(k, v, w, u, h0, reset):
    B, L, D = k.shape
    # Element t: S -> a_t S + e^{k_t} (v_t, 1), a_t = e^{-w} (0 where a segment starts at t >= 1).
    log_a = jnp.where(reset[..., None], -jnp.inf, jnp.broadcast_to(-w, (B, L, D)))  # [B, L, D]
    ones = jnp.ones_like(k)
    elems = (log_a, k, v, ones)
    # The initial state as a leading constant map (a = 0), so element t of the scan is the state S_t.
    first = (jnp.full((B, 1, D), -jnp.inf, k.dtype), h0.p[:, None], h0.num[:, None], h0.den[:, None])
    elems = tuple(jnp.concatenate([f, e], axis=1) for f, e in zip(first, elems))  # [B, L + 1, D]
    _, p, num, den = lax.associative_scan(_log_combine, elems, axis=1)
    # Token t reads S_{t-1} (index t of the extended scan) plus its bonus term e^{u + k_t} (v_t, 1).
    p_prev, num_prev, den_prev = p[:, :-1], num[:, :-1], den[:, :-1]
    p_prev = jnp.where(reset[..., None], EMPTY, p_prev)
    ww = u + k
    q = jnp.maximum(p_prev, ww)
    e1, e2 = jnp.exp(p_prev - q), jnp.exp(ww - q)
    out = (e1 * num_prev + e2 * v) / (e1 * den_prev + e2)
    return out, WKV4State(num[:, -1], den[:, -1], p[:, -1])


def wkv4(k, v, w, u, *, initial_state: WKV4State | None = None, reset=None, method="recurrent",
         return_state=False):
    """RWKV-4's WKV (module docstring), per channel.

    Args:
      k, v: keys and values [B, L, D].
      w: time decay [D], > 0 (the state decays by e^{-w} per step; RWKV-4's ``exp(time_decay)``).
      u: bonus of the current token [D] (RWKV-4's ``time_first``).
      initial_state: :class:`WKV4State` before the first token (default empty); enters the first segment.
      reset: bool [B, L], True where a packed segment starts (``scan.segment_starts``).
      method: "recurrent" | "associative".
      return_state: also return the :class:`WKV4State` after the last token.

    Returns:
      wkv [B, L, D] in float32 (float64 under x64 inputs); (wkv, state) with ``return_state``.
    """
    k, v = jnp.asarray(k), jnp.asarray(v)
    _check_wkv4(k, v, w, u, initial_state, reset, method)
    B, L, D = k.shape
    dtype = jnp.promote_types(jnp.result_type(k, v, w, u), jnp.float32)
    k, v, w, u = (jnp.asarray(x, dtype) for x in (k, v, w, u))
    h0 = WKV4State.zeros(B, D, dtype) if initial_state is None else jax.tree.map(lambda x: x.astype(dtype),
                                                                                   initial_state)
    reset = jnp.zeros((B, L), bool) if reset is None else jnp.asarray(reset).at[:, 0].set(False)
    run = _wkv4_recurrent if method == "recurrent" else _wkv4_associative
    out, state = run(k, v, w, u, h0, reset)
    return (out, state) if return_state else out


def wkv4_reference(k, v, w, u, *, initial_state: WKV4State | None = None, segment_ids=None):
    """The definition (paper eq. 14) as a masked softmax over scores [B, L, L, D]; plain jnp.

    ``score[t, i] = -(t-1-i) w + k_i`` for i < t in t's segment, ``u + k_t`` for i = t; the initial state
    enters the first segment as one more term of exponent ``p0 - t w`` carrying ``(num0, den0)``.
    """
    k, v = jnp.asarray(k), jnp.asarray(v)
    B, L, D = k.shape
    t = jnp.arange(L)
    dist = (t[:, None] - 1 - t[None, :]).astype(k.dtype)  # [L, L], t - 1 - i
    score = -dist[..., None] * w + k[:, None, :, :]  # [B, L(t), L(i), D]
    score = jnp.where((t[:, None] == t[None, :])[..., None], u + k[:, :, None, :], score)
    mask = jnp.broadcast_to((t[:, None] >= t[None, :]), (B, L, L))
    first = jnp.ones((B, L), bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        first = segment_ids == segment_ids[:, :1]
    score = jnp.where(mask[..., None], score, -jnp.inf)
    if initial_state is None:
        m = jnp.max(score, axis=2)  # [B, L, D]
        e = jnp.exp(score - m[:, :, None])
        return jnp.einsum("btid,bid->btd", e, v) / jnp.sum(e, axis=2)
    s0 = initial_state.p[:, None, :] - t[None, :, None] * w  # [B, L, D], exponent of the state's term at t
    s0 = jnp.where(first[..., None], s0, -jnp.inf)
    m = jnp.maximum(jnp.max(score, axis=2), s0)
    e, e0 = jnp.exp(score - m[:, :, None]), jnp.exp(s0 - m)
    num = jnp.einsum("btid,bid->btd", e, v) + e0 * initial_state.num[:, None]
    den = jnp.sum(e, axis=2) + e0 * initial_state.den[:, None]
    return num / den


# ----------------------------------------------------------------------------------------------------------
# WKV-6


def _check_wkv6(r, k, v, log_decay, u, initial_state, reset, method, chunk_size):
    if method not in WKV6_METHODS:
        raise ValueError(f"method={method!r} must be one of {WKV6_METHODS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if r.ndim != 4 or k.shape != r.shape or log_decay.shape != r.shape or v.ndim != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"need r, k, log_decay [B, L, H, N] and v [B, L, H, P]; got r {r.shape}, k {k.shape}, "
                         f"log_decay {log_decay.shape}, v {v.shape}")
    B, L, H, N = r.shape
    if jnp.shape(u) != (H, N):
        raise ValueError(f"u must be [H, N] = {(H, N)}, got {jnp.shape(u)}")
    if initial_state is not None and jnp.shape(initial_state) != (B, H, N, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, N, P] = {(B, H, N, v.shape[-1])}, got "
                         f"{jnp.shape(initial_state)}")
    if reset is not None and (jnp.shape(reset) != (B, L) or jnp.asarray(reset).dtype != jnp.bool_):
        raise ValueError(f"reset must be bool [B, L] = {(B, L)}, got {jnp.shape(reset)} {jnp.asarray(reset).dtype}")


def wkv6_step(state, r_t, k_t, v_t, log_decay_t, u):
    """One token: r_t, k_t, log_decay_t [B, H, N], v_t [B, H, P], state S [B, H, N, P] -> (o_t [B, H, P], S)."""
    kv = jnp.einsum("bhn,bhp->bhnp", k_t, v_t)  # [B, H, N, P]
    o = jnp.einsum("bhn,bhnp->bhp", r_t, state + u[..., None] * kv)
    return o, jnp.exp(log_decay_t)[..., None] * state + kv


def _wkv6_recurrent(r, k, v, log_decay, u, h0, reset):
    def step(S, x):
        r_t, k_t, v_t, g_t, c_t = x
        S = jnp.where(c_t[:, None, None, None], 0.0, S)  # a segment starts at t: nothing flows in
        o, S = wkv6_step(S, r_t, k_t, v_t, g_t, u)
        return S, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (r, k, v, log_decay, reset))  # time-major
    S, o = lax.scan(step, h0, xs)
    return jnp.moveaxis(o, 0, 1), S


def _wkv6_chunked(r, k, v, log_decay, u, h0, reset, C):
    B, L, H, N = r.shape
    P = v.shape[-1]
    C = min(C, L)
    pad = -L % C
    if pad:  # zero tokens with no decay at the end: outputs and final state unchanged
        r, k, v, log_decay = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (r, k, v, log_decay))
        reset = jnp.pad(reset, ((0, 0), (0, pad)))
    nc = (L + pad) // C
    heads = lambda x: x.reshape(B, nc, C, H, x.shape[-1]).transpose(0, 3, 1, 2, 4)  # noqa: E731 [B, H, nc, C, .]
    r, k, v, g = heads(r), heads(k), heads(v), heads(log_decay)
    G = jnp.cumsum(g, axis=3)  # [B, H, nc, C, N], log decay after tokens 0..t of the chunk
    G_prev = G - g  # G_{t-1}: decay the state entering the chunk has received when token t reads it

    seg = jnp.cumsum(reset.reshape(B, 1, nc, C), axis=-1)  # [B, 1, nc, C]; 0: continues the previous chunk
    strictly = jnp.tril(jnp.ones((C, C), bool), k=-1)
    same = strictly & (seg[..., :, None] == seg[..., None, :])  # [B, 1, nc, C, C], i < t in t's segment
    carry_in = (seg == 0)[..., None]  # [B, 1, nc, C, 1]
    to_end = (seg == seg[..., -1:])[..., None]
    chunk_open = (seg[..., -1] == 0)[..., None, None]  # [B, 1, nc, 1, 1]

    # 1. Inside chunks: A[t, i] = sum_n r_t k_i exp(G_{t-1} - G_i), i < t (exponent <= 0), plus the bonus.
    expo = jnp.where(same[..., None], G_prev[:, :, :, :, None] - G[:, :, :, None], -jnp.inf)  # [B,H,nc,C,C,N]
    A = jnp.einsum("bhctn,bhcin,bhctin->bhcti", r, k, jnp.exp(expo))  # [B, H, nc, C, C]
    bonus = jnp.einsum("bhctn,hn,bhctn->bhct", r, u, k)
    o = jnp.einsum("bhcti,bhcip->bhctp", A, v) + bonus[..., None] * v  # [B, H, nc, C, P]

    # 2. Each chunk's own contribution to the state at its end: sum_i exp(G_last - G_i) k_i v_i^T.
    G_last = G[:, :, :, -1:]  # [B, H, nc, 1, N]
    k_end = k * jnp.exp(G_last - G) * to_end
    states = jnp.einsum("bhcin,bhcip->bhcnp", k_end, v)  # [B, H, nc, N, P]

    # 3. State passing across chunks: h_c = exp(G_last_c) h_{c-1} + states_c, one linear recurrence.
    a = (jnp.exp(G_last) * chunk_open)[:, :, :, 0, :, None]  # [B, H, nc, N, 1]
    flat = lambda x: x.reshape(B * H, nc, *x.shape[3:])  # noqa: E731
    h_end = linear_recurrence(flat(a), flat(states), h0.reshape(B * H, N, P)).reshape(B, H, nc, N, P)
    h_in = jnp.concatenate([h0[:, :, None], h_end[:, :, :-1]], axis=2)  # state entering each chunk

    # 4. Each token reads the incoming state decayed to its position: (r_t * exp(G_{t-1})) . h_in.
    r_in = r * jnp.exp(G_prev) * carry_in
    o = o + jnp.einsum("bhctn,bhcnp->bhctp", r_in, h_in)
    o = o.transpose(0, 2, 3, 1, 4).reshape(B, nc * C, H, P)[:, :L]  # [B, L, H, P]
    return o, h_end[:, :, -1]


def wkv6(r, k, v, log_decay, u, *, initial_state=None, reset=None, method="chunked", chunk_size=16,
         return_state=False):
    """RWKV-6's WKV (module docstring): per head a matrix state with a per-token, per-channel decay.

    Args:
      r, k: receptance and keys [B, L, H, N].
      v: values [B, L, H, P].
      log_decay: [B, L, H, N], log w_t <= 0 (Finch: ``-exp(d_t)``), the decay applied to the state after
        token t has read it.
      u: bonus [H, N] (Finch's ``time_faaaa``).
      initial_state: S before the first token [B, H, N, P] (default zeros); enters the first segment.
      reset: bool [B, L], True where a packed segment starts (``scan.segment_starts``).
      method: "chunked" | "recurrent".
      chunk_size: C of the chunked form (memory L C N per head; L need not be a multiple).
      return_state: also return S after the last token [B, H, N, P].

    Returns:
      o [B, L, H, P] in float32 (float64 under x64 inputs); (o, S) with ``return_state``.
    """
    r, k, v, log_decay = (jnp.asarray(x) for x in (r, k, v, log_decay))
    _check_wkv6(r, k, v, log_decay, u, initial_state, reset, method, chunk_size)
    B, L, H, N = r.shape
    P = v.shape[-1]
    dtype = jnp.promote_types(jnp.result_type(r, k, v, log_decay, u), jnp.float32)
    r, k, v, log_decay, u = (jnp.asarray(x, dtype) for x in (r, k, v, log_decay, u))
    h0 = jnp.zeros((B, H, N, P), dtype) if initial_state is None else jnp.asarray(initial_state, dtype)
    reset = jnp.zeros((B, L), bool) if reset is None else jnp.asarray(reset).at[:, 0].set(False)
    if method == "recurrent":
        o, S = _wkv6_recurrent(r, k, v, log_decay, u, h0, reset)
    else:
        o, S = _wkv6_chunked(r, k, v, log_decay, u, h0, reset, chunk_size)
    return (o, S) if return_state else o


def wkv6_reference(r, k, v, log_decay, u, *, initial_state=None, segment_ids=None, return_state=False):
    """The definition with each decay product summed explicitly, O(L^3 N); plain jnp.

    ``o_t = sum_{i<t, same segment} (r_t . (k_i * exp(sum_{i<s<t} log w_s))) v_i + (r_t . (u * k_t)) v_t``
    (+ ``r_t * exp(sum_{s<t} log w_s)`` read from the initial state in the first segment);
    ``S_L = sum_{i in the last segment} exp(sum_{s>i} log w_s) k_i v_i^T`` (+ the decayed initial state when
    the row is one segment).
    """
    B, L, H, N = r.shape
    t = jnp.arange(L)
    between = (t[None, :, None] < t[None, None, :]) & (t[None, None, :] < t[:, None, None])  # [t, i, s]: i<s<t
    expo = jnp.einsum("tis,bshn->btihn", between.astype(log_decay.dtype), log_decay)  # [B, t, i, H, N]
    mask = jnp.broadcast_to(t[:, None] > t[None, :], (B, L, L))
    first = last = jnp.ones((B, L), bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        first, last = segment_ids == segment_ids[:, :1], segment_ids == segment_ids[:, -1:]
    A = jnp.einsum("bthn,bihn,btihn->bthi", r, k, jnp.exp(expo)) * mask[:, :, None, :]  # [B, t, H, i]
    o = jnp.einsum("bthi,bihp->bthp", A, v) + jnp.einsum("bthn,hn,bthn->bth", r, u, k)[..., None] * v
    before = jnp.cumsum(log_decay, axis=1) - log_decay  # [B, L, H, N], sum_{s<t}
    if initial_state is not None:
        r0 = r * jnp.exp(before) * first[:, :, None, None]
        o = o + jnp.einsum("bthn,bhnp->bthp", r0, initial_state)
    if not return_state:
        return o
    after = jnp.sum(log_decay, axis=1, keepdims=True) - jnp.cumsum(log_decay, axis=1)  # [B, L, H, N], sum_{s>i}
    S = jnp.einsum("bihn,bihp->bhnp", k * jnp.exp(after) * last[:, :, None, None], v)
    if initial_state is not None:
        whole = (first & last).all(axis=1)[:, None, None, None]  # [B, 1, 1, 1]
        S = S + whole * jnp.exp(jnp.sum(log_decay, axis=1))[..., None] * initial_state
    return o, S
