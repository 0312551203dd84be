"""Answers of policies (HF checkpoint folders) to chat prompts: greedy and sampled, from
transformers in this process or from one vLLM engine that answers for every policy in turn.

    got = policies_answers({"sft": ".../sft/model", "rl": ".../rl/model"}, chats, 8,
                           num_samples=8, engine="vllm", resources={"num_cpus": 1})
    greedy, sampled = got["sft"]

Prompts are rendered with the rule SFT and RL use (rlhf/data/render.py). On vLLM a checkpoint
whose config, generation config and tokenizer settings equal those of the engine's model (every
model of one pipeline) replaces the weights in place instead of building a new engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def load_tokenizer(model_dir: str, prompt_format: str, message_lists: int) -> tuple[Any, str]:
    """The model's tokenizer and the prompt format resolved for it (`raw` or `chat`)."""
    from transformers import AutoTokenizer

    from rlhf.data.render import resolve_prompt_format

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, resolve_prompt_format(prompt_format, tok, message_lists, "eval.prompt_format")


def encode_prompts(
    model_dir: str, prompts: list[list[dict]], prompt_format: str = "auto", message_lists: int = 0
) -> tuple[Any, list[list[int]]]:
    """The model's tokenizer and the prompts' token ids, rendered as SFT and RL render them."""
    from rlhf.data.render import render_prompt

    tok, fmt = load_tokenizer(model_dir, prompt_format, message_lists)
    return tok, [render_prompt(p, tok, fmt) for p in prompts]


def policy_answers(
    model_dir: str, prompts: list[list[dict]], max_new_tokens: int, **options: Any
) -> tuple[list[str], list[list[str]]]:
    """One policy's `policies_answers` (the same keyword options): (greedy, sampled)."""
    return policies_answers({"_": model_dir}, prompts, max_new_tokens, **options)["_"]


