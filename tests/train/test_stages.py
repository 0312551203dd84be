"""Each Ray Train stage for a few steps on a real local Ray cluster: the demo config's one worker
(the plain-torch engine) or two DeepSpeed workers (gloo, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import load_config
from rlhf.train.trainer import run_stage

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
]


def small_config(tmp_path, stage, *extra):
    """The shipped demo config, shrunk to a few steps of a very small model."""
    overrides = [
        f"run.output_dir={tmp_path}",
        "run.name=t",
        f"run.stages=[{stage}]",
        *TINY,
        f"{stage}.max_steps=4",
        f"{stage}.warmup_steps=1",
        f"{stage}.micro_batch_size=2",
        f"{stage}.global_batch_size=8",
        f"{stage}.eval_interval=2",
        f"{stage}.save_interval=2",
        f"{stage}.log_interval=1",
        *extra,
    ]
    if stage == "pretrain":
        overrides += ["pretrain.token_budget=20000", "pretrain.max_length=64"]
    return load_config(REPO / "configs/tiny_cpu.yaml", overrides)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, ray_cluster):
    from rlhf.driver import base_model as build

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml", [f"run.output_dir={tmp_path_factory.mktemp('base')}", *TINY]
    )
    return build(cfg)


def _metrics(stage_dir):
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x]


def _weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


# The demo config trains every stage on one worker; pretraining and DPO run here on two DeepSpeed
# workers instead, so that both engines train real stages.
TWO_DEEPSPEED_WORKERS = {"pretrain", "dpo"}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "dpo"])
def test_each_stage_trains_a_few_steps_and_exports_a_loadable_hf_checkpoint(
    tmp_path, base_model, stage
):
    two = [f"{stage}.num_workers=2", f"{stage}.cpus_per_worker=1"]
    cfg = small_config(tmp_path, stage, *(two if stage in TWO_DEEPSPEED_WORKERS else []))
    summary = run_stage(cfg, stage, base_model)
    stage_dir = Path(summary["model"]).parent
    rows = _metrics(stage_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(isinstance(r[f"{stage}/loss"], float) for r in rows)
    assert f"{stage}/eval_loss" in rows[-1]
    assert (stage_dir / "tensorboard").is_dir()
    assert json.loads((stage_dir / "done.json").read_text())["stage"] == stage
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    (startup,) = [x["data"] for x in lines if x.get("event") == "startup"]
    two = stage in TWO_DEEPSPEED_WORKERS
    assert (startup["engine"], startup["workers"]) == (("deepspeed", 2) if two else ("torch", 1))
    assert startup["process_group"] is two
    before, after = _weights(base_model), _weights(summary["model"])
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed, "training changed no weight"
    if stage == "rm":
        from rlhf.models.factory import load_reward_model

        assert load_reward_model(summary["model"]) is not None
        assert 0.0 <= rows[-1]["rm/eval_accuracy"] <= 1.0
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(summary["model"])
    # A second run of the same command skips the finished stage.
    assert run_stage(cfg, stage, base_model)["wall_s"] == summary["wall_s"]


def test_sft_with_lora_trains_adapters_and_exports_merged_full_weights(tmp_path, base_model):
    cfg = small_config(
        tmp_path, "sft", "sft.lora.enabled=true", "sft.lora.r=4", "sft.lr=1e-2", "sft.max_steps=2"
    )
    summary = run_stage(cfg, "sft", base_model)
    before, after = _weights(base_model), _weights(summary["model"])
    assert set(after) == set(before)  # a plain HF checkpoint: no adapter keys left
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        after["model.layers.0.self_attn.q_proj.weight"],
    )  # adapters merged
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )  # no adapter there


def test_two_workers_and_one_worker_give_the_same_weights_for_the_same_global_batches(
    tmp_path, base_model
):
    one = run_stage(
        small_config(
            tmp_path / "w1", "sft", "sft.num_workers=1", "sft.max_steps=2", "sft.micro_batch_size=4"
        ),
        "sft",
        base_model,
    )
    two = run_stage(
        small_config(
            tmp_path / "w2",
            "sft",
            "sft.num_workers=2",
            "sft.cpus_per_worker=1",
            "sft.micro_batch_tokens=null",
            "sft.max_steps=2",
            "sft.micro_batch_size=2",
        ),
        "sft",
        base_model,
    )
    w1, w2 = _weights(one["model"]), _weights(two["model"])
    base = _weights(base_model)
    # Summing gradients in another order changes them by float rounding only, but Adam's first
    # step is ~lr * g / (|g| + eps): where |g| is near eps that rounding moves an element by a
    # visible part of lr. So: every tensor agrees to 1e-3 of its update on average, and at most
    # 0.1% of its elements differ by more than 1% of its largest update. Gradients that were not
    # averaged, or shards that overlap, move most elements by about lr and fail both.
    for k in w1:
        update, diff = (w1[k] - base[k]).abs(), (w1[k] - w2[k]).abs()
        assert update.max() > 0, k
        assert diff.mean() <= 1e-3 * update.mean(), (k, float(diff.mean()), float(update.mean()))
        outliers = int((diff > 1e-2 * update.max()).sum())
        assert outliers <= max(1, diff.numel() // 1000), (k, outliers, diff.numel())


def test_a_non_finite_run_aborts_with_a_clear_error(tmp_path, base_model):
    from rlhf.train.trainer import StageFailedError

    cfg = small_config(
        tmp_path,
        "sft",
        "sft.lr=1e30",
        "sft.warmup_steps=0",
        "sft.max_steps=8",
        "sft.grad_clip=1e30",
    )
    with pytest.raises(StageFailedError, match=r"steps in a row had a non-finite loss or gradient"):
        run_stage(cfg, "sft", base_model)


def test_more_workers_than_the_cluster_can_hold_is_refused_before_anything_starts(
    tmp_path, base_model
):
    """Ray Train would wait for the missing CPUs without end; the stage says what is missing."""
    from rlhf.train.trainer import StageFailedError

    cfg = small_config(
        tmp_path, "sft", "sft.num_workers=2", "sft.cpus_per_worker=2", "sft.micro_batch_tokens=null"
    )
    with pytest.raises(
        StageFailedError,
        match=r"sft.num_workers = 2 workers need 4 CPU \(sft.cpus_per_worker = 2 each\) but the "
        r"cluster has [\d.]+ free of 2",
    ):
        run_stage(cfg, "sft", base_model)
    assert not (tmp_path / "t" / "sft").exists()  # nothing prepared, nothing to clean up


def test_rerunning_after_a_kill_resumes_and_matches_an_uninterrupted_run(tmp_path, base_model):
    args = [f"sft.init_from={base_model}", "sft.max_steps=6", "sft.save_interval=2"]
    # DeepSpeed's sharded checkpoint
    args += ["sft.num_workers=2", "sft.cpus_per_worker=1", "sft.micro_batch_tokens=null"]
    # Uninterrupted reference run, in this process's Ray cluster.
    ref = run_stage(small_config(tmp_path / "ref", "sft", *args), "sft", base_model)

    cmd = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "run",
        str(REPO / "configs/tiny_cpu.yaml"),
        f"run.output_dir={tmp_path / 'kill'}",
        "run.name=t",
        "run.stages=[sft]",
        *TINY,
        "sft.warmup_steps=1",
        "sft.micro_batch_size=2",
        "sft.global_batch_size=8",
        "sft.eval_interval=2",
        "sft.log_interval=1",
        *args,
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    ckpts = tmp_path / "kill/t/ray_train/sft"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("checkpoint_*/manifest.rank1.json")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("checkpoint_*")), "the run was killed before its first checkpoint"
    assert not (tmp_path / "kill/t/sft/done.json").exists()

    resumed = run_stage(small_config(tmp_path / "kill", "sft", *args), "sft", base_model)
    steps = [r["step"] for r in _metrics(Path(resumed["model"]).parent)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed, not restarted; each step logged once
    w_ref, w_res = _weights(ref["model"]), _weights(resumed["model"])
    for k in w_ref:
        torch.testing.assert_close(w_ref[k], w_res[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_killed_training_worker_is_replaced_and_the_stage_completes(tmp_path, base_model):
    """SIGKILL one Ray Train worker after the first checkpoint: Ray Train re-creates the group
    (sft.max_failures), which resumes from that checkpoint; the stage finishes and logs each
    step once."""
    import threading

    import psutil

    cfg = small_config(
        tmp_path,
        "sft",
        f"sft.init_from={base_model}",
        "sft.max_steps=8",
        "sft.max_failures=1",
        "sft.num_workers=2",  # one of two is killed
        "sft.cpus_per_worker=1",
        "sft.micro_batch_tokens=null",
    )
    ckpts = tmp_path / "t/ray_train/sft"
    killed: list[int] = []

    def kill_one_worker():
        deadline = time.time() + 300
        while time.time() < deadline and not list(ckpts.glob("checkpoint_*/manifest.rank1.json")):
            time.sleep(0.2)
        for proc in psutil.Process().children(recursive=True):  # this test's own cluster only
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            except psutil.NoSuchProcess:
                continue

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    result = run_stage(cfg, "sft", base_model)
    killer.join()
    assert killed, "no training worker was found to kill"
    assert (tmp_path / "t/sft/done.json").exists()
    steps = [r["step"] for r in _metrics(Path(result["model"]).parent)]
    assert steps == list(range(1, 9))


def test_the_reward_model_learns_a_preference_it_can_see(tmp_path, base_model):
    """Chosen answers are numbers, rejected ones a refusal: held-out pairwise accuracy must reach
    near 1 (the score is read at the right token and the ranking loss has the right sign)."""

    def pairs(lo, hi):
        return "".join(
            json.dumps(
                {
                    "prompt": f"What is {a}+{a % 7}?",
                    "chosen": str(a + a % 7),
                    "rejected": "I do not know.",
                }
            )
            + "\n"
            for a in range(lo, hi)
        )

    (tmp_path / "train.jsonl").write_text(pairs(0, 64))
    (tmp_path / "eval.jsonl").write_text(pairs(64, 96))
    cfg = small_config(
        tmp_path,
        "rm",
        f"rm.train_files=[{{path: {tmp_path / 'train.jsonl'}}}]",
        f"rm.eval_files=[{{path: {tmp_path / 'eval.jsonl'}}}]",
        "rm.max_steps=24",
        "rm.eval_interval=24",
        "rm.save_interval=24",
        "rm.lr=3e-3",
        "rm.log_interval=24",
    )
    run_stage(cfg, "rm", base_model)
    rows = _metrics(cfg.run.dir / "rm")
    assert rows[-1]["step"] == 24
    assert rows[-1]["rm/eval_accuracy"] >= 0.9, rows[-1]
