"""Experience batches of the RL loop: rollouts as padded tensors, and the advantage phase.

Pure torch (no Ray, vLLM or DeepSpeed). `Experience` holds one row per sample; the phases of a
step fill its optional fields (`replace` returns a new batch, nothing is mutated in place):

    batch = build_batch(prompt_ids, response_ids, rollout_logprobs, pad_id)   # after generate
    batch = batch.replace(scores=..., ref_logprobs=..., old_logprobs=..., values=...)
    batch, metrics = compute_advantages(batch, algorithm="grpo", ...)        # + advantages

Every per-token tensor is response-aligned: column j is the j-th sampled token, so the last
response token is `response_mask.sum(-1) - 1` (what `kl_penalized_rewards` and `gae` expect).
Samples of one prompt are contiguous (group estimators need that).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhf.algorithms import (
    GROUP_ADVANTAGES,
    KL_ESTIMATORS,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
)


@dataclass(frozen=True)
class Experience:
    """One RL step's samples. B rows, prompts left-padded to P, responses right-padded to R."""

    input_ids: torch.Tensor  # (B, P+R) long
    attention_mask: torch.Tensor  # (B, P+R) long
    position_ids: torch.Tensor  # (B, P+R) long, 0 at each row's first real token (vLLM's)
    response_mask: torch.Tensor  # (B, R) float, 1 on sampled tokens (EOS included)
    rollout_logprobs: torch.Tensor  # (B, R) the engine's logprobs of the sampled tokens
    scores: torch.Tensor | None = None  # (B,) sequence rewards             (reward phase)
    ref_logprobs: torch.Tensor | None = None  # (B, R) reference policy      (ref phase)
    old_logprobs: torch.Tensor | None = None  # (B, R) policy before update  (logprobs phase)
    values: torch.Tensor | None = None  # (B, R) critic, PPO only             (values phase)
    advantages: torch.Tensor | None = None  # (B, R)                          (advantages phase)
    returns: torch.Tensor | None = None  # (B, R) value targets               (advantages phase)

    def __post_init__(self) -> None:
        B, T = self.input_ids.shape
        R = self.response_mask.shape[1]
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            want = (
                (B,)
                if f.name == "scores"
                else (B, T)
                if f.name in ("attention_mask", "position_ids")
                else (B, R)
            )
            if f.name != "input_ids" and tuple(t.shape) != want:
                raise ValueError(f"Experience.{f.name}: shape {tuple(t.shape)}, expected {want}")

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def need(self, *names: str) -> None:
        """Raise unless the phases that fill `names` have run."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"Experience is missing {missing}: their phase has not run")

    def replace(self, **fields: torch.Tensor) -> Experience:
        return dataclasses.replace(self, **fields)

    def _map(self, fn) -> Experience:
        out = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            out[f.name] = None if t is None else fn(t)
        return Experience(**out)

    def rows(self, start: int, stop: int) -> Experience:
        """Rows [start, stop)."""
        return self._map(lambda t: t[start:stop])

    def take(self, index: torch.Tensor) -> Experience:
        """The rows in `index`, in its order."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> Experience:
        return self._map(lambda t: t.to(device))


def build_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    rollout_logprobs: list[list[float]],
    pad_id: int,
) -> Experience:
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
    return Experience(input_ids, attention_mask, position_ids, response_mask, logprobs)


