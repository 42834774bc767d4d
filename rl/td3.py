"""Twin Delayed DDPG (Fujimoto et al. 2018, "Addressing Function Approximation Error in Actor-Critic Methods").

TD3 is DDPG with three changes against overestimation and variance (Sec. 4-5 of the paper):

1. clipped double Q-learning: two critics, the target uses ``min(Q'_1, Q'_2)(s', a')`` (eq. 10);
2. target policy smoothing: ``a' = clip(mu'(s') + clip(N(0, sigma), -c, c))`` (eq. 14);
3. delayed policy updates: the actor and the targets move once every ``policy_delay`` critic steps.

The deterministic-actor agent of ``jaxlab.rl.ddpg`` implements all three as options; this module holds
TD3's configuration (the paper's Table 3 values, with the paper's Gaussian exploration noise 0.1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlab.rl.core import Train
from jaxlab.rl.ddpg import DDPGConfig, make_agent
from jaxlab.rl.off_policy import make_off_policy_train
from jaxlab.validation import check

__all__ = ["TD3Config", "make_train"]


@dataclasses.dataclass(frozen=True)
class TD3Config(DDPGConfig):
    """TD3 hyperparameters (Fujimoto et al. 2018, Table 3); defaults tuned for Pendulum-v1 in 2e5 steps."""

    ALGO: ClassVar[str] = "TD3"

    num_critics: int = 2
    """Critics; the target takes their minimum (clipped double Q)."""
    target_noise: float = 0.2
    """Std of the target policy smoothing noise (unit-box scale)."""
    target_noise_clip: float = 0.5
    """The smoothing noise is clipped to +-this."""
    policy_delay: int = 2
    """Critic steps per actor and target update."""

    def __post_init__(self):
        check(self.num_critics >= 2, f"num_critics={self.num_critics} must be >= 2 for clipped double Q")
        super().__post_init__()


def make_train(cfg: TD3Config) -> Train:
    """``train(key) -> {"state", "metrics"}`` for TD3; jit- and vmap-able."""
    return make_off_policy_train(cfg, make_agent(cfg))
