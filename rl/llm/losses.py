"""Losses of LLM post-training, as pure functions of per-token or per-sequence log-probabilities.

Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary; masks are 1 on response tokens
(up to and including EOS) and 0 on padding, and nothing under ``mask = 0`` reaches a loss or a gradient.

* :func:`sequence_logprobs` - ``log pi(y | x)`` as the masked sum of the LM's token log-probabilities
  (:func:`jaxlab.models.lm.token_logprobs`).
* :func:`dpo_loss` - DPO (Rafailov et al. 2023, eq. 7) and its IPO (Azar et al. 2023) and hinge
  (SLiC, Zhao et al. 2023) variants on the implicit reward ``beta log pi / pi_ref``.
* :func:`grpo_advantages` / :func:`grpo_loss` - GRPO (Shao et al. 2024, DeepSeekMath eq. 3): group-relative
  advantages, PPO's clipped ratio and the ``k3`` KL to the reference, with the original per-sequence mean,
  a per-token mean, or Dr. GRPO's constant normaliser (Liu et al. 2025, "Understanding R1-Zero-Like Training");
  DAPO's options (Yu et al. 2025, arXiv:2503.14476, sections 3.1-3.2): clip-higher (``clip_eps_high``, a wider upper
  clip than lower) and dynamic sampling's filter (``keep``: the groups whose rewards are not all equal, from
  :func:`mixed_groups`; only they enter the loss and its normaliser).
* :func:`kimi_length_reward` - the length reward of Kimi k1.5 (Kimi Team 2025, section 2.3.3).
* :func:`mirror_descent_loss` - Kimi k1.5's online policy mirror descent (section 2.3.2): a REINFORCE step with
  the group's mean reward as baseline and a squared log-ratio tether to the sampling policy.
* :func:`reward_model_loss` - Bradley-Terry pairwise loss of a reward model (InstructGPT, Ouyang et al. 2022, eq. 1).
* :func:`masked_whiten`, :func:`masked_value_loss` - PPO-RLHF's advantage whitening and critic loss over tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.models.lm import token_logprobs
from jaxlab.rl.losses import value_loss
from jaxlab.train_state import LOSS_WEIGHT

__all__ = ["AGGREGATIONS", "DPO_LOSSES", "dpo_loss", "grpo_advantages", "grpo_loss", "kimi_length_reward",
           "masked_mean", "masked_value_loss", "masked_whiten", "mirror_descent_loss", "mixed_groups",
           "reward_model_loss", "sequence_kl", "sequence_logprobs"]

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
AGGREGATIONS = ("token-mean", "sequence-mean", "constant-norm")
sg = jax.lax.stop_gradient


def _check_same_shape(**arrays) -> None:
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def sequence_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_t mask[b, t] log softmax(logits[b, t])[tokens[b, t]]`` -> [B], on the LM's own
    :func:`~jaxlab.models.lm.token_logprobs`.

    ``logits[:, t]`` scores ``tokens[:, t]`` (the caller shifts: for an LM run on ``x``, pass
    ``logits[:, :-1]`` with ``x[:, 1:]``). Masked positions contribute exactly 0, whatever their logits.
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B, T, V] and tokens [B, T], got {logits.shape} and {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} must equal tokens shape {tokens.shape}")
    return masked_sum(token_logprobs(logits, tokens), mask, axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``sum(x * mask)`` where masked-out entries are dropped with ``where`` (a NaN/inf there stays out)."""
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over ``mask = 1`` (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def sequence_kl(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """``E_pi[log pi(y|x) - log pi_ref(y|x)]`` estimated on responses sampled from pi: the batch mean of
    ``sum_t mask (logp - ref_logp)`` over per-token log-probabilities [B, T] (with ``rows`` [B] 0/1: the mean
    over the rows set)."""
    per_sequence = masked_sum(logp - ref_logp, mask, axis=1)  # [B]
    return jnp.mean(per_sequence) if rows is None else masked_mean(per_sequence, rows)


# ---- DPO ---------------------------------------------------------------------------------------------
def dpo_loss(pi_chosen: jax.Array, pi_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             beta: float = 0.1, loss_type: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct preference optimisation on sequence log-probabilities (each [B]).

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (the difference of implicit rewards over beta):

    * ``"sigmoid"``: ``mean(-log sigmoid(beta h))`` (Rafailov et al. 2023, eq. 7); ``log 2`` at ``pi = ref``;
    * ``"ipo"``: ``mean((h - 1 / (2 beta))^2)`` (Azar et al. 2023, eq. 17, with tau = beta);
    * ``"hinge"``: ``mean(max(0, 1 - beta h))`` (SLiC-HF, Zhao et al. 2023).

    Metrics: ``reward_accuracy`` (share of pairs whose implicit reward ``beta (pi - ref)`` ranks chosen
    first), ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (means over the batch).
    """
    _check_same_shape(pi_chosen=pi_chosen, pi_rejected=pi_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if jnp.ndim(pi_chosen) != 1:
        raise ValueError(f"sequence log-probabilities must be [B], got shape {jnp.shape(pi_chosen)}")
    if not beta > 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} must be one of {DPO_LOSSES}")
    ref_chosen, ref_rejected = sg(ref_chosen), sg(ref_rejected)
    chosen_logratio = pi_chosen - ref_chosen  # [B]
    rejected_logratio = pi_rejected - ref_rejected  # [B]
    h = chosen_logratio - rejected_logratio  # [B]
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = jax.nn.relu(1.0 - beta * h)
    chosen_reward, rejected_reward = sg(beta * chosen_logratio), sg(beta * rejected_logratio)
    metrics = {"reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
               "reward_margin": jnp.mean(chosen_reward - rejected_reward),
               "chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward)}
    return jnp.mean(losses), metrics


# ---- GRPO --------------------------------------------------------------------------------------------
def _grouped(x: jax.Array, group_size: int, name: str) -> jax.Array:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if jnp.ndim(x) != 1 or x.shape[0] % group_size:
        raise ValueError(f"{name} must be [N * group_size] with contiguous groups; got shape {jnp.shape(x)} "
                         f"for {group_size=}")
    return x.reshape(-1, group_size)  # [N, G]


def grpo_advantages(rewards: jax.Array, group_size: int, scale: bool = True) -> jax.Array:
    """Group-relative advantages (Shao et al. 2024, section 4.1.2): rewards [N * G], groups contiguous.

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6)`` with the population std (ddof = 0), or only
    ``r_i - mean(r_group)`` for ``scale=False`` (Dr. GRPO: the std division up-weights near-solved and
    near-impossible prompts). A group of identical rewards gets zero advantages. Returns [N * G].
    """
    r = _grouped(jnp.asarray(rewards, jnp.float32), group_size, "rewards")  # [N, G]
    # A group of equal rewards has no signal: exactly zero, not the rounding of r - mean(r) (a reduction
    # order other than one device's leaves an ulp there, which the std division would blow up to ~1e-2).
    tied = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    centred = jnp.where(tied, 0.0, r - jnp.mean(r, axis=1, keepdims=True))
    if scale:
        var = jnp.mean(jnp.square(centred), axis=1, keepdims=True)  # population variance (ddof = 0)
        std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)  # no NaN gradient at var = 0
        centred = centred / (std + 1e-6)
    return centred.reshape(-1)


def mixed_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, section 3.2: the constraint ``0 < |{o_i correct}| < G``,
    for 0/1 accuracy rewards): 1.0 for each response [N * G] whose group's rewards are not all equal, 0.0 where
    they are (all right, all wrong: zero advantages, no signal). Groups contiguous."""
    r = _grouped(jnp.asarray(rewards, jnp.float32), group_size, "rewards")  # [N, G]
    mixed = jnp.max(r, axis=1) > jnp.min(r, axis=1)  # [N]
    return jnp.repeat(mixed.astype(jnp.float32), group_size)  # [N * G]


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
              clip_eps: float = 0.2, beta: float = 0.04, aggregation: str = "token-mean",
              clip_eps_high: float | None = None,
              keep: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's clipped objective with the ``k3`` KL penalty, negated for minimisation.

    Per token (all [B, T]; ``advantages`` [B] broadcast over tokens, or [B, T]):
    ``rho = exp(logp - old_logp)``, ``kl = exp(ref - logp) - (ref - logp) - 1`` (Schulman's ``k3``,
    non-negative and 0 where ``logp = ref``), ``l = -(min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) - beta kl)``
    with ``eps_high = clip_eps_high`` (DAPO's clip-higher, section 3.1: e.g. 0.2 / 0.28, room for low-probability
    tokens to grow) or ``clip_eps`` when it is None (symmetric, PPO's).

    ``keep`` [B] (0/1; None: every sequence): the sequences that count, DAPO's dynamic sampling (section 3.2)
    (:func:`mixed_groups`). The others leave the loss *and its normaliser* (their tokens, their KL term), so
    the loss equals the loss of the kept sequences alone: DAPO fills its batch with groups of mixed outcome by
    over-sampling, here the fixed-shape batch keeps only those, and the normaliser is theirs. No sequence
    kept: loss 0.

    ``aggregation`` reduces ``l`` under ``mask`` (times ``keep``):

    * ``"token-mean"``: ``sum(l m) / sum(m)`` over the batch (every token weighs the same; DAPO);
    * ``"sequence-mean"``: ``mean_b(sum_t l m / sum_t m)`` (GRPO's eq. 3: each response weighs the same,
      so tokens of long responses weigh less - the length bias Dr. GRPO points out); the mean over kept ``b``;
    * ``"constant-norm"``: ``sum(l m) / (B T)`` (Dr. GRPO: a constant normaliser, ``T`` the generation budget);
      ``B`` the kept sequences.

    ``old_logp``, ``ref_logp`` and ``advantages`` are constants (no gradient flows through them).
    Metrics: ``kl`` (masked mean of k3), ``clip_fraction`` (ratio outside ``[1 - eps, 1 + eps_high]``),
    ``ratio`` (masked means), ``policy_loss``.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    if jnp.ndim(logp) != 2:
        raise ValueError(f"per-token log-probabilities must be [B, T], got shape {jnp.shape(logp)}")
    if jnp.shape(advantages) not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {logp.shape}, got shape {jnp.shape(advantages)}")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps={clip_eps!r} must be > 0")
    if clip_eps_high is not None and not clip_eps_high > 0:
        raise ValueError(f"clip_eps_high={clip_eps_high!r} must be None or > 0")
    if not beta >= 0:
        raise ValueError(f"beta={beta!r} must be >= 0")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    if keep is not None and jnp.shape(keep) != logp.shape[:1]:
        raise ValueError(f"keep must be [B] = {logp.shape[:1]}, got shape {jnp.shape(keep)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    kept = jnp.ones(logp.shape[:1], jnp.float32) if keep is None else sg(jnp.asarray(keep, jnp.float32))  # [B]
    mask = mask.astype(jnp.float32) * kept[:, None]  # [B, T]: dropped sequences have no tokens
    adv = sg(advantages if advantages.ndim == 2 else advantages[:, None])  # [B, T] or [B, 1]
    log_ratio = jnp.where(mask > 0, logp - sg(old_logp), 0.0)  # [B, T]
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high) * adv)  # [B, T]
    ref_diff = jnp.where(mask > 0, sg(ref_logp) - logp, 0.0)  # [B, T]
    kl = jnp.exp(ref_diff) - ref_diff - 1.0  # [B, T], k3 >= 0
    per_token = -(surrogate - beta * kl)  # [B, T]
    num_kept = jnp.sum(kept)
    if aggregation == "token-mean":
        loss = masked_mean(per_token, mask)
    elif aggregation == "sequence-mean":
        loss = jnp.sum(kept * masked_mean(per_token, mask, axis=1)) / jnp.maximum(num_kept, 1.0)
    else:
        loss = masked_sum(per_token, mask) / (jnp.maximum(num_kept, 1.0) * per_token.shape[1])
    # the number of terms the loss is a mean over (gradient accumulation weighs microbatches by it)
    weight = jnp.sum(mask) if aggregation == "token-mean" else num_kept
    outside = (1.0 - ratio > clip_eps) | (ratio - 1.0 > high)  # |ratio - 1| > clip_eps when symmetric
    metrics = {"kl": sg(masked_mean(kl, mask)), "policy_loss": sg(-masked_mean(surrogate, mask)),
               "clip_fraction": masked_mean(outside.astype(jnp.float32), mask),
               "ratio": sg(masked_mean(ratio, mask)), LOSS_WEIGHT: sg(weight)}
    return loss, metrics


