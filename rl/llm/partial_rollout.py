"""Partial rollouts (Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning with LLMs", section 2.6.2):
a rollout generates at most a fixed budget of new tokens per call, and an unfinished one is saved and continued
later from its state, without generating its earlier segment again.

    state = start_rollout(model, params, prompts, key, max_new_tokens=64, temperature=1.0, eos_id=EOS)
    while not bool(jnp.all(finished(state))):
        state = continue_rollout(model, params, state, budget=16)   # at most 16 more tokens per row
    out = to_sample(state)                                          # a models.sampling.Sample

The state (:class:`PartialRollout`, a pytree) holds the prompt and the response so far, the KV cache (or the
recurrent mixers' state) after the last token fed to the model, the logits that predict the next token, the
per-row EOS flags, the response position ``t`` and the log-probabilities and mask so far. Token ``t`` is drawn
exactly as :func:`jaxlab.models.sampling.sample` draws it (:func:`~jaxlab.models.sampling.draw_token` from
``fold_in(key, t)``, one ``categorical`` over the batch), so with the same key and parameters continuing in
segments of any budget gives the tokens and log-probabilities of one uninterrupted ``sample`` call.

The key is the rollout's, one for all its rows: ``sample`` draws row ``b``'s token ``t`` as row ``b`` of one
draw over the whole batch from ``fold_in(key, t)``, so a row's tokens depend on the batch it was started in,
and the rows of a rollout advance together (one position ``t``; the cache has one stream position). A rollout
is therefore continued as a whole; finished rows emit ``pad_id`` with mask 0 until the others are done.

:func:`start_rollout` prefills the cache with the whole prompt in one ``LM.decode`` call (as ``sample`` does)
and draws nothing; :func:`continue_rollout` draws up to ``budget`` tokens in a jitted ``lax.scan`` of that
static length (no Python loop per token), each step drawing token ``t`` from the stored logits, then feeding
it to the model for the logits of ``t + 1``; once ``t`` reaches ``max_new_tokens`` the remaining steps do
nothing. A continuation may use other parameters than the start (the policy changed between two iterations):
the new tokens are then drawn from the new parameters given the cache the old ones wrote, and their log-probs
are those of that distribution, the one actually sampled from (what an importance ratio against the sampler
needs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlab.models.lm import LM, LMCache, LMConfig
from jaxlab.models.sampling import Sample, _check, draw_token
from jaxlab.rl.llm.grpo import GRPOSpec, make_grpo_learner
from jaxlab.rl.llm.task import Task, TextTask
from jaxlab.train_state import TrainState

__all__ = ["PartialGRPOState", "PartialRollout", "RolloutPool", "continue_rollout", "finished",
           "make_partial_grpo_step", "start_rollout", "to_sample", "with_rollout_pool"]


@struct.dataclass
class PartialRollout:
    """A rollout in progress (a pytree: it passes through ``jit`` and checkpoints as arrays)."""

    tokens: jax.Array
    """[B, Lp + R] int32: the prompt, then the response so far (``pad_id`` at the positions not drawn yet)."""
    logps: jax.Array
    """[B, R] fp32: ``log q`` of each drawn token (:attr:`jaxlab.models.sampling.Sample.logps`); 0 elsewhere."""
    model_logps: jax.Array
    """[B, R] fp32: the model's own log-probability of each drawn token; 0 elsewhere."""
    mask: jax.Array
    """[B, R] fp32: 1 on the drawn tokens up to and including each row's first EOS, 0 elsewhere."""
    cache: LMCache
    """The model's decoding state after the prompt and the response's first ``t`` tokens."""
    logits: jax.Array
    """[B, V] fp32: the logits that predict response token ``t``."""
    done: jax.Array
    """[B] bool: the row has drawn its EOS."""
    t: jax.Array
    """int32 scalar: response tokens drawn so far (the position of the next one), at most R."""
    key: jax.Array
    """The rollout's key: token ``t`` is drawn from ``fold_in(key, t)``."""
    temperature: jax.Array
    """fp32 scalar: the sampling temperature (0: greedy)."""
    eos_id: jax.Array
    """int32 scalar: the token that ends a row (-1: none, every row runs to R)."""
    pad_id: jax.Array
    """int32 scalar: the token after EOS and at the positions not drawn yet."""

    @property
    def max_new_tokens(self) -> int:
        """R, the response budget of the whole rollout."""
        return self.mask.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.mask.shape[1]


def finished(state: PartialRollout) -> jax.Array:
    """[B] bool: the row has drawn its EOS or all ``max_new_tokens`` tokens."""
    return state.done | (state.t >= state.max_new_tokens)


