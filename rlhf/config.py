"""The one typed config tree: every setting of every stage, with a default and a one-line doc.

YAML files in `configs/` hold overrides only; the command line adds dotted overrides:

    cfg = load_config("configs/tiny_cpu.yaml", ["sft.lr=1e-4", "run.stages=[sft,dpo]"])

Validation is loud: an unknown key (with the closest valid key suggested), a wrong type or an
impossible combination raises `ConfigError` naming the key, the value and what was expected.
Nothing is rewritten behind the user's back; derived values are computed once, in properties.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STAGES = ("pretrain", "sft", "rm", "dpo", "rl")
# Head sizes vLLM's CPU attention kernels support (the rollout engine must load the tiny model).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(ValueError):
    """A config key has a bad value; the message names the key, the value and what was expected."""


class Section(BaseModel):
    # strict: "1" is not silently turned into 1; extra="forbid": typos are errors.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class RunConfig(Section):
    name: str = Field("tiny_cpu", description="Run name; outputs go to <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Root folder for checkpoints, logs and reports.")
    seed: int = Field(0, description="Seed for data order, model init and sampling.")
    stages: list[Literal["pretrain", "sft", "rm", "dpo", "rl"]] = Field(
        ["pretrain", "sft", "rm", "dpo", "rl"], description="Stages to run, in pipeline order."
    )

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


class RayConfig(Section):
    address: str | None = Field(
        None, description="Cluster to join ('auto', 'ray://host:10001'); None: embedded local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray; None: all.")
    object_store_memory_gb: float = Field(1.0, gt=0, description="Embedded Ray object store.")
    dashboard: bool = Field(
        True,
        description="Embedded Ray: serve the dashboard (and the state API Ray Train polls) on "
        "127.0.0.1 only.",
    )


class TinyModelConfig(Section):
    hidden_size: int = Field(128, ge=8, description="Width of the tiny Llama.")
    num_layers: int = Field(4, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(4, ge=1, description="Key/value heads (GQA when < num_heads).")
    intermediate_size: int = Field(352, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(512, ge=16, description="Longest sequence.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        head = self.hidden_size // self.num_heads
        if head not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"hidden_size/num_heads = {self.hidden_size}/{self.num_heads} = {head}: vLLM's "
                f"CPU attention supports head sizes {VLLM_CPU_HEAD_SIZES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        return self


class ModelConfig(Section):
    path: str | None = Field(
        None, description="Local HF checkpoint to start from; None: build the tiny model."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    trust_remote_code: bool = Field(False, description="Allow checkpoint code to run (unsafe).")


class LoRAConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Adapter scale numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names that get adapters."
    )


class DataFile(Section):
    path: str = Field(
        description="JSONL, JSON, Parquet file, save_to_disk folder, or a folder of such files."
    )
    weight: float = Field(1.0, gt=0, description="Mixing weight relative to the other files.")
    split: str | None = Field(
        None, description="Split of a saved DatasetDict, or of a dataset folder holding several."
    )


PromptFormat = Literal["auto", "raw", "chat"]
PROMPT_FORMAT_DOC = (
    "How prompts become tokens: raw (plain text, no chat template; base models), chat (the "
    "tokenizer's chat template), auto (chat when the tokenizer has a template)."
)
COLUMNS_DOC = "Format field -> the field's name in the data, e.g. {prompt: question}."


def resolve_engine(
    engine: str, ranks: int, gpu: bool, precision: str, unit: str, got: str
) -> Literal["deepspeed", "torch"]:
    """A training engine setting resolved: torch (rlhf/engine.py's `TorchEngine`) fits one CPU
    rank in fp32; auto takes it there and DeepSpeed elsewhere; engine='torch' anywhere else is a
    ValueError quoting `got` (the settings, as the config names them)."""
    fits = ranks == 1 and not gpu and precision in ("auto", "fp32")
    if engine == "torch" and not fits:
        raise ValueError(
            f"engine='torch' trains one CPU {unit} in fp32 (got {got}); use engine='deepspeed'"
        )
    if engine == "auto":
        return "torch" if fits else "deepspeed"
    return engine  # type: ignore[return-value]


class TrainStageConfig(Section):
    """Settings shared by every Ray Train stage."""

    init_from: str | None = Field(
        None, description="Checkpoint to start from; None: the previous stage's output."
    )
    train_files: list[DataFile] = Field(default_factory=list, description="Training data.")
    eval_files: list[DataFile] = Field(default_factory=list, description="Held-out data.")
    max_length: int = Field(256, ge=8, description="Longest tokenized sample.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="Over-length samples.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="Bad records: stop, or skip+count."
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); else CPU and gloo.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    engine: Literal["auto", "deepspeed", "torch"] = Field(
        "auto",
        description="Training engine: torch (plain AdamW, no DeepSpeed; one CPU worker, fp32), "
        "deepspeed, or auto (torch for one CPU worker in fp32, else deepspeed).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU.")
    micro_batch_size: int = Field(8, ge=1, description="Samples per worker per forward pass.")
    global_batch_size: int = Field(32, ge=1, description="Samples per optimizer step, all workers.")
    micro_batch_tokens: int | None = Field(
        None,
        ge=8,
        description="Dynamic micro-batches (one worker on the torch engine): each step's rows, "
        "sorted by length, are cut into micro-batches of at most this many padded tokens (rows x "
        "the longest row) instead of micro_batch_size rows each; the update is the same, less "
        "padding is computed. Held-out batches too. None: micro_batch_size rows.",
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2, description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    eval_interval: int = Field(50, ge=1, description="Steps between held-out evaluations.")
    save_interval: int = Field(50, ge=1, description="Steps between resumable checkpoints.")
    log_interval: int = Field(5, ge=1, description="Steps between metric logs.")
    max_nonfinite_steps: int = Field(3, ge=1, description="Consecutive non-finite steps -> abort.")
    max_failures: int = Field(
        2,
        ge=0,
        description="Worker failures Ray Train recovers from (the group is re-created and resumes "
        "from the newest checkpoint); one more ends the stage.",
    )
    overfit_patience: int = Field(
        3,
        ge=0,
        description="Warn when the held-out loss rises this many evaluations in a row (0: never).",
    )
    select: Literal["best", "last", "auto"] = Field(
        "auto",
        description="Exported model: the checkpoint with the lowest held-out loss, the last one, "
        "or auto (best when the stage has held-out data). best also checkpoints at every "
        "evaluation.",
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig)

    @property
    def has_heldout(self) -> bool:
        """Whether the stage evaluates on held-out data."""
        return bool(self.eval_files)

    @property
    def select_best(self) -> bool:
        """Export the checkpoint with the lowest held-out loss (else the last one)."""
        return self.select == "best" or (self.select == "auto" and self.has_heldout)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainStageConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size * num_workers = {self.micro_batch_size} * "
                f"{self.num_workers} = {per_step}"
            )
        if self.lora.enabled and self.zero_stage == 3:
            raise ValueError(
                "lora.enabled=True with zero_stage=3: adapters are merged for export from full "
                "weights; use zero_stage 0-2 with LoRA (the frozen base is small per rank anyway)"
            )
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be smaller than max_steps={self.max_steps}"
            )
        backend = self.engine_backend  # validates engine='torch'
        if self.micro_batch_tokens is not None and backend != "torch":
            raise ValueError(
                f"micro_batch_tokens={self.micro_batch_tokens} needs the torch engine (one CPU "
                f"worker in fp32; DeepSpeed accumulates a fixed number of micro-batches), but "
                f"num_workers={self.num_workers}, use_gpu={self.use_gpu}, engine="
                f"{self.engine!r}, precision={self.precision!r} give {backend}; set "
                f"micro_batch_tokens=null to cut micro_batch_size rows"
            )
        if self.select == "best" and not self.has_heldout:
            raise ValueError(
                "select='best' picks the checkpoint with the lowest held-out loss, but eval_files "
                "is empty; add held-out files or use select='last'"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def engine_backend(self) -> Literal["deepspeed", "torch"]:
        """The engine `engine` resolves to (auto: torch where it fits)."""
        got = (
            f"num_workers={self.num_workers}, use_gpu={self.use_gpu}, precision={self.precision!r}"
        )
        return resolve_engine(
            self.engine, self.num_workers, self.use_gpu, self.precision, "worker", got
        )


class PretrainConfig(TrainStageConfig):
    sources: dict[str, list[DataFile]] = Field(
        default_factory=dict, description="Source name -> files of {'text': ...} records."
    )
    mix: dict[str, float] = Field(
        default_factory=dict, description="Source name -> share of training tokens (sums to 1)."
    )
    token_budget: int = Field(1_000_000, ge=1, description="Tokens after mixing.")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard threshold.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)

    @model_validator(mode="after")
    def _mix_matches_sources(self) -> PretrainConfig:
        if set(self.mix) != set(self.sources):
            raise ValueError(
                f"mix keys {sorted(self.mix)} must equal sources {sorted(self.sources)}"
            )
        if self.mix and abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix shares {self.mix} must sum to 1")
        if self.lora.enabled:
            raise ValueError("lora.enabled=True: pretraining trains all weights")
        return self

    @property
    def has_heldout(self) -> bool:
        """Pretraining always holds out 5% of its packed blocks."""
        return True


class SFTConfig(TrainStageConfig):
    format: Literal["auto", "input_output", "instruction", "messages"] = Field(
        "auto", description="Record format; auto detects it from the keys."
    )
    prompt_format: PromptFormat = Field("auto", description=PROMPT_FORMAT_DOC)
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_DOC)


class RewardModelConfig(TrainStageConfig):
    format: Literal["auto", "pairwise", "ranked"] = Field("auto", description="Preference format.")
    prompt_format: PromptFormat = Field("auto", description=PROMPT_FORMAT_DOC)
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_DOC)
    margin: float = Field(0.0, ge=0, description="Margin in -log sigmoid(r_w - r_l - margin).")


class DPOConfig(TrainStageConfig):
    loss: Literal["dpo", "ipo", "cdpo"] = Field("dpo", description="Preference loss.")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO label noise.")
    nll_coef: float = Field(0.0, ge=0, description="Weight of an NLL term on chosen responses.")
    precompute_reference: bool = Field(
        False,
        description="Score every pair with the frozen reference once, when the data are "
        "prepared, and store it with them: no reference in the engine, no reference forward.",
    )
    format: Literal["auto", "pairwise", "ranked"] = Field("auto", description="Preference format.")
    prompt_format: PromptFormat = Field("auto", description=PROMPT_FORMAT_DOC)
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_DOC)

    @model_validator(mode="after")
    def _smoothing_needs_cdpo(self) -> DPOConfig:
        if self.label_smoothing > 0 and self.loss != "cdpo":
            raise ValueError(
                f"label_smoothing={self.label_smoothing} only applies to loss='cdpo' "
                f"(got loss={self.loss!r})"
            )
        return self


# ---- the online RL stage --------------------------------------------------------------------------

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
        training forward, before any update, measures the gap instead."""
        return (
            self.skip_passes == "auto"
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
        n = self.rollout_batch_size
        if n % self.mini_batch_size:
            raise ValueError(
                f"prompts_per_step * samples_per_prompt = {self.prompts_per_step} * "
                f"{self.samples_per_prompt} = {n} must be a multiple of "
                f"mini_batch_size={self.mini_batch_size}"
            )
        for name in ("policy", "critic") if self.algorithm == "ppo" else ("policy",):
            role = getattr(self, name)
            per = role.micro_batch_size * role.num_actors
            if self.mini_batch_size % per:
                raise ValueError(
                    f"mini_batch_size={self.mini_batch_size} must be a multiple of "
                    f"{name}.micro_batch_size * {name}.num_actors = {per}"
                )
        if self.algorithm == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("algorithm='rloo' needs samples_per_prompt >= 2")
        if (
            self.algorithm in ("grpo", "dr_grpo", "reinforce_pp_baseline")
            and self.samples_per_prompt < 2
        ):
            raise ValueError(
                f"algorithm={self.algorithm!r} compares samples of a prompt: "
                f"samples_per_prompt={self.samples_per_prompt} must be >= 2"
            )
        if self.filter_groups and self.samples_per_prompt < 2:
            raise ValueError(
                "filter_groups=true keeps prompts whose samples' scores differ: "
                f"samples_per_prompt={self.samples_per_prompt} must be >= 2"
            )
        if self.algorithm == "grpo" and self.kl_in_reward and self.kl_coef > 0:
            # A group whose scores are equal would get advantages made of its KL differences
            # alone, divided by their (tiny) std: unit-sized noise instead of zero.
            raise ValueError(
                "kl_in_reward=true with algorithm='grpo': GRPO divides by each group's reward "
                "std, which turns the KL differences of an all-equal group into unit-sized "
                "advantages; use kl_in_reward=false (the KL loss), or dr_grpo / rloo"
            )
        if self.reward.kind == "http" and not self.reward.url:
            raise ValueError("reward.kind='http' needs reward.url")
        if self.max_staleness > 0:
            shared = [g for g in self.colocate if "rollout" in g]
            if shared:
                raise ValueError(
                    f"max_staleness={self.max_staleness} with rollout in rl.colocate {shared[0]}: "
                    "asynchronous engines generate while the roles on their bundles train, so "
                    "they cannot share them; remove rollout from rl.colocate, or max_staleness=0"
                )
            if self.truncated_is_cap is None:
                raise ValueError(
                    f"max_staleness={self.max_staleness} trains on samples of older policy "
                    "versions: set truncated_is_cap (e.g. 2.0), the importance-weight correction "
                    "for them"
                )
        if self.reference.placement == "policy" and self.policy.num_actors > 1:
            raise ValueError(
                f"reference.placement='policy' with policy.num_actors={self.policy.num_actors}: "
                "the reference rides in the policy's one actor; use reference.placement='actor' "
                "(or 'auto') for a data-parallel policy"
            )
        if self.ptx_coef > 0 and not self.ptx_files:
            raise ValueError(f"ptx_coef={self.ptx_coef} needs ptx_files")
        if self.rollout.weight_sync == "nccl" and (
            self.rollout.gpus_per_engine == 0 or self.policy.gpus_per_actor == 0
        ):
            raise ValueError(
                "rollout.weight_sync='nccl' needs GPUs for the policy and the "
                "engines (gpus_per_actor, gpus_per_engine > 0)"
            )
        if self.rollout.weight_sync == "nccl" and self._rollout_on_policy_gpus:
            raise ValueError(
                "rollout.weight_sync='nccl' with rollout colocated with the policy: NCCL cannot "
                "join two ranks on one GPU; use weight_sync='object_store' (or 'auto')"
            )
        tp = self.rollout.tensor_parallel_size
        if tp > 1 and self.rollout.backend != "vllm":
            raise ValueError(
                f"rollout.tensor_parallel_size={tp} with rollout.backend={self.rollout.backend!r}: "
                "only vLLM shards an engine; set rollout.backend='vllm' or tensor_parallel_size=1"
            )
        if self.generates_in_policy:
            self._check_generates_in_policy()
        if tp > 1 and self.rollout.gpus_per_engine != 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={tp} shards an engine over {tp} whole GPUs: "
                f"set rollout.gpus_per_engine=1 (got {self.rollout.gpus_per_engine}); "
                "on CPU tensor_parallel_size must be 1"
            )
        if tp > 1 and any("rollout" in g for g in self.colocate):
            raise ValueError(
                f"rollout.tensor_parallel_size={tp}: a tensor-parallel engine holds whole GPUs "
                "and cannot be colocated; remove rollout from rl.colocate"
            )
        if self.policy.lora.enabled and self.policy.zero_stage == 3:
            raise ValueError("policy.lora.enabled=True with policy.zero_stage=3: use 0-2")
        needed, seen = set(self.roles()), set()
        for group in self.colocate:
            if len(group) < 2:
                raise ValueError(f"colocate group {group} needs at least two roles")
            for role in group:
                if role in seen:
                    raise ValueError(f"colocate: {role!r} appears in two groups")
                seen.add(role)
            counts = {r: self._count(r) for r in group if r in needed}
            if len(set(counts.values())) > 1:
                raise ValueError(
                    f"colocate group {group}: colocated roles need the same number "
                    f"of actors, got {counts}"
                )
            gpus = {r: self._gpus(r) for r in group if r in needed}
            if sum(gpus.values()) > 0 and (min(gpus.values()) == 0 or sum(gpus.values()) > 1):
                raise ValueError(
                    f"colocate group {group}: GPU shares {gpus} must all be > 0 and "
                    f"sum to at most 1"
                )
        if isinstance(self.colocate_cpus, float) and self.colocate_cpus <= 0:
            raise ValueError(f"colocate_cpus={self.colocate_cpus} must be > 0 (or 'all')")
        return self

    def _check_generates_in_policy(self) -> None:
        """rollout.backend='policy' needs whole weights in each policy actor and no engines."""
        checks = (
            (
                "policy.zero_stage",
                self.policy.zero_stage,
                self.policy.zero_stage == 3,
                "ZeRO-3 shards the weights over the ranks; use 0-2",
            ),
            (
                "max_staleness",
                self.max_staleness,
                self.max_staleness > 0,
                "the policy cannot generate ahead while it trains; use 0",
            ),
            (
                "rollout.num_engines",
                self.rollout.num_engines,
                self.rollout.num_engines != 1,
                "the policy's actors are the engines; leave it at 1",
            ),
            (
                "rollout.weight_sync",
                self.rollout.weight_sync,
                self.rollout.weight_sync in ("gloo", "nccl"),
                "no weights are sent; leave it at 'auto'",
            ),
        )
        for key, value, bad, fix in checks:
            if bad:
                raise ValueError(
                    f"rollout.backend='policy' with {key}={value!r}: {fix} "
                    "(or set rollout.backend to 'transformers' or 'vllm')"
                )

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


# ---- monitoring the RL stage ---------------------------------------------------------------------

MONITOR_RULES = (
    "non_finite",
    "kl",
    "reward_zscore",
    "no_signal",
    "length",
    "diversity",
    "entropy",
    "logprob_gap",
    "reward_hacking",
)
MonitorAction = Literal["warn", "pause", "stop"]


class MonitorRule(Section):
    """What every monitor rule has: on/off, what a trip does, and how long the condition must last."""

    enabled: bool = Field(True, description="Check this rule after every RL step.")
    action: MonitorAction = Field(
        "pause", description="warn: log it; pause: checkpoint, paused.json, exit 3; stop: error."
    )
    patience: int = Field(1, ge=1, description="RL steps in a row the condition must hold.")


class NonFiniteRule(MonitorRule):
    action: MonitorAction = Field("stop", description="A NaN/inf metric: stop (exit 2).")


class KLRule(MonitorRule):
    max_per_sequence: float = Field(
        1.0, gt=0, description="Limit on kl/mean_per_sequence (nats per answer; demo 0.1-0.4)."
    )
    patience: int = Field(3, ge=1, description="Steps in a row (single-step k3 spikes happen).")


class RewardZScoreRule(MonitorRule):
    window: int = Field(30, ge=2, description="Previous steps the reward is compared against.")
    warmup: int = Field(20, ge=2, description="Steps of history needed before the rule checks.")
    max_abs_z: float = Field(
        6.0, gt=0, description="|reward/score_mean - window mean| / window std above this trips."
    )
    min_std: float = Field(
        0.01,
        gt=0,
        description="Floor on the window std (reward units), so a flat window "
        "does not turn noise into huge z-scores.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> RewardZScoreRule:
        if self.warmup > self.window:
            raise ValueError(f"warmup={self.warmup} must be <= window={self.window}")
        return self


class NoSignalRule(MonitorRule):
    max_flat_group_frac: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Limit on reward/flat_group_frac (share of prompt groups "
        "whose scores all agree: no advantage; the demo has about 0.75).",
    )
    zero_std: bool = Field(True, description="Also trip when every reward of the step is equal.")
    patience: int = Field(5, ge=1, description="RL steps in a row without signal.")


class LengthRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    baseline_steps: int = Field(
        5, ge=1, description="The first steps whose mean response/length_mean is the baseline."
    )
    max_ratio: float = Field(
        3.0, gt=1, description="Length / baseline above this, or below 1/this, trips."
    )
    max_clipped_frac: float = Field(
        0.5, gt=0, le=1, description="Limit on response/clipped_frac (answers cut at max length)."
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class DiversityRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    min_distinct_frac: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Floor on response/distinct_frac (distinct answers / all; "
        "1/samples_per_prompt when every prompt gets one repeated answer).",
    )
    min_distinct_ngram_frac: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Floor on response/distinct_ngram_frac (distinct 2-grams "
        "/ all 2-grams of the step's answers).",
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class EntropyRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    min_entropy: float = Field(
        0.005, ge=0, description="Floor on policy/entropy (nats per response token)."
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class LogprobGapRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    max_gap: float = Field(
        0.02, gt=0, description="Limit on rollout/logprob_gap (rl.rollout.max_logprob_gap stops)."
    )


class RewardHackingRule(MonitorRule):
    window: int = Field(20, ge=3, description="Steps over which both trends are fitted.")
    min_gold_drop: float = Field(
        0.05, gt=0, description="reward/gold_mean must fall by more than this over the window..."
    )
    min_score_rise: float = Field(
        0.0, ge=0, description="...while reward/score_mean rises by more than this."
    )


class MonitorConfig(Section):
    """Rules checked on every RL step's metrics; each can warn, pause (exit 3) or stop (exit 2)."""

    enabled: bool = Field(True, description="Run the monitor at all.")
    acknowledge: list[
        Literal[
            "non_finite",
            "kl",
            "reward_zscore",
            "no_signal",
            "length",
            "diversity",
            "entropy",
            "logprob_gap",
            "reward_hacking",
        ]
    ] = Field(
        default_factory=list,
        description="Rules demoted to warn, e.g. [kl] to resume past a kl pause unchanged.",
    )
    non_finite: NonFiniteRule = Field(default_factory=NonFiniteRule)
    kl: KLRule = Field(default_factory=KLRule)
    reward_zscore: RewardZScoreRule = Field(default_factory=RewardZScoreRule)
    no_signal: NoSignalRule = Field(default_factory=NoSignalRule)
    length: LengthRule = Field(default_factory=LengthRule)
    diversity: DiversityRule = Field(default_factory=DiversityRule)
    entropy: EntropyRule = Field(default_factory=EntropyRule)
    logprob_gap: LogprobGapRule = Field(default_factory=LogprobGapRule)
    reward_hacking: RewardHackingRule = Field(default_factory=RewardHackingRule)

    def action_of(self, rule: str) -> str:
        """The rule's action after acknowledgement: an acknowledged rule only warns."""
        return "warn" if rule in self.acknowledge else getattr(self, rule).action


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RewardModelConfig = Field(default_factory=RewardModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _columns_name_format_fields(self) -> Config:
        from rlhf.data.formats import FORMAT_KEYS, PREFERENCE_FORMATS, SFT_FORMATS

        def fields(formats: tuple[str, ...]) -> set[str]:
            return set().union(*(FORMAT_KEYS[f][0] | FORMAT_KEYS[f][1] for f in formats))

        for key, formats in [
            ("sft", SFT_FORMATS),
            ("rm", PREFERENCE_FORMATS),
            ("dpo", PREFERENCE_FORMATS),
            ("rl", ("prompts",)),
            ("eval", ("prompts",)),
        ]:
            known = fields(formats)
            for name in getattr(self, key).columns:
                if name not in known:
                    raise ValueError(
                        f"{key}.columns: {name!r} is not a field of its formats {sorted(known)}"
                    )
        return self

    @model_validator(mode="after")
    def _stages_in_order(self) -> Config:
        order = [s for s in STAGES if s in self.run.stages]
        if order != list(self.run.stages):
            raise ValueError(f"run.stages={self.run.stages} must follow pipeline order {order}")
        for stage in self.run.stages:
            if stage == "pretrain" and not self.pretrain.sources:
                raise ValueError("pretrain.sources is empty: the stage has no data")
            if stage == "rl":
                if not self.rl.prompt_files:
                    raise ValueError("rl.prompt_files is empty: the stage has no prompts")
                if (
                    self.rl.reward.kind == "model"
                    and not self.rl.reward.model_path
                    and "rm" not in self.run.stages
                ):
                    raise ValueError(
                        "rl.reward.kind='model' needs run.stages to include rm, or "
                        "rl.reward.model_path"
                    )
            elif stage != "pretrain" and not getattr(self, stage).train_files:
                raise ValueError(f"{stage}.train_files is empty: the stage has no data")
        return self

    def fingerprint(self) -> str:
        """Short hash of every setting; stored in checkpoint manifests."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- loading -----------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """YAML-parse a command-line value; also accept `1e-4`, which YAML 1.1 leaves as a string."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(err: ValidationError, source: str) -> ConfigError:
    keys = _known_keys(Config)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{key}: unknown key{hint}")
        else:
            shown = e.get("input")
            value = "" if isinstance(shown, dict) else f" = {shown!r}"
            lines.append(f"{key or '<root>'}{value}: {e['msg']}")
    return ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides, then validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sft.lr=1e-4")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, source) from None
