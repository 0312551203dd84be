"""The benchmark's measuring parts: peak memory of a process tree, the RL step report, and the
side-by-side run against TRL (its settings translation and step timing; TRL itself is not here)."""

import json
import sys
from pathlib import Path

import pytest

from rlhf.bench_runs import peak_memory, rl_step_report


def test_peak_memory_sees_a_child_process_allocation():
    # The parent allocates nothing; its child holds 400 MiB for a second. The tree's peak must
    # include the child, and the exit code must come back.
    child = "import time; b = bytearray(400 * 2**20); time.sleep(1.5)"
    parent = (
        f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]) + 3)"
    )
    result = peak_memory([sys.executable, "-c", parent], interval=0.1)
    assert result["exit_code"] == 3
    assert 0.35 < result["tree_pss_gib"] < 1.5, result


def test_rl_step_report_averages_phases_and_skips_the_warm_up_step(tmp_path):
    rows = [
        {"step": 0, "rl/eval/exact_match": 0.5},
        {
            "step": 1,
            "rl/timing/step": 9.0,
            "rl/timing/generate": 8.0,
            "rl/perf/outside_compute_frac": 0.5,
        },
        {
            "step": 2,
            "rl/timing/step": 2.0,
            "rl/timing/generate": 1.0,
            "rl/perf/outside_compute_frac": 0.1,
        },
        {
            "step": 3,
            "rl/timing/step": 4.0,
            "rl/timing/generate": 2.0,
            "rl/perf/outside_compute_frac": 0.3,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = rl_step_report(path)
    assert report["steps"] == 2
    assert report["timing/step"] == 3.0
    assert report["timing/generate"] == 1.5
    assert report["perf/outside_compute_frac"] == 0.2


# ---- the side-by-side benchmark against TRL: settings translation and step timing ---------------


def _side_by_side_config(tmp_path, job):
    from rlhf.bench_vs_trl import DEMO_CONFIG, our_overrides, write_prompt_pool
    from rlhf.config import load_config

    write_prompt_pool(tmp_path, count=16)
    model_dir = tmp_path / "model"
    overrides = our_overrides(job, model_dir, tmp_path, steps=5, num_workers=2)
    return load_config(DEMO_CONFIG, overrides), model_dir


def test_trl_grpo_settings_are_the_ones_our_rl_stage_runs_with(tmp_path):
    from rlhf.bench_trl import grpo_args
    from rlhf.bench_vs_trl import KL_COEF, LR, Job, trl_spec

    cfg, model_dir = _side_by_side_config(tmp_path, Job("grpo", "25M", 48))
    rl = cfg.rl
    args = grpo_args(trl_spec(Job("grpo", "25M", 48), cfg, model_dir, tmp_path / "p", tmp_path))
    # 8 prompts x 8 samples, all of them in one optimizer step, on both sides.
    assert args["per_device_train_batch_size"] == rl.rollout_batch_size == rl.mini_batch_size == 64
    assert args["gradient_accumulation_steps"] == 1 and args["steps_per_generation"] == 1
    assert args["num_generations"] == rl.samples_per_prompt == 8
    assert args["num_iterations"] == rl.ppo_epochs == 1
    assert args["max_completion_length"] == rl.rollout.max_new_tokens == 48
    assert args["max_steps"] == rl.max_steps == 5
    # KL: the k3 estimate as a loss term with the same coefficient (TRL's beta).
    assert args["beta"] == rl.kl_coef == KL_COEF
    assert rl.kl_estimate == "k3" and not rl.kl_as_reward and rl.kl_controller == "fixed"
    assert args["epsilon"] == rl.clip_eps_low and args["loss_type"] == "dapo"
    assert rl.loss_mode == "token_mean" and rl.algorithm == "grpo" and not rl.filter_groups
    assert args["temperature"] == rl.rollout.temperature == 1.0 and rl.rollout.top_p == 1.0
    # Optimizer: same lr, constant, same AdamW betas and clipping, fp32.
    assert args["learning_rate"] == rl.policy.lr == LR
    assert args["lr_scheduler_type"] == "constant" and args["warmup_steps"] == 0
    assert rl.policy.min_lr_ratio == 1.0 and rl.policy.warmup_steps == 0
    assert [args["adam_beta1"], args["adam_beta2"]] == rl.policy.betas
    assert args["max_grad_norm"] == rl.policy.grad_clip
    assert args["weight_decay"] == rl.policy.weight_decay == 0.0
    assert not args["bf16"] and rl.policy.precision == rl.reference.precision == "fp32"
    assert not args["gradient_checkpointing"]
    assert rl.reward.kind == "rule" and rl.reward.rule == "digit_match"
    assert cfg.model.path == str(model_dir)


def test_trl_sft_settings_are_the_ones_our_sft_stage_runs_with(tmp_path):
    from rlhf.bench_trl import sft_args
    from rlhf.bench_vs_trl import LR, SFT_BATCH, Job, trl_spec

    cfg, model_dir = _side_by_side_config(tmp_path, Job("sft", "0.4M"))
    sft = cfg.sft
    args = sft_args(trl_spec(Job("sft", "0.4M"), cfg, model_dir, tmp_path / "rows", tmp_path))
    # Ours splits the batch of 32 over its 2 data-parallel workers; one optimizer step each.
    assert args["per_device_train_batch_size"] == sft.global_batch_size == SFT_BATCH
    assert sft.micro_batch_size * sft.num_workers == SFT_BATCH and sft.grad_accum_steps == 1
    assert args["max_length"] == sft.max_length and not args["packing"]
    assert args["learning_rate"] == sft.lr == LR and args["lr_scheduler_type"] == "constant"
    assert sft.min_lr_ratio == 1.0 and sft.warmup_steps == 0
    assert [args["adam_beta1"], args["adam_beta2"]] == sft.betas
    assert args["max_grad_norm"] == sft.grad_clip and args["weight_decay"] == sft.weight_decay
    assert not args["bf16"] and sft.precision == "fp32"
    assert sft.log_interval == 1  # every step's time is in metrics.jsonl


def test_step_report_reads_per_step_times_startup_and_phases(tmp_path):
    from rlhf.bench_trl import step_seconds
    from rlhf.bench_vs_trl import median_after, step_report

    rows = [
        {"event": "prompts", "time": 100.0, "data": {}},
        {"step": 0, "time": 101.0},
        # Step 1 ran from 110.0 - 4.0 = 106.0: 6 s after the stage was called at 100.0.
        {"step": 1, "time": 110.0, "rl/timing/step": 4.0, "rl/timing/generate": 3.0},
        {"step": 3, "time": 113.0, "rl/timing/step": 1.0, "rl/timing/generate": 0.5},
        {"step": 2, "time": 112.0, "rl/timing/step": 2.0, "rl/timing/generate": 1.5},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = step_report(path, "rl", called=100.0)
    assert report["step_s"] == [4.0, 2.0, 1.0]  # in step order
    assert report["startup_s"] == 6.0
    assert report["phases"] == {"generate": [3.0, 1.5, 0.5]}
    assert median_after(report["step_s"], warmup=1) == 1.5  # median of [2.0, 1.0]
    # TRL's side: step ends at 12, 13.5, 14 after the first step began at 10.
    assert step_seconds(10.0, [12.0, 13.5, 14.0]) == [2.0, 1.5, 0.5]


@pytest.mark.ray
@pytest.mark.vllm
def test_the_weight_sync_benchmark_times_a_real_sync(tmp_path):
    """`python -m rlhf.bench sync` on the demo size: one sync through the object store into a
    vLLM engine (the demo config samples in the policy's actor, which has nothing to sync: the
    benchmark must set its own engine), every part timed."""
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "rlhf.bench", "sync", "--size", "demo", "--repeat", "1"]
        + ["--workdir", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("weight_sync: "))
    result = json.loads(line.split(": ", 1)[1])
    assert result["backend"] == "object_store" and result["buckets"] >= 1
    assert result["sync_s"] > 0 and result["torch_save_s"] > 0 and result["reload_s"] > 0
