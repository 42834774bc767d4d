"""``jaxlab train posttrain``: SFT, then DPO, PPO-RLHF or GRPO on a verifiable arithmetic task.

    jaxlab train posttrain --method grpo --steps 200 --out runs/posttrain    # resumes from runs/posttrain
    jaxlab train posttrain --method dpo --dpo-loss ipo --out runs/posttrain  # reuses the SFT stage there
    jaxlab train posttrain --method grpo --init-from ckpt/ --out runs/hf     # a Hugging Face checkpoint -> runs/hf/hf

Every field of :class:`jaxlab.rl.llm.posttrain.PostTrainConfig` is a flag (``jaxlab train posttrain --help``).
"""

from __future__ import annotations

import pathlib

from jaxlab.registry import register_trainer
from jaxlab.rl.llm.posttrain import PostTrainConfig, posttrain


@register_trainer("posttrain", description="LM post-training on a verifiable task: sft | dpo | ppo-rlhf | grpo "
                  "(from a Hugging Face checkpoint with --init-from)",
                  config=PostTrainConfig)
def posttrain_trainer(cfg: PostTrainConfig, out_dir: pathlib.Path) -> dict:
    return posttrain(cfg, out_dir)
