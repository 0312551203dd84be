"""The training core shared by the offline stages (rlhf/train/loop.py) and the RL policy and
critic updates (rlhf/rl/worker.py): one optimizer step over micro-batches, the non-finite guard,
and a rank's checkpoint part.

    sums, count, bad = accumulate(engine, micro_batches, loss_fn, world, gas)   # one step
    streak = nonfinite_streak(streak, skipped, limit, what)                     # abort check
    save_part(engine, root, state, rank=r, world=w, step=s, fingerprint=fp)     # checkpoint
    state = load_part(engine, root)

Loss normalisation: `loss_fn` returns a micro-batch's loss already divided by its whole
mini-batch's (global) token or sequence count; the engine (DeepSpeed, or rlhf/engine.py's
`TorchEngine` for one CPU rank) averages gradients over ranks and divides by the accumulation
steps, and `backward_step` undoes both (`* world * gas`), so 1 and N ranks compute the same
gradient for the same mini-batch. Non-finite: a loss that is not finite on any rank (all ranks
agree) becomes a zero that keeps the engine's bookkeeping, and the optimizer skips the step
(`GuardedAdamW.force_skip`); `nonfinite_streak` aborts after too many in a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhf import engine as eng
from rlhf.train.checkpoint import write_manifest

STATE_FILE = "trainer_state.json"


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def optimizer_of(engine: Any) -> eng.GuardedAdamW:
    """Our AdamW inside DeepSpeed's wrapper (ZeRO) or as is (stage 0)."""
    opt = engine.optimizer
    return opt if isinstance(opt, eng.GuardedAdamW) else opt.optimizer


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A batch dict's tensors on `device` (the model's: a GPU rank's batches go to its GPU);
    other values as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def several_ranks() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over the ranks (a no-op without a process group or with one rank)."""
    if not values or not several_ranks():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def backward_step(engine: Any, loss: torch.Tensor, world: int, gas: int) -> tuple[Any, bool]:
    """One micro-batch's backward and engine step; returns (the loss used, whether it was
    non-finite on any rank)."""
    bad = all_reduce_sum({"bad": float(not torch.isfinite(loss).item())})["bad"] > 0
    if bad:
        optimizer_of(engine).force_skip = True
        loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
    engine.backward(loss * world * gas)
    engine.step()
    return loss, bad


def accumulate(
    engine: Any,
    micro_batches: Iterable[Any],
    loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    world: int,
    gas: int,
    loss_key: str | None = None,
) -> tuple[dict[str, float], int, int]:
    """One optimizer step: backward and step on each of this rank's `gas` micro-batches.

    `loss_fn(micro_batch) -> (loss, metrics)`. Returns this rank's summed metrics (plus the
    loss actually used under `loss_key`, if given), the number of micro-batches and how many
    of them had a non-finite loss.
    """
    sums: dict[str, float] = {}
    count = bad_count = 0
    for micro in micro_batches:
        loss, metrics = loss_fn(micro)
        loss, bad = backward_step(engine, loss, world, gas)
        if loss_key is not None:
            metrics = {loss_key: loss.item(), **metrics}
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
        bad_count += int(bad)
    return sums, count, bad_count


def last_step_skipped(engine: Any) -> bool:
    """Whether the optimizer skipped its last step (our guard, or DeepSpeed's own overflow)."""
    return bool(optimizer_of(engine).last_step_skipped)


def nonfinite_streak(streak: int, skipped: bool, limit: int, what: str) -> int:
    """The streak of skipped steps after this one; raise NonFiniteError when it reaches `limit`.
    `what` ends the message: which setting to lower, what to check."""
    streak = streak + 1 if skipped else 0
    if streak >= limit:
        raise NonFiniteError(f"{streak} steps in a row had a non-finite loss or gradient; {what}")
    return streak


def save_part(
    engine: Any,
    root: Path,
    state: dict,
    *,
    rank: int,
    world: int,
    step: int,
    fingerprint: str,
    rank0_files: Callable[[Path], None] | None = None,
) -> None:
    """This rank's part of a checkpoint under `root`: its engine state (model, optimizer,
    scheduler); rank 0 adds `state` as JSON (and whatever `rank0_files(root)` writes); then every
    rank hashes what is under `root` into its own manifest. Every rank must call it. `root` may be
    private to the rank (Ray Train) or shared by the ranks (RL): either way the manifests appear
    only once every rank's files are whole."""
    eng.save_engine_state(engine, root / "engine")  # ends with a barrier of the ranks
    if rank == 0:
        if rank0_files is not None:
            rank0_files(root)
        (root / STATE_FILE).write_text(json.dumps(state, indent=1))
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0's files exist before any rank hashes a shared folder
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith("manifest.")]
    write_manifest(root, files, rank=rank, world_size=world, step=step, fingerprint=fingerprint)


def load_part(engine: Any, root: Path) -> dict:
    """Restore this rank's engine state from a checkpoint part; return the saved state."""
    eng.load_engine_state(engine, root / "engine")
    return json.loads((root / STATE_FILE).read_text())