def to_sample(state: PartialRollout) -> Sample:
    """The rollout so far as a :class:`~jaxlab.models.sampling.Sample` (equal to ``sample``'s once
    :func:`finished`; before that, the positions not drawn yet are ``pad_id`` with mask 0)."""
    return Sample(state.tokens, state.tokens[:, state.prompt_len:], state.logps, state.mask, state.model_logps)


@functools.lru_cache(maxsize=32)
def _start_fn(cfg: LMConfig, max_new_tokens: int):
    model = LM(cfg)

    def run(params, prompts, key, temperature, eos_id, pad_id):
        B, Lp = prompts.shape
        cache = model.init_cache(B, Lp + max_new_tokens)
        logits, cache = model.apply({"params": params}, prompts, cache, method=LM.decode)  # prefill
        zeros = jnp.zeros((B, max_new_tokens), jnp.float32)
        tokens = jnp.concatenate([prompts, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], axis=1)
        return PartialRollout(tokens, zeros, zeros, zeros, cache, logits[:, -1].astype(jnp.float32),
                              jnp.zeros((B,), bool), jnp.zeros((), jnp.int32), key, temperature, eos_id, pad_id)

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _continue_fn(cfg: LMConfig, budget: int):
    model = LM(cfg)

    def run(params, state: PartialRollout) -> PartialRollout:
        R, Lp = state.max_new_tokens, state.prompt_len

        def draw(s: PartialRollout) -> PartialRollout:
            token, logp, model_logp, live, done = draw_token(
                s.logits, s.key, s.t, s.done, temperature=s.temperature, eos_id=s.eos_id, pad_id=s.pad_id)
            put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v[:, None], s.t, axis=1)  # noqa: E731
            s = s.replace(tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], Lp + s.t, axis=1),
                          logps=put(s.logps, logp), model_logps=put(s.model_logps, model_logp),
                          mask=put(s.mask, live), done=done, t=s.t + 1)

            def feed(s):  # the logits of token t + 1 (not needed after the last token)
                logits, cache = model.apply({"params": params}, token[:, None], s.cache, method=LM.decode)
                return s.replace(logits=logits[:, 0].astype(jnp.float32), cache=cache)

            return jax.lax.cond(s.t < R, feed, lambda s: s, s)

        def step(s, _):
            return jax.lax.cond(s.t < R, draw, lambda s: s, s), None

        state, _ = jax.lax.scan(step, state, None, length=budget)
        return state

    return jax.jit(run)


def start_rollout(model: LM, params, prompts: jax.Array, key: jax.Array, max_new_tokens: int, *,
                  temperature: float | jax.Array = 1.0, eos_id: int | None = None, pad_id: int = 0) -> PartialRollout:
    """A rollout of up to ``max_new_tokens`` tokens after prompts int [B, Lp]: the prompt prefilled, nothing
    drawn yet (``t = 0``). Arguments as :func:`jaxlab.models.sampling.sample`'s (no top-k/top-p)."""
    _check(model, prompts, max_new_tokens, temperature, None, None, eos_id, pad_id)
    return _start_fn(model.cfg, max_new_tokens)(params, jnp.asarray(prompts, jnp.int32), key,
                                                jnp.asarray(temperature, jnp.float32),
                                                jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id))


def continue_rollout(model: LM, params, state: PartialRollout, budget: int) -> PartialRollout:
    """Draw up to ``budget`` more tokens of every row (fewer when ``t`` reaches ``max_new_tokens``); jitted
    once per model configuration and budget (``params`` may differ from the start's)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive int")
    if not isinstance(state, PartialRollout):
        raise TypeError(f"state must be a PartialRollout (from start_rollout), got {type(state).__name__}")
    if state.logits.shape[-1] != model.cfg.vocab_size:
        raise ValueError(f"the rollout's logits have {state.logits.shape[-1]} entries, the model's vocab_size is "
                         f"{model.cfg.vocab_size}: the state was started with another model")
    return _continue_fn(model.cfg, budget)(params, state)


# ---- GRPO on partial rollouts -----------------------------------------------------------------------
@struct.dataclass
class RolloutPool:
    """GRPO's rollouts in flight: ``N`` groups of ``G`` rows (groups contiguous) started together."""

    rollout: PartialRollout
    """[N * G] rows."""
    answers: jax.Array
    """[N * G, Ra] int32: the answers the rows are verified against."""
    trained: jax.Array
    """[N] bool: the group has been trained on (all True: the pool is spent, the next step starts a new one)."""


class PartialGRPOState(TrainState):
    """The GRPO stage's train state with its :class:`RolloutPool`: the loop checkpoints the pool with the
    parameters, so a resumed run continues the rollouts in flight exactly where an uninterrupted one would."""

    pool: RolloutPool = struct.field(pytree_node=True, default=None)


