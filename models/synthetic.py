"""Synthetic sequence tasks that separate attention from recurrent models; pure JAX from a key.

Every generator returns ``{"inputs": int32 [B, L], "targets": int32 [B, L], "mask": bool [B, L]}``:
the model reads ``inputs`` causally and its prediction at position t is scored against
``targets[:, t]`` where ``mask[:, t]`` (targets are aligned with the inputs, not shifted).
The generators are jitted with their sizes static (pass them by keyword or position).

* :func:`mqar`: multi-query associative recall (Arora et al. 2023, "Zoology", §3): ``K`` key-value
  pairs up front, keys from the lower half of the vocabulary and values from the upper half; then
  the keys are queried again at positions drawn from a power law favouring short gaps; all other
  positions hold token 0 (Zoology's Figure 2 configs, ``random_non_queries=False``) or random tokens of the
  whole vocabulary (its generator's default). At each query the answer is the value that followed that key.
* :func:`selective_copying`: the Mamba paper's selective copying (Gu & Dao 2023, §4.1.1, Fig. 2):
  ``num_tokens`` data tokens scattered at random positions among noise tokens, then as many marker
  tokens; at the i-th marker the answer is the i-th data token. Solving it needs content-aware
  (selective) state updates: a time-invariant SSM cannot skip the noise.
* :func:`induction_heads`: the Mamba paper's induction heads (§4.1.2; Olsson et al. 2022): random
  tokens with one occurrence of a trigger token followed by the answer; the sequence ends with the
  trigger again and the answer is the token that followed its first occurrence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["MARKER", "NOISE", "TRIGGER", "induction_heads", "mqar", "selective_copying"]

NOISE, MARKER = 0, 1  # selective copying: data tokens are 2..V-1
TRIGGER = 0  # induction heads: other tokens are 1..V-1


def _check(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def _scatter_rows(base: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """``base[b, cols[b, k]] = values[b, k]`` for every row b ([B, L], [B, K], [B, K])."""
    rows = jnp.arange(base.shape[0])[:, None]
    return base.at[rows, cols].set(values)


def _choose_rows(key: jax.Array, batch: int, population: int, k: int, p=None) -> jax.Array:
    """[B, k] distinct draws from ``range(population)`` per row, with probabilities ``p`` (default
    uniform): the Gumbel-top-k trick, exactly sequential sampling without replacement (Kool et al. 2019)."""
    logits = jnp.zeros(population) if p is None else jnp.log(p)
    perturbed = logits + jax.random.gumbel(key, (batch, population))  # [B, population]
    return jax.lax.top_k(perturbed, k)[1]


@functools.partial(jax.jit, static_argnames=("batch", "seq_len", "num_kv_pairs", "vocab_size", "power_a",
                                             "random_non_queries"))
def mqar(key: jax.Array, batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
         power_a: float = 0.01, random_non_queries: bool = True) -> dict[str, jax.Array]:
    """Zoology's MQAR batch. Layout of a row (K = num_kv_pairs)::

        k_1 v_1 k_2 v_2 ... k_K v_K | query region of seq_len - 2K tokens: k_i at offset 2 g_i, noise elsewhere

    Keys are distinct draws from ``1 .. V/2 - 1``, values from ``V/2 .. V - 1``; the gaps ``g_i`` are
    distinct draws from ``0 .. (seq_len - 2K) / 2 - 1`` with ``P(g) ∝ (g + 1)^(power_a - 1)``.
    ``targets`` holds the value at each query position. The other positions of the query region hold random
    tokens of the whole vocabulary with ``random_non_queries`` (a queried key may then also appear as noise
    before its query, followed by a token that is not its value: rare at Zoology's 8192 tokens, frequent at a
    few dozen), else token 0, which is never a key or a value (Zoology's paper configs).
    """
    for name, value, low in (("batch", batch, 1), ("num_kv_pairs", num_kv_pairs, 1), ("vocab_size", vocab_size, 4)):
        _check(name, value, low)
    K, half = num_kv_pairs, vocab_size // 2
    if seq_len < 4 * K:
        raise ValueError(f"seq_len={seq_len!r} must be >= 4 * num_kv_pairs = {4 * K}")
    if half - 1 < K:
        raise ValueError(f"vocab_size={vocab_size} has {half - 1} keys, fewer than num_kv_pairs={K}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a={power_a!r} must be in (0, 1]")
    if not isinstance(random_non_queries, bool):
        raise ValueError(f"random_non_queries={random_non_queries!r} must be a bool")
    k_keys, k_values, k_gaps, k_noise = jax.random.split(key, 4)
    keys = 1 + _choose_rows(k_keys, batch, half - 1, K)  # [B, K]
    values = half + _choose_rows(k_values, batch, vocab_size - half, K)  # [B, K]
    context = jnp.stack([keys, values], axis=-1).reshape(batch, 2 * K)  # [B, 2K]
    space = (seq_len - 2 * K) // 2
    g = jnp.arange(1, space + 1, dtype=jnp.float32)
    p = power_a * g ** (power_a - 1)
    gaps = _choose_rows(k_gaps, batch, space, K, p / p.sum())  # [B, K]
    query_pos = 2 * K + 2 * gaps  # [B, K]
    noise = (jax.random.randint(k_noise, (batch, seq_len), 0, vocab_size) if random_non_queries
             else jnp.zeros((batch, seq_len), jnp.int32))  # [B, L]
    inputs = jnp.concatenate([context, noise[:, 2 * K:]], axis=1)  # [B, L]
    inputs = _scatter_rows(inputs, query_pos, keys)
    targets = _scatter_rows(jnp.zeros((batch, seq_len), jnp.int32), query_pos, values)
    mask = _scatter_rows(jnp.zeros((batch, seq_len), bool), query_pos, jnp.ones_like(keys, bool))
    return {"inputs": inputs.astype(jnp.int32), "targets": targets, "mask": mask}


@functools.partial(jax.jit, static_argnames=("batch", "seq_len", "num_tokens", "vocab_size"))
def selective_copying(key: jax.Array, batch: int, seq_len: int, num_tokens: int,
                      vocab_size: int) -> dict[str, jax.Array]:
    """Selective copying batch: the first ``seq_len - num_tokens`` positions hold ``num_tokens`` data
    tokens (from ``2 .. V-1``) at sorted random positions and ``NOISE`` elsewhere; the last
    ``num_tokens`` positions hold ``MARKER``, where the targets are the data tokens in order."""
    for name, value, low in (("batch", batch, 1), ("num_tokens", num_tokens, 1), ("vocab_size", vocab_size, 3)):
        _check(name, value, low)
    context = seq_len - num_tokens
    if context < num_tokens:
        raise ValueError(f"seq_len={seq_len!r} must be >= 2 * num_tokens = {2 * num_tokens}")
    k_pos, k_tok = jax.random.split(key)
    positions = jnp.sort(_choose_rows(k_pos, batch, context, num_tokens), axis=1)  # [B, T]
    data = jax.random.randint(k_tok, (batch, num_tokens), 2, vocab_size)  # [B, T]
    inputs = jnp.full((batch, seq_len), NOISE, jnp.int32).at[:, context:].set(MARKER)
    inputs = _scatter_rows(inputs, positions, data)
    targets = jnp.zeros((batch, seq_len), jnp.int32).at[:, context:].set(data)
    mask = jnp.zeros((batch, seq_len), bool).at[:, context:].set(True)
    return {"inputs": inputs, "targets": targets, "mask": mask}


@functools.partial(jax.jit, static_argnames=("batch", "seq_len", "vocab_size"))
def induction_heads(key: jax.Array, batch: int, seq_len: int, vocab_size: int) -> dict[str, jax.Array]:
    """Induction-heads batch: tokens from ``1 .. V-1``, ``TRIGGER`` at a random position p <= L - 3
    followed by the answer, and ``TRIGGER`` again at L - 1, where the target is the answer."""
    for name, value, low in (("batch", batch, 1), ("seq_len", seq_len, 4), ("vocab_size", vocab_size, 3)):
        _check(name, value, low)
    k_tok, k_pos = jax.random.split(key)
    inputs = jax.random.randint(k_tok, (batch, seq_len), 1, vocab_size)  # [B, L]
    p = jax.random.randint(k_pos, (batch, 1), 0, seq_len - 2)  # [B, 1]
    answer = jnp.take_along_axis(inputs, p + 1, axis=1)  # [B, 1]
    inputs = _scatter_rows(inputs, p, jnp.full_like(p, TRIGGER)).at[:, -1].set(TRIGGER)
    targets = jnp.zeros((batch, seq_len), jnp.int32).at[:, -1].set(answer[:, 0])
    mask = jnp.zeros((batch, seq_len), bool).at[:, -1].set(True)
    return {"inputs": inputs.astype(jnp.int32), "targets": targets, "mask": mask}
