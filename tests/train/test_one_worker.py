"""One CPU worker: an offline stage trains through Ray Train on the torch engine (no DeepSpeed),
says where its start-up went, and resumes from its checkpoint to the weights of an
uninterrupted run."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_stages import REPO, TINY

from rlhf.config import ConfigError, load_config
from rlhf.train.trainer import checkpoint_score, run_stage


def one_worker_config(tmp_path, *extra):
    return load_config(
        REPO / "configs/tiny_cpu.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "run.stages=[sft]",
            *TINY,
            "sft.num_workers=1",
            "sft.micro_batch_tokens=null",  # micro_batch_size rows: 2 accumulated per step
            "sft.max_steps=4",
            "sft.warmup_steps=1",
            "sft.micro_batch_size=4",
            "sft.global_batch_size=8",  # 2 micro-batches accumulated per step
            "sft.eval_interval=2",
            "sft.save_interval=2",
            "sft.log_interval=1",
            *extra,
        ],
    )


def test_engine_auto_is_torch_for_one_cpu_worker_in_fp32_and_deepspeed_otherwise(tmp_path):
    def stage(*extra):
        return one_worker_config(tmp_path, *extra).sft

    assert stage().engine_backend == "torch"
    assert stage("sft.precision=bf16").engine_backend == "deepspeed"
    assert stage("sft.num_workers=2").engine_backend == "deepspeed"
    assert stage("sft.num_workers=1", "sft.engine=deepspeed").engine_backend == "deepspeed"
    with pytest.raises(ConfigError, match="engine='torch' trains one CPU worker.*num_workers=2"):
        stage("sft.num_workers=2", "sft.engine=torch")


@pytest.mark.ray
@pytest.mark.e2e
def test_one_worker_trains_on_the_torch_engine_and_resumes_to_the_uninterrupted_weights(
    tmp_path, ray_cluster
):
    from rlhf.driver import base_model

    cfg = one_worker_config(tmp_path, "sft.lr=1e-2")
    base = base_model(cfg)
    stage_dir = cfg.run.dir / "sft"
    called_ms = time.time() * 1000
    summary = run_stage(cfg, "sft", base)
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    startup = next(x["data"] for x in lines if x.get("event") == "startup")
    assert startup["engine"] == "torch" and startup["workers"] == 1
    assert startup["process_group"] is False  # one rank: Ray Train forms no torch process group
    assert startup["resumed_step"] is None
    assert startup["launch_s"] > 0 and startup["model_s"] > 0
    # On the embedded cluster Ray Train starts no preemption watcher (one more process per stage;
    # a driver that joins this cluster, as in tests/serve/test_lifecycle.py, keeps Ray's defaults:
    # only the actors this stage started count).
    import ray._private.state

    actors = ray._private.state.actors().values()
    started = {a["ActorClassName"] for a in actors if a["StartTime"] >= called_ms}
    assert "TrainController" in started and "PreemptionWatcher" not in started, started
    rows = [x for x in lines if "step" in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"]
    uninterrupted = load_file(str(Path(summary["model"]) / "model.safetensors"))

    # Lose everything after the step-2 checkpoint, as a kill between the two checkpoints would
    # (Ray Train's own record of the newest checkpoint goes too): the re-run resumes at step 2.
    storage = cfg.run.dir / "ray_train/sft"
    for folder in storage.glob("checkpoint_*"):
        if checkpoint_score(folder)[0] == 4:
            shutil.rmtree(folder)
    (storage / "checkpoint_manager_snapshot.json").unlink()
    (stage_dir / "done.json").unlink()
    shutil.rmtree(stage_dir / "model")

    resumed = run_stage(cfg, "sft", base)
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "step" in x] == [1, 2, 3, 4]  # steps 3-4 re-done once
    startups = [x["data"] for x in lines if x.get("event") == "startup"]
    assert [s["resumed_step"] for s in startups] == [None, 2]  # resumed, not restarted
    again = load_file(str(Path(resumed["model"]) / "model.safetensors"))
    for k, v in uninterrupted.items():
        torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-6, msg=k)
