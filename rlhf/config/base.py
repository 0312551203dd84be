"""What every part of the config tree builds on: `ConfigError`, the strict `Section` base, the
run, Ray, model, LoRA and data-file sections, and how a training engine setting resolves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
