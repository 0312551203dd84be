"""Preference losses: the reward model's pairwise ranking loss and the DPO family.

Pure tensor functions over per-pair scalars; each returns `(loss, metrics)`. `reduction="sum"`
lets the caller divide by a global pair count (gradient accumulation / data parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean() if x.numel() else x.sum()
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")


def reward_pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry ranking loss of a reward model (Ouyang et al. 2022, eq. 1).

    chosen_rewards, rejected_rewards: (P,). loss = -log sigmoid(r_w - r_l - margin)
    (the margin variant is Llama 2's, Touvron et al. 2023). Metrics: pairwise accuracy, margin.
    """
    diff = chosen_rewards - rejected_rewards
    loss = _reduce(-F.logsigmoid(diff - margin), reduction)
    with torch.no_grad():
        metrics = {
            "rm/accuracy": (diff > 0).float().mean().item() if diff.numel() else 0.0,
            "rm/margin": diff.mean().item() if diff.numel() else 0.0,
        }
    return loss, metrics


def _logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """h = (log pi_w - log ref_w) - (log pi_l - log ref_l), the DPO log-ratio difference."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    return chosen_ratio - rejected_ratio, chosen_ratio, rejected_ratio


def _preference_metrics(beta, chosen_ratio, rejected_ratio) -> dict[str, float]:
    with torch.no_grad():
        rc, rr = beta * chosen_ratio, beta * rejected_ratio
        n = rc.numel()
        return {
            "dpo/reward_chosen": rc.mean().item() if n else 0.0,
            "dpo/reward_rejected": rr.mean().item() if n else 0.0,
            "dpo/reward_accuracy": (rc > rr).float().mean().item() if n else 0.0,
            "dpo/reward_margin": (rc - rr).mean().item() if n else 0.0,
        }


def _nll_term(policy_chosen, chosen_lengths, nll_coef):
    if nll_coef == 0.0 or chosen_lengths is None:
        return torch.zeros_like(policy_chosen)
    return -nll_coef * policy_chosen / chosen_lengths.clamp(min=1).to(policy_chosen.dtype)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    nll_coef: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO, sigmoid loss (Rafailov et al. 2023, eq. 7); with label_smoothing, conservative DPO.

    All inputs (P,): summed response log-probs of policy and reference for chosen / rejected.
    loss = -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h), h = log-ratio difference
    (cDPO: Mitchell 2023, label noise e). nll_coef adds -nll_coef * log pi(y_w) / |y_w|
    (RPO, Pang et al. 2024).
    """
    h, chosen_ratio, rejected_ratio = _logits(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected
    )
    per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    per_pair = per_pair + _nll_term(policy_chosen, chosen_lengths, nll_coef)
    return _reduce(per_pair, reduction), _preference_metrics(beta, chosen_ratio, rejected_ratio)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    nll_coef: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, eq. 17): loss = (h - 1 / (2 beta))^2, inputs (P,) as in dpo_loss.

    `label_smoothing` must be 0 (IPO has no noise model); the config rejects it earlier.
    """
    if label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing}: IPO takes none")
    h, chosen_ratio, rejected_ratio = _logits(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected
    )
    per_pair = (h - 1 / (2 * beta)) ** 2 + _nll_term(policy_chosen, chosen_lengths, nll_coef)
    return _reduce(per_pair, reduction), _preference_metrics(beta, chosen_ratio, rejected_ratio)


PREFERENCE_LOSSES = {"dpo": dpo_loss, "cdpo": dpo_loss, "ipo": ipo_loss}
