"""Time-sharing of colocated roles: bundle sizes from the config, and an RL run with every role on
one bundle whose actors each compute with all of its cores (real Ray, vLLM and DeepSpeed)."""

import os
import subprocess
import sys

import pytest
import ray
import torch
from test_rl_loop import rl_config

from rlhf.config import ConfigError
from rlhf.rl.trainer import RLRun

EVERYTHING = "rl.colocate=[[policy, reference, critic, rollout]]"


def test_a_colocated_group_bundle_has_its_first_roles_cpus_unless_colocate_cpus_says(tmp_path):
    rl = rl_config(tmp_path, EVERYTHING, "rl.policy.cpus_per_actor=1.5").rl
    group = rl.colocated_groups()[0]
    assert group[0] == "policy" and rl.bundle_cpus(group) == 1.5
    assert rl.resource_requests() == {"policy": {"CPU": 1.5, "GPU": 0.0}}
    rl = rl_config(tmp_path, EVERYTHING, "rl.colocate_cpus=3").rl
    assert rl.bundle_cpus(group) == 3.0


def test_colocate_cpus_all_splits_what_the_other_roles_leave_over_the_colocated_bundles(tmp_path):
    # policy + reference on 2 bundles, critic and 1 engine alone (0.5 CPU each): 8 CPUs leave
    # 8 - 0.5 - 0.5 = 7 for the group's 2 bundles, 3.5 each.
    rl = rl_config(
        tmp_path,
        "rl.colocate=[[policy, reference]]",
        "rl.colocate_cpus=all",
        "rl.policy.num_actors=2",
        "rl.reference.num_actors=2",
    ).rl
    assert rl.bundle_cpus(["policy", "reference"], cluster_cpus=8.0) == 3.5
    assert rl.resource_requests(8.0)["policy"]["CPU"] == 7.0
    with pytest.raises(ValueError, match=r"the cluster's 1 CPUs leave 0 for the colocated roles"):
        rl.bundle_cpus(["policy", "reference"], cluster_cpus=1.0)
    # No running cluster (KubeRay manifests): the first role's CPUs.
    assert rl.bundle_cpus(["policy", "reference"]) == 0.5
    with pytest.raises(ConfigError, match=r"colocate_cpus=-1.0 must be > 0"):
        rl_config(tmp_path, "rl.colocate_cpus=-1")


def test_engines_sleep_only_when_they_share_the_policys_gpus(tmp_path):
    gpu = ["rl.policy.gpus_per_actor=0.5", "rl.rollout.gpus_per_engine=0.4"]
    assert rl_config(tmp_path, "rl.colocate=[[policy, rollout]]", *gpu).rl.engines_sleep
    apart = rl_config(
        tmp_path, "rl.colocate=[[policy, reference]]", *gpu, "rl.reference.gpus_per_actor=0.5"
    )
    assert not apart.rl.engines_sleep
    assert not rl_config(tmp_path, "rl.colocate=[[policy, rollout]]").rl.engines_sleep  # CPU


def _threads(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: torch.get_num_threads()))


def _matmul_precision(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: torch.get_float32_matmul_precision()))


def _onednn_switches_here(model_dir) -> bool:
    """Whether `onednn_fp32_matmul` switches a fresh process for this model on this machine."""
    code = (
        "import sys; from rlhf.process_tuning import model_width, onednn_fp32_matmul; "
        "print(onednn_fp32_matmul(model_width(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def _gloo_loop_policies(actor) -> list[int]:
    """The scheduling policy of each of the actor's gloo loop threads."""

    def policies(self):
        from rlhf.process_tuning import GLOO_LOOP_THREAD, threads_named

        return [os.sched_getscheduler(tid) for tid in threads_named(GLOO_LOOP_THREAD)]

    return ray.get(actor.__ray_call__.remote(policies))


def _policy_weights(run) -> dict:
    policy = run.groups["policy"].actors[0]
    return ray.get(
        policy.__ray_call__.remote(
            lambda self: {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        )
    )


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_every_role_on_one_bundle_computes_with_all_its_cores_and_learns(
    tmp_path, tiny_dir, ray_cluster
):
    """PPO with policy, reference, critic and the vLLM engine on one bundle of the whole (2-CPU)
    cluster: each actor runs 2 torch threads, the phases take turns, and the run learns as the
    separate layout does (the engines follow the trained weights exactly)."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=ppo",
        EVERYTHING,
        "rl.colocate_cpus=all",
        "rl.policy.warmup_steps=0",
        "rl.reference.placement=actor",  # an actor of its own (auto: inside the policy's)
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    try:
        groups = run.groups
        assert {g.pg.id for g in groups.values()} == {groups["policy"].pg.id}
        assert all(g.bundle_cpus == 2.0 for g in groups.values())
        before = _policy_weights(run)
        metrics = [run.step(0), run.step(1)]
        # After their phases (generate, ref, logprobs, values, train_critic, train_policy) every
        # role still runs as many threads as the bundle has CPUs; vLLM kept them in its actor.
        for role in ("policy", "reference", "critic", "rollout"):
            assert _threads(groups[role].actors[0]) == 2, role
            # Every torch.distributed group here has one member: loop wake-ups wait for idle
            # cores instead of preempting the phase that computes.
            assert set(_gloo_loop_policies(groups[role].actors[0])) == {os.SCHED_IDLE}, role
        # The trainers' fp32 matmuls run on oneDNN where it pays and computes them exactly
        # (rlhf/process_tuning.py: not at this width); vLLM's engine keeps torch's default.
        fast = "medium" if _onednn_switches_here(tiny_dir) else "highest"
        for role in ("policy", "reference", "critic"):
            assert _matmul_precision(groups[role].actors[0]) == fast, role
        assert _matmul_precision(groups["rollout"].actors[0]) == "highest"
        for m in metrics:
            assert torch.isfinite(
                torch.tensor([m["critic/value_loss"], m["ppo/clipfrac"], m["policy/entropy"]])
            ).all()
        assert metrics[1]["rollout/logprob_gap"] < 1e-3  # the engine runs the trained weights
        after = _policy_weights(run)
        assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
        # No sleep mode on CPU: asking an engine to sleep is a no-op and it still generates.
        assert ray.get(groups["rollout"].actors[0].sleep.remote()) is False
        assert run.evaluate()["eval/num_prompts"] > 0
    finally:
        run.shutdown()
