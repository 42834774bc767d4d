"""A Bradley-Terry reward model: the LM's backbone with a scalar head (InstructGPT's second stage,
Ouyang et al. 2022, section 3.5), trained on the verifier-labelled pairs of :mod:`jaxlab.rl.llm.dpo`.

Parameters are ``{"lm": <LM params>, "head": {"w": [d_model], "b": []}}``: initialised from the SFT
model with a zero head, so training starts at reward 0 everywhere. :func:`token_scores` reads the head at
every position (PPO-RLHF's critic uses the same architecture, initialised from the reward model, as in
InstructGPT); :func:`sequence_scores` reads it at each response's last token (its EOS).

Before RL the head is rescaled so that the rewards of the initial policy's own samples have mean 0 and
standard deviation 1 (:func:`normalize_reward`; Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", section 2.2): a Bradley-Terry score has no scale of its own (only differences are
trained, and they grow with training), so without it the KL coefficient's meaning would depend on how long
the reward model trained.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.models.lm import LM, LMConfig
from jaxlab.rl.llm.losses import reward_model_loss
from jaxlab.train_state import make_train_step

__all__ = ["hidden_states", "init_reward_params", "last_token_positions", "make_reward_model_step",
           "normalize_reward", "pair_accuracy", "sequence_scores", "token_scores"]


def hidden_states(model: LM, params, tokens: jax.Array) -> jax.Array:
    """The final-norm output of the LM (the features its head reads): tokens [B, L] -> [B, L, d_model].

    Read with flax's ``capture_intermediates``, so reward and value heads sit on an unmodified ``LM``."""
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"],
                           capture_intermediates=lambda module, name: module.name == "final_norm")
    return state["intermediates"]["final_norm"]["__call__"][0]


def init_reward_params(lm_params, d_model: int) -> dict:
    """Reward model parameters on the given LM backbone with a zero scalar head."""
    return {"lm": lm_params, "head": {"w": jnp.zeros((d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}


def token_scores(model: LM, params: dict, tokens: jax.Array) -> jax.Array:
    """The scalar head at every position: tokens [B, L] -> [B, L]."""
    h = hidden_states(model, params["lm"], tokens).astype(jnp.float32)  # [B, L, d]
    return h @ params["head"]["w"] + params["head"]["b"]  # [B, L]


def last_token_positions(mask: jax.Array, length: int) -> jax.Array:
    """Position [B] of each response's last unmasked token in rows of ``length`` tokens whose last ``R`` are
    the response (mask [B, R], 1 up to and including EOS); an empty response points at its first position."""
    R = mask.shape[1]
    return length - R + jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32), 1) - 1  # [B]


def sequence_scores(model: LM, params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Reward [B] of each response: the head at its last unmasked token (mask [B, R] over the last R tokens)."""
    last = last_token_positions(mask, tokens.shape[1])  # [B]
    return jnp.take_along_axis(token_scores(model, params, tokens), last[:, None], axis=1)[:, 0]


def normalize_reward(params: dict, scores) -> tuple[dict, dict]:
    """The reward model with its head rescaled so that ``scores`` (its rewards of the initial policy's
    samples, [N]) get mean 0 and standard deviation 1: ``w / s``, ``(b - m) / s``. Rankings, and so pair
    accuracy, are unchanged. Returns ``(params, {"mean": m, "std": s})``."""
    scores = np.asarray(scores, np.float64)
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"normalize_reward needs >= 2 finite scores, got {scores.size} ({scores[:4]}...)")
    m, s = float(scores.mean()), float(scores.std())
    if not s > 1e-6:
        raise ValueError(f"the reward model gives every sample the same score ({m:.4g}, std {s:.2g}): "
                         "it has learned nothing to normalise (train it longer or on more pairs)")
    head = {"w": params["head"]["w"] / s, "b": (params["head"]["b"] - m) / s}
    return {**params, "head": head}, {"mean": m, "std": s}


def make_reward_model_step(model: LM, optimizer: optax.GradientTransformation, grad_accum: int = 1):
    """``train_step(state, pairs_batch, key) -> (state, metrics)`` minimising the Bradley-Terry loss (a mean over
    pairs, accumulated over ``grad_accum`` equal microbatches)."""

    def loss_fn(params, batch, key):
        del key
        B = batch["chosen"].shape[0]
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)  # [2B, L]
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)  # [2B, R]
        scores = sequence_scores(model, params, tokens, mask)  # [2B]
        return reward_model_loss(scores[:B], scores[B:])

    return make_train_step(loss_fn, optimizer, grad_accum=grad_accum)


@functools.lru_cache(maxsize=8)
def _margins_fn(cfg: LMConfig):
    model = LM(cfg)

    def margins(params, chosen, chosen_mask, rejected, rejected_mask):
        return (sequence_scores(model, params, chosen, chosen_mask)
                - sequence_scores(model, params, rejected, rejected_mask))  # [B]

    return jax.jit(margins)


def pair_accuracy(model: LM, params: dict, pairs: dict, chunk: int = 256) -> float:
    """Share of preference pairs (``chosen``/``rejected`` tokens and masks, as from
    :func:`~jaxlab.rl.llm.dpo.preference_pairs`) that the reward model ranks right: a held-out check."""
    n = len(pairs["chosen"])
    if n == 0:
        raise ValueError("pair_accuracy needs at least one preference pair")
    fn = _margins_fn(model.cfg)
    margins = [np.asarray(fn(params, *(jnp.asarray(pairs[k][i:i + chunk]) for k in
                                       ("chosen", "chosen_mask", "rejected", "rejected_mask"))))
               for i in range(0, n, chunk)]
    return float(np.mean(np.concatenate(margins) > 0))
