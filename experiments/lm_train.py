"""``jaxlab train lm``: train a byte-level language model on text (the Python stdlib by default).

    jaxlab train lm --mixer mamba2 --steps 2000 --out runs/mamba2      # resumes if runs/mamba2 has a checkpoint
    jaxlab train lm --data corpus.jsonl --dtype bfloat16 --no-resume

Every field of :class:`jaxlab.models.lm_training.LMTrainConfig` is a flag (``jaxlab train lm --help``).
"""

from __future__ import annotations

import pathlib

from jaxlab.models.lm_training import LMTrainConfig, train_lm
from jaxlab.registry import register_trainer


@register_trainer("lm", description="byte-level LM on packed text (default: the Python stdlib), exact resume",
                  config=LMTrainConfig)
def lm(cfg: LMTrainConfig, out_dir: pathlib.Path) -> dict:
    return train_lm(cfg, out_dir)
