"""Advantages: GAE with a critic, and the critic-free group baselines.

Layouts: token tensors are (B, T), right padded, `response_mask` 1 on response tokens. For the
critic-free estimators `scores` is (B,) with the n samples of each prompt contiguous
(rows [i*n, (i+1)*n) belong to prompt i) and `group_size` = n; the per-sample advantage is
broadcast over the response tokens.
"""

from __future__ import annotations

import torch

from rlhf.algorithms.masking import masked_whiten


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last response token),
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    rewards, values, response_mask: (B, T). Returns (advantages, returns), both (B, T), 0 outside
    the mask.
    """
    m = response_mask.to(values.dtype)
    values = values * m
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        # Padded positions pass the future through unchanged (they hold no step).
        next_adv = torch.where(m[:, t] > 0, a, next_adv)
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        adv[:, t] = a * m[:, t]
    return adv, (adv + values) * m


def discounted_returns(
    rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """G_t = sum_k gamma^k r_{t+k} over the response tokens: (B, T) -> (B, T)."""
    m = response_mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(m[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running * m[:, t]
    return out


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return per_sample.unsqueeze(-1) * response_mask.to(per_sample.dtype)


def grpo_advantages(
    scores: torch.Tensor, response_mask: torch.Tensor, group_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): (r - mean_g) / (std_g + eps).

    A group whose rewards are all equal gets zero advantage (std 0 -> numerator 0).
    """
    g = _groups(scores, group_size)
    std = g.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    adv = (g - g.mean(-1, keepdim=True)) / (std + eps)
    return _broadcast(adv.reshape(-1), response_mask)


def dr_grpo_advantages(
    scores: torch.Tensor, response_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean_g, no std division (removes the difficulty bias)."""
    g = _groups(scores, group_size)
    return _broadcast((g - g.mean(-1, keepdim=True)).reshape(-1), response_mask)


def rloo_advantages(
    scores: torch.Tensor, response_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other n-1 rewards of the group."""
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (a leave-one-out baseline)")
    g = _groups(scores, group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _broadcast((g - baseline).reshape(-1), response_mask)


def reinforce_pp_advantages(
    scores: torch.Tensor, response_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return (score at every token) whitened over the whole batch."""
    return masked_whiten(_broadcast(scores, response_mask), response_mask)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor, response_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025): subtract the group mean, then whiten over the batch."""
    g = _groups(scores, group_size)
    centred = (g - g.mean(-1, keepdim=True)).reshape(-1)
    return masked_whiten(_broadcast(centred, response_mask), response_mask)


# Critic-free estimators: (scores (B,), response_mask (B, T), group_size) -> advantages (B, T).
GROUP_ADVANTAGES = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}
ADVANTAGE_ESTIMATORS = {"gae": gae, **GROUP_ADVANTAGES}
