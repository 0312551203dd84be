"""What the RL role actors compute, as plain functions of a model or a DeepSpeed engine.

No Ray and no vLLM here: `actors/policy.py` and `actors/roles.py` wrap these in thin Ray actors.
Every function takes the whole experience batch plus (rank, world) and works on its own contiguous
slice of rows, so the batch travels once, as one object ref, to every rank.

Loss normalisation follows the offline loop: a mini-batch's loss is divided by its global token
(or sequence) count, and DeepSpeed's averaging over ranks and accumulation steps is undone
(`* world * gas`), so 1 and N ranks compute the same gradient for the same mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from rlhf.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    kl_loss,
    masked_mean,
    ppo_policy_loss,
    token_logprobs,
    truncated_is_weights,
    value_loss,
)
from rlhf.config import RLConfig, TrainRoleConfig
from rlhf.rl.experience import (
    Experience,
    minibatches,
    rank_bounds,
    response_logits,
    response_tokens,
)


def my_rows(batch: Experience, rank: int, world: int) -> Experience:
    """This rank's contiguous slice of the rows."""
    return batch.rows(*rank_bounds(batch.num_rows, rank, world))


def _chunks(batch: Experience, size: int) -> Iterator[Experience]:
    for start in range(0, batch.num_rows, size):
        yield batch.rows(start, start + size)


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    batch: Experience,
    micro_batch_size: int,
    temperature: float = 1.0,
    share_prompts: bool = False,
) -> torch.Tensor:
    """log p(response token) under `model` at the sampling temperature: (B, R), 0 on padding.
    `share_prompts`: see `response_logits`."""
    parts = []
    for chunk in _chunks(batch, micro_batch_size):
        logits = response_logits(model, chunk, share_prompts).float() / temperature
        parts.append(token_logprobs(logits, response_tokens(chunk)) * chunk.response_mask)
    return torch.cat(parts) if parts else torch.zeros_like(batch.response_mask)


@torch.no_grad()
def response_values(
    critic: torch.nn.Module, batch: Experience, micro_batch_size: int, share_prompts: bool = False
) -> torch.Tensor:
    """V(state before each response token): (B, R), 0 on padding. `share_prompts`: see
    `response_logits`."""
    parts = []
    for chunk in _chunks(batch, micro_batch_size):
        parts.append(_values(critic, chunk, share_prompts) * chunk.response_mask)
    return torch.cat(parts) if parts else torch.zeros_like(batch.response_mask)


def _values(critic: torch.nn.Module, batch: Experience, share_prompts: bool) -> torch.Tensor:
    return response_logits(critic, batch, share_prompts, causal_lm=False).squeeze(-1).float()


@torch.no_grad()
def sequence_scores(
    reward_model: torch.nn.Module, batch: Experience, micro_batch_size: int
) -> torch.Tensor:
    """The reward model's score of each (prompt, response): (B,)."""
    parts = []
    for chunk in _chunks(batch, micro_batch_size):
        out = reward_model(
            input_ids=chunk.input_ids,
            attention_mask=chunk.attention_mask,
            position_ids=chunk.position_ids,
            use_cache=False,
        )
        parts.append(out.logits.squeeze(-1).float())
    return torch.cat(parts)


def _normaliser(mb: dict, mode: str) -> float:
    if mode == "token_mean":
        return float(mb.response_mask.sum().clamp(min=1.0))
    return float(mb.num_rows)


