"""The online RL stage's roles: the actors of each model role (policy, critic, reference, reward
model), the rollout engines, and where rewards come from. `rl.RLConfig` holds one of each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config.base import LoRAConfig, Section, resolve_engine

RL_ALGORITHMS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
RL_ROLES = ("policy", "reference", "critic", "reward_model", "rollout")


class RoleConfig(Section):
    """One role's actors: a placement group of `num_actors` bundles."""

    num_actors: int = Field(1, ge=1, description="Actors (data-parallel ranks) of this role.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per actor (a Ray resource).")
    gpus_per_actor: float = Field(0.0, ge=0, le=1, description="GPU share per actor.")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU.")
    micro_batch_size: int = Field(16, ge=1, description="Rows per forward pass per actor.")


class ReferenceConfig(RoleConfig):
    """The frozen reference policy of the KL term."""

    placement: Literal["auto", "actor", "policy"] = Field(
        "auto",
        description="actor: actors of its own; policy: a frozen copy inside the policy's one "
        "actor (no reference actors, no call between processes per step; num_actors, "
        "cpus_per_actor and gpus_per_actor here are then unused); auto: policy when the "
        "reference would share the policy's CPU bundles (rl.colocate) and the policy has one "
        "actor (on GPUs auto keeps actors).",
    )


class TrainRoleConfig(RoleConfig):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine floor (1.0: constant lr).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup (optimizer steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2, description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    engine: Literal["auto", "deepspeed", "torch"] = Field(
        "auto",
        description="Training engine: torch (plain AdamW, no DeepSpeed; one CPU actor, fp32), "
        "deepspeed, or auto (torch for one CPU actor in fp32, else deepspeed).",
    )

    @model_validator(mode="after")
    def _engine_fits(self) -> TrainRoleConfig:
        self.engine_backend  # noqa: B018 - validates engine='torch'
        return self

    @property
    def engine_backend(self) -> Literal["deepspeed", "torch"]:
        """The engine `engine` resolves to (auto: torch where it fits)."""
        got = (
            f"num_actors={self.num_actors}, gpus_per_actor={self.gpus_per_actor}, "
            f"precision={self.precision!r}"
        )
        gpu = self.gpus_per_actor > 0
        return resolve_engine(self.engine, self.num_actors, gpu, self.precision, "actor", got)


class RolloutConfig(Section):
    backend: Literal["vllm", "transformers", "policy"] = Field(
        "vllm",
        description="vllm; transformers: transformers' generate in the rollout actor "
        "(actors/hf_rollout.py: faster for models of a few million parameters on CPU; no tensor "
        "parallelism); policy: the same generate inside each policy actor, from its training "
        "weights (no rollout actor, no weight copy; ZeRO 0-2, synchronous).",
    )
    num_engines: int = Field(1, ge=1, description="Rollout engines (RolloutActors).")
    cpus_per_engine: float = Field(0.5, gt=0, description="CPUs per engine (a Ray resource).")
    gpus_per_engine: float = Field(
        0.0, ge=0, le=1, description="GPU share per engine (per TP rank: whole GPUs when TP > 1)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallel size: an engine holds this many whole GPUs."
    )
    kv_cache_gb: float | None = Field(None, gt=0, description="KV cache; None: vLLM default.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM's GPU share.")
    max_new_tokens: int = Field(16, ge=1, description="Longest sampled response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    chunk_size: int = Field(8, ge=1, description="Prompts per dispatched request.")
    weight_sync: Literal["auto", "object_store", "gloo", "nccl"] = Field(
        "auto",
        description="auto: nccl when policy and engines have GPUs, else object_store; gloo/nccl: "
        "bucketed broadcast from policy rank 0 (actors/weight_sync.py).",
    )
    weight_bucket_mb: float = Field(
        256.0, gt=0, description="Weight sync: one bucket (object or broadcast), MiB."
    )
    max_logprob_gap: float = Field(
        0.05, gt=0, description="Mean |trainer - rollout| logprob above this: stale engine, stop."
    )


class RewardSourceConfig(Section):
    kind: Literal["rule", "model", "http"] = Field("rule", description="Where rewards come from.")
    rule: str = Field(
        "exact_match", description="A built-in rule (exact_match) or 'package.module:function'."
    )
    url: str | None = Field(None, description="kind=http: POST endpoint returning rewards.")
    timeout_s: float = Field(30.0, gt=0, description="kind=http: request timeout.")
    model_path: str | None = Field(None, description="kind=model: RM checkpoint; None: rm stage.")
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip].")
