"""The checks of `RLConfig`'s validator: combinations of RL settings that cannot run together.
Each raises `ValueError` naming the keys, their values and the fix; `RLConfig._consistent` calls
them in a fixed order, so the first problem found is the one reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.config.rl import RLConfig


def check_batch_sizes(rl: RLConfig) -> None:
    """A step's samples split into mini-batches, and each into the actors' micro-batches."""
    n = rl.rollout_batch_size
    if n % rl.mini_batch_size:
        raise ValueError(
            f"prompts_per_step * samples_per_prompt = {rl.prompts_per_step} * "
            f"{rl.samples_per_prompt} = {n} must be a multiple of "
            f"mini_batch_size={rl.mini_batch_size}"
        )
    for name in ("policy", "critic") if rl.algorithm == "ppo" else ("policy",):
        role = getattr(rl, name)
        per = role.micro_batch_size * role.num_actors
        if rl.mini_batch_size % per:
            raise ValueError(
                f"mini_batch_size={rl.mini_batch_size} must be a multiple of "
                f"{name}.micro_batch_size * {name}.num_actors = {per}"
            )


def check_algorithm(rl: RLConfig) -> None:
    """What the advantage estimator, group filtering and the reward source need."""
    if rl.algorithm == "rloo" and rl.samples_per_prompt < 2:
        raise ValueError("algorithm='rloo' needs samples_per_prompt >= 2")
    if rl.algorithm in ("grpo", "dr_grpo", "reinforce_pp_baseline") and rl.samples_per_prompt < 2:
        raise ValueError(
            f"algorithm={rl.algorithm!r} compares samples of a prompt: "
            f"samples_per_prompt={rl.samples_per_prompt} must be >= 2"
        )
    if rl.filter_groups and rl.samples_per_prompt < 2:
        raise ValueError(
            "filter_groups=true keeps prompts whose samples' scores differ: "
            f"samples_per_prompt={rl.samples_per_prompt} must be >= 2"
        )
    if rl.algorithm == "grpo" and rl.kl_in_reward and rl.kl_coef > 0:
        # A group whose scores are equal would get advantages made of its KL differences
        # alone, divided by their (tiny) std: unit-sized noise instead of zero.
        raise ValueError(
            "kl_in_reward=true with algorithm='grpo': GRPO divides by each group's reward "
            "std, which turns the KL differences of an all-equal group into unit-sized "
            "advantages; use kl_in_reward=false (the KL loss), or dr_grpo / rloo"
        )
    if rl.reward.kind == "http" and not rl.reward.url:
        raise ValueError("reward.kind='http' needs reward.url")


def check_staleness(rl: RLConfig) -> None:
    """Asynchronous rollouts (max_staleness > 0): engines of their own and the IS correction."""
    if rl.max_staleness > 0:
        shared = [g for g in rl.colocate if "rollout" in g]
        if shared:
            raise ValueError(
                f"max_staleness={rl.max_staleness} with rollout in rl.colocate {shared[0]}: "
                "asynchronous engines generate while the roles on their bundles train, so "
                "they cannot share them; remove rollout from rl.colocate, or max_staleness=0"
            )
        if rl.truncated_is_cap is None:
            raise ValueError(
                f"max_staleness={rl.max_staleness} trains on samples of older policy "
                "versions: set truncated_is_cap (e.g. 2.0), the importance-weight correction "
                "for them"
            )


def check_in_policy_extras(rl: RLConfig) -> None:
    """What rides in the policy's actors: a frozen reference (one actor), PPO-ptx data."""
    if rl.reference.placement == "policy" and rl.policy.num_actors > 1:
        raise ValueError(
            f"reference.placement='policy' with policy.num_actors={rl.policy.num_actors}: "
            "the reference rides in the policy's one actor; use reference.placement='actor' "
            "(or 'auto') for a data-parallel policy"
        )
    if rl.ptx_coef > 0 and not rl.ptx_files:
        raise ValueError(f"ptx_coef={rl.ptx_coef} needs ptx_files")


