"""Checkpoints that are either whole or absent: manifest with sha256 per file, atomic commit.

A checkpoint folder holds what every rank wrote (DeepSpeed state per rank, the HF export and
`trainer_state.json` from rank 0) plus one manifest per rank, `manifest.rank<r>.json`:

    {"rank": 0, "world_size": 2, "step": 40, "fingerprint": "...", "files": {"model/...": sha256}}

`validate_checkpoint` recomputes the hashes; `newest_valid_checkpoint` picks the newest folder that
validates and refuses (raises) when folders exist but none validates, so a run never silently
restarts from scratch over a damaged history.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MANIFEST_GLOB = "manifest.rank*.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())


def write_manifest(
    root: Path, files: list[Path], *, rank: int, world_size: int, step: int, fingerprint: str
) -> None:
    """Hash `files` (paths under `root`) and write this rank's manifest last, after an fsync."""
    fsync_tree(root)
    manifest = {
        "rank": rank,
        "world_size": world_size,
        "step": step,
        "fingerprint": fingerprint,
        "files": {str(f.relative_to(root)): sha256_file(f) for f in sorted(files)},
    }
    out = root / f"manifest.rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(out)


def validate_checkpoint(root: Path) -> tuple[bool, str, int]:
    """(valid, reason, step). Valid means every rank's manifest is present and every hash matches."""
    manifests = sorted(root.glob(MANIFEST_GLOB))
    if not manifests:
        return False, "no manifest", -1
    try:
        loaded = [json.loads(m.read_text()) for m in manifests]
    except (OSError, json.JSONDecodeError) as exc:
        return False, f"unreadable manifest: {exc}", -1
    world = loaded[0]["world_size"]
    if sorted(m["rank"] for m in loaded) != list(range(world)):
        return False, f"manifests for ranks {[m['rank'] for m in loaded]} of {world}", -1
    steps = {m["step"] for m in loaded}
    if len(steps) != 1:
        return False, f"ranks disagree on the step: {sorted(steps)}", -1
    for m in loaded:
        for rel, digest in m["files"].items():
            path = root / rel
            if not path.is_file():
                return False, f"missing file {rel}", -1
            if sha256_file(path) != digest:
                return False, f"sha256 mismatch in {rel}", -1
    return True, "ok", steps.pop()


def newest_valid_checkpoint(
    folders: list[Path], validate: Callable[[Path], tuple[bool, str, int]] | None = None
) -> Path | None:
    """Newest (highest step) valid folder; None if there are none; raise if none validates.

    `validate` checks one folder (default `validate_checkpoint`; the RL stage checks every part).
    """
    if not folders:
        return None
    checked = [(p, *(validate or validate_checkpoint)(p)) for p in folders]
    valid = [(step, p) for p, ok, _, step in checked if ok]
    if not valid:
        reasons = "; ".join(f"{p.name}: {why}" for p, _, why, _ in checked)
        raise CheckpointError(
            f"{len(folders)} checkpoint(s) exist but none validates ({reasons}). Refusing to "
            "start from scratch over them: repair or move them away to start fresh."
        )
    return max(valid)[1]


def commit_dir(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` via a temporary sibling and a rename: `dst` is whole or absent."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    fsync_tree(tmp)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
