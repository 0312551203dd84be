"""The advantage phase of an RL step as glue: the sampled batch, its scores and the logprobs
(and values) other actors computed, fetched from the object store and combined by the pure
functions of `rlhf.rl.experience` / `rlhf.algorithms`.

It runs in the driver's `AdvantageWorker` (next to the data), or, when the update is on-policy
and no critic takes part, inside the policy's own `train_on_rollouts` call: one Ray round trip
and one copy of the batch through the store fewer per step.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from rlhf.rl.experience import Experience, concat_rows


def advantages_from_parts(
    batch: Experience,
    scores: Any,
    ref_parts: list,
    old_parts: list,
    value_parts: list,
    kwargs: dict,
) -> tuple[Experience, dict]:
    """`old_parts` empty: the update is on-policy, the engine's logprobs stand in for the old
    logprobs here (KL in the reward, `kl/` metrics; within ~1e-7 of the trainer's in fp32 after
    a sync) and the policy's training forward measures the gap. `ref_parts` empty: no
    reference model (kl_coef 0), no KL. A part is an object ref or, computed in this process
    (the policy holding the reference), the `{"out", "compute_s"}` dict itself."""
    from rlhf.algorithms import truncated_is_weights
    from rlhf.rl.experience import compute_advantages, concat_rows, groups_with_signal

    parts = {"ref_logprobs": ref_parts, "old_logprobs": old_parts, "values": value_parts}
    compute = {}
    if isinstance(scores, dict):  # from the reward model actors
        compute["compute/reward_s"] = scores["compute_s"]
        scores = scores["out"]
    batch = batch.replace(scores=torch.as_tensor(scores, dtype=torch.float32))
    for key, refs in parts.items():
        if refs:
            got = [p if isinstance(p, dict) else ray.get(p) for p in refs]
            batch = batch.replace(**{key: concat_rows([g["out"] for g in got])})
            compute[f"compute/{key}_s"] = max(g["compute_s"] for g in got)
    if not old_parts:
        batch = batch.replace(old_logprobs=batch.rollout_logprobs)
    batch, metrics = compute_advantages(batch, **kwargs)
    signal = groups_with_signal(batch.scores.tolist(), kwargs["group_size"])
    metrics["reward/flat_group_frac"] = 1.0 - sum(signal) / max(1, len(signal))
    if old_parts:
        _, gap = truncated_is_weights(
            batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
        )
        metrics.update(gap)
    metrics.update(compute)
    return batch, metrics


@ray.remote(num_cpus=0)
class AdvantageWorker:
    """The advantage phase next to the data (a long-lived actor: Ray reaps idle task workers
    on a small machine, and re-importing torch cost ~2 s per step)."""

    @ray.method(num_returns=2)
    def compute(
        self,
        batch: Experience,
        scores: Any,
        ref_parts: list,
        old_parts: list,
        value_parts: list,
        kwargs: dict,
    ) -> tuple[Experience, dict]:
        """Returns (batch with advantages, metrics); only the metrics go to the driver."""
        return advantages_from_parts(batch, scores, ref_parts, old_parts, value_parts, kwargs)

    def concat(self, parts: list) -> dict:
        got = ray.get(parts)
        return {
            "out": concat_rows([g["out"] for g in got]),
            "compute_s": max(g["compute_s"] for g in got),
        }
