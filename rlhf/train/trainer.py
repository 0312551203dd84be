"""Launch one offline stage (pretrain, SFT, reward model, DPO) as a Ray Train `TorchTrainer`.

    final_model_dir = run_stage(cfg, "sft", init_dir="runs/tiny_cpu/pretrain/model")

The driver prepares and validates the stage's data once (bad input fails here, before any worker
starts) and saves it next to the stage; the workers load it from disk. Every checkpoint a worker
reports lands in `<run>/ray_train/<stage>/checkpoint_*`; re-running the same command resumes from
the newest one that validates. When the stage ends, the HF export of the chosen checkpoint is
committed atomically to `<run>/<stage>/model` and `<run>/<stage>/done.json` marks it finished, so
a re-run skips it. `<stage>.select`: best (the lowest held-out loss; Ray keeps that checkpoint
besides the newest), last, or auto (best when the stage has held-out data).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.config import Config
from rlhf.train.checkpoint import (
    CheckpointError,
    commit_dir,
    newest_valid_checkpoint,
    validate_checkpoint,
)
from rlhf.train.tasks import TASKS

# Ray Train's controller checks on its workers every 2 s by default, so a stage whose workers had
# finished waited ~3 s more before Ray Train released them; every 0.5 s costs no measurable time.
# Ray Train reads these from the driver's environment at fit() and hands them to its processes.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# On the embedded cluster (one machine this process started) Ray Train's preemption watcher has no
# other node to watch, and without a dashboard nothing reads its Prometheus metrics; each is one
# more process (or its work) on the machine at every stage's start.
EMBEDDED_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
NO_DASHBOARD_RAY_TRAIN_ENV = {"RAY_TRAIN_METRICS_ENABLED": "0"}


def ray_train_env() -> dict[str, str]:
    """The Ray Train settings a stage runs with on the cluster this process is connected to."""
    from rlhf.runtime import embedded_cluster

    env = dict(RAY_TRAIN_ENV)
    embedded = embedded_cluster()
    if embedded is not None:
        env.update(EMBEDDED_RAY_TRAIN_ENV)
        if not embedded["dashboard"]:
            env.update(NO_DASHBOARD_RAY_TRAIN_ENV)
    return env


class StageFailedError(RuntimeError):
    """A stage's workers failed; the message carries the root cause."""


def stage_paths(cfg: Config, stage: str) -> tuple[Path, Path]:
    """(stage_dir, ray_storage) as absolute paths: Ray Train needs absolute storage paths."""
    run_dir = cfg.run.dir.resolve()
    return run_dir / stage, run_dir / "ray_train"


def prepare_stage_data(cfg: Config, stage: str, init_dir: str, stage_dir: Path) -> dict:
    """Validate, tokenize and save the stage's data under `<stage_dir>/data`; return the report."""
    data_dir = stage_dir / "data"
    report_path = data_dir / "report.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    train, evals, report = TASKS[stage](cfg).prepare_data(cfg, init_dir)
    tmp = stage_dir / ".data.tmp"
    train.save_to_disk(str(tmp / "train"))
    evals.save_to_disk(str(tmp / "eval"))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    commit_dir(tmp, data_dir)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return report


