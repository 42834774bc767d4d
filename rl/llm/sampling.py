"""The policy's side of post-training: sample responses with a KV cache, score them with a full forward pass.

    roll = sample(model, params, prompts, key, max_new_tokens=5)      # jitted, cached per shape
    roll.tokens [B, Lp + R], roll.response [B, R], roll.mask [B, R], roll.logps [B, R]
    logps = response_logprobs(model, params, roll.tokens, prompt_len)  # the same numbers, teacher-forced

:func:`rollout` prefills :meth:`jaxlab.models.lm.LM.decode`'s cache with the prompt and decodes one
token per step in a ``lax.scan`` (as :func:`jaxlab.models.lm.generate` does), and additionally records
``log pi(token)`` of the untempered policy, stops each row at its first EOS (later tokens are PAD with
mask 0 and logp 0) and returns the response mask. It is a plain function, so the RL steps call it
inside their own jitted program; :func:`sample` is the jitted entry point for host code.
A fixed key gives the same samples; step ``i`` uses ``fold_in(key, i)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxlab.models.lm import LM, LMConfig
from jaxlab.rl.llm.losses import token_logprobs
from jaxlab.rl.llm.task import EOS, PAD

__all__ = ["Rollout", "hidden_states", "response_logprobs", "rollout", "sample"]


@struct.dataclass
class Rollout:
    """Sampled responses: ``tokens`` [B, Lp + R] (prompt then response), ``response`` [B, R],
    ``mask`` [B, R] (1 through the first EOS), ``logps`` [B, R] (log pi of each sampled token, 0 after EOS)."""

    tokens: jax.Array
    response: jax.Array
    mask: jax.Array
    logps: jax.Array


def rollout(model: LM, params, prompts: jax.Array, key: jax.Array, max_new_tokens: int,
            temperature: float | jax.Array = 1.0) -> Rollout:
    """Sample ``max_new_tokens`` tokens after prompts [B, Lp] (traceable; see :func:`sample`).

    Tokens are drawn from ``softmax(logits / temperature)`` (argmax at temperature 0); ``logps`` are
    always those of the policy itself, ``log softmax(logits)``, which is the behaviour policy at
    temperature 1.
    """
    B, Lp = prompts.shape
    cache = model.init_cache(B, Lp + max_new_tokens)
    logits, cache = model.apply({"params": params}, prompts, cache, method=LM.decode)  # prefill
    temperature = jnp.asarray(temperature, jnp.float32)

    def step(carry, i):
        last_logits, cache, done = carry  # [B, V], cache, [B] bool
        logp_all = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)  # [B, V]
        sampled = jax.random.categorical(jax.random.fold_in(key, i), logp_all / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logp_all, axis=-1)).astype(jnp.int32)
        token = jnp.where(done, PAD, token)  # [B]
        logp = jnp.where(done, 0.0, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0])
        live = (~done).astype(jnp.float32)
        done = done | (token == EOS)
        logits, cache = model.apply({"params": params}, token[:, None], cache, method=LM.decode)
        return (logits[:, 0], cache, done), (token, logp, live)

    init = (logits[:, -1], cache, jnp.zeros((B,), bool))
    _, (response, logps, mask) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    response, logps, mask = response.T, logps.T, mask.T  # [B, R]
    return Rollout(jnp.concatenate([prompts, response], axis=1), response, mask, logps)


@functools.lru_cache(maxsize=32)
def _sample_fn(cfg: LMConfig, max_new_tokens: int):
    model = LM(cfg)
    return jax.jit(lambda params, prompts, key, temperature: rollout(model, params, prompts, key, max_new_tokens,
                                                                     temperature))


def sample(model: LM, params, prompts: jax.Array, key: jax.Array, max_new_tokens: int,
           temperature: float = 1.0) -> Rollout:
    """:func:`rollout`, jitted once per (config, response length, prompt shape); temperature is traced."""
    if getattr(prompts, "ndim", None) != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be an int array [B, Lp], got {getattr(prompts, 'shape', prompts)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if prompts.shape[1] + max_new_tokens > model.cfg.max_len:
        raise ValueError(f"prompt length {prompts.shape[1]} + {max_new_tokens=} exceeds max_len={model.cfg.max_len}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0")
    return _sample_fn(model.cfg, max_new_tokens)(params, jnp.asarray(prompts, jnp.int32), key,
                                                  jnp.float32(temperature))


def response_logprobs(model: LM, params, tokens: jax.Array, prompt_len: int) -> jax.Array:
    """Teacher-forced ``log pi(tokens[:, t] | tokens[:, :t])`` for the response ``t >= prompt_len``: [B, R].

    Position ``t - 1``'s logits score token ``t`` (mask the result with the response mask)."""
    logits, _ = model.apply({"params": params}, tokens)  # [B, L, V]
    return token_logprobs(logits[:, prompt_len - 1:-1], tokens[:, prompt_len:])  # [B, R]


def hidden_states(model: LM, params, tokens: jax.Array) -> jax.Array:
    """The final-norm output of the LM (the features its head reads): tokens [B, L] -> [B, L, d_model].

    Read with flax's ``capture_intermediates``, so reward and value heads sit on an unmodified ``LM``."""
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"],
                           capture_intermediates=lambda module, name: module.name == "final_norm")
    return state["intermediates"]["final_norm"]["__call__"][0]
