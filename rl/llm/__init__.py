"""LLM post-training: SFT, reward model, PPO-RLHF, DPO and GRPO on a verifiable task.

    from jaxlab.rl.llm import dpo_loss, grpo_advantages, grpo_loss, sequence_logprobs

Modules: :mod:`~jaxlab.rl.llm.losses` (the losses), :mod:`~jaxlab.rl.llm.task` (problems, tokenizer,
verifier), one module per method (:mod:`~jaxlab.rl.llm.sft`, :mod:`~jaxlab.rl.llm.dpo`,
:mod:`~jaxlab.rl.llm.reward_model`, :mod:`~jaxlab.rl.llm.ppo_rlhf`, :mod:`~jaxlab.rl.llm.grpo`), each a
``train_step(state, batch, key)`` of the training spine (:mod:`jaxlab.train_state`), and the driver
:mod:`~jaxlab.rl.llm.posttrain`. Responses are sampled with the LM's one sampler,
:func:`jaxlab.models.sampling.sample`, and scored with :func:`jaxlab.models.sampling.response_logprobs`.
"""

from jaxlab.rl.llm.losses import (dpo_loss, grpo_advantages, grpo_loss, kimi_length_reward, reward_model_loss,
                                  sequence_logprobs)

__all__ = ["dpo_loss", "grpo_advantages", "grpo_loss", "kimi_length_reward", "reward_model_loss",
           "sequence_logprobs"]
