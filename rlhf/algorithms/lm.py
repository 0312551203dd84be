"""Language-model pieces: per-token log-probabilities and the masked next-token loss.

Pure tensor functions (no Ray, vLLM, DeepSpeed, no config objects).
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under `logits`, gathered per position.

    logits: (B, T, V), labels: (B, T) token ids (no -100: clamp masked labels first).
    Returns: (B, T). Uses log_softmax, so it is stable for large logits.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def lm_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, normaliser: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked negative log-likelihood.

    logprobs, loss_mask: (B, T). loss = -sum(mask * logprobs) / normaliser, where `normaliser`
    defaults to this batch's mask sum; pass the *global* token count of the whole (accumulated,
    data-parallel) batch so micro-batch losses add up to the big-batch mean.
    """
    mask = loss_mask.to(logprobs.dtype)
    tokens = mask.sum()
    denom = tokens.clamp(min=1.0) if normaliser is None else max(float(normaliser), 1.0)
    loss = -(logprobs * mask).sum() / denom
    return loss, {"lm/tokens": float(tokens)}