def policies_answers(
    policies: dict[str, str],
    prompts: list[list[dict]],
    max_new_tokens: int,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    prompt_format: str = "auto",
    message_lists: int = 0,
    engine: str = "transformers",
    resources: dict[str, float] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per policy (name -> checkpoint folder): greedy answers to prompts (lists of turns, rendered
    by `prompt_format`) and `num_samples` sampled ones each, stopping at EOS: (greedy, sampled).
    `message_lists`: how many prompts came as lists of turns (for `auto`). `engine="vllm"`: one
    vLLM engine answers for every policy in turn (`engine_tokens`), else transformers in this
    process (left padding, each model loaded once) on `device` (None: `local_device()`, the
    process's GPU where it has one)."""
    encoded = {
        name: encode_prompts(path, prompts, prompt_format, message_lists)
        for name, path in policies.items()
    }
    if engine != "vllm":
        return {
            name: _transformers_answers(
                policies[name],
                tok,
                rendered,
                max_new_tokens,
                num_samples,
                temperature,
                seed,
                batch_size,
                device,
            )
            for name, (tok, rendered) in encoded.items()
        }
    got = engine_tokens(
        [(policies[name], rendered) for name, (_, rendered) in encoded.items()],
        max_new_tokens,
        num_samples,
        temperature,
        seed,
        resources,
    )
    out = {}
    for (name, (tok, _)), (greedy_ids, sampled_ids) in zip(encoded.items(), got):
        decode = lambda ids, tok=tok: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        out[name] = (
            [decode(x) for x in greedy_ids],
            [[decode(x) for x in xs] for xs in sampled_ids],
        )
    return out


def _transformers_answers(
    model_dir: str,
    tok: Any,
    rendered: list[list[int]],
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    seed: int,
    batch_size: int,
    device: str | torch.device | None,
) -> tuple[list[str], list[list[str]]]:
    from transformers import AutoModelForCausalLM

    from rlhf.models.factory import local_device

    device = local_device(device)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def generate(**sampling) -> list[str]:
        out: list[str] = []
        for i in range(0, len(rendered), batch_size):
            batch = [{"input_ids": ids} for ids in rendered[i : i + batch_size]]
            enc = tok.pad(batch, padding=True, return_tensors="pt").to(device)
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                **sampling,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            out.extend(
                tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return out

    sampled: list[list[str]] = []
    rng_devices = [device] if device.type == "cuda" else []  # sampling draws from its RNG
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
        greedy = generate(do_sample=False)
        if num_samples > 0:
            torch.manual_seed(seed)
            flat = generate(
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=num_samples,
            )
            sampled = [flat[j : j + num_samples] for j in range(0, len(flat), num_samples)]
    return greedy, sampled


TokenIds = tuple[list[list[int]], list[list[list[int]]]]  # greedy ids, sampled ids per prompt


def _vllm_tokens(
    models: list[tuple[str, list[list[int]]]],
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    seed: int,
) -> list[TokenIds]:
    """Each (checkpoint, prompt ids) in turn on one engine: a checkpoint that `reloadable` says
    fits the engine's model replaces its weights in place (~0.1 s at demo size, against ~3 s for
    a new engine); any other gets a new engine."""
    from actors.rollout import RolloutEngine

    longest = max(len(ids) for _, rendered in models for ids in rendered) + max_new_tokens
    engine, built_from, results = None, None, []
    try:
        for model_dir, rendered in models:
            if engine is not None and reloadable(built_from, model_dir):
                engine.update_weights(checkpoint_tensors(model_dir))
            else:
                if engine is not None:
                    engine.shutdown()
                engine, built_from = None, model_dir
                engine = RolloutEngine(model_dir, max_model_len=longest, max_num_seqs=64, seed=seed)
            results.append(
                _answer_ids(engine, rendered, max_new_tokens, num_samples, temperature, seed)
            )
    finally:
        if engine is not None:
            engine.shutdown()
    return results


def _answer_ids(
    engine: Any,
    rendered: list[list[int]],
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    seed: int,
) -> TokenIds:
    out = engine.generate(rendered, max_tokens=max_new_tokens, temperature=0.0)
    greedy = [s.token_ids for s in out]
    sampled: list[list[list[int]]] = []
    if num_samples > 0:
        flat = engine.generate(
            rendered, n=num_samples, max_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        ids = [s.token_ids for s in flat]
        sampled = [ids[j : j + num_samples] for j in range(0, len(ids), num_samples)]
    return greedy, sampled


# Config entries that do not change what an engine built from the checkpoint computes.
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
# Tokenizer settings the engine uses (it stops at EOS); the rest (chat template, loading flags
# that transformers writes back) do not matter: the prompts arrive as token ids.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


def reloadable(built_from: str, model_dir: str) -> bool:
    """Whether an engine built from checkpoint `built_from` can take `model_dir`'s weights in
    place: safetensors weights and the same config (architecture, shapes, special tokens),
    generation config and tokenizer settings (the engine stops at their EOS)."""

    def settings(folder: Path) -> list:
        found = []
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            path = folder / name
            entries = json.loads(path.read_text()) if path.is_file() else None
            if name == "config.json" and entries is not None:
                entries = {k: v for k, v in entries.items() if k not in _NOT_ARCHITECTURE}
            if name == "tokenizer_config.json" and entries is not None:
                entries = {k: entries.get(k) for k in _SPECIAL_TOKENS}
            found.append(entries)
        return found

    new = Path(model_dir)
    return any(new.glob("*.safetensors")) and settings(Path(built_from)) == settings(new)


def checkpoint_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the checkpoint's safetensors files."""
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                yield name, f.get_tensor(name)


def engine_tokens(
    models: list[tuple[str, list[list[int]]]],
    max_new_tokens: int,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    resources: dict[str, float] | None = None,
) -> list[TokenIds]:
    """Greedy and sampled answer token ids, per (checkpoint folder, prompt ids), from one vLLM
    engine (`_vllm_tokens`): in a Ray task holding `resources` ({"num_cpus", "num_gpus"}: the
    rollout engine's) when Ray runs in this process, so a driver without a GPU evaluates on the
    cluster's; else in this process."""
    import ray

    args = (models, max_new_tokens, num_samples, temperature, seed)
    if ray.is_initialized():
        task = ray.remote(_vllm_tokens).options(**(resources or {"num_cpus": 1}))
        return ray.get(task.remote(*args))
    return _vllm_tokens(*args)
