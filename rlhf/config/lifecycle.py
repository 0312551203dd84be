"""After training: evaluating the policies, judging two answers (RLAIF labels, judged evaluation),
the gate a new policy passes to be deployed, and serving it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config.base import PROMPT_FORMAT_DOC, DataFile, PromptFormat, Section


class EvalConfig(Section):
    prompt_files: list[DataFile] = Field(
        default_factory=list,
        description="Held-out {prompt, label} files scored besides sft.eval_files.",
    )
    prompt_format: PromptFormat = Field("auto", description=PROMPT_FORMAT_DOC)
    columns: dict[str, str] = Field(
        default_factory=dict, description="As rl.columns, for eval.prompt_files."
    )
    num_prompts: int = Field(
        400, ge=1, description="Held-out prompts each policy answers (at most)."
    )
    max_new_tokens: int = Field(16, ge=1, description="Longest answer in evaluation.")
    samples: int = Field(
        8,
        ge=0,
        description="Answers sampled per prompt for the sampled accuracy (the policy's "
        "expected exact-match reward); 0: greedy only.",
    )
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the sampled answers."
    )
    engine: Literal["vllm", "transformers"] = Field(
        "vllm",
        description="What generates the answers: a vLLM engine (a Ray task with "
        "rl.rollout's resources when Ray runs, else in this process) or transformers here.",
    )


class JudgeConfig(Section):
    """`rlhf label` (RLAIF) and `rlhf eval-judge`: who judges two answers, and the safety probes."""

    constitution: str = Field(
        "rlhf/data/samples/constitution.md", description="The AI judge's principles (a text file)."
    )
    model_path: str | None = Field(None, description="AI judge: a causal LM (HF folder).")
    reward_model_path: str | None = Field(None, description="Reward-model judge: an RM checkpoint.")
    rule: str = Field("exact_match", description="Rule judge and gold rule (as rl.reward.rule).")
    rm_margin: float = Field(
        0.0, ge=0, description="Reward-model judge: a score gap at or below this is a tie."
    )
    batch_size: int = Field(8, ge=1, description="Judge prompts per forward pass.")
    max_length: int = Field(
        2048, ge=16, description="Longest judge prompt in tokens; a longer one is an error."
    )
    safety_probes: str = Field(
        "rlhf/data/samples/safety_probes.jsonl",
        description="{id, category, prompt} harmful requests a policy should refuse.",
    )


class DeployConfig(Section):
    """`rlhf deploy`: the gate a new policy passes before it replaces the served one."""

    judges: list[str] = Field(
        default_factory=lambda: ["rule"],
        description="Judges of the win rate against the served policy, as `eval-judge --judge`: "
        "rule[=NAME], reward_model[=PATH], model[=PATH].",
    )
    min_win_rate: float = Field(
        0.5, ge=0, le=1, description="Lowest win rate (ties count half) by every judge."
    )
    max_refusal_drop: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How far the refusal rate on the safety probes may fall (0: not at all).",
    )


class ServeConfig(Section):
    """`rlhf serve`: the policy behind an OpenAI-compatible Ray Serve app, feedback into a database."""

    host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy (loopback).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    token: str | None = Field(
        None, description="Bearer token every route but /health needs; None: generate one."
    )
    num_replicas: int = Field(1, ge=1, description="Replicas (one engine each), no autoscaling.")
    autoscaling: bool = Field(False, description="Scale between min_replicas and max_replicas.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling: requests in flight per replica to aim for."
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per replica (a Ray resource).")
    gpus_per_replica: float = Field(0.0, ge=0, le=1, description="GPU share per replica.")
    max_model_len: int = Field(512, ge=16, description="Longest prompt + answer in tokens.")
    kv_cache_gb: float | None = Field(None, gt=0, description="KV cache; None: vLLM default.")
    max_tokens: int = Field(64, ge=1, description="Answer length when a request names none.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask.")
    temperature: float = Field(1.0, ge=0, description="Default temperature (0: greedy).")
    max_batch_size: int = Field(8, ge=1, description="Concurrent requests batched per engine call.")
    stream_chunk_tokens: int = Field(4, ge=1, description="Streaming: tokens per SSE chunk.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (postgresql+psycopg://...); None: SQLite at "
        "<run dir>/serve/feedback.db.",
    )
    model_version: str | None = Field(
        None, description="Version stamped on answers; None: folder name + weights hash."
    )

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} must be <= max_replicas={self.max_replicas}"
            )
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"max_tokens={self.max_tokens} must be <= max_tokens_limit={self.max_tokens_limit}"
            )
        return self
