"""The online RL stage: its settings (`RLConfig`: algorithm, batch sizes, KL, asynchrony, PPO-ptx,
colocation, and one section per role), what they imply (properties), and the resources each role
reserves. The validator's checks are in `rl_checks`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config.base import COLUMNS_DOC, PROMPT_FORMAT_DOC, DataFile, PromptFormat, Section
from rlhf.config.rl_checks import (
    check_algorithm,
    check_batch_sizes,
    check_colocate,
    check_in_policy_extras,
    check_rollout,
    check_staleness,
)
from rlhf.config.rl_roles import (
    ReferenceConfig,
    RewardSourceConfig,
    RoleConfig,
    RolloutConfig,
    TrainRoleConfig,
)


class RLConfig(Section):
    algorithm: Literal[
        "ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"
    ] = Field("ppo", description="ppo (critic + GAE) or a critic-free estimator.")
    init_from: str | None = Field(None, description="Policy checkpoint; None: the SFT output.")
    prompt_files: list[DataFile] = Field(default_factory=list, description="Training prompts.")
    eval_prompt_files: list[DataFile] = Field(default_factory=list, description="Held-out prompts.")
    prompt_format: PromptFormat = Field("auto", description=PROMPT_FORMAT_DOC)
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_DOC)
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="Bad records: stop, or skip+count."
    )
    max_prompt_length: int = Field(128, ge=4, description="Longer prompts are an error.")
    max_steps: int = Field(20, ge=1, description="RL steps (generate -> update -> sync).")
    prompts_per_step: int = Field(32, ge=1, description="Prompts sampled per step.")
    samples_per_prompt: int = Field(4, ge=1, description="Responses per prompt (group size).")
    filter_groups: bool = Field(
        False,
        description="Dynamic sampling (DAPO): train only on prompts whose samples' scores "
        "differ, sampling more prompts until prompts_per_step such groups are found.",
    )
    filter_max_rounds: int = Field(
        4,
        ge=1,
        description="filter_groups: most generation rounds per step; a batch still short "
        "after them is filled with equal-score groups (counted in filter/padded_groups).",
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's experience.")
    mini_batch_size: int = Field(64, ge=1, description="Samples per optimizer step.")
    skip_passes: Literal["auto", "never"] = Field(
        "auto",
        description="auto: no old-logprob forward when the update is on-policy (ppo_epochs=1, "
        "one mini-batch) and no reference model when kl_coef=0 with a fixed controller; never: "
        "run both always (KL metrics at kl_coef=0, A/B checks).",
    )
    shared_prompt_forward: bool = Field(
        True,
        description="Policy and reference forwards run each distinct prompt of a micro-batch "
        "once and continue its samples from its cached keys/values (the same logits and "
        "gradients up to float rounding); false: every row's prompt again.",
    )
    loss_mode: Literal["token_mean", "seq_mean", "seq_sum"] = Field(
        "token_mean", description="How per-token losses are reduced."
    )
    clip_eps_low: float = Field(0.2, gt=0, description="PPO clip range below 1.")
    clip_eps_high: float | None = Field(None, gt=0, description="Clip above 1 (DAPO clip-higher).")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip cap for A < 0.")
    value_clip: float | None = Field(0.2, gt=0, description="PPO2 value clipping.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="PPO: whiten GAE advantages per batch.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial if adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="Per-token KL estimate; None: k1 in the reward, k3 as a loss."
    )
    kl_in_reward: bool | None = Field(
        None,
        description="KL in the reward, or (False) a loss term; None: a loss for grpo "
        "(Shao et al. 2024), the reward for the rest.",
    )
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="KL coefficient.")
    kl_target: float = Field(6.0, gt=0, description="Adaptive controller: target KL.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller: horizon.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    truncated_is_cap: float | None = Field(
        None, gt=0, description="Weight tokens by min(pi_trainer/pi_rollout, cap)."
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="Asynchronous rollouts: the next max_staleness steps' samples are generated "
        "while this step trains, so a step may train on samples up to that many policy versions "
        "old (0: synchronous). Needs rollout on its own bundles and truncated_is_cap.",
    )
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of the LM loss on ptx_files.")
    ptx_files: list[DataFile] = Field(
        default_factory=list, description="PPO-ptx data (SFT formats)."
    )
    ptx_batch_size: int = Field(8, ge=1, description="PPO-ptx rows per micro-batch.")
    save_interval: int = Field(
        10, ge=1, description="RL steps between resumable checkpoints (policy, critic, driver)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest RL checkpoints kept on disk.")
    max_failures: int = Field(
        3,
        ge=0,
        description="Restarts allowed: policy/critic restores from the newest checkpoint over the "
        "run, and failed attempts of one step when an engine or frozen role dies.",
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="RL steps in a row whose updates were all non-finite -> abort."
    )
    eval_interval: int = Field(10, ge=1, description="Steps between held-out evaluations.")
    eval_prompts: int = Field(200, ge=1, description="Held-out prompts per evaluation.")
    colocate: list[list[Literal["policy", "reference", "critic", "reward_model", "rollout"]]] = (
        Field(
            default_factory=list,
            description="Roles sharing bundles, e.g. [[policy, reference], [critic, reward_model]].",
        )
    )
    colocate_cpus: float | Literal["all"] | None = Field(
        None,
        description="CPUs of each bundle of a colocate group, all used (torch threads) by whichever "
        "role's phase runs; None: the group's first role's cpus_per_actor / cpus_per_engine; all: "
        "the running cluster's CPUs left by the other roles, split over the colocated bundles "
        "(one machine; KubeRay manifests size pods by the first role's).",
    )
    policy: TrainRoleConfig = Field(default_factory=TrainRoleConfig)
    critic: TrainRoleConfig = Field(default_factory=lambda: TrainRoleConfig(lr=5e-5))
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    reward_model: RoleConfig = Field(default_factory=RoleConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardSourceConfig = Field(default_factory=RewardSourceConfig)

    @property
    def weight_sync_backend(self) -> str:
        """How weights reach the engines: "object_store", or a broadcast over "gloo" / "nccl"."""
        if self.rollout.weight_sync == "auto":
            gpus = self.rollout.gpus_per_engine > 0 and self.policy.gpus_per_actor > 0
            return "nccl" if gpus and not self._rollout_on_policy_gpus else "object_store"
        return self.rollout.weight_sync

    @property
    def _rollout_on_policy_gpus(self) -> bool:
        """Engines started on the policy's bundles (none start with rollout.backend='policy')."""
        return any("rollout" in g and "policy" in g for g in self.colocated_groups())

    @property
    def uses_broadcast_sync(self) -> bool:
        """The bucketed broadcast (gloo or NCCL: one protocol) rather than the object store."""
        return not self.generates_in_policy and self.weight_sync_backend != "object_store"

    @property
    def generates_in_policy(self) -> bool:
        """rollout.backend='policy': the policy's actors sample; no rollout role, no weight copy."""
        return self.rollout.backend == "policy"

    @property
    def kl_as_reward(self) -> bool:
        """Where the KL penalty goes: the reward (True) or the policy loss (False)."""
        if self.kl_in_reward is None:
            return self.algorithm != "grpo"
        return self.kl_in_reward

    @property
    def kl_estimate(self) -> str:
        """The per-token KL estimator in use."""
        if self.kl_estimator is None:
            return "k1" if self.kl_as_reward else "k3"
        return self.kl_estimator

    @property
    def rollout_batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def advantages_in_policy(self) -> bool:
        """On-policy without a critic nothing needs the advantages before the update: the
        policy computes them (and waits for the reference's logprobs) in its own train call."""
        return self.on_policy_update and self.algorithm != "ppo"

    @property
    def on_policy_update(self) -> bool:
        """One optimizer step on the whole batch of samples from the current weights: the
        training forward's own logprobs (detached) are the old logprobs, no separate pass."""
        return (
            self.skip_passes == "auto"
            and self.ppo_epochs == 1
            and self.mini_batch_size == self.rollout_batch_size
            and self.max_staleness == 0  # stale samples: the current policy's pass is the anchor
        )

    @property
    def old_logprobs_from_sampler(self) -> bool:
        """Samples from the policy's own current weights (rollout.backend='policy', synchronous,
        top_p 1): the logprobs they were sampled with are the old logprobs (the same module's
        forward up to float rounding: mean gap 3.7e-7 on the demo's PPO), so no separate
        old-logprob forward even with several mini-batches or epochs; the first mini-batch's
        training forward, before any update, measures the gap instead. False where the update
        is on-policy (`on_policy_update`: the training forward's own logprobs serve)."""
        return (
            not self.on_policy_update
            and self.skip_passes == "auto"
            and self.generates_in_policy
            and self.max_staleness == 0
            and self.rollout.top_p == 1.0
        )

    @property
    def needs_reference(self) -> bool:
        """The reference model is run only for a KL term that can be non-zero (an adaptive
        controller reads the KL too), or with skip_passes='never'."""
        return self.skip_passes == "never" or self.kl_coef > 0 or self.kl_controller == "adaptive"

    @property
    def reference_in_policy(self) -> bool:
        """The reference's logprobs come from a frozen copy inside the policy's actor
        (`reference.placement`); with auto, where it would share the policy's CPU bundles anyway:
        one process fewer, no call and no copy of its logprobs between processes each step."""
        if not self.needs_reference or self.reference.placement == "actor":
            return False
        if self.reference.placement == "policy":
            return True
        together = any("policy" in g and "reference" in g for g in self.colocate)
        return together and self.policy.num_actors == 1 and self.policy.gpus_per_actor == 0

    def roles(self) -> list[str]:
        """The roles this algorithm, KL setting and reward source need (actors of their own)."""
        own_reference = self.needs_reference and not self.reference_in_policy
        roles = ["policy", *(["reference"] if own_reference else [])]
        if not self.generates_in_policy:
            roles.append("rollout")
        if self.algorithm == "ppo":
            roles.append("critic")
        if self.reward.kind == "model":
            roles.append("reward_model")
        return roles

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        """Impossible combinations, checked in this order: the first one found is raised."""
        check_batch_sizes(self)
        check_algorithm(self)
        check_staleness(self)
        check_in_policy_extras(self)
        check_rollout(self)
        if self.policy.lora.enabled and self.policy.zero_stage == 3:
            raise ValueError("policy.lora.enabled=True with policy.zero_stage=3: use 0-2")
        check_colocate(self)
        return self

    def _count(self, role: str) -> int:
        return self.rollout.num_engines if role == "rollout" else getattr(self, role).num_actors

    def _gpus(self, role: str) -> float:
        if role == "rollout":
            return self.rollout.gpus_per_engine
        return getattr(self, role).gpus_per_actor

    def _cpus(self, role: str) -> float:
        if role == "rollout":
            return self.rollout.cpus_per_engine
        return getattr(self, role).cpus_per_actor

    def colocated_groups(self) -> list[list[str]]:
        """The rl.colocate groups as started: roles this run needs only, the host (the role that
        reserves the bundles) first; groups left with no role dropped."""
        needed = self.roles()
        groups = [[r for r in g if r in needed] for g in self.colocate]
        return [g for g in groups if g]

    def bundle_cpus(self, group: list[str], cluster_cpus: float | None = None) -> float:
        """CPUs of each bundle of colocated `group` (a `colocated_groups()` entry); with
        colocate_cpus='all' the running cluster's `cluster_cpus` decide (None: no cluster yet,
        the first role's CPUs)."""
        if self.colocate_cpus is None or (self.colocate_cpus == "all" and cluster_cpus is None):
            return self._cpus(group[0])
        if self.colocate_cpus != "all":
            return self.colocate_cpus
        groups = self.colocated_groups()
        grouped = {r for g in groups for r in g}
        alone = sum(self._count(r) * self._cpus(r) for r in self.roles() if r not in grouped)
        left = cluster_cpus - alone
        if left <= 0:
            raise ValueError(
                f"rl.colocate_cpus='all': the cluster's {cluster_cpus:g} CPUs leave {left:g} for "
                f"the colocated roles after the others ({alone:g})"
            )
        return left / sum(self._count(g[0]) for g in groups)

    @property
    def engines_sleep(self) -> bool:
        """Engines that share the policy's GPUs sleep (vLLM sleep mode: weights offloaded, KV
        cache freed) while the policy trains, and wake for the weight sync and generation."""
        on_gpu = self.rollout.gpus_per_engine > 0 and self.policy.gpus_per_actor > 0
        return on_gpu and self._rollout_on_policy_gpus

    def resource_requests(self, cluster_cpus: float | None = None) -> dict[str, dict[str, float]]:
        """Role -> total CPU/GPU it reserves (a colocated role rides on its group's first role,
        whose bundles have `bundle_cpus`)."""
        out: dict[str, dict[str, float]] = {}
        hosts = {g[0]: g for g in self.colocated_groups()}
        riders = {r for g in self.colocated_groups() for r in g[1:]}
        for role in self.roles():
            if role in riders:
                continue
            n = self._count(role)
            per = self.rollout.tensor_parallel_size if role == "rollout" else 1
            gpus = float(n * per) if self._gpus(role) > 0 else 0.0
            cpus = self._cpus(role)
            if role in hosts:
                cpus = self.bundle_cpus(hosts[role], cluster_cpus)
            out[role] = {"CPU": n * cpus, "GPU": gpus}
        return out
