"""The trained policy as a Ray actor: logprobs, PPO updates, weights for the rollout engines.

    group = ActorGroup(PolicyActor, "policy", num_actors=2, actor_kwargs={"cfg": cfg, ...})

One data-parallel rank of the policy (the shared set-up in actors/role_base.py). With
rollout.backend='policy' it is the rollout engine too (`generate`, from its training module); with
`reference_path` (rl.reference_in_policy) it holds the frozen reference as well. The computing lives
in `rlhf/rl/worker.py`; the other roles are in actors/roles.py, which lists all of them in
`ROLE_ACTORS`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from actors.role_base import _engine, _frozen_reference, _optimizer_steps, _Trained
from actors.rollout import Generates
from rlhf.config import Config


class PolicyActor(_Trained, Generates):
    """The trained policy: logprobs, PPO updates, weights for the rollout engines; with
    rollout.backend='policy' the rollout engine itself (`generate`, from its training module);
    with `reference_path` (rl.reference_in_policy) the frozen reference too."""

    def __init__(self, cfg: Config, model_path: str, reference_path: str | None = None) -> None:
        from rlhf.models.factory import load_trainable_lm

        rl = self.rl = cfg.rl
        self._setup(rl.policy, model_path)
        torch.manual_seed(cfg.run.seed)
        from rlhf import engine as eng

        dtype = eng.precision_dtype(rl.policy.precision, self.on_gpu)
        model = load_trainable_lm(
            model_path,
            dtype=dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            lora=rl.policy.lora,
        )
        self.engine = _engine(model, rl.policy, rl, _optimizer_steps(rl), self.on_gpu, self.world)
        self.reference = None
        if reference_path is not None:
            self.reference = _frozen_reference(cfg, reference_path, self.device)
        self.model_path = model_path
        self.role_name = "policy"
        self.version = 0
        self.nonfinite_streak = 0
        self.ptx, self.ptx_rows, self.ptx_drawn = None, None, 0
        self.seed = cfg.run.seed
        if rl.ptx_coef > 0:
            from rlhf.data.stages import prepare_sft

            ptx_cfg = cfg.sft.model_copy(update={"train_files": rl.ptx_files, "eval_files": []})
            self.ptx_rows, _, _ = prepare_sft(ptx_cfg, model_path, seed=cfg.run.seed)
            self._start_ptx(0)
        self.weight_sender = None
        self.sampler = None  # `generate` (actors.rollout.Generates) with rollout.backend='policy'
        if rl.generates_in_policy:  # this actor is the rollout engine too
            from actors.hf_rollout import HFRolloutEngine

            self.sampler = HFRolloutEngine.around(self.engine.module)

    def set_rollout_version(self, version: int) -> int:
        """The version the samples of the weights as they are now carry (the driver's count of
        updates: a sync without a copy)."""
        self.sampler.weights_version = version
        return version

    def _start_ptx(self, drawn: int) -> None:
        """The PPO-ptx stream positioned after `drawn` batches (a resumed run continues it)."""
        from rlhf.rl.worker import ptx_stream

        self.ptx_drawn = drawn
        stream = ptx_stream(
            self.ptx_rows, self.rl.ptx_batch_size, self.seed + self.rank, drawn, self.device
        )

        def counted():
            for rows in stream:
                self.ptx_drawn += 1
                yield rows

        self.ptx = counted()

    def _extra_state(self) -> dict:
        return {"version": self.version, "ptx_drawn": self.ptx_drawn}

    def _load_extra_state(self, state: dict) -> None:
        self.version = state["version"]
        if self.ptx_rows is not None:
            self._start_ptx(state["ptx_drawn"])

    def logprobs(self, batch: dict) -> dict:
        self.engine.module.eval()
        return self._logprobs_part(self.engine.module, batch, self.rl.policy.micro_batch_size)

    def reference_logprobs(self, batch: dict) -> dict:
        """The frozen reference's logprobs of this rank's rows (as `ReferenceActor.logprobs`)."""
        return self._logprobs_part(self.reference, batch, self.rl.reference.micro_batch_size)

    def train(
        self,
        batch: dict,
        step: int,
        kl_coef: float,
        on_policy: bool = False,
        gap_in_first: bool = False,
    ) -> dict[str, float]:
        """PPO epochs on the batch; `kl_coef` is the KL controller's live coefficient.
        `on_policy`: no old logprobs were computed; the update's forward stands in for them and
        returns the trainer-vs-engine gap (`rollout/logprob_gap`). `gap_in_first`: the old
        logprobs are the sampler's (this actor's own); the first mini-batch measures the gap."""
        from rlhf.rl.worker import policy_update

        t0 = time.perf_counter()
        self.engine.module.train()
        out = policy_update(
            self.engine,
            self._to_device(batch),
            self.rl,
            self.rl.policy,
            self.rank,
            self.world,
            step,
            self.ptx,
            kl_coef,
            on_policy,
            gap_in_first,
        )
        self.version += 1
        self._check_nonfinite(out)
        out["compute/train_policy_s"] = time.perf_counter() - t0
        return out

    def train_on_rollouts(
        self,
        batch: Any,
        scores: Any,
        ref_parts: list,
        advantage_args: dict,
        step: int,
        kl_coef: float,
        rollout_version: int | None = None,
    ) -> dict[str, float]:
        """An on-policy update without a critic, the advantage phase included: the advantages
        of the sampled `batch` (`rlhf.rl.advantages`, as the driver's helper would compute
        them; every rank the whole batch), then `train`. `rollout_version`: with
        rollout.backend='policy', the version the samples of the new weights carry, set once
        they are trained (the weight sync's only work there). A policy holding the reference
        computes its logprobs here (`ref_parts` empty). Returns the advantage phase's metrics
        and the update's."""
        from rlhf.rl.advantages import advantages_from_parts

        if self.reference is not None:
            ref_parts = [self.reference_logprobs(batch)]

        batch, metrics = advantages_from_parts(batch, scores, ref_parts, [], [], advantage_args)
        metrics.update(self.train(batch, step, kl_coef, on_policy=True))
        if rollout_version is not None:
            self.set_rollout_version(rollout_version)
        return metrics

    def full_weights(self, live: bool = False) -> dict[str, torch.Tensor] | None:
        """Plain HF weights (LoRA merged), gathered on rank 0 (None elsewhere); every rank must
        call it. CPU copies by default; `live=True` leaves every tensor where it is and, without
        ZeRO-3 or LoRA, hands out the model's own parameters (no copy: read them before the next
        update)."""
        import copy

        from rlhf import engine as eng
        from rlhf.models.factory import merge_lora

        module = self.engine.module
        if hasattr(module, "peft_config"):
            if self.rank != 0:
                return None
            state = merge_lora(copy.deepcopy(module)).state_dict()
        elif live and not eng.zero3(self.engine):  # whole on every rank
            state = module.state_dict() if self.rank == 0 else None
        else:
            state = eng.full_state_dict(self.engine)
        if state is None:
            return None
        return {k: v.detach() if live else v.detach().cpu() for k, v in state.items()}

    def weights_ref(self, bucket_bytes: int) -> dict | None:
        """Rank 0: the full weights in the object store as flat buckets of at most
        `bucket_bytes` (`actors/weight_sync.put_buckets`): {"buckets": [(entries, ObjectRef)],
        and the seconds of gathering and putting}; None elsewhere. Every rank must call it
        (ZeRO-3 gathers are collectives). The refs travel inside the result, so Ray hands them
        on unresolved: the weights go actor to actor, never through the driver."""
        from actors.weight_sync import put_buckets

        t0 = time.perf_counter()
        state = self.full_weights(live=True)
        gathered = time.perf_counter()
        if state is None:
            return None
        buckets = put_buckets(state, bucket_bytes)
        return {
            "buckets": buckets,
            "weight_sync/gather_s": gathered - t0,
            "weight_sync/put_s": time.perf_counter() - gathered,
            "weight_sync/buckets": float(len(buckets)),
        }

    def init_weight_transfer(
        self, master_address: str, master_port: int, world_size: int, backend: str
    ) -> None:
        """Rank 0 joins the weight-sync group as its sender (member 0, host of its TCP store);
        the other ranks are no members. Called on rank 0 while every engine joins."""
        from actors.weight_sync import WeightBroadcast

        self.weight_sender = WeightBroadcast(
            master_address, master_port, world_size, rank=0, backend=backend
        )

    def send_weights(self, bucket_bytes: int) -> dict[str, float]:
        """The full weights (LoRA merged) to every engine: all ranks gather (ZeRO-3 gathers are
        collectives), rank 0 broadcasts them in buckets. Every rank must call it, while every
        engine runs `receive_weights`."""
        t0 = time.perf_counter()
        state = self.full_weights(live=True)  # where they live: packed on the GPU for NCCL
        gathered = time.perf_counter()
        if state is None:
            return {}
        buckets = self.weight_sender.send(state, bucket_bytes)
        return {
            "weight_sync/gather_s": gathered - t0,
            "weight_sync/broadcast_s": time.perf_counter() - gathered,
            "weight_sync/buckets": float(buckets),
        }

    def save(self, out_dir: str) -> None:
        from pathlib import Path

        from transformers import AutoTokenizer

        state = self.full_weights()
        if self.rank != 0:
            return
        from rlhf.models.factory import load_causal_lm

        model = load_causal_lm(self.model_path, dtype=torch.float32)
        model.load_state_dict(state)
        model.save_pretrained(out_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)
        Path(out_dir, "version.txt").write_text(str(self.version))