def with_rollout_pool(state: TrainState, model: LM, task: Task | TextTask, spec: GRPOSpec,
                      num_prompts: int) -> PartialGRPOState:
    """``state`` with a spent pool for ``num_prompts`` groups of ``spec.group_size`` rows (zeros of the pool's
    shapes, every group trained: the first step starts the first rollouts)."""
    rows = num_prompts * spec.group_size
    shapes = jax.eval_shape(lambda p: start_rollout(model, p, jnp.zeros((rows, task.prompt_len), jnp.int32),
                                                    jax.random.PRNGKey(0), spec.max_new_tokens,
                                                    temperature=spec.temperature, eos_id=task.eos_id,
                                                    pad_id=task.pad_id), state.params)
    rollout = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    pool = RolloutPool(rollout, jnp.zeros((rows, task.answer_len), jnp.int32), jnp.ones((num_prompts,), bool))
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return PartialGRPOState(**fields, pool=pool)


def make_partial_grpo_step(model: LM, task: Task | TextTask, spec: GRPOSpec,
                           optimizer: optax.GradientTransformation) -> Callable:
    """GRPO on partial rollouts (Kimi k1.5, section 2.6.2): ``train_step(state, batch, key) -> (state,
    metrics)`` with ``state`` a :class:`PartialGRPOState` and the batch of :func:`jaxlab.rl.llm.grpo.make_grpo_step`.

    Each step

    1. starts a new pool from the batch's ``N`` prompts (each ``G`` times, drawn with ``key``) when every group of
       the pool has been trained on, else keeps the pool (that step's problems go unused);
    2. advances every rollout of the pool by ``spec.rollout_budget`` tokens (:func:`continue_rollout`, with the
       current policy; the earlier segments and their cache are reused, not generated again);
    3. trains on the groups whose ``G`` rollouts have all finished (EOS or ``max_new_tokens``) and that have not
       been trained on yet (:func:`~jaxlab.rl.llm.grpo.make_grpo_learner` with ``ready``: the other groups leave
       the loss and its normaliser), or makes no update when there is none (the step counter still advances);
    4. marks those groups trained; unfinished ones carry over in the state to the next step.

    The loss covers every token of a finished response with the log-probability it was drawn with: the
    segments drawn by earlier policies are off-policy samples whose ratio against the sampler is clipped as any
    other's. The paper reuses the earlier segments from its replay buffer ("only the current iteration requires
    on-policy computation") and says that "certain segments can be excluded from loss computation" without
    saying which, so none is excluded here. The rows of a pool share one cache position, so a finished group's
    rows cannot take a new problem while the others decode: a new pool starts when the whole pool is spent.
    With ``rollout_budget >= max_new_tokens`` every step starts, finishes and trains on a whole pool: the plain
    GRPO step exactly (same tokens, same update).

    Metrics: the GRPO step's (over the groups trained on; 0 on a step without update), plus ``trained_groups``,
    ``unfinished_groups`` (in flight after the step) and ``rollout_t`` (the pool's response position)."""
    G, R, budget = spec.group_size, spec.max_new_tokens, spec.rollout_budget
    learn = make_grpo_learner(model, task, dataclasses.replace(spec, rollout_budget=0), optimizer)

    def train_step(state: PartialGRPOState, batch: dict, key: jax.Array):
        N = batch["prompts"].shape[0]
        if state.pool is None or state.pool.trained.shape != (N,):
            raise ValueError(f"the state's rollout pool holds "
                             f"{None if state.pool is None else state.pool.trained.shape[0]} groups, the batch {N} "
                             "prompts: build the state with with_rollout_pool(state, ..., num_prompts=N)")

        def fresh(_):
            prompts = jnp.repeat(batch["prompts"], G, axis=0)  # [N * G, Lp], groups contiguous
            rollout = start_rollout(model, state.params, prompts, key, R, temperature=spec.temperature,
                                    eos_id=task.eos_id, pad_id=task.pad_id)
            return RolloutPool(rollout, jnp.repeat(batch["answers"], G, axis=0), jnp.zeros((N,), bool))

        pool = jax.lax.cond(jnp.all(state.pool.trained), fresh, lambda _: state.pool, None)
        rollout = continue_rollout(model, state.params, pool.rollout, budget)
        done = jnp.all(finished(rollout).reshape(N, G), axis=1)  # [N]
        ready = done & ~pool.trained

        def update(inner):
            return learn(inner, to_sample(rollout), pool.answers, batch["ref_params"], key, ready)

        def skip(inner):
            _, shapes = jax.eval_shape(update, inner)
            return inner.replace(step=inner.step + 1), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        inner, metrics = jax.lax.cond(jnp.any(ready), update, skip, state.replace(pool=None))
        metrics.update(trained_groups=jnp.sum(ready), unfinished_groups=jnp.sum(~done), rollout_t=rollout.t)
        return inner.replace(pool=RolloutPool(rollout, pool.answers, pool.trained | ready)), metrics

    return train_step
