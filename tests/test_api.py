"""The Python API: `from rlhf import Pipeline`, light to import, and the driver-script example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import Pipeline, load_config
from rlhf.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/tiny_cpu.yaml"
TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
]
SFT_FEW_STEPS = [
    "sft.num_workers=1",
    "sft.micro_batch_size=2",
    "sft.global_batch_size=8",
    "sft.max_steps=3",
    "sft.warmup_steps=1",
    "sft.eval_interval=3",
    "sft.save_interval=3",
]
RL_TWO_STEPS = [
    "rl.max_steps=2",
    "rl.eval_interval=2",
    "rl.prompts_per_step=4",
    "rl.samples_per_prompt=2",
    "rl.mini_batch_size=4",
    "rl.filter_groups=false",
    "rl.rollout.chunk_size=1",
    "rl.rollout.max_new_tokens=6",
    "rl.rollout.kv_cache_gb=0.05",
    "rl.eval_prompts=8",
    "rl.policy.micro_batch_size=2",
    "rl.policy.warmup_steps=0",
]
EVAL_SMALL = ["eval.num_prompts=8", "eval.samples=0"]


def test_importing_rlhf_and_making_a_pipeline_loads_no_ray_vllm_deepspeed_or_torch():
    script = f"""
import sys
for name in ("ray", "vllm", "deepspeed", "torch"):
    sys.modules[name] = None  # importing them now fails
from rlhf import Pipeline, load_config
p = Pipeline(load_config({str(CONFIG)!r}), ["run.stages=[sft]"])
print("ok", p.cfg.run.stages)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok ['sft']"


def test_overrides_apply_to_a_config_object_as_to_a_path():
    from_path = Pipeline(CONFIG, ["sft.lr=1e-4", "run.stages=[sft]"]).cfg
    from_object = Pipeline(load_config(CONFIG), ["sft.lr=1e-4", "run.stages=[sft]"]).cfg
    assert from_object.fingerprint() == from_path.fingerprint()
    assert from_object.sft.lr == 1e-4


def test_a_bad_override_on_a_config_object_names_the_key():
    with pytest.raises(ConfigError, match="sft.lrr: unknown key"):
        Pipeline(load_config(CONFIG), ["sft.lrr=1e-4"])


def test_a_reward_function_needs_a_rule_reward_and_must_be_callable():
    with pytest.raises(ConfigError, match="rl.reward.kind = 'model'"):
        Pipeline(CONFIG, ["rl.reward.kind=model"], reward_fn=lambda p, r, y: 0.0)
    with pytest.raises(ConfigError, match="is not callable"):
        Pipeline(CONFIG, reward_fn="exact_match")


def test_a_stage_outside_run_stages_is_refused_before_anything_runs():
    pipeline = Pipeline(CONFIG, ["run.stages=[sft]"])
    with pytest.raises(ConfigError, match="stage 'dpo' is not in run.stages"):
        pipeline.run_stage("dpo")
    with pytest.raises(ConfigError, match="stage 'rl' is not in run.stages"):
        pipeline.run(["sft", "rl"])


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_run_stage_trains_one_stage_and_a_new_pipeline_finds_it_finished(tmp_path, ray_cluster):
    overrides = [f"run.output_dir={tmp_path}", "run.stages=[sft,dpo]", *TINY, *SFT_FEW_STEPS]
    pipeline = Pipeline(CONFIG, overrides)
    sft = pipeline.run_stage("sft")
    assert sft.model == str(tmp_path / "tiny_cpu/sft/model")
    assert (Path(sft.model) / "config.json").is_file()
    assert sft.metrics["sft/loss"] > 0 and sft.wall_s > 0
    assert pipeline.outputs["sft"] is sft and "dpo" not in pipeline.outputs

    again = Pipeline(CONFIG, overrides)  # e.g. the next driver script on the same run
    assert again.outputs["sft"].model == sft.model
    assert again.outputs["sft"].metrics == sft.metrics


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_the_driver_example_runs_sft_and_rl_with_a_python_reward_object(tmp_path):
    """examples/driver.py (the README's Python example) on tiny settings, in its own process."""
    overrides = [f"run.output_dir={tmp_path}", *TINY, *SFT_FEW_STEPS, *RL_TWO_STEPS, *EVAL_SMALL]
    done = subprocess.run(
        [sys.executable, "examples/driver.py", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "driver_example"
    for stage in ("sft", "rl"):
        assert (run / stage / "model/config.json").is_file()
        assert f"{stage}: {run / stage / 'model'}" in done.stdout
    assert (run / "summary.json").is_file()
    reward = re.search(r"rl reward, last step: ([0-9.]+)", done.stdout)
    assert reward and 0.0 <= float(reward.group(1)) <= 1.0
    # The object ran in the driver: at least every sampled answer of 2 steps (4 prompts x 2)
    calls = int(re.search(r"answers scored by the reward object: (\d+)", done.stdout).group(1))
    assert calls >= 2 * 4 * 2