def _average(sums: dict[str, float], count: float) -> dict[str, float]:
    """Mean of summed metrics over every micro-batch of every rank."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return {k: (t[i] / t[-1].clamp(min=1)).item() for i, k in enumerate(keys)}


def _add(sums: dict[str, float], metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def _updates(
    engine: Any,
    batch: Experience,
    rl: RLConfig,
    role: TrainRoleConfig,
    rank: int,
    world: int,
    step: int,
    loss_fn: Callable[[Experience, float, int], tuple[torch.Tensor, dict[str, float]]],
    prefix: str,
) -> dict[str, float]:
    """rl.ppo_epochs passes over the batch in shuffled mini-batches of rl.mini_batch_size, one
    optimizer step each through the shared training core (`rlhf.train.core.accumulate`: this
    rank's slice of the mini-batch in micro-batches, the non-finite guard). `loss_fn(micro,
    normaliser, gas)` gets the mini-batch's global token (or sequence) count as normaliser.
    Metrics are averaged over every micro-batch of every rank."""
    from rlhf.train.core import accumulate, last_step_skipped  # DeepSpeed: only in the actors

    micro = role.micro_batch_size
    gas = rl.mini_batch_size // (micro * world)
    sums: dict[str, float] = {}
    count = bad = skipped = 0
    for epoch in range(rl.ppo_epochs):
        for index in minibatches(batch.num_rows, rl.mini_batch_size, seed_of(step, epoch)):
            mb = batch.take(index)
            norm = _normaliser(mb, rl.loss_mode)
            mine = my_rows(mb, rank, world)
            chunks = (mine.rows(k * micro, (k + 1) * micro) for k in range(gas))
            part, n, b = accumulate(
                engine, chunks, lambda chunk, norm=norm: loss_fn(chunk, norm, gas), world, gas
            )
            _add(sums, part)
            count, bad = count + n, bad + b
            skipped += int(last_step_skipped(engine))
    out = _average({**sums, f"{prefix}/nonfinite_loss": float(bad)}, count)
    out[f"{prefix}/lr"] = engine.get_lr()[0]
    out[f"{prefix}/skipped_steps"] = float(skipped)
    return out


def policy_update(
    engine: Any,
    batch: Experience,
    rl: RLConfig,
    role: TrainRoleConfig,
    rank: int,
    world: int,
    step: int,
    ptx_rows: Iterator[dict] | None = None,
    kl_coef: float | None = None,
    on_policy: bool = False,
    gap_in_first: bool = False,
) -> dict[str, float]:
    """PPO epochs over shuffled mini-batches: clipped surrogate (+ KL loss, entropy, PPO-ptx).

    `kl_coef`: the KL controller's live coefficient (None: the static `rl.kl_coef`). A
    non-finite loss skips the optimizer step on every rank (`policy/nonfinite_loss`).
    `on_policy` (one epoch, one mini-batch: `rl.on_policy_update`): the old logprobs are this
    forward's own, detached (ratio 1; the same gradient as a separate forward would give, without
    running it), and this forward measures the trainer-vs-engine gap (`rollout/logprob_gap`: the
    mean over micro-batches of each one's token mean).
    `gap_in_first` (`rl.old_logprobs_from_sampler`: the old logprobs are the sampler's own): the
    first mini-batch's forwards, before any update, measure that gap instead.
    """
    kl_coef = rl.kl_coef if kl_coef is None else kl_coef
    temperature = rl.rollout.temperature
    measured = [0]  # micro-batches whose gap was measured (gap_in_first: the first `gas`)
    gap_sums: dict[str, float] = {}

    def loss_fn(chunk: Experience, norm: float, gas: int) -> tuple[torch.Tensor, dict]:
        mask = chunk.response_mask
        logits = response_logits(engine.module, chunk, rl.shared_prompt_forward).float()
        logits = logits / temperature
        logp = token_logprobs(logits, response_tokens(chunk))
        old = logp.detach() if on_policy else chunk.old_logprobs
        if gap_in_first and measured[0] < gas:  # the weights that sampled: no update yet
            measured[0] += 1
            _add(gap_sums, truncated_is_weights(logp.detach(), chunk.rollout_logprobs, mask)[1])
        loss, metrics = _surrogate(logp, old, chunk, rl, kl_coef, norm, on_policy)
        for key in ("policy/pg_loss", "policy/kl_loss"):  # undo the averaging (module doc)
            if key in metrics:
                metrics[key] = metrics[key] * world * gas
        entropy = entropy_from_logits(logits)
        if rl.entropy_coef > 0:
            loss = loss - rl.entropy_coef * aggregate_loss(entropy, mask, rl.loss_mode, norm)
        metrics["policy/entropy"] = masked_mean(entropy.detach(), mask).item()
        if ptx_rows is not None and rl.ptx_coef > 0:
            ptx_nll = _lm_nll_mean(engine.module, next(ptx_rows))
            loss = loss + rl.ptx_coef * ptx_nll / (world * gas)
            metrics["policy/ptx_loss"] = ptx_nll.item()
        return loss, metrics

    out = _updates(engine, batch, rl, role, rank, world, step, loss_fn, "policy")
    if gap_in_first:  # over the first mini-batch's micro-batches of every rank
        out.update(_average(gap_sums, float(measured[0])))
    return out


def _surrogate(
    logp: torch.Tensor,
    old: torch.Tensor,
    chunk: Experience,
    rl: RLConfig,
    kl_coef: float,
    norm: float,
    on_policy: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's clipped surrogate (truncated importance weights with
    rl.truncated_is_cap) plus, unless the KL is in the reward, the KL loss to the reference.
    `policy/pg_loss` and `policy/kl_loss` are this rank's micro-batch terms, unscaled."""
    mask = chunk.response_mask
    is_weights = None
    metrics: dict[str, float] = {}
    if on_policy or rl.truncated_is_cap is not None:
        cap = rl.truncated_is_cap
        weights, gap = truncated_is_weights(old, chunk.rollout_logprobs, mask, cap or 2.0)
        is_weights = None if cap is None else weights
        metrics.update(gap)
    loss, pm = ppo_policy_loss(
        logp,
        old,
        chunk.advantages,
        mask,
        clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high,
        dual_clip=rl.dual_clip,
        mode=rl.loss_mode,
        normaliser=norm,
        is_weights=is_weights,
    )
    metrics.update(pm)
    metrics["policy/pg_loss"] = loss.item()
    if not rl.kl_as_reward and kl_coef > 0:
        kl_term, _ = kl_loss(
            logp,
            chunk.ref_logprobs,
            mask,
            kl_coef,
            rl.kl_estimate,
            rl.loss_mode,
            norm,
            ratio=torch.exp(logp.detach() - old) * mask,
        )
        loss = loss + kl_term
        metrics["policy/kl_loss"] = kl_term.item()
    return loss, metrics


def critic_update(
    engine: Any,
    batch: Experience,
    rl: RLConfig,
    role: TrainRoleConfig,
    rank: int,
    world: int,
    step: int,
) -> dict[str, float]:
    """Value regression to the GAE returns, PPO2-clipped around the rollout-time values."""

    def loss_fn(chunk: Experience, norm: float, gas: int) -> tuple[torch.Tensor, dict]:
        values = _values(engine.module, chunk, rl.shared_prompt_forward)
        loss, metrics = value_loss(
            values,
            chunk.values,
            chunk.returns,
            chunk.response_mask,
            rl.value_clip,
            rl.loss_mode,
            norm,
        )
        metrics["critic/value_loss"] = loss.item() * world * gas
        return loss, metrics

    return _updates(engine, batch, rl, role, rank, world, step, loss_fn, "critic")


def seed_of(step: int, epoch: int) -> int:
    """Mini-batch shuffling seed; policy and critic use the same order."""
    return 1_000_003 * step + epoch


def _lm_nll_mean(model: torch.nn.Module, rows: dict) -> torch.Tensor:
    logits = (
        model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False)
        .logits[:, :-1]
        .float()
    )
    labels = rows["labels"][:, 1:]
    mask = labels != -100
    logp = token_logprobs(logits, labels.clamp(min=0))
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def ptx_stream(
    rows: Any, batch_size: int, seed: int, start: int = 0, device: torch.device | str = "cpu"
) -> Iterator[dict]:
    """Endless shuffled batches of tokenized SFT rows (input_ids, labels) for PPO-ptx, on
    `device` (the policy's training device), from batch number `start` on (a new permutation
    every epoch; a resumed run passes the count it had drawn)."""
    from rlhf.train.core import to_device
    from rlhf.train.tasks import _lm_collate

    per_epoch = len(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(f"PPO-ptx: {len(rows)} rows < rl.ptx_batch_size = {batch_size}")
    epoch, skip = divmod(start, per_epoch)
    while True:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(rows), generator=gen).tolist()
        for b in range(skip, per_epoch):
            batch = _lm_collate([rows[i] for i in order[b * batch_size : (b + 1) * batch_size]])
            yield to_device(batch, device)
        epoch, skip = epoch + 1, 0
