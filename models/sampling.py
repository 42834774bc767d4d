"""The one sampler of :class:`~jaxlab.models.lm.LM`: KV-cache decoding with temperature, top-k and top-p
(nucleus) filtering, stopping at EOS, and the log-probabilities RL needs.

    out = sample(model, params, prompts, key, max_new_tokens=32, temperature=0.8, top_p=0.95, eos_id=EOS)
    out.tokens [B, Lp + R]      prompt then response
    out.response [B, R]         sampled tokens; PAD after each row's first EOS
    out.mask [B, R]             1 up to and including the first EOS, 0 on the padding after it
    out.logps [B, R]            log q(y_t): the filtered, tempered distribution each token was drawn from
    out.model_logps [B, R]      log pi(y_t | y_<t, x) of the model itself (temperature 1, no filtering)
    logps = response_logprobs(model, params, out.tokens, Lp)  # = out.model_logps, teacher-forced

Decoding prefills :meth:`~jaxlab.models.lm.LM.decode`'s cache with the whole prompt in one call, then
decodes one token per step in a ``lax.scan`` (a KV cache for attention, a ring buffer for sliding
windows, a constant-size state for the recurrent mixers). Token ``t`` of the response is drawn with
``fold_in(key, t)``, so a fixed key gives the same sample.

The distribution of token ``t``, from the model's logits ``z`` (fp32):

1. temperature: ``z' = log softmax(z) / T`` (``T = 0`` is greedy: the argmax, with log q = 0);
2. top-k: entries below the k-th largest are removed (ties with it are kept);
3. top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", section 3.1): the smallest
   set of most likely tokens whose probability under the renormalised ``softmax(z')`` reaches ``p`` is
   kept (ties broken by token id), the rest removed;
4. ``q = softmax(z')`` over what is left.

``logps`` are ``log q`` of the sampled tokens, the distribution actually sampled from (what an
importance weight against the sampler needs); ``model_logps`` are ``log pi = log softmax(z)``, the
policy's own log-probabilities, which PPO's and GRPO's ratios use (at ``T = 1`` without filtering the
two are the same distribution). Both are 0 after EOS. :func:`sample` is jitted once per (config,
response length, ``top_k``, whether ``top_p`` and ``eos_id`` are given) and per shape; the temperature,
``top_p``, ``eos_id`` and ``pad_id`` are traced, so changing them does not recompile. It may be called
inside another jitted function (the RL steps sample inside their own step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.models.lm import LM, LMConfig, token_logprobs

__all__ = ["Sample", "decode_tokens", "draw_token", "response_logprobs", "sample", "sampling_logits"]


@struct.dataclass
class Sample:
    """Sampled continuations of a batch of prompts (a pytree: it passes through ``jit``)."""

    tokens: jax.Array
    """[B, Lp + R] int32: the prompt, then the response."""
    response: jax.Array
    """[B, R] int32: the sampled tokens, ``pad_id`` after each row's first EOS."""
    logps: jax.Array
    """[B, R] fp32: ``log q`` of each sampled token under the distribution it was drawn from (after
    temperature, top-k and top-p); 0 after EOS and everywhere at temperature 0."""
    mask: jax.Array
    """[B, R] fp32: 1 up to and including the first EOS (everywhere without ``eos_id``), 0 after."""
    model_logps: jax.Array
    """[B, R] fp32: ``log softmax(logits)`` of each sampled token, the model's own log-probability
    (temperature 1, no filtering; equal to :func:`response_logprobs`); 0 after EOS."""


def sampling_logits(logits: jax.Array, temperature: float | jax.Array = 1.0, top_k: int | None = None,
                    top_p: float | jax.Array | None = None) -> jax.Array:
    """Logits [..., V] of the distribution :func:`sample` draws from at ``temperature > 0``: the model's
    log-probabilities divided by the temperature, ``-inf`` outside the top-k and the top-p nucleus.
    ``log_softmax`` of the result is ``log q``."""
    scaled = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) / jnp.maximum(temperature, 1e-6)  # [..., V]
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]  # [..., 1]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p is not None:
        order = jnp.argsort(-scaled, axis=-1, stable=True)  # most likely first, ties by token id
        probs = jnp.take_along_axis(jax.nn.softmax(scaled, axis=-1), order, axis=-1)  # [..., V], sorted
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = (before < top_p) | (top_p >= 1.0)  # the smallest prefix whose mass reaches top_p
        keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)  # back to token order
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return scaled


def _check(model: LM, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id) -> None:
    cfg = model.cfg
    if getattr(prompts, "ndim", None) != 2 or prompts.shape[1] < 1 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be a non-empty int array [B, Lp], got {getattr(prompts, 'shape', prompts)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if prompts.shape[1] + max_new_tokens > cfg.max_len:
        raise ValueError(f"prompt length {prompts.shape[1]} + {max_new_tokens=} exceeds max_len={cfg.max_len}")
    concrete = lambda x: not isinstance(x, jax.core.Tracer)  # noqa: E731
    if concrete(temperature) and not float(temperature) >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"top_k={top_k!r} must be None or an int in [1, vocab_size={cfg.vocab_size}]")
    if top_p is not None and concrete(top_p) and not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < cfg.vocab_size):
            raise ValueError(f"{name}={value!r} must be None or a token id in [0, vocab_size={cfg.vocab_size})")


