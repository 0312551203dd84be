"""Pure RL and preference math: tensors and floats in, `(loss, metrics)` or tensors out.

Nothing here imports Ray, vLLM or DeepSpeed, and no function takes a config object. Configs pick
functions by name through the plain dicts below.
"""

from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ADVANTAGES,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from rlhf.algorithms.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalized_rewards,
)
from rlhf.algorithms.lm import lm_loss, token_logprobs
from rlhf.algorithms.masking import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from rlhf.algorithms.ppo import (
    entropy_bonus,
    entropy_from_logits,
    ppo_policy_loss,
    ppo_ptx_loss,
    truncated_is_weights,
    value_loss,
)
from rlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    ipo_loss,
    reward_pairwise_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ADVANTAGES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "discounted_returns",
    "dpo_loss",
    "dr_grpo_advantages",
    "entropy_bonus",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalized_rewards",
    "lm_loss",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_ptx_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reward_pairwise_loss",
    "rloo_advantages",
    "token_logprobs",
    "truncated_is_weights",
    "value_loss",
]
