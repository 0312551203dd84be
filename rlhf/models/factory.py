"""Models: the tiny Llama built from nothing, loading HF checkpoints, reward/value heads, LoRA.

Every checkpoint this project writes or reads is a plain Hugging Face folder (config.json,
model.safetensors, tokenizer files), so transformers, vLLM and the next pipeline stage all load it
as is. The reward model and the critic are the stock HF heads on the same backbone:

    path = ensure_tiny_model("runs/base", hidden_size=64, num_layers=2, seed=0)
    policy = load_causal_lm(path)                        # logits (B, T, V)
    rm = load_reward_model(path)                         # backbone reused, new `score` head
    rewards = sequence_rewards(rm, input_ids, attention_mask)   # (B,)
    critic = load_critic(path)
    values = token_values(critic, input_ids, attention_mask)    # (B, T)
    policy = apply_lora(policy, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    merge_lora(policy).save_pretrained("runs/sft/model")

Nothing here imports Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from rlhf.models.tokenizer import build_byte_tokenizer

# Embedding rows are padded to a multiple of this: aligned matmuls, and room for added tokens.
VOCAB_MULTIPLE = 64
# Written next to the weights by `save_tiny_model`: the exact arguments that built them.
TINY_MANIFEST = "tiny_model.json"
# Head sizes vLLM's CPU attention kernels accept (vllm 0.32, cpu_attn.py); any other fails only
# when the rollout engine first runs attention, so the factory refuses them up front.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# ---- the tiny model ------------------------------------------------------------------------------


def tiny_llama_config(
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 352,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """A Llama config whose special token ids are the byte tokenizer's.

    `vocab_size=None` takes the byte tokenizer's 261 tokens rounded up to a multiple of 64 (320).
    """
    tok = build_byte_tokenizer()
    if vocab_size is None:
        vocab_size = -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tok)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}: "
            "heads must divide hidden_size and key/value heads must divide heads"
        )
    if hidden_size // num_heads not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"head size hidden_size/num_heads = {hidden_size // num_heads} is not one vLLM's CPU "
            f"attention supports: {VLLM_CPU_HEAD_DIMS}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def build_tiny_model(seed: int = 0, **size) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (fp32); the same seed and size give identical weights.

    `size` holds the flat arguments of `tiny_llama_config`. The global RNG is left untouched.
    """
    config = tiny_llama_config(**size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def save_tiny_model(path: str | Path, seed: int = 0, **size) -> Path:
    """Build the tiny model and save it with the byte tokenizer and a generation config.

    Written to a temporary folder next to `path`, fsynced, then renamed into place, so `path` is
    either absent or complete. Raises FileExistsError when `path` exists.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; use ensure_tiny_model to reuse it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_tiny_model(tmp, seed, size)
        _fsync_tree(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_model(path: str | Path, seed: int = 0, **size) -> Path:
    """Create the tiny model at `path` unless it is already there; return `path`.

    An existing tiny model built with other arguments is an error, never silently reused.
    """
    path = Path(path)
    wanted = _tiny_args(seed, size)
    if not path.exists():
        try:
            return save_tiny_model(path, seed=seed, **size)
        except OSError:
            if not (path / TINY_MANIFEST).is_file():  # not a concurrent writer winning the race
                raise
    manifest = path / TINY_MANIFEST
    if not manifest.is_file():
        raise FileExistsError(f"{path} exists but holds no {TINY_MANIFEST}: not a tiny model")
    built = json.loads(manifest.read_text())
    differ = {k: (built.get(k), v) for k, v in wanted.items() if built.get(k) != v}
    if differ:
        raise ValueError(f"{path} was built with other arguments (built, wanted): {differ}")
    return path


def _tiny_args(seed: int, size: dict) -> dict:
    """Every argument that shapes the tiny model, defaults filled in (TypeError on unknown)."""
    bound = inspect.signature(tiny_llama_config).bind(**size)
    bound.apply_defaults()
    return {"seed": seed, **bound.arguments}


def _write_tiny_model(out: Path, seed: int, size: dict) -> None:
    model = build_tiny_model(seed=seed, **size)
    tok = build_byte_tokenizer()
    tok.model_max_length = model.config.max_position_embeddings
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    manifest = json.dumps(_tiny_args(seed, size), sort_keys=True)
    (out / TINY_MANIFEST).write_text(manifest + "\n")


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- loading checkpoints -------------------------------------------------------------------------


def default_dtype() -> torch.dtype:
    """bf16 where a GPU is present, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def local_device(device: str | torch.device | None = None) -> torch.device:
    """Where this process runs the models it loads itself (held-out answers, reward-model scores,
    the AI judge): `device` when given, else its current GPU when it sees one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load(auto_cls: type, path: str | Path, dtype, trust_remote_code: bool, **overrides):
    """`auto_cls.from_pretrained` with config attributes overridden and errors naming the path."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    dtype = default_dtype() if dtype is None else dtype
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        for key, value in overrides.items():
            setattr(config, key, value)
        return auto_cls.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot load as {auto_cls.__name__}: {err}") from err


def load_causal_lm(
    path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM from a local checkpoint; `dtype=None` picks `default_dtype()`."""
    return _load(AutoModelForCausalLM, path, dtype, trust_remote_code)


def load_reward_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A `*ForSequenceClassification` model with one label: one scalar per sequence.

    From a causal-LM checkpoint the backbone is reused and the `score` head is new (initialised
    from `seed`, so every data-parallel worker starts identical); from a reward-model checkpoint
    the head is loaded too. The score is read at the last token that is not `pad_token_id`, so
    the checkpoint needs a pad token distinct from EOS (sequences end with EOS).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load(
            AutoModelForSequenceClassification, path, dtype, trust_remote_code, num_labels=1
        )
    _require_distinct_pad(model, path, pad_token_id)
    return model


def load_critic(
    path: str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """A `*ForTokenClassification` model with one label: one value per token.

    Loads from a causal-LM checkpoint (new head) or a reward-model checkpoint (its `score.weight`
    is reused, a common PPO critic init). Dropout before the head is off: value targets are noisy
    enough already.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load(
            AutoModelForTokenClassification,
            path,
            dtype,
            trust_remote_code,
            num_labels=1,
            classifier_dropout=0.0,
        )


def _require_distinct_pad(model: PreTrainedModel, path: str | Path, pad_token_id: int | None):
    config = model.config.get_text_config()
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
        model.config.pad_token_id = pad_token_id
    pad, eos = config.pad_token_id, config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if pad is None:
        raise ValueError(f"{path}: config has no pad_token_id; pass pad_token_id=...")
    if pad in eos_ids:
        raise ValueError(
            f"{path}: pad_token_id={pad} equals EOS; the reward would be read before the final "
            "EOS. Pass a distinct pad_token_id."
        )


def sequence_rewards(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scalar reward per sequence, read at its last non-pad token.

    input_ids, attention_mask: (B, T), left or right padded with the model's pad token.
    Returns rewards: (B,)
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.squeeze(-1)


def token_values(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Value estimate per token (values at padded positions are meaningless: mask them).

    input_ids, attention_mask: (B, T). Returns values: (B, T)
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits.squeeze(-1)


# ---- LoRA ----------------------------------------------------------------------------------------

# PEFT task type per head: it picks the PeftModel wrapper (generate, pooling kwargs).
_PEFT_TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
}


def load_trainable_lm(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    lora: Any = None,
) -> torch.nn.Module:
    """A causal LM to train (the offline stages' model, the RL policy): with LoRA adapters when
    `lora.enabled` (a LoRAConfig)."""
    return with_lora(load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code), lora)


def with_lora(model: torch.nn.Module, lora: Any = None) -> torch.nn.Module:
    """`model` with LoRA adapters as a LoRAConfig says (`lora.enabled`), else unchanged."""
    if lora is None or not lora.enabled:
        return model
    return apply_lora(
        model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )


def apply_lora(
    model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules: list[str]
) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters; only adapters (and a `score` head, if any) train.

    The reward/value `score` head is new, so it trains in full next to the adapters.
    """
    from peft import LoraConfig, get_peft_model

    name = type(model).__name__
    task = next((t for suffix, t in _PEFT_TASKS.items() if name.endswith(suffix)), None)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=["score"] if hasattr(model, "score") else None,
        task_type=task,
    )
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    """Fold the adapters into the base weights and return the plain HF model.

    In place: the PEFT wrapper must not be used afterwards. A model without adapters is
    returned unchanged.
    """
    if not hasattr(model, "merge_and_unload"):
        return model
    return model.merge_and_unload()