def draw_token(logits: jax.Array, key: jax.Array, t, done: jax.Array, *, temperature, top_k: int | None = None,
               top_p=None, eos_id=None, pad_id=0):
    """Token ``t`` of every row from the logits [B, V] that predict it, drawn with ``fold_in(key, t)`` (one
    ``categorical`` over the whole batch); rows already ``done`` [B] give ``pad_id``. Returns ``(token [B] int32,
    logp, model_logp, live [B] fp32, done)``: ``live`` is 1 where the row was not done before this token, ``done``
    is updated with ``token == eos_id`` (never, for ``eos_id=None``). The step of :func:`sample` (and of
    :mod:`jaxlab.rl.llm.partial_rollout`, which continues it in segments)."""
    logits = logits.astype(jnp.float32)
    model_logp = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    filtered = sampling_logits(logits, temperature, top_k, top_p)  # [B, V]
    drawn = jax.random.categorical(jax.random.fold_in(key, t), filtered, axis=-1)
    greedy = temperature <= 0
    token = jnp.where(greedy, jnp.argmax(model_logp, axis=-1), drawn).astype(jnp.int32)  # [B]
    token = jnp.where(done, pad_id, token)
    gather = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]  # noqa: E731
    logp = jnp.where(done | greedy, 0.0, gather(jax.nn.log_softmax(filtered, axis=-1)))
    model_logp = jnp.where(done, 0.0, gather(model_logp))
    live = (~done).astype(jnp.float32)
    if eos_id is not None:
        done = done | (token == eos_id)
    return token, logp, model_logp, live, done


def decode_tokens(pick, next_logits, logits: jax.Array, cache, max_new_tokens: int):
    """The decoding loop after a prefill: token 0 is ``pick(logits, 0, done)`` from the prompt's last logits
    [B, V], then each token ``t`` is picked from ``next_logits(token_{t-1} [B], cache) -> (logits [B, V], cache)``
    in a ``lax.scan``; ``pick`` is :func:`draw_token` with its options bound. Returns ``(response, logps,
    model_logps, mask)``, each [B, R]."""
    first = pick(logits, 0, jnp.zeros((logits.shape[0],), bool))

    def step(carry, t):
        token, cache, done = carry  # token t - 1 [B], its cache, [B] bool
        logits, cache = next_logits(token, cache)
        token, logp, model_logp, live, done = pick(logits, t, done)
        return (token, cache, done), (token, logp, model_logp, live)

    _, rest = jax.lax.scan(step, (first[0], cache, first[4]), jnp.arange(1, max_new_tokens))
    return tuple(jnp.concatenate([a[:, None], b.T], axis=1) for a, b in zip(first[:4], rest))  # [B, R] each


@functools.lru_cache(maxsize=64)
def _sample_fn(cfg: LMConfig, max_new_tokens: int, top_k: int | None, nucleus: bool, stops: bool):
    """The jitted sampler of one configuration and response length; temperature, top_p, the EOS and the
    padding token are traced."""
    model = LM(cfg)

    def run(params, prompts, key, temperature, top_p, eos_id, pad_id):
        B, Lp = prompts.shape

        def pick(logits, t, done):
            return draw_token(logits, key, t, done, temperature=temperature, top_k=top_k,
                              top_p=top_p if nucleus else None, eos_id=eos_id if stops else None, pad_id=pad_id)

        cache = model.init_cache(B, Lp + max_new_tokens)
        logits, cache = model.apply({"params": params}, prompts, cache, method=LM.decode)  # prefill

        def next_logits(token, cache):  # token [B] -> the logits [B, V] after it
            logits, cache = model.apply({"params": params}, token[:, None], cache, method=LM.decode)
            return logits[:, 0], cache

        response, logps, model_logps, mask = decode_tokens(pick, next_logits, logits[:, -1], cache, max_new_tokens)
        return Sample(jnp.concatenate([prompts, response], axis=1), response, logps, mask, model_logps)

    return jax.jit(run)


def sample(model: LM, params, prompts: jax.Array, key: jax.Array, max_new_tokens: int, *,
           temperature: float | jax.Array = 1.0, top_k: int | None = None, top_p: float | jax.Array | None = None,
           eos_id: int | None = None, pad_id: int = 0) -> Sample:
    """Sample ``max_new_tokens`` tokens after prompts int [B, Lp] (see the module docstring).

    Args:
      temperature: divides the log-probabilities; 0 is greedy decoding.
      top_k: keep only the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens with probability >= top_p (None: all).
      eos_id: a row stops at its first ``eos_id`` (included in the mask); later tokens are ``pad_id``
        with mask 0. None: every row runs to ``max_new_tokens``.
      pad_id: the token after EOS.
    """
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id)
    fn = _sample_fn(model.cfg, max_new_tokens, top_k, top_p is not None, eos_id is not None)
    return fn(params, jnp.asarray(prompts, jnp.int32), key, jnp.asarray(temperature, jnp.float32),
              jnp.asarray(1.0 if top_p is None else top_p, jnp.float32), jnp.int32(-1 if eos_id is None else eos_id),
              jnp.int32(pad_id))


def response_logprobs(model: LM, params, tokens: jax.Array, prompt_len: int, temperature: float = 1.0) -> jax.Array:
    """Teacher-forced ``log pi_T(tokens[:, t] | tokens[:, :t])`` of the response ``t >= prompt_len``: [B, R],
    ``pi_T = softmax(z / T)`` the policy at ``temperature`` T (the distribution :func:`sample` draws from at
    that temperature without top-k/top-p; T = 1: the model itself).

    One full forward pass; position ``t - 1``'s logits score token ``t``. Equal to :attr:`Sample.model_logps`
    (T = 1) or :attr:`Sample.logps` (no filtering) on the sampler's own tokens up to EOS (mask the result with
    the response mask)."""
    if not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {tokens.shape[1]}) for tokens {tokens.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    logits, _ = model.apply({"params": params}, tokens)  # [B, L, V] fp32
    if temperature != 1:
        logits = logits / temperature
    return token_logprobs(logits[:, prompt_len - 1:-1], tokens[:, prompt_len:])  # [B, R]
