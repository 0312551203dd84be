"""Checkpoints are whole or absent: manifests, hash validation, newest-valid selection."""

import pytest

from rlhf.train.checkpoint import (
    CheckpointError,
    commit_dir,
    newest_valid_checkpoint,
    validate_checkpoint,
    write_manifest,
)


def _checkpoint(root, step, world=2):
    root.mkdir(parents=True)
    for rank in range(world):
        f = root / f"engine/rank{rank}.bin"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(bytes([rank, step % 256]) * 100)
        write_manifest(root, [f], rank=rank, world_size=world, step=step, fingerprint="abc")
    return root


def test_a_complete_checkpoint_validates_with_its_step(tmp_path):
    ok, reason, step = validate_checkpoint(_checkpoint(tmp_path / "c", step=7))
    assert (ok, reason, step) == (True, "ok", 7)


def test_a_flipped_byte_fails_validation_naming_the_file(tmp_path):
    root = _checkpoint(tmp_path / "c", step=7)
    data = bytearray((root / "engine/rank1.bin").read_bytes())
    data[3] ^= 0xFF
    (root / "engine/rank1.bin").write_bytes(bytes(data))
    assert validate_checkpoint(root) == (False, "sha256 mismatch in engine/rank1.bin", -1)


def test_a_missing_rank_manifest_fails_validation(tmp_path):
    root = _checkpoint(tmp_path / "c", step=7)
    (root / "manifest.rank1.json").unlink()
    ok, reason, _ = validate_checkpoint(root)
    assert not ok and "ranks [0] of 2" in reason


def test_newest_valid_checkpoint_skips_a_damaged_newer_one(tmp_path):
    old = _checkpoint(tmp_path / "checkpoint_a", step=10)
    new = _checkpoint(tmp_path / "checkpoint_b", step=20)
    (new / "engine/rank0.bin").unlink()
    assert newest_valid_checkpoint([old, new]) == old


def test_newest_valid_checkpoint_refuses_when_none_validates(tmp_path):
    bad = _checkpoint(tmp_path / "checkpoint_a", step=10)
    (bad / "manifest.rank0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="none validates.*Refusing to start from scratch"):
        newest_valid_checkpoint([bad])


def test_no_checkpoints_means_a_fresh_start(tmp_path):
    assert newest_valid_checkpoint([]) is None


def test_commit_dir_replaces_the_destination_whole(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out/model"
    src.mkdir()
    (src / "a.txt").write_text("new")
    dst.mkdir(parents=True)
    (dst / "stale.txt").write_text("old")
    commit_dir(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["a.txt"]
    assert not any(p.name.startswith(".") for p in dst.parent.iterdir())
