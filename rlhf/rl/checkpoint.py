"""RL checkpoints: every trained role's DeepSpeed state plus the driver's state, whole or absent.

    runs/<name>/rl/checkpoints/step_000020/
        policy/   DeepSpeed state of every policy rank (model, optimizer, scheduler), the actor's
                  own state (weights version, PPO-ptx cursor), manifest.rank0.json
        critic/   the same for the critic (PPO)
        driver/   state.json: step, policy version, prompt-stream cursor, KL controller, monitor
                  windows, RNG states, the metrics before training; manifest.rank0.json

Parts are written under `.tmp-step_000020/` and the folder is renamed into place only after every
part's manifest (sha256 per file, written after an fsync) exists, so a kill at any moment leaves
either the whole checkpoint or a temporary folder that is ignored and removed. `newest()` returns
the newest checkpoint whose every part validates, and refuses (raises) when checkpoints exist but
none validates. Nothing here is unpickled: the driver state is JSON, RNG states included.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.train.checkpoint import newest_valid_checkpoint, validate_checkpoint, write_manifest

DRIVER = "driver"
PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{PREFIX}{step:06d}"


def validate(path: Path) -> tuple[bool, str, int]:
    """(valid, reason, step): every part (sub-folder) validates and they agree on the step."""
    parts = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    if not any(p.name == DRIVER for p in parts):
        return False, "no driver state", -1
    steps = set()
    for part in parts:
        ok, why, step = validate_checkpoint(part)
        if not ok:
            return False, f"{part.name}: {why}", -1
        steps.add(step)
    if len(steps) != 1:
        return False, f"parts disagree on the step: {sorted(steps)}", -1
    return True, "ok", steps.pop()


def newest(root: Path) -> Path | None:
    """The newest valid checkpoint under `root`; None if there is none; raise if none validates.

    Temporary folders of an interrupted save are removed first.
    """
    if not root.is_dir():
        return None
    for tmp in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return newest_valid_checkpoint(sorted(root.glob(f"{PREFIX}*")), validate=validate)


def write_driver_state(tmp: Path, state: dict, step: int, fingerprint: str) -> None:
    part = tmp / DRIVER
    part.mkdir(parents=True, exist_ok=True)
    (part / "state.json").write_text(json.dumps(state, indent=1))
    write_manifest(
        part, [part / "state.json"], rank=0, world_size=1, step=step, fingerprint=fingerprint
    )


def read_driver_state(path: Path) -> dict:
    return json.loads((path / DRIVER / "state.json").read_text())


def commit(tmp: Path, root: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place, then prune all but the newest `keep`."""
    final = step_dir(root, step)
    if final.exists():  # the same step saved before a crash that lost what followed it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states of this process, as JSON-serialisable values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
