"""Choosing the exported checkpoint by held-out loss, and the overfitting warning.

The Ray test runs SFT on 8 questions whose answers are random strings, and holds out the same
questions with other random answers: the first steps learn what answers look like (held-out loss
falls), then the model memorises the training answers (held-out loss rises).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import ConfigError, load_config
from rlhf.train.checkpoint import write_manifest
from rlhf.train.trainer import best_checkpoint, run_stage

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
]


def _checkpoint(root: Path, step: int, evals: list, tamper: bool = False) -> Path:
    """A checkpoint folder as the loop writes it: trainer state + weights + manifest."""
    folder = root / f"checkpoint_{step:03d}"
    (folder / "model").mkdir(parents=True)
    (folder / "model/model.safetensors").write_bytes(f"weights of step {step}".encode())
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "evals": evals}))
    write_manifest(
        folder, list(folder.rglob("*.*")), rank=0, world_size=1, step=step, fingerprint="f"
    )
    if tamper:
        (folder / "model/model.safetensors").write_bytes(b"damaged")
    return folder


def test_best_checkpoint_takes_the_lowest_loss_measured_at_each_checkpoints_own_step(tmp_path):
    a = _checkpoint(tmp_path, 2, [[2, 3.0]])
    b = _checkpoint(tmp_path, 4, [[2, 3.0], [4, 2.0]])
    c = _checkpoint(tmp_path, 6, [[2, 3.0], [4, 2.0], [6, 2.5]])
    assert best_checkpoint([a, b, c]) == b
    # A damaged best checkpoint is passed over for the next best.
    d = _checkpoint(tmp_path, 8, [[2, 3.0], [4, 2.0], [6, 2.5], [8, 1.0]], tamper=True)
    assert best_checkpoint([a, b, c, d]) == b
    # Without scores (no evaluation at the checkpoint's step): the newest valid one.
    e = _checkpoint(tmp_path / "u", 3, [[2, 1.0]])
    f = _checkpoint(tmp_path / "u", 5, [])
    assert best_checkpoint([e, f]) == f
    assert best_checkpoint([]) is None


def test_select_best_without_held_out_files_is_a_config_error():
    with pytest.raises(ConfigError, match="select='best'.*eval_files is empty"):
        load_config(REPO / "configs/tiny_cpu.yaml", ["sft.eval_files=[]", "sft.select=best"])
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["sft.eval_files=[]"])
    assert not cfg.sft.select_best  # auto: the last checkpoint
    assert cfg.pretrain.select_best  # pretraining always holds out 5% of its blocks
    assert load_config(REPO / "configs/tiny_cpu.yaml").sft.select_best


def _answers(seed: int) -> str:
    rng = random.Random(seed)
    return "".join(
        json.dumps(
            {
                "input": f"Name the code of box {i}.",
                "output": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12)),
            }
        )
        + "\n"
        for i in range(8)
    )


@pytest.mark.ray
@pytest.mark.e2e
def test_select_best_exports_the_lowest_held_out_loss_and_warns_of_overfitting(
    tmp_path, ray_cluster
):
    from rlhf.driver import base_model

    (tmp_path / "train.jsonl").write_text(_answers(0))
    (tmp_path / "eval.jsonl").write_text(_answers(1))
    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "run.stages=[sft]",
            *TINY,
            f"sft.train_files=[{{path: {tmp_path / 'train.jsonl'}}}]",
            f"sft.eval_files=[{{path: {tmp_path / 'eval.jsonl'}}}]",
            "sft.num_workers=1",
            "sft.micro_batch_size=8",
            "sft.global_batch_size=8",
            "sft.max_steps=24",
            "sft.warmup_steps=1",
            "sft.lr=1e-2",
            "sft.weight_decay=0.0",
            "sft.eval_interval=3",
            "sft.save_interval=100",  # select=best checkpoints at every evaluation anyway
            "sft.log_interval=3",
            "sft.overfit_patience=2",
            "sft.select=best",
        ],
    )
    summary = run_stage(cfg, "sft", base_model(cfg))
    stage_dir = cfg.run.dir / "sft"
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["sft/eval_loss"]) for r in lines if "sft/eval_loss" in r]
    print("held-out loss by step:", evals)
    best_step, best_loss = min(evals, key=lambda x: x[1])
    assert evals[-1][0] == 24 and best_step < 24 and evals[-1][1] > best_loss

    # Ray kept the best checkpoint (lowest loss) besides the newest one.
    kept = {}
    for folder in (cfg.run.dir / "ray_train/sft").glob("checkpoint_*/"):
        kept[json.loads((folder / "trainer_state.json").read_text())["step"]] = folder
    assert best_step in kept and 24 in kept, sorted(kept)
    exported = load_file(str(stage_dir / "model/model.safetensors"))
    at_best = load_file(str(kept[best_step] / "model/model.safetensors"))
    at_last = load_file(str(kept[24] / "model/model.safetensors"))
    assert exported.keys() == at_best.keys()
    assert all(torch.equal(exported[k], at_best[k]) for k in exported)
    assert not all(torch.equal(exported[k], at_last[k]) for k in exported)
    assert summary["selected"]["step"] == best_step
    assert summary["selected"]["eval_loss"] == pytest.approx(best_loss)

    # The held-out loss rose twice in a row at least once: one warning per rising streak.
    warnings = [r["data"] for r in lines if r.get("event") == "monitor"]
    assert warnings and all(w["rule"] == "overfit" for w in warnings)
    by_step = dict(evals)
    for w in warnings:
        i = [s for s, _ in evals].index(w["step"])
        assert by_step[w["step"]] > evals[i - 1][1] > evals[i - 2][1], (w, evals)
        assert "sft.overfit_patience" in w["message"]