def run_stage(cfg: Config, stage: str, init_dir: str) -> dict:
    """Train `stage` from `init_dir` (or resume it); return its `done.json` summary."""
    stage_dir, storage = stage_paths(cfg, stage)
    done = stage_dir / "done.json"
    if done.exists():
        print(f"== {stage}: already done ({done}); skipping", flush=True)
        return json.loads(done.read_text())
    scfg = getattr(cfg, stage)
    check_resources(scfg, stage)
    t0 = time.time()
    report = prepare_stage_data(cfg, stage, init_dir, stage_dir)
    resume = newest_valid_checkpoint(sorted((storage / stage).glob("checkpoint_*")))
    if resume is not None:
        print(f"== {stage}: resuming from {resume}", flush=True)
    trainer = _trainer(cfg, stage, init_dir, stage_dir, storage, resume)
    try:
        with _environment(ray_train_env()):
            result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the root cause, not the wrapper.
        raise StageFailedError(f"{stage} failed: {_root_cause(exc)}") from exc
    folders = sorted((storage / stage).glob("checkpoint_*"))
    final = best_checkpoint(folders) if scfg.select_best else newest_valid_checkpoint(folders)
    if final is None:
        raise CheckpointError(f"{stage}: finished without a checkpoint under {storage / stage}")
    selected = _selected(final, scfg.select_best)
    print(f"== {stage}: exporting {selected['why']}", flush=True)
    commit_dir(final / "model", stage_dir / "model")
    summary = {
        "stage": stage,
        "model": str(stage_dir / "model"),
        "init_from": str(init_dir),
        "selected": selected,
        "wall_s": round(time.time() - t0, 1),
        "metrics": {k: v for k, v in (result.metrics or {}).items() if k.startswith(stage)},
        "data": report,
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.rename(done)
    return summary


def _trainer(
    cfg: Config, stage: str, init_dir: str, stage_dir: Path, storage: Path, resume: Path | None
) -> Any:
    """The stage's Ray Train trainer: its workers run `train_stage` from `init_dir`, or from
    `resume` (a checkpoint folder), keeping checkpoints under `storage`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from rlhf.train.loop import train_stage

    scfg = getattr(cfg, stage)
    # One worker on the torch engine talks to no other rank: no torch process group (TorchTrainer
    # forms one, gloo included: ~0.6 s of a 0.4M SFT stage's ~10 s start-up, 2026-12-02).
    alone = scfg.num_workers == 1 and scfg.engine_backend == "torch"
    return (DataParallelTrainer if alone else TorchTrainer)(
        train_stage,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "stage": stage,
            "init_dir": str(init_dir),
            "stage_dir": str(stage_dir),
            "resume_dir": str(resume) if resume else None,
            "launched_at": time.time(),
        },
        scaling_config=ScalingConfig(
            num_workers=scfg.num_workers,
            use_gpu=scfg.use_gpu,
            resources_per_worker={
                "CPU": scfg.cpus_per_worker,
                **({"GPU": 1} if scfg.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=str(storage),
            # select=best: Ray keeps the 2 lowest held-out losses besides the newest checkpoint
            # (which resume needs), so the best one is still there to export at the end.
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=f"{stage}/eval_loss" if scfg.select_best else None,
                checkpoint_score_order="min",
            ),
            # A dead worker: Ray Train re-creates the group, which resumes from the newest
            # checkpoint reported (train_stage reads it), up to <stage>.max_failures times.
            failure_config=FailureConfig(max_failures=scfg.max_failures),
        ),
    )


def check_resources(scfg: Any, stage: str) -> None:
    """StageFailedError when the cluster's free CPUs (GPUs) cannot hold the stage's workers now:
    Ray Train would wait for them without end (e.g. a Serve replica on the same machine holds
    some). The RL stage checks its actors the same way (`actors.group.validate_resources`)."""
    import ray

    need = {"CPU": scfg.num_workers * scfg.cpus_per_worker}
    if scfg.use_gpu:
        need["GPU"] = float(scfg.num_workers)
    # A stage that just ended frees its workers' resources a little later: wait up to 15 s.
    deadline = time.monotonic() + 15.0
    free = ray.available_resources()
    while time.monotonic() < deadline and any(
        amount > free.get(kind, 0.0) + 1e-9 for kind, amount in need.items()
    ):
        time.sleep(0.5)
        free = ray.available_resources()
    for kind, amount in need.items():
        have = free.get(kind, 0.0)
        if amount > have + 1e-9:
            raise StageFailedError(
                f"{stage}: {stage}.num_workers = {scfg.num_workers} workers need {amount:g} {kind} "
                f"({stage}.cpus_per_worker = {scfg.cpus_per_worker}{' and a GPU' if kind == 'GPU' else ''} "
                f"each) but the cluster has {have:g} free of {ray.cluster_resources().get(kind, 0.0):g}: "
                f"lower {stage}.num_workers or {stage}.cpus_per_worker, or free the rest"
            )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block, except names the user set; restored after."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def checkpoint_score(folder: Path) -> tuple[int, float | None]:
    """(step, held-out loss measured at that step or None) from a checkpoint's trainer state."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return -1, None
    step, evals = state.get("step", -1), state.get("evals") or []
    if evals and evals[-1][0] == step and math.isfinite(evals[-1][1]):
        return step, float(evals[-1][1])
    return step, None


def best_checkpoint(folders: list[Path]) -> Path | None:
    """The valid checkpoint with the lowest held-out loss (the later one on a tie); the newest
    valid one when none was scored; None without folders; raises when none validates."""
    scored = [(loss, -step, p) for p in folders for step, loss in [checkpoint_score(p)]]
    for _, _, folder in sorted(x for x in scored if x[0] is not None):
        if validate_checkpoint(folder)[0]:
            return folder
    return newest_valid_checkpoint(folders)


def _selected(folder: Path, best: bool) -> dict:
    step, loss = checkpoint_score(folder)
    shown = f", held-out loss {loss:.4g}" if loss is not None else ""
    kind = "the checkpoint with the lowest held-out loss" if best else "the last checkpoint"
    return {
        "select": "best" if best else "last",
        "step": step,
        "eval_loss": loss,
        "why": f"{kind}: step {step}{shown}",
    }


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    # Ray prefixes the worker traceback; the last line holds "ErrorType: message".
    return text[-1] if text else type(seen).__name__
