"""KL to the reference policy: per-token estimators, KL in the reward or as a loss, controllers.

Estimators (Schulman 2020, "Approximating KL Divergence"), with log r = ref_logprobs - logprobs
for tokens sampled from the policy:
  k1 = -log r                 unbiased, can be negative
  k2 = (log r)^2 / 2          biased, low variance, >= 0
  k3 = (r - 1) - log r        unbiased, >= 0
"""

from __future__ import annotations

import torch

from rlhf.algorithms.masking import aggregate_loss, masked_mean

# exp(20) ~ 5e8: large enough for any sane ratio, small enough that k3 stays finite in fp32.
MAX_LOG_RATIO = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards with the KL penalty inside (Ziegler et al. 2019; Ouyang et al. 2022).

    scores: (B,) sequence reward; kl: (B, T) per-token estimate; response_mask: (B, T), right
    padded. rewards[b, t] = -kl_coef * kl[b, t], plus scores[b] at the last response token.
    Returns rewards: (B, T), zero outside the mask.
    """
    m = response_mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m.sum(-1).long() - 1).clamp(min=0)
    has_tokens = m.sum(-1) > 0
    bonus = torch.where(has_tokens, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k3",
    mode: str = "token_mean",
    normaliser: float | None = None,
    ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL as a loss term (GRPO, Shao et al. 2024): kl_coef * aggregate(ratio * k(logprobs, ref)).

    logprobs (with grad), ref_logprobs, response_mask, ratio: (B, T). The samples come from the
    policy that generated them (pi_old); once the policy has moved (a second mini-batch or epoch),
    k(.) averaged over them estimates the KL of pi_old, not of pi_theta. `ratio` = pi_theta /
    pi_old per token (detached here: it reweights the samples, it is not differentiated) makes it
    an importance-weighted estimate of KL(pi_theta || pi_ref); None (or all ones, on-policy) is
    the plain estimate.
    """
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs)
    weighted = kl if ratio is None else kl * ratio.detach()
    loss = kl_coef * aggregate_loss(weighted, response_mask, mode, normaliser)
    return loss, {"kl/mean": masked_mean(kl.detach(), response_mask).item()}


class FixedKLController:
    """A constant coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    error = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + error * n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}
