"""No redundant passes in an RL step: no old-logprob forward when the update is on-policy, no
reference model when nothing reads its logprobs (rl.skip_passes=auto, the default)."""

from pathlib import Path

import pytest
import ray
import torch
from test_rl_loop import _coin, _weight_buckets, rl_config

from rlhf.config import load_config
from rlhf.rl.dispatch import StaleEngineError
from rlhf.rl.trainer import RLRun

REPO = Path(__file__).resolve().parents[2]


def _weights(run):
    """Policy rank 0's full weights (CPU copies)."""
    return ray.get(run.groups["policy"].call_async("full_weights"))[0]


# 4 prompts x 2 samples = 8 = one mini-batch, one epoch: on-policy. kl_coef 0 (fixed): no
# reference. Full lr from the first step, so one update moves the policy measurably.
ON_POLICY = [
    "rl.algorithm=grpo",
    "rl.kl_coef=0",
    "rl.mini_batch_size=8",
    "rl.policy.warmup_steps=0",
    "rl.policy.lr=1e-2",
]


def test_the_reference_is_left_out_only_when_nothing_reads_it():
    from rlhf.kuberay import worker_groups

    apart = [  # a group per role, the rollout engines' among them
        "run.stages=[rl]",
        "rl.colocate=[]",
        "rl.colocate_cpus=null",
        "rl.rollout.backend=vllm",
    ]

    def rl(*extra):
        return load_config(REPO / "configs/tiny_cpu.yaml", [*apart, *extra]).rl

    off = rl("rl.kl_coef=0")
    assert not off.needs_reference and "reference" not in off.roles()
    assert set(off.resource_requests()) == {"policy", "rollout", "critic"}
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [*apart, "rl.kl_coef=0"])
    assert [g.name for g in worker_groups(cfg)] == ["rl-policy", "rl-rollout", "rl-critic"]
    for extra in ("rl.kl_coef=0.01", "rl.kl_controller=adaptive", "rl.skip_passes=never"):
        on = rl("rl.kl_coef=0", extra) if extra != "rl.kl_coef=0.01" else rl(extra)
        assert on.needs_reference and "reference" in on.roles(), extra
    # tiny_cpu.yaml: 64 x 8 samples in mini-batches of 128, 4 optimizer steps: off-policy.
    assert not rl().on_policy_update
    assert rl("rl.mini_batch_size=512").on_policy_update
    assert not rl("rl.mini_batch_size=512").advantages_in_policy  # the demo's PPO: a critic
    assert rl("rl.mini_batch_size=512", "rl.algorithm=grpo").advantages_in_policy
    assert not rl("rl.mini_batch_size=512", "rl.ppo_epochs=2").on_policy_update
    assert not rl("rl.mini_batch_size=512", "rl.skip_passes=never").on_policy_update


def test_the_reference_rides_in_the_policys_actor_where_it_would_share_its_cpu_bundles():
    from rlhf.config import ConfigError
    from rlhf.kuberay import worker_groups

    def cfg(*extra):
        return load_config(REPO / "configs/tiny_cpu.yaml", ["run.stages=[rl]", *extra])

    demo = cfg().rl  # every role on one CPU bundle, one policy actor
    assert demo.reference_in_policy and "reference" not in demo.roles()
    assert "reference" not in demo.resource_requests(2.0)
    assert "rl-reference" not in [g.name for g in worker_groups(cfg())]
    apart = ["rl.colocate=[]", "rl.colocate_cpus=null"]
    assert not cfg(*apart).rl.reference_in_policy and "reference" in cfg(*apart).rl.roles()
    assert cfg(*apart, "rl.reference.placement=policy").rl.reference_in_policy
    assert not cfg("rl.reference.placement=actor").rl.reference_in_policy
    assert not cfg("rl.kl_coef=0").rl.reference_in_policy  # no reference at all
    two = ["rl.policy.num_actors=2", "rl.reference.num_actors=2", "rl.critic.num_actors=2"]
    assert not cfg(*two).rl.reference_in_policy  # auto: a data-parallel policy keeps actors
    gpu = [
        "rl.colocate=[[policy, reference]]",
        "rl.colocate_cpus=null",
        "rl.policy.gpus_per_actor=0.5",
        "rl.reference.gpus_per_actor=0.5",
    ]
    assert not cfg(*gpu).rl.reference_in_policy  # auto keeps actors on GPUs
    with pytest.raises(ConfigError, match=r"reference.placement='policy' with policy.num_actors=2"):
        cfg(*two, "rl.reference.placement=policy")


