"""RL checkpoints: parts validated together, atomic commit and pruning, RNG state round trip,
the PPO-ptx stream resumed mid-epoch, and the metrics log rewound to a checkpoint."""

import json
import random

import numpy as np
import pytest
import torch

from rlhf.rl import checkpoint as ck
from rlhf.rl.worker import ptx_stream
from rlhf.train.checkpoint import CheckpointError, write_manifest
from rlhf.train.metrics import MetricsWriter


def _save(root, step, parts=("policy", "critic")):
    tmp = ck.tmp_dir(root, step)
    for part in parts:
        f = tmp / part / "engine" / "state.bin"
        f.parent.mkdir(parents=True)
        f.write_bytes(bytes([step % 256]) * 64)
        write_manifest(tmp / part, [f], rank=0, world_size=1, step=step, fingerprint="x")
    ck.write_driver_state(tmp, {"step": step}, step, "x")
    return tmp


def test_commit_keeps_the_newest_and_newest_returns_the_latest_valid(tmp_path):
    for step in (2, 4, 6):
        ck.commit(_save(tmp_path, step), tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000006"]
    assert ck.newest(tmp_path) == tmp_path / "step_000006"
    assert ck.read_driver_state(ck.newest(tmp_path)) == {"step": 6}


def test_an_interrupted_save_is_ignored_and_removed(tmp_path):
    ck.commit(_save(tmp_path, 2), tmp_path, 2, keep=2)
    tmp = _save(tmp_path, 4)
    (tmp / "critic" / "manifest.rank0.json").unlink()  # killed before the critic's manifest
    assert ck.newest(tmp_path) == tmp_path / "step_000002"
    assert not tmp.exists()


def test_a_damaged_part_fails_the_whole_checkpoint(tmp_path):
    ck.commit(_save(tmp_path, 2), tmp_path, 2, keep=2)
    ck.commit(_save(tmp_path, 4), tmp_path, 4, keep=2)
    (tmp_path / "step_000004" / "policy" / "engine" / "state.bin").write_bytes(b"torn")
    ok, why, _ = ck.validate(tmp_path / "step_000004")
    assert not ok and why == "policy: sha256 mismatch in engine/state.bin"
    assert ck.newest(tmp_path) == tmp_path / "step_000002"
    (tmp_path / "step_000002" / "driver" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="none validates"):
        ck.newest(tmp_path)


def test_rng_states_survive_a_json_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(ck.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_ptx_stream_started_after_k_batches_continues_the_same_sequence():
    rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(10)]
    whole = ptx_stream(rows, batch_size=3, seed=5)
    batches = [next(whole)["input_ids"].tolist() for _ in range(8)]  # 3 per epoch: crosses two
    resumed = ptx_stream(rows, batch_size=3, seed=5, start=4)
    assert [next(resumed)["input_ids"].tolist() for _ in range(4)] == batches[4:]


def test_metrics_writer_resumed_at_a_step_drops_later_lines(tmp_path):
    w = MetricsWriter(tmp_path)
    w.log_event("prompts", {"n": 1})
    for step in range(5):
        w.log(step, {"rl/x": float(step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rl/x"')  # cut short by a kill
    w = MetricsWriter(tmp_path, resume_step=2)
    w.log(3, {"rl/x": 30.0})
    w.rewind(1)
    w.log(2, {"rl/x": 20.0})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "prompts"
    assert [(x["step"], x["rl/x"]) for x in lines[1:]] == [(0, 0.0), (1, 1.0), (2, 20.0)]
    MetricsWriter(tmp_path, resume_step=-1).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
