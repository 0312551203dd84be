"""The training loop every Ray Train stage shares (pretrain, SFT, reward model, DPO).

Runs inside each `TorchTrainer` worker. A stage plugs in through a `StageTask` (rlhf/train/tasks.py):
how to load its data, build its model, compute its loss and evaluation sums, and export weights.
The loop owns everything else: the data order, gradient accumulation, the engine (DeepSpeed, or
plain torch for one CPU worker: `<stage>.engine`), evaluation, non-finite guards, metrics, a
`startup` event (where the worker's start-up seconds went), and checkpoints that resume exactly.
Held-out losses are kept in the trainer state: rising `overfit_patience` evaluations in a row
warns (a `monitor` event), and with `select=best` every evaluation is a checkpoint whose loss picks
the exported model.

Data order: the sample at stream position p is `perm(seed + p // N)[p % N]`, so step s reads
positions [s*G, (s+1)*G) whatever the number of workers. Each rank takes every world-th micro-batch
of that global batch, and every loss is normalised by the global batch's token (or pair) count,
so 1 worker and 2 workers compute the same gradient for the same global batch.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import engine as eng
from rlhf.config import Config
from rlhf.monitor import overfit_event
from rlhf.train.core import (
    accumulate,
    all_reduce_sum,
    load_part,
    nonfinite_streak,
    optimizer_of,
    save_part,
    to_device,
)
from rlhf.train.metrics import MetricsWriter
from rlhf.train.tasks import TASKS, StageTask


@dataclass
class StageData:
    """What the driver prepared for a stage: tokenized train / eval rows and the data report."""

    train: Any
    eval: Any
    report: dict

    @classmethod
    def load(cls, folder: Path) -> StageData:
        """An empty split (no held-out files) loads as []: `datasets` saves no table for zero
        rows and then cannot load the folder."""
        from datasets import load_from_disk

        def split(path: Path) -> Any:
            state = json.loads((path / "state.json").read_text())
            return load_from_disk(str(path)) if state["_data_files"] else []

        return cls(
            split(folder / "train"),
            split(folder / "eval"),
            json.loads((folder / "report.json").read_text()),
        )


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Sample ids at stream positions [start, start + count): a fresh permutation per epoch."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch = pos // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][pos % n])
    return out


def token_budget_batches(rows: list, length: Callable[[Any], int], max_tokens: int) -> list[list]:
    """Cut `rows`, sorted by `length`, into consecutive micro-batches whose padded size (rows x
    the longest row's length) stays within `max_tokens`; a longer row goes alone."""
    batches: list[list] = []
    current: list = []
    for row in rows:
        if current and (len(current) + 1) * length(row) > max_tokens:
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def evaluate(
    task: StageTask,
    model: torch.nn.Module,
    eval_ds: Any,
    rank: int,
    world: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Sharded evaluation: each rank sums over its slice, sums are all-reduced, then finished.
    Batches of `batch_size` rows of similar length, or cut by `max_tokens` (token_budget_batches).

    No held-out samples (every rank sees the same split): no evaluation, no metrics.
    """
    if len(eval_ds) == 0:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    rows = sorted((eval_ds[j] for j in range(rank, len(eval_ds), world)), key=task.length)
    if max_tokens is None:
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        batches = token_budget_batches(rows, task.length, max_tokens)
    device = next(model.parameters()).device
    with torch.no_grad():
        for part in batches:
            batch = to_device(task.collate(part), device)
            for k, v in task.eval_sums(model, batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    # Ranks with an empty slice still take part in the all-reduce.
    sums = all_reduce_sum({k: sums.get(k, 0.0) for k in task.eval_keys})
    model.train()
    return task.finish_eval(sums)


def _save(
    engine: Any,
    task: StageTask,
    state: dict,
    cfg: Config,
    stage: str,
    rank: int,
    world: int,
    init_dir: str,
) -> str:
    """This rank's checkpoint part in a private folder (Ray Train gathers them); rank 0 adds the
    HF export and the trainer state."""
    root = Path(tempfile.mkdtemp(prefix=f"{stage}-ckpt-"))
    weights = eng.full_state_dict(engine)  # a collective under ZeRO-3: every rank calls it
    save_part(
        engine,
        root,
        state,
        rank=rank,
        world=world,
        step=state["step"],
        fingerprint=cfg.fingerprint(),
        rank0_files=lambda r: task.export(engine.module, weights, init_dir, r / "model"),
    )
    return str(root)


def train_stage(loop_config: dict) -> None:
    """Entry point of a Ray Train worker: `loop_config` holds the config, stage and paths."""
    import ray.train

    t_enter = time.time()
    cfg = Config.model_validate(loop_config["config"])
    stage, init_dir, resume_dir = (
        loop_config["stage"],
        loop_config["init_dir"],
        loop_config.get("resume_dir"),
    )
    restarted = ray.train.get_checkpoint()
    if restarted is not None:  # Ray Train re-created the workers after a failure
        resume_dir = restarted.path
    scfg = getattr(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not scfg.use_gpu:
        from rlhf.process_tuning import model_width, tune_cpu_compute

        tune_cpu_compute(scfg.cpus_per_worker, model_width(init_dir))
    task = TASKS[stage](cfg)
    torch.manual_seed(cfg.run.seed)

    marks = [time.time()]
    data = StageData.load(Path(loop_config["stage_dir"]) / "data")
    marks.append(time.time())
    model = task.build_model(cfg, init_dir)
    marks.append(time.time())
    engine = eng.engine_for(
        model,
        scfg,
        max_steps=scfg.max_steps,
        grad_accum_steps=scfg.grad_accum_steps,
        on_gpu=scfg.use_gpu,
    )
    marks.append(time.time())
    state = {"step": 0, "skipped_steps": 0, "nonfinite_streak": 0}
    if resume_dir:
        state = load_part(engine, Path(resume_dir))
        torch.manual_seed(cfg.run.seed + state["step"])
    marks.append(time.time())

    # Lines logged after the resumed step are dropped: those steps run again.
    writer = MetricsWriter(
        Path(loop_config["stage_dir"]),
        enabled=rank == 0,
        resume_step=state["step"] if resume_dir else -1,
    )
    if rank == 0 and not resume_dir:
        writer.log_event("data", data.report)
    if rank == 0:
        launched = None if restarted is not None else loop_config.get("launched_at")
        resumed = state["step"] if resume_dir else None
        writer.log_event("startup", _startup(launched, t_enter, marks, scfg, resumed))
    _run_steps(task, engine, data, cfg, stage, state, rank, world, writer, init_dir)
    writer.close()


def _startup(
    launched: float | None, entered: float, marks: list[float], scfg: Any, resumed: int | None
) -> dict:
    """Where this worker's start-up went, in seconds: Ray Train's worker-group start (from the
    driver's `fit()` to this function; None after Ray Train re-created the group), then loading
    the data, building the model, building the engine and restoring a checkpoint. The first
    step's own time is its `timing/step`. `resumed_step`: the checkpoint's step, or None.
    `process_group`: whether Ray Train formed a torch process group (not for one torch worker)."""
    names = ("setup_s", "data_s", "model_s", "engine_s", "resume_s")
    spans = [b - a for a, b in zip([entered, *marks], marks)]
    return {
        "engine": scfg.engine_backend,
        "workers": scfg.num_workers,
        "process_group": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "resumed_step": resumed,
        "launch_s": None if launched is None else round(entered - launched, 3),
        **{k: round(v, 3) for k, v in zip(names, spans)},
    }


def _train_step(
    task: StageTask, engine: Any, data: Any, scfg: Any, seed: int, step: int, rank: int, world: int
) -> dict[str, float]:
    """One optimizer step over one global batch; returns metrics summed over all ranks."""
    mb, gas = scfg.micro_batch_size, scfg.grad_accum_steps
    ids = stream_indices(
        step * scfg.global_batch_size, scfg.global_batch_size, len(data.train), seed
    )
    # Rows of similar length share a micro-batch (`collate` pads each to its longest row); the
    # global batch's loss and gradient do not depend on how its rows are split.
    rows = sorted((data.train[i] for i in ids), key=task.length)
    norm = max(1, task.loss_weight(rows))
    if scfg.micro_batch_tokens is not None:  # one worker, torch engine (validated)
        parts = token_budget_batches(rows, task.length, scfg.micro_batch_tokens)
        gas = engine.grad_accum_steps = len(parts)
    else:
        parts = [rows[(k * world + rank) * mb : (k * world + rank + 1) * mb] for k in range(gas)]
    device = next(engine.module.parameters()).device
    micro = (to_device(task.collate(part), device) for part in parts)
    sums, _, bad = accumulate(
        engine, micro, lambda b: task.loss(engine.module, b, norm), world, gas, loss_key="loss"
    )
    # Every rank saw the same (all-reduced) verdict: count the step once over the ranks.
    sums["nonfinite_loss"] = bad / world
    return all_reduce_sum(sums)


def _watch_overfitting(
    stage: str, patience: int, state: dict, ev: dict[str, float], writer: MetricsWriter
) -> None:
    """Keep the held-out losses in the trainer state (checkpointed, so a resume keeps them and
    the exported checkpoint can be chosen by them); warn when they rise `patience` times in a
    row, printed and as a `monitor` event in metrics.jsonl."""
    if "loss" not in ev:
        return
    state.setdefault("evals", []).append([state["step"], ev["loss"]])
    event = overfit_event(stage, state["evals"], patience)
    if event is not None and writer.enabled:
        writer.log_event("monitor", event.to_dict(), at_step=event.step)
        sys.stdout.write(f"warning: {event.message}\n")
        sys.stdout.flush()


def _after_step(
    task: StageTask,
    engine: Any,
    optimizer: Any,
    scfg: Any,
    stage: str,
    state: dict,
    sums: dict[str, float],
    t_step: float,
) -> dict[str, float]:
    """Count the step in `state` (step, skipped steps, non-finite streak: NonFiniteError after
    <stage>.max_nonfinite_steps in a row) and return its metrics."""
    step = state["step"]
    # Skipped by our guard, or by DeepSpeed itself (it skips on overflow without calling us).
    skipped = (
        optimizer.last_step_skipped
        or sums["nonfinite_loss"] > 0
        or not math.isfinite(eng.global_grad_norm(engine))
    )
    state["skipped_steps"] += int(skipped)
    state["nonfinite_streak"] = nonfinite_streak(
        state["nonfinite_streak"],
        skipped,
        scfg.max_nonfinite_steps,
        f"{stage} (last at step {step + 1}): lower {stage}.lr or check the data",
    )
    state["step"] = step + 1
    metrics = {f"{stage}/{k}": v for k, v in task.finish_train(sums).items()}
    metrics.update(
        {
            f"{stage}/lr": engine.get_lr()[0],
            f"{stage}/grad_norm": eng.global_grad_norm(engine),
            f"{stage}/skipped_steps": state["skipped_steps"],
            f"{stage}/timing/step": time.perf_counter() - t_step,
        }
    )
    return metrics


def _run_steps(
    task: StageTask,
    engine: Any,
    data: Any,
    cfg: Config,
    stage: str,
    state: dict,
    rank: int,
    world: int,
    writer: MetricsWriter,
    init_dir: str,
) -> None:
    import ray.train

    scfg = getattr(cfg, stage)
    optimizer = optimizer_of(engine)
    t_start, tokens = time.time(), 0.0
    while state["step"] < scfg.max_steps:
        step = state["step"]
        t_step = time.perf_counter()
        sums = _train_step(task, engine, data, scfg, cfg.run.seed, step, rank, world)
        metrics = _after_step(task, engine, optimizer, scfg, stage, state, sums, t_step)
        tokens += sums.get("tokens", 0.0)
        if tokens:  # language-modelling stages count tokens; preference stages count pairs
            metrics[f"{stage}/tokens_per_s"] = tokens / max(1e-9, time.time() - t_start)
        last = state["step"] == scfg.max_steps
        at_eval = state["step"] % scfg.eval_interval == 0 or last
        at_save = state["step"] % scfg.save_interval == 0 or last
        if scfg.select_best:  # every evaluation is a candidate checkpoint, every checkpoint scored
            at_eval = at_save = at_eval or at_save
        if at_eval:
            ev = evaluate(
                task,
                engine.module,
                data.eval,
                rank,
                world,
                scfg.micro_batch_size,
                scfg.micro_batch_tokens,
            )
            metrics.update({f"{stage}/eval_{k}": v for k, v in ev.items()})
            _watch_overfitting(stage, scfg.overfit_patience, state, ev, writer)
        if state["step"] % scfg.log_interval == 0 or last or state["step"] == 1:
            writer.log(state["step"], metrics, total=scfg.max_steps)
        if at_save:
            # Only checkpoints go through Ray Train: a report is a synchronous round trip to the
            # controller (it cost ~75% of a tiny-model step); metrics go to our own writer.
            ckpt = _save(engine, task, state, cfg, stage, rank, world, init_dir)
            ray.train.report(
                {**metrics, "step": state["step"]},
                checkpoint=ray.train.Checkpoint.from_directory(ckpt),
            )
            shutil.rmtree(ckpt, ignore_errors=True)  # Ray has copied it into storage