def test_advantages_without_a_reference_are_those_of_kl_coef_0_and_report_no_kl():
    from test_experience import _batch

    from rlhf.rl.experience import compute_advantages

    args = dict(
        algorithm="ppo", group_size=1, kl_estimator="k1", kl_in_reward=True, gamma=1.0, lam=1.0
    )
    full = _batch([1.0, 0.0], [2, 3])
    with_ref, m_ref = compute_advantages(full, kl_coef=0.0, **args)
    no_ref, m = compute_advantages(full.replace(ref_logprobs=None), kl_coef=0.0, **args)
    torch.testing.assert_close(no_ref.advantages, with_ref.advantages)
    assert "kl/mean_per_token" in m_ref and not any(k.startswith("kl/") for k in m)
    with pytest.raises(ValueError, match="ref_logprobs"):  # a KL term needs the reference
        compute_advantages(full.replace(ref_logprobs=None), kl_coef=0.1, **args)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_an_on_policy_step_skips_both_passes_and_makes_the_update_of_the_separate_forward(
    tmp_path, tiny_dir, ray_cluster
):
    cfg = rl_config(tmp_path, *ON_POLICY)
    assert cfg.rl.on_policy_update and not cfg.rl.needs_reference
    # A reward that depends on the answer's text: non-zero advantages, a real policy gradient.
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda question, answer, label: _coin(answer))
    try:
        assert "reference" not in run.groups
        w0, w0_buckets = _weights(run), _weight_buckets(run)
        start, _ = run.save_checkpoint({})
        on = run.step(0)
        w_on = _weights(run)
        for key in ("timing/logprobs", "timing/ref", "compute/old_logprobs_s", "kl/mean_per_token"):
            assert key not in on, key
        assert "timing/advantages" not in on  # computed inside the policy's update
        assert on["advantages/abs_mean"] > 0
        assert on["rollout/logprob_gap"] < 1e-4  # measured by the training forward

        # The same step from the same weights, with the separate old-logprob forward.
        run.restore(start)
        run.rl = run.rl.model_copy(update={"skip_passes": "never"})
        sep = run.step(0)
        w_sep = _weights(run)
        assert sep["timing/logprobs"] > 0 and sep["compute/old_logprobs_s"] > 0
        assert sep["timing/advantages"] > 0  # by the driver's helper
        for key in ("reward/score_mean", "response/length_mean", "advantages/abs_mean"):
            assert on[key] == sep[key], key  # the same samples and advantages
        assert sep["rollout/logprob_gap"] < 1e-4
        moved = max((w_on[k] - w0[k]).abs().max().item() for k in w0)
        apart = max((w_on[k] - w_sep[k]).abs().max().item() for k in w0)
        assert moved > 1e-3, moved
        assert apart <= 1e-5 * moved, (apart, moved)  # identical here: the ratio is 1 both ways

        # A stale engine is still caught, by the on-policy update's forward.
        run.rl = run.rl.model_copy(update={"skip_passes": "auto"})
        ray.get(run.groups["rollout"].actors[0].load_weights.remote(w0_buckets, run.version))
        with pytest.raises(StaleEngineError, match="logprob gap .* on-policy update's forward"):
            run.step(1)
    finally:
        run.shutdown()


def test_an_on_policy_update_in_the_policys_actor_stamps_its_samples_without_a_sync(
    tmp_path, tiny_dir, ray_cluster
):
    """rollout.backend='policy', on-policy: the update computes the advantages and stamps the
    samples of its new weights itself (no advantage helper, no version call); the next step's
    samples come from those weights (no gap at lr 1e-2) and carry the driver's version."""
    cfg = rl_config(tmp_path, *ON_POLICY, "rl.rollout.backend=policy")
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda question, answer, label: _coin(answer))
    try:
        (policy,) = run.groups["policy"].actors
        steps = [run.step(step) for step in range(2)]
        for m in steps:
            assert "timing/advantages" not in m and "advantages/abs_mean" in m
            assert m["rollout/logprob_gap"] < 1e-4
        assert max(m["advantages/abs_mean"] for m in steps) > 0  # a real policy gradient
        assert run.version == steps[-1]["policy/version"] == 2
        samples, _ = ray.get(policy.generate.remote([[2, 6, 7, 1, 4]], 2, 4, 1.0, 1.0, 0))
        assert [s.weights_version for s in samples] == [2, 2]
    finally:
        run.shutdown()


def test_an_on_policy_update_with_a_reference_waits_for_it_in_the_policys_call(
    tmp_path, tiny_dir, ray_cluster
):
    """kl_coef > 0: the reference runs; on-policy, the driver does not wait for its logprobs
    (the policy's update does): the same KL and the same update as the separate passes."""
    cfg = rl_config(tmp_path, *ON_POLICY[:1], *ON_POLICY[2:], "rl.kl_coef=0.5")
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda question, answer, label: _coin(answer))
    try:
        start, _ = run.save_checkpoint({})
        on = run.step(0)
        w_on = _weights(run)
        assert "timing/ref" not in on and "timing/advantages" not in on
        assert on["compute/ref_logprobs_s"] > 0
        run.restore(start)
        run.rl = run.rl.model_copy(update={"skip_passes": "never"})
        sep = run.step(0)
        w_sep = _weights(run)
        assert sep["timing/ref"] > 0
        for key in ("kl/mean_per_token", "policy/kl_loss", "advantages/abs_mean"):
            assert on[key] == pytest.approx(sep[key], rel=1e-5, abs=1e-7), key
        apart = max((w_on[k] - w_sep[k]).abs().max().item() for k in w_on)
        assert apart <= 1e-6, apart
    finally:
        run.shutdown()


