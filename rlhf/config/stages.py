"""The offline training stages (each a Ray Train run): the settings they share, and pretraining,
SFT, reward model and DPO on top of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config.base import (
    COLUMNS_DOC,
    PROMPT_FORMAT_DOC,
    DataFile,
    LoRAConfig,
    PromptFormat,
    Section,
    resolve_engine,
)


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
