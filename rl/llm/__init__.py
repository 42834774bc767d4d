"""LLM post-training: SFT, reward model, PPO-RLHF, DPO and GRPO on a verifiable task.

    from jaxlab.rl.llm import dpo_loss, grpo_advantages, grpo_loss, sequence_logprobs

Modules: :mod:`~jaxlab.rl.llm.losses` (the losses), :mod:`~jaxlab.rl.llm.task` (problems, tokenizer,
verifier), :mod:`~jaxlab.rl.llm.sampling` (KV-cache sampler and teacher-forced scoring), one module per
method (:mod:`~jaxlab.rl.llm.sft`, :mod:`~jaxlab.rl.llm.dpo`, :mod:`~jaxlab.rl.llm.reward_model`,
:mod:`~jaxlab.rl.llm.ppo_rlhf`, :mod:`~jaxlab.rl.llm.grpo`) and the driver :mod:`~jaxlab.rl.llm.posttrain`.
"""

from jaxlab.rl.llm.losses import (dpo_loss, grpo_advantages, grpo_loss, kimi_length_reward, reward_model_loss,
                                  sequence_logprobs, token_logprobs)

__all__ = ["dpo_loss", "grpo_advantages", "grpo_loss", "kimi_length_reward", "reward_model_loss",
           "sequence_logprobs", "token_logprobs"]