@pytest.mark.e2e
def test_a_reference_in_the_policys_actor_gives_the_updates_of_a_reference_actor(
    tmp_path, tiny_dir, ray_cluster
):
    """After one update (the policy has left the reference), the same second step on-policy (the
    policy computes the KL and advantages itself) and with the separate passes (the driver's
    `ref` phase calls the policy's actor), with the reference in the policy's actor and in
    actors of its own: the same KL, advantages and weights."""
    base = [*ON_POLICY[:1], *ON_POLICY[2:], "rl.kl_coef=0.5", "rl.rollout.backend=policy"]
    got = {}
    for placement in ("policy", "actor"):
        cfg = rl_config(tmp_path / placement, *base, f"rl.reference.placement={placement}")
        run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda q, answer, label: _coin(answer))
        try:
            assert ("reference" in run.groups) == (placement == "actor")
            run.step(0)
            run.steps_done = 1
            start, _ = run.save_checkpoint({})
            on = run.step(1)
            w_on = _weights(run)
            run.restore(start)
            run.rl = run.rl.model_copy(update={"skip_passes": "never"})
            sep = run.step(1)
            got[placement] = (on, w_on, sep, _weights(run))
        finally:
            run.shutdown()
    (on, w_on, sep, w_sep), (on_a, w_on_a, sep_a, w_sep_a) = got["policy"], got["actor"]
    assert on["compute/ref_logprobs_s"] > 0 and "timing/ref" not in on
    assert sep["timing/ref"] > 0 and sep["compute/ref_logprobs_s"] > 0
    assert on["kl/mean_per_token"] > 1e-4  # the first update moved the policy
    for mine, theirs in ((on, on_a), (sep, sep_a)):
        for key in ("kl/mean_per_token", "policy/kl_loss", "advantages/abs_mean"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    for mine, theirs in ((w_on, w_on_a), (w_sep, w_sep_a)):
        apart = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
        assert apart <= 1e-6, apart


@pytest.mark.e2e
def test_samples_of_the_policys_own_weights_need_no_old_logprob_forward(
    tmp_path, tiny_dir, ray_cluster
):
    """rollout.backend='policy' with two mini-batches a step (off-policy after the first
    update): the sampling logprobs are the old logprobs, no separate forward runs, the first
    mini-batch's forward measures the gap, and the update is the one the separate forward
    gives (up to its float rounding)."""
    extra = ["rl.kl_coef=0.5", "rl.policy.warmup_steps=0", "rl.policy.lr=1e-2"]
    cfg = rl_config(tmp_path, "rl.algorithm=grpo", "rl.rollout.backend=policy", *extra)
    assert cfg.rl.old_logprobs_from_sampler and not cfg.rl.on_policy_update
    assert not rl_config(tmp_path, "rl.rollout.backend=vllm").rl.old_logprobs_from_sampler
    assert not rl_config(
        tmp_path, "rl.rollout.backend=policy", "rl.rollout.top_p=0.9"
    ).rl.old_logprobs_from_sampler  # top-p samples from a truncated distribution
    on_policy = rl_config(tmp_path, "rl.rollout.backend=policy", "rl.mini_batch_size=8").rl
    assert on_policy.on_policy_update and not on_policy.old_logprobs_from_sampler  # its own
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda question, answer, label: _coin(answer))
    try:
        w0 = _weights(run)
        start, _ = run.save_checkpoint({})
        mine = run.step(0)
        w_mine = _weights(run)
        assert "timing/logprobs" not in mine and "compute/old_logprobs_s" not in mine
        assert 0 <= mine["rollout/logprob_gap"] < 1e-4
        run.restore(start)
        run.rl = run.rl.model_copy(update={"skip_passes": "never"})
        sep = run.step(0)
        w_sep = _weights(run)
        assert sep["timing/logprobs"] > 0 and sep["rollout/logprob_gap"] < 1e-4
        for key in ("reward/score_mean", "response/length_mean", "advantages/abs_mean"):
            assert mine[key] == pytest.approx(sep[key], rel=1e-5, abs=1e-7), key
        moved = max((w_mine[k] - w0[k]).abs().max().item() for k in w0)
        apart = max((w_mine[k] - w_sep[k]).abs().max().item() for k in w0)
        assert moved > 1e-3, moved
        # Adam scales the rounding of near-zero gradients up to lr: apart 7e-4 and 1.05e-3 of
        # moved measured (sampling's attention in torch's flash kernel and in products,
        # 2026-12-04); old logprobs of the wrong weights would put them as far apart as moved.
        assert apart <= 5e-3 * moved, (apart, moved)

        # The first mini-batch's gap is checked against rl.rollout.max_logprob_gap: below what
        # it measured, the step stops before the weights are used.
        assert mine["rollout/logprob_gap"] > 0  # float rounding between sampling and training
        run.restore(start)
        limit = mine["rollout/logprob_gap"] / 2
        rollout = run.rl.rollout.model_copy(update={"max_logprob_gap": limit})
        run.rl = run.rl.model_copy(update={"skip_passes": "auto", "rollout": rollout})
        with pytest.raises(StaleEngineError, match="measured in the update's first forward"):
            run.step(0)
    finally:
        run.shutdown()
