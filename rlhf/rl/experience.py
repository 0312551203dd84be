"""Experience batches of the RL loop: rollouts as padded tensors, and the advantage phase.

Pure torch (no Ray, vLLM or DeepSpeed). A batch is a dict of tensors, one row per sample:

    input_ids       (B, P+R)  prompt left-padded to P, then the response right-padded to R
    attention_mask  (B, P+R)
    position_ids    (B, P+R)  0 at each row's first real token (vLLM's positions)
    response_mask   (B, R)    1 on sampled tokens (EOS included)
    rollout_logprobs (B, R)   the engine's log-probabilities of the sampled tokens
    scores          (B,)      sequence rewards (after the reward phase)
    old_logprobs, ref_logprobs, values, advantages, returns   (B, R), added phase by phase

Every per-token tensor is response-aligned: column j is the j-th sampled token, so the last
response token is `response_mask.sum(-1) - 1` (what `kl_penalized_rewards` and `gae` expect).
Samples of one prompt are contiguous (group estimators need that).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.algorithms import (
    GROUP_ADVANTAGES,
    KL_ESTIMATORS,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
)


def build_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    rollout_logprobs: list[list[float]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Pad prompts (left) and responses (right) into one batch of response-aligned tensors."""
    if not (len(prompts) == len(responses) == len(rollout_logprobs)):
        raise ValueError("prompts, responses and logprobs must have one row per sample")
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, rollout_logprobs)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        attention_mask[i, P - len(p) : P + len(r)] = 1
        if r:
            input_ids[i, P : P + len(r)] = torch.tensor(r)
            response_mask[i, : len(r)] = 1.0
            logprobs[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "rollout_logprobs": logprobs,
    }


def prompt_length(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[1] - batch["response_mask"].shape[1]


def slice_rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows [start, stop) of every row-indexed tensor (scalars and metadata are kept)."""
    rows = batch["input_ids"].shape[0]
    return {
        k: (v[start:stop] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v)
        for k, v in batch.items()
    }


def rank_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice of n rows for `rank` (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank outputs back into one tensor, padding the response axis to the widest part."""
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that predict each response token: (B, R, V)."""
    P = prompt_length(batch)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.logits[:, P - 1 : -1]


def response_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"][:, prompt_length(batch) :]


def compute_advantages(
    batch: dict[str, torch.Tensor],
    *,
    algorithm: str,
    group_size: int,
    kl_coef: float,
    kl_estimator: str,
    kl_in_reward: bool,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[dict, dict[str, float]]:
    """Add `advantages` and `returns` to the batch; return it with metrics.

    PPO (`algorithm="ppo"`): per-token rewards = score at the last token - kl_coef * KL when the KL
    is in the reward (Ziegler 2019), then GAE with the critic's values, advantages whitened over
    the batch. Critic-free estimators: advantages from sequence scores (minus kl_coef * summed KL
    when the KL is in the reward), broadcast over the response; returns = advantages.
    """
    mask = batch["response_mask"]
    scores = batch["scores"].float()
    kl = KL_ESTIMATORS[kl_estimator](batch["old_logprobs"], batch["ref_logprobs"]) * mask
    metrics = {
        "reward/score_mean": scores.mean().item(),
        "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "kl/mean_per_token": masked_mean(kl, mask).item(),
        "kl/mean_per_sequence": kl.sum(-1).mean().item(),
    }
    if algorithm == "ppo":
        if kl_in_reward:
            rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)
        else:
            rewards = kl_penalized_rewards(scores, torch.zeros_like(kl), mask, 0.0)
        advantages, returns = gae(rewards, batch["values"] * mask, mask, gamma, lam)
        if whiten:
            advantages = masked_whiten(advantages, mask)
        metrics["critic/values_mean"] = masked_mean(batch["values"], mask).item()
        metrics["critic/returns_mean"] = masked_mean(returns, mask).item()
    elif algorithm in GROUP_ADVANTAGES:
        seq = scores - kl_coef * kl.sum(-1) if kl_in_reward else scores
        advantages = GROUP_ADVANTAGES[algorithm](seq, mask, group_size)
        returns = advantages
    else:
        raise ValueError(
            f"algorithm={algorithm!r}: expected 'ppo' or one of {sorted(GROUP_ADVANTAGES)}"
        )
    metrics["advantages/mean"] = masked_mean(advantages, mask).item()
    metrics["advantages/abs_mean"] = masked_mean(advantages.abs(), mask).item()
    return {**batch, "advantages": advantages, "returns": returns}, metrics


def minibatches(num_rows: int, mini_batch_size: int, epoch_seed: int) -> list[torch.Tensor]:
    """Shuffled row indices in mini-batches of `mini_batch_size` (the last may be smaller)."""
    gen = torch.Generator().manual_seed(epoch_seed)
    order = torch.randperm(num_rows, generator=gen)
    return [order[i : i + mini_batch_size] for i in range(0, num_rows, mini_batch_size)]


def take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    rows = batch["input_ids"].shape[0]
    return {
        k: (v[index] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v)
        for k, v in batch.items()
    }


def groups_with_signal(scores: list[float], group_size: int, tol: float = 1e-6) -> list[bool]:
    """For each run of `group_size` consecutive scores (one prompt's samples): do they differ?

    Every group estimator gives an all-equal group zero advantage, so its tokens add nothing to
    the policy gradient but still count in a token-mean loss's denominator; DAPO's dynamic
    sampling (Yu et al. 2025, sec. 3.2) trains on the other groups only.
    """
    if len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores are not whole groups of {group_size}")
    groups = [scores[i : i + group_size] for i in range(0, len(scores), group_size)]
    return [max(g) - min(g) > tol for g in groups]