def rank_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice of n rows for `rank` (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank outputs back into one tensor, padding the response axis to the widest part."""
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def response_logits(
    model: torch.nn.Module, batch: Experience, share_prompts: bool = False, causal_lm: bool = True
) -> torch.Tensor:
    """Logits that predict each response token: (B, R, V). A critic (`causal_lm=False`, one label
    per token) gives the value of the state before each response token: (B, R, 1).

    `share_prompts`: rows with the same prompt (a group's samples) run it once. The distinct
    prompts' forward fills a key/value cache, each row continues from its prompt's copy, so the
    prompt tokens are computed once per distinct prompt instead of once per row; gradients
    through the shared part add up over its rows. The same outputs and gradients up to float
    rounding. Not under gradient checkpointing (no cache in training), nor in one process when
    no prompt repeats.
    """
    if share_prompts and not getattr(model, "is_gradient_checkpointing", False):
        last_only = {"logits_to_keep": 1} if causal_lm else {}
        shared = _shared_prompt_logits(model, batch, last_only)
        if shared is not None:
            return shared
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.logits[:, batch.prompt_length - 1 : -1]


def _shared_prompt_logits(
    model: torch.nn.Module, batch: Experience, first_kwargs: dict
) -> torch.Tensor | None:
    from transformers import DynamicCache

    P = batch.prompt_length
    prompts = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], dim=1)
    distinct, row_prompt = torch.unique(prompts, dim=0, return_inverse=True)  # (U, 2P), (B,)
    from rlhf.train.core import several_ranks

    # Nothing to share; but ZeRO-3 gathers each layer's weights in every forward, so with
    # several ranks every rank runs as many forwards as the others.
    if len(distinct) == len(prompts) and not several_ranks():
        return None
    ids, mask = distinct[:, :P], distinct[:, P:]
    # Passed in, not read from the output: a token-classification critic does not return it.
    cache = DynamicCache(config=model.config)
    first = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
        **first_kwargs,
    )
    cache.reorder_cache(row_prompt)  # (U, ...) -> (B, ...): each row its prompt's keys/values
    rest = model(
        input_ids=batch.input_ids[:, P:],
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids[:, P:],
        past_key_values=cache,
        use_cache=True,
    )
    # The last prompt position predicts (or values the state before) the first response token.
    return torch.cat([first.logits[row_prompt, -1:], rest.logits[:, :-1]], dim=1)


def response_tokens(batch: Experience) -> torch.Tensor:
    """(B, R) the sampled tokens (padding after each row's response)."""
    return batch.input_ids[:, batch.prompt_length :]


def compute_advantages(
    batch: Experience,
    *,
    algorithm: str,
    group_size: int,
    kl_coef: float,
    kl_estimator: str,
    kl_in_reward: bool,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[Experience, dict[str, float]]:
    """The batch with `advantages` and `returns`, and metrics.

    PPO (`algorithm="ppo"`): per-token rewards = score at the last token - kl_coef * KL when the KL
    is in the reward (Ziegler 2019), then GAE with the critic's values, advantages whitened over
    the batch. Critic-free estimators: advantages from sequence scores (minus kl_coef * summed KL
    when the KL is in the reward), broadcast over the response; returns = advantages.
    Without `ref_logprobs` (no reference model: kl_coef must be 0) there is no KL and no `kl/`
    metric.
    """
    batch.need("scores", "old_logprobs", *(["values"] if algorithm == "ppo" else []))
    if batch.ref_logprobs is None and kl_coef != 0:
        batch.need("ref_logprobs")
    mask = batch.response_mask
    scores = batch.scores.float()
    metrics = {
        "reward/score_mean": scores.mean().item(),
        "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
    }
    kl = torch.zeros_like(mask)
    if batch.ref_logprobs is not None:
        kl = KL_ESTIMATORS[kl_estimator](batch.old_logprobs, batch.ref_logprobs) * mask
        metrics["kl/mean_per_token"] = masked_mean(kl, mask).item()
        metrics["kl/mean_per_sequence"] = kl.sum(-1).mean().item()
    if algorithm == "ppo":
        if kl_in_reward:
            rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)
        else:
            rewards = kl_penalized_rewards(scores, torch.zeros_like(kl), mask, 0.0)
        advantages, returns = gae(rewards, batch.values * mask, mask, gamma, lam)
        if whiten:
            advantages = masked_whiten(advantages, mask)
        metrics["critic/values_mean"] = masked_mean(batch.values, mask).item()
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
    return batch.replace(advantages=advantages, returns=returns), metrics


def minibatches(num_rows: int, mini_batch_size: int, epoch_seed: int) -> list[torch.Tensor]:
    """Shuffled row indices in mini-batches of `mini_batch_size` (the last may be smaller)."""
    gen = torch.Generator().manual_seed(epoch_seed)
    order = torch.randperm(num_rows, generator=gen)
    return [order[i : i + mini_batch_size] for i in range(0, num_rows, mini_batch_size)]


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
