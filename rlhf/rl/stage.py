"""The RL stage of the pipeline: resume, the step loop, checkpoints, the monitor, the export.

    result = run_rl(cfg, policy_dir="runs/x/sft/model", reward_model_dir="runs/x/rm/model")

`RLRun` (rlhf/rl/trainer.py) holds the actors and runs one step; this module runs the stage
around it. Every rl.save_interval steps a checkpoint (rlhf/rl/checkpoint.py) is committed; a
re-run resumes from the newest valid one and the metrics log continues from its step; a dead
actor is recovered and the step retried (rlhf/rl/faults.py); after every step the monitor's rules
(rlhf/monitor.py) may warn, pause (checkpoint + paused.json, exit code 3) or stop the run.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import ray

from rlhf.config import Config
from rlhf.rl.trainer import RLRun


def run_rl(
    cfg: Config, policy_dir: str, reward_model_dir: str | None = None, reward_fn: Any = None
) -> dict:
    """The RL stage of the pipeline; returns {"model", "wall_s", "metrics"} like run_stage.

    Resumes from the newest valid checkpoint under `rl/checkpoints/` when there is one (the
    metrics log continues from its step); a dead actor is re-created and the step retried
    (`rlhf/rl/faults.py`).
    """
    from rlhf.rl import checkpoint as ck
    from rlhf.train.metrics import MetricsWriter

    started = time.time()
    rl = cfg.rl
    out_dir = cfg.run.dir.resolve() / "rl"
    done = out_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = ck.newest(out_dir / "checkpoints")
    run = RLRun(cfg, policy_dir, reward_model_dir, reward_fn=reward_fn)
    writer = None
    try:
        if resume is not None:
            state = run.restore(resume)
            before = state["before"]
            print(f"== rl: resumed from {resume} (step {run.steps_done})", flush=True)
            writer = MetricsWriter(out_dir, resume_step=run.steps_done)
            paused = out_dir / "paused.json"
            if paused.exists():  # the user has changed the config or acknowledged the rule
                writer.log_event("resumed_after_pause", json.loads(paused.read_text()))
                paused.unlink()
        else:
            writer = MetricsWriter(out_dir, resume_step=-1)
            writer.log_event("prompts", run.prompt_report)
            before = run.evaluate()
            writer.log(0, {f"rl/{k}": v for k, v in before.items()}, total=rl.max_steps)
        metrics = _train(run, writer, before)
        model_dir = out_dir / "model"
        tmp = out_dir / "model.tmp"
        ray.get(run.groups["policy"].call_async("save", str(tmp)))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        if writer is not None:
            writer.close()
        run.shutdown()
    final = {f"rl/{k}": v for k, v in metrics.items()}
    final.update({f"rl/before_{k.split('/', 1)[1]}": v for k, v in before.items()})
    result = {"model": str(model_dir), "wall_s": round(time.time() - started, 1), "metrics": final}
    done.write_text(json.dumps(result, indent=1))
    return result


def _watch(run: RLRun, writer: Any, metrics: dict[str, float], before: dict) -> None:
    """The monitor's rules on this step's metrics: log every event; a `stop` ends the stage
    (MonitorStop), a `pause` checkpoints this step, writes paused.json and raises PausedRun."""
    from rlhf.monitor import MonitorStop, PausedRun, blocking, write_pause

    events = run.monitor.check(run.steps_done, metrics)
    for event in events:
        writer.log_event("monitor", event.to_dict(), at_step=event.step)
        print(f"== monitor {event.action}: {event.message}", flush=True)
    event = blocking(events)
    if event is None:
        return
    if event.action == "stop":
        raise MonitorStop(event)
    run.save_checkpoint({"before": before})
    raise PausedRun(event, write_pause(run.stage_dir, event, run.steps_done))


def _train(run: RLRun, writer: Any, before: dict) -> dict[str, float]:
    """Steps from `run.steps_done` to rl.max_steps: evaluate, log, checkpoint every
    rl.save_interval steps; a dead actor is recovered and the step retried."""
    from rlhf.rl.faults import recoverable

    rl = run.rl
    metrics: dict[str, float] = {}
    attempts = 0
    save_s = None  # seconds of the last checkpoint, logged with the next step
    while run.steps_done < rl.max_steps:
        step = run.steps_done
        snapshot = (run.prompt_cursor, run.version, run.kl.value)
        try:
            metrics = run.step(step)
            last = step + 1 == rl.max_steps
            if (step + 1) % rl.eval_interval == 0 or last:
                metrics.update(run.evaluate())
        except recoverable() as exc:
            attempts = _recover(run, writer, exc, snapshot, attempts)
            continue
        attempts = 0
        run.steps_done = step + 1
        metrics["fault/restarts"] = float(run.restarts)
        if save_s is not None:
            metrics["checkpoint/save_s"], save_s = save_s, None
        writer.log(run.steps_done, {f"rl/{k}": v for k, v in metrics.items()}, total=rl.max_steps)
        _watch(run, writer, metrics, before)
        # Logged first: a kill between the two resumes from the previous checkpoint and drops
        # the lines after it, so no step is logged twice or lost.
        if run.steps_done % rl.save_interval == 0 and run.steps_done < rl.max_steps:
            try:
                path, save_s = run.save_checkpoint({"before": before})
            except recoverable() as exc:  # a trained rank died while saving: nothing committed
                after = (run.prompt_cursor, run.version, run.kl.value)
                attempts = _recover(run, writer, exc, after, attempts)
                continue
            print(f"== rl: checkpoint {path.name} in {save_s:.2f}s", flush=True)
    return metrics


def _recover(run: RLRun, writer: Any, exc: BaseException, snapshot: tuple, attempts: int) -> int:
    """Recover from a dead actor (rlhf/rl/faults.py); a trained role goes back to its newest
    checkpoint and the metrics log with it. Returns the failed attempts so far."""
    from rlhf.rl.faults import recover

    restored = recover(run, exc, snapshot, attempts + 1)
    if restored is not None:
        writer.rewind(restored)
    return attempts + 1
