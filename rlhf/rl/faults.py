"""Recovering the RL stage from a dead actor, so a long run survives what kills one process.

    except recoverable() as exc:
        restored_step = recover(run, exc, snapshot, attempts)

What died decides what happens (Ray reports it as RayActorError, or as a lost object whose owner
died):
- A rollout engine, a reference or reward-model rank, or the advantage helper: re-created on its
  bundle (ranks that share a torch.distributed group are re-created together), engines get the
  policy's current weights and version, and the interrupted step is retried from its start (the
  prompt cursor, version and KL coefficient are put back): at most one step's work is lost.
  Samples generated ahead (rl.max_staleness) are dropped and generated again.
- A policy or critic rank: both trained roles are re-created and restored from the newest RL
  checkpoint (or their initial weights when none exists yet), the driver state with them; at most
  rl.max_failures times in a run.
A step that keeps failing after rl.max_failures restarts ends the stage with a clear error naming
the actor and the cause. Every restart is printed and counted in `fault/restarts`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import ray

FROZEN_ROLES = ("rollout", "reference", "reward_model")
TRAINED_ROLES = ("policy", "critic")


def recoverable() -> tuple[type[BaseException], ...]:
    return (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def _cause(exc: BaseException) -> str:
    """One line: the root error's first line, with the dead actor's class and pid when known."""
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    who = re.search(r"class_name: (\w+)", text)
    pid = re.search(r"pid: (\d+)", text)
    if who:
        first += f" [{who.group(1)}{f' pid {pid.group(1)}' if pid else ''}]"
    return first


def recover(run: Any, exc: BaseException, snapshot: tuple, attempts: int) -> int | None:
    """Re-create what died; return the step restored from a checkpoint, or None when the step
    is simply retried."""
    from rlhf.rl.trainer import RLStageError

    rl = run.rl
    step = run.steps_done + 1
    run.ahead.drop()  # samples generated ahead (rl.max_staleness) may come from a dead engine
    dead = {role: g.dead_ranks() for role, g in run.groups.items()}
    dead = {role: ranks for role, ranks in dead.items() if ranks}
    where = ", ".join(f"{role} rank(s) {ranks}" for role, ranks in dead.items()) or "no actor"
    if any(role in TRAINED_ROLES for role in dead):
        if run.restores >= rl.max_failures:
            raise RLStageError(
                f"rl step {step}: {where} died ({_cause(exc)}); already restored "
                f"{run.restores} time(s) = rl.max_failures: giving up"
            )
        return _restore_trained(run, dead, where, exc)
    if attempts > rl.max_failures:
        raise RLStageError(
            f"rl step {step}: failed {attempts} times in a row, last because {where} died "
            f"({_cause(exc)}); rl.max_failures = {rl.max_failures}"
        )
    t0 = time.perf_counter()
    for role, ranks in dead.items():
        group = run.groups[role]
        # Engines are independent; ranks of a frozen role share a torch.distributed group.
        group.restart(ranks if role == "rollout" else None)
        run.restarts += len(ranks) if role == "rollout" else group.num_actors
    if not _alive(run.helper):
        from rlhf.rl.advantages import AdvantageWorker

        run.helper = AdvantageWorker.remote()
        run.restarts += 1
        where += ", advantage helper"
    run.prompt_cursor, run.version, run.kl.value = snapshot
    run.dispatcher.engines = run.engine_actors()
    if "rollout" in dead:
        if rl.uses_broadcast_sync:
            run.init_weight_broadcast()
        run.push_weights()
    print(
        f"== rl fault: {where} died ({_cause(exc)}); re-created in "
        f"{time.perf_counter() - t0:.1f}s, retrying step {step} "
        f"(fault/restarts = {run.restarts})",
        flush=True,
    )
    return None


def resync_after_train(run: Any, exc: BaseException) -> None:
    """An engine died during the weight sync after the policy trained: re-create it and push
    the weights again (the step's update is kept). A dead trained rank re-raises."""
    run.ahead.drop()
    dead = {role: g.dead_ranks() for role, g in run.groups.items()}
    if any(dead.get(role) for role in TRAINED_ROLES) or not dead.get("rollout"):
        raise exc
    t0 = time.perf_counter()
    run.groups["rollout"].restart(dead["rollout"])
    run.restarts += len(dead["rollout"])
    run.dispatcher.engines = run.engine_actors()
    if run.rl.uses_broadcast_sync:
        run.init_weight_broadcast()
    run.push_weights()
    print(
        f"== rl fault: rollout rank(s) {dead['rollout']} died during the weight sync "
        f"({_cause(exc)}); re-created and re-synced in {time.perf_counter() - t0:.1f}s "
        f"(fault/restarts = {run.restarts})",
        flush=True,
    )


def _restore_trained(run: Any, dead: dict, where: str, exc: BaseException) -> int:
    from rlhf.rl import checkpoint as ck

    t0 = time.perf_counter()
    run.restores += 1
    for role in TRAINED_ROLES:
        if role in run.groups:
            run.groups[role].restart()
            run.restarts += run.groups[role].num_actors
    for role, ranks in dead.items():  # a frozen role that died with them
        if role in FROZEN_ROLES:
            run.groups[role].restart(ranks if role == "rollout" else None)
            run.restarts += len(ranks)
    run.dispatcher.engines = run.engine_actors()
    if run.rl.uses_broadcast_sync:
        run.init_weight_broadcast()
    path = ck.newest(run.stage_dir / "checkpoints")
    if path is not None:
        run.restore(path)
    else:  # no checkpoint yet: the new ranks hold the initial weights; start over
        run.steps_done, run.version, run.prompt_cursor = 0, 0, 0
        run.kl.value = run.rl.kl_coef
        run.push_weights()
    print(
        f"== rl fault: {where} died ({_cause(exc)}); trained roles restored from "
        f"{path.name if path else 'their initial weights'} in {time.perf_counter() - t0:.1f}s, "
        f"continuing at step {run.steps_done + 1} (restore {run.restores} of at most "
        f"rl.max_failures = {run.rl.max_failures})",
        flush=True,
    )
    return run.steps_done


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=60)
        return True
    except ray.exceptions.RayActorError:
        return False