def kimi_length_reward(lengths: jax.Array, correct: jax.Array, group_size: int) -> jax.Array:
    """Kimi k1.5's length reward (Kimi Team 2025, section 2.3.3), per group of ``group_size`` responses.

    ``lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)`` within the group; a correct response
    gets ``lambda_i``, a wrong one ``min(0, lambda_i)`` (short wrong answers are not rewarded).
    All 0 when every response of the group has the same length. ``lengths``, ``correct`` [N * G] -> [N * G].
    """
    L = _grouped(jnp.asarray(lengths, jnp.float32), group_size, "lengths")  # [N, G]
    ok = _grouped(jnp.asarray(correct, jnp.float32), group_size, "correct")
    lo, hi = L.min(axis=1, keepdims=True), L.max(axis=1, keepdims=True)
    spread = hi - lo
    lam = jnp.where(spread > 0, 0.5 - (L - lo) / jnp.where(spread > 0, spread, 1.0), 0.0)
    return jnp.where(ok > 0, lam, jnp.minimum(0.0, lam)).reshape(-1)


def mirror_descent_loss(logp: jax.Array, old_logp: jax.Array, rewards: jax.Array, mask: jax.Array,
                        group_size: int, tau: float,
                        keep: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Kimi k1.5's online policy mirror descent (Kimi Team 2025, section 2.3.2), negated for minimisation.

    The iteration maximises ``E[r] - tau KL(pi || pi_i)`` against the sampling policy ``pi_i``; with ``k``
    samples per prompt and the group's mean reward ``r_bar`` for ``tau log Z``, the paper's gradient is
    ``1/k sum_j [grad log pi(y_j) (r_j - r_bar) - tau/2 grad (log pi(y_j) / pi_i(y_j))^2]``. This loss has
    exactly minus that gradient (averaged over the ``N`` prompts)::

        l_j = -(r_j - r_bar) log pi(y_j) + tau/2 (log pi(y_j) - log pi_i(y_j))^2

    with sequence log-probabilities ``log pi(y_j) = sum_t logp m``. ``logp``, ``old_logp``, ``mask`` [B, T]
    (``B = N * group_size``, groups contiguous); ``rewards`` [B]; ``old_logp`` and ``rewards`` are constants.
    ``keep`` [B] (0/1; None: every sequence), as :func:`grpo_loss`'s: the other sequences leave the loss, its
    mean and ``loss_weight`` (the loss is the mean over the kept sequences; none kept: 0).
    Metrics: ``policy_loss`` (the REINFORCE term), ``log_ratio_sq`` (mean squared sequence log-ratio)."""
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if jnp.ndim(logp) != 2 or jnp.shape(rewards) != logp.shape[:1]:
        raise ValueError(f"need logp [B, T] and rewards [B], got {jnp.shape(logp)} and {jnp.shape(rewards)}")
    if not tau > 0:
        raise ValueError(f"tau={tau!r} must be > 0")
    if keep is not None and jnp.shape(keep) != logp.shape[:1]:
        raise ValueError(f"keep must be [B] = {logp.shape[:1]}, got shape {jnp.shape(keep)}")
    r = _grouped(sg(jnp.asarray(rewards, jnp.float32)), group_size, "rewards")  # [N, G]
    baseline = (r - jnp.mean(r, axis=1, keepdims=True)).reshape(-1)  # r_j - r_bar, [B]
    mask = mask.astype(jnp.float32)
    if keep is None:
        mean, weight = jnp.mean, jnp.float32(logp.shape[0])
    else:
        kept = sg(jnp.asarray(keep, jnp.float32))  # [B]
        mask = mask * kept[:, None]  # [B, T]: dropped sequences have no tokens
        mean = lambda x: jnp.sum(kept * x) / jnp.maximum(jnp.sum(kept), 1.0)  # noqa: E731
        weight = sg(jnp.sum(kept))
    seq = masked_sum(logp, mask, axis=1)  # log pi(y_j), [B]
    log_ratio = seq - masked_sum(sg(old_logp), mask, axis=1)  # [B]
    reinforce = -baseline * seq  # [B]
    loss = mean(reinforce + 0.5 * tau * jnp.square(log_ratio))
    metrics = {"policy_loss": sg(mean(reinforce)), "log_ratio_sq": sg(mean(jnp.square(log_ratio))),
               LOSS_WEIGHT: weight}
    return loss, metrics


# ---- reward model and PPO-RLHF -------------------------------------------------------------------------
def reward_model_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry loss ``mean(-log sigmoid(r_c - r_r))`` on scalar rewards [B] (Ouyang et al. 2022, eq. 1)."""
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    margin = r_chosen - r_rejected
    return jnp.mean(-jax.nn.log_sigmoid(margin)), {
        "accuracy": jnp.mean((margin > 0).astype(jnp.float32)), "margin": sg(jnp.mean(margin))}


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / (std + eps)`` with moments over ``mask = 1``; zero where masked."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return jnp.where(mask > 0, (x - mean) / (jnp.sqrt(var) + eps), 0.0)


def masked_value_loss(values: jax.Array, targets: jax.Array, old_values: jax.Array, mask: jax.Array,
                      clip_eps: float | None = None) -> jax.Array:
    """PPO's (optionally clipped) critic loss ``0.5 (V - target)^2`` averaged over ``mask = 1`` tokens.

    :func:`jaxlab.rl.losses.value_loss` on masked inputs (masked entries are exactly 0 there), rescaled
    from its mean over all entries to the mean over the unmasked ones.
    """
    _check_same_shape(values=values, targets=targets, old_values=old_values, mask=mask)
    m = mask.astype(values.dtype)
    zero = lambda x: jnp.where(m > 0, x, 0.0)  # noqa: E731
    full_mean = value_loss(zero(values), zero(targets), zero(old_values), clip_eps)
    return full_mean * (m.size / jnp.maximum(jnp.sum(m), 1.0))
