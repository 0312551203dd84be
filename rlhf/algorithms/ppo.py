"""PPO losses: clipped policy loss (dual clip, clip-higher), value loss, entropy, PPO-ptx, and
truncated importance sampling for rollout-engine / trainer logprob mismatch.

All token tensors are (B, T) with `response_mask` 1 on response tokens.
"""

from __future__ import annotations

import torch

from rlhf.algorithms.masking import aggregate_loss, masked_mean

MAX_LOG_RATIO = 20.0


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    mode: str = "token_mean",
    normaliser: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss.

    ratio = exp(logprobs - old_logprobs)
    pg_loss = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
    clip-higher: eps_high > eps_low (DAPO, Yu et al. 2025); dual clip (Ye et al. 2020): for A < 0
    the loss is capped at -A * dual_clip (dual_clip > 1). `is_weights` (B, T) multiplies the
    per-token loss (truncated importance sampling, see `truncated_is_weights`).
    Metrics: ppo/clipfrac (share of tokens where the clipped branch is active), ppo/approx_kl
    (k3 of old vs new, Schulman 2020), ppo/ratio_mean.
    """
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
    pg_loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip} must be > 1")
        capped = torch.minimum(pg_loss, -advantages * dual_clip)
        pg_loss = torch.where(advantages < 0, capped, pg_loss)
    if is_weights is not None:
        pg_loss = pg_loss * is_weights
    loss = aggregate_loss(pg_loss, response_mask, mode, normaliser)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), response_mask)
        approx_kl = masked_mean(torch.exp(-log_ratio) - 1 + log_ratio, response_mask)
        metrics = {
            "ppo/clipfrac": clipfrac.item(),
            "ppo/approx_kl": approx_kl.item(),
            "ppo/ratio_mean": masked_mean(ratio, response_mask).item(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    value_clip: float | None = None,
    mode: str = "token_mean",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 (V - G)^2; with value_clip, the PPO2 form max((V - G)^2, (clip(V) - G)^2) where
    clip(V) = old_V + clamp(V - old_V, -c, c) (Schulman et al. 2017, baselines ppo2)."""
    err = (values - returns) ** 2
    clipfrac = torch.zeros(())
    if value_clip is not None:
        clipped_v = old_values + (values - old_values).clamp(-value_clip, value_clip)
        err_clipped = (clipped_v - returns) ** 2
        clipfrac = masked_mean((err_clipped > err).float(), response_mask)
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * aggregate_loss(err, response_mask, mode, normaliser)
    return loss, {"critic/value_loss": loss.item(), "critic/clipfrac": float(clipfrac)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p per position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(
    logits: torch.Tensor, response_mask: torch.Tensor, coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss term -coef * mean entropy (adding it to a loss rewards exploration)."""
    ent = masked_mean(entropy_from_logits(logits), response_mask)
    return -coef * ent, {"ppo/entropy": ent.item()}


def ppo_ptx_loss(
    pg_loss: torch.Tensor,
    ptx_logprobs: torch.Tensor,
    ptx_mask: torch.Tensor,
    ptx_coef: float,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-ptx (Ouyang et al. 2022, eq. 2): maximise E[r - beta log(pi/pi_ref)] + gamma
    E_pretrain[log pi]. As a loss: pg_loss + ptx_coef * (-mean log pi over pretraining tokens).

    ptx_logprobs, ptx_mask: (B', T') next-token log-probs of a pretraining batch.
    """
    ptx_nll = -aggregate_loss(ptx_logprobs, ptx_mask, "token_mean", normaliser)
    total = pg_loss + ptx_coef * ptx_nll
    return total, {"ppo/ptx_loss": ptx_nll.item(), "ppo/total_loss": total.item()}


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights min(pi_trainer / pi_rollout, cap) per token (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training").

    The rollout engine's logprobs differ from the trainer's on the same tokens (kernels,
    precision); weighting the loss by the ratio corrects the bias, truncation bounds the variance.
    Returns weights (B, T) (no gradient) and metrics of the gap.
    """
    with torch.no_grad():
        gap = (old_logprobs - rollout_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        weights = torch.exp(gap).clamp(max=cap) * response_mask.to(gap.dtype)
        abs_gap = gap.abs() * response_mask.to(gap.dtype)
        metrics = {
            "rollout/logprob_gap": masked_mean(gap.abs(), response_mask).item(),
            "rollout/logprob_gap_max": abs_gap.max().item() if abs_gap.numel() else 0.0,
            "rollout/is_clamped_frac": masked_mean(
                (torch.exp(gap) > cap).float(), response_mask
            ).item(),
        }
    return weights, metrics
