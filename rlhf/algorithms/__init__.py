"""Pure RL and preference math: tensors and floats in, `(loss, metrics)` or tensors out."""

from rlhf.algorithms.lm import lm_loss, token_logprobs
from rlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    ipo_loss,
    reward_pairwise_loss,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "dpo_loss",
    "ipo_loss",
    "lm_loss",
    "reward_pairwise_loss",
    "token_logprobs",
]
