"""Masked reductions and loss aggregation shared by every loss.

Masks are float or bool tensors of the same shape as the values, 1 where a token counts. Sums
over empty masks are clamped so an all-masked row gives 0, never NaN.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); masked-out entries -> 0."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    normaliser: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    token_mean: sum over all tokens / token count (or `normaliser`, the global token count, so
      micro-batches and data-parallel ranks add up to the big-batch mean);
    seq_mean: mean over sequences of each sequence's token mean (or sum / `normaliser` sequences);
    seq_sum: mean over sequences of each sequence's token sum (Dr.GRPO's length-unbiased form).
    """
    m = mask.to(loss.dtype)
    if mode == "token_mean":
        denom = m.sum().clamp(min=1.0) if normaliser is None else max(float(normaliser), 1.0)
        return (loss * m).sum() / denom
    if mode == "seq_mean":
        per_seq = (loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    elif mode == "seq_sum":
        per_seq = (loss * m).sum(-1)
    else:
        raise ValueError(f"mode={mode!r}: expected one of {sorted(LOSS_AGGREGATIONS)}")
    denom = per_seq.numel() if normaliser is None else normaliser
    return per_seq.sum() / max(float(denom), 1.0)


LOSS_AGGREGATIONS = {"token_mean", "seq_mean", "seq_sum"}