def check_rollout(rl: RLConfig) -> None:
    """How weights reach the engines, tensor parallelism, and generation inside the policy."""
    if rl.rollout.weight_sync == "nccl" and (
        rl.rollout.gpus_per_engine == 0 or rl.policy.gpus_per_actor == 0
    ):
        raise ValueError(
            "rollout.weight_sync='nccl' needs GPUs for the policy and the "
            "engines (gpus_per_actor, gpus_per_engine > 0)"
        )
    if rl.rollout.weight_sync == "nccl" and rl._rollout_on_policy_gpus:
        raise ValueError(
            "rollout.weight_sync='nccl' with rollout colocated with the policy: NCCL cannot "
            "join two ranks on one GPU; use weight_sync='object_store' (or 'auto')"
        )
    tp = rl.rollout.tensor_parallel_size
    if tp > 1 and rl.rollout.backend != "vllm":
        raise ValueError(
            f"rollout.tensor_parallel_size={tp} with rollout.backend={rl.rollout.backend!r}: "
            "only vLLM shards an engine; set rollout.backend='vllm' or tensor_parallel_size=1"
        )
    if rl.generates_in_policy:
        check_generates_in_policy(rl)
    if tp > 1 and rl.rollout.gpus_per_engine != 1:
        raise ValueError(
            f"rollout.tensor_parallel_size={tp} shards an engine over {tp} whole GPUs: "
            f"set rollout.gpus_per_engine=1 (got {rl.rollout.gpus_per_engine}); "
            "on CPU tensor_parallel_size must be 1"
        )
    if tp > 1 and any("rollout" in g for g in rl.colocate):
        raise ValueError(
            f"rollout.tensor_parallel_size={tp}: a tensor-parallel engine holds whole GPUs "
            "and cannot be colocated; remove rollout from rl.colocate"
        )


def check_generates_in_policy(rl: RLConfig) -> None:
    """rollout.backend='policy' needs whole weights in each policy actor and no engines."""
    checks = (
        (
            "policy.zero_stage",
            rl.policy.zero_stage,
            rl.policy.zero_stage == 3,
            "ZeRO-3 shards the weights over the ranks; use 0-2",
        ),
        (
            "max_staleness",
            rl.max_staleness,
            rl.max_staleness > 0,
            "the policy cannot generate ahead while it trains; use 0",
        ),
        (
            "rollout.num_engines",
            rl.rollout.num_engines,
            rl.rollout.num_engines != 1,
            "the policy's actors are the engines; leave it at 1",
        ),
        (
            "rollout.weight_sync",
            rl.rollout.weight_sync,
            rl.rollout.weight_sync in ("gloo", "nccl"),
            "no weights are sent; leave it at 'auto'",
        ),
    )
    for key, value, bad, fix in checks:
        if bad:
            raise ValueError(
                f"rollout.backend='policy' with {key}={value!r}: {fix} "
                "(or set rollout.backend to 'transformers' or 'vllm')"
            )


def check_colocate(rl: RLConfig) -> None:
    """rl.colocate groups: disjoint, of at least two roles, same actor counts, GPU shares that fit;
    and colocate_cpus, if a number, positive."""
    needed, seen = set(rl.roles()), set()
    for group in rl.colocate:
        if len(group) < 2:
            raise ValueError(f"colocate group {group} needs at least two roles")
        for role in group:
            if role in seen:
                raise ValueError(f"colocate: {role!r} appears in two groups")
            seen.add(role)
        counts = {r: rl._count(r) for r in group if r in needed}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"colocate group {group}: colocated roles need the same number "
                f"of actors, got {counts}"
            )
        gpus = {r: rl._gpus(r) for r in group if r in needed}
        if sum(gpus.values()) > 0 and (min(gpus.values()) == 0 or sum(gpus.values()) > 1):
            raise ValueError(
                f"colocate group {group}: GPU shares {gpus} must all be > 0 and sum to at most 1"
            )
    if isinstance(rl.colocate_cpus, float) and rl.colocate_cpus <= 0:
        raise ValueError(f"colocate_cpus={rl.colocate_cpus} must be > 0 (or 'all')")
