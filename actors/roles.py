"""The RL roles as thin Ray actors: policy, reference, reward model, critic.

Each actor is one data-parallel rank of its role (an `ActorGroup` starts them with `RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); ranks of a role form their own torch.distributed
group (gloo on CPU, NCCL on GPU) and train through DeepSpeed, or, one CPU rank in fp32, through
rlhf/engine.py's plain-torch engine (`engine: auto`). The computing lives in
`rlhf/rl/worker.py`; these classes only hold the model and translate calls.

Every method takes the whole experience batch (an object ref resolved by Ray in the actor, never
by the driver) and returns its own slice's result as `{"out": tensor, "compute_s": seconds}`
(the seconds feed the step's compute-vs-orchestration split), or metrics.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from actors.rollout import Generates
from rlhf.config import Config, RoleConfig, TrainRoleConfig


class _Rank:
    """torch.distributed set-up shared by every role actor."""

    def _setup(self, role: RoleConfig, model_path: str) -> None:
        import torch.distributed as dist

        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.on_gpu = role.gpus_per_actor > 0 and torch.cuda.is_available()
        if not self.on_gpu:
            # The whole bundle, shared with any colocated roles: they take turns (one phase at a
            # time), so whoever computes gets every core. Set once: nothing else in this process
            # changes it, and it holds for every phase method.
            from actors.group import bundle_threads
            from rlhf.process_tuning import model_width, tune_cpu_compute

            tune_cpu_compute(bundle_threads(role.cpus_per_actor), model_width(model_path))
        if not dist.is_initialized():
            address = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            dist.init_process_group(
                "nccl" if self.on_gpu else "gloo",
                init_method=address,
                rank=self.rank,
                world_size=self.world,
            )
            if self.world == 1 and not self.on_gpu:  # one member: its loop threads carry nothing
                from rlhf.process_tuning import idle_gloo_loops

                idle_gloo_loops()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.on_gpu
            else torch.device("cpu")
        )

    def _to_device(self, batch: Any) -> Any:
        """An `Experience` (or a PPO-ptx batch dict) on this rank's device."""
        if isinstance(batch, dict):
            return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch.to(self.device)

    def ready(self) -> int:
        return self.rank

    def _logprobs_part(self, model: torch.nn.Module, batch: Any, micro_batch_size: int) -> dict:
        """`model`'s logprobs of this rank's rows of the sampled batch, as a part."""
        from rlhf.rl.worker import my_rows, response_logprobs

        t0 = time.perf_counter()
        mine = self._to_device(my_rows(batch, self.rank, self.world))
        out = response_logprobs(
            model,
            mine,
            micro_batch_size,
            self.rl.rollout.temperature,
            self.rl.shared_prompt_forward,
        )
        return {"out": out.cpu(), "compute_s": time.perf_counter() - t0}


def _engine(
    model: torch.nn.Module,
    role: TrainRoleConfig,
    rl: Any,
    total_steps: int,
    on_gpu: bool,
    world: int,
) -> Any:
    from rlhf import engine as eng

    return eng.init_engine(
        model,
        lr=role.lr,
        betas=tuple(role.betas),
        weight_decay=role.weight_decay,
        warmup_steps=role.warmup_steps,
        max_steps=max(total_steps, role.warmup_steps + 1),
        min_lr_ratio=role.min_lr_ratio,
        zero_stage=role.zero_stage,
        micro_batch_size=role.micro_batch_size,
        grad_accum_steps=rl.mini_batch_size // (role.micro_batch_size * world),
        grad_clip=role.grad_clip,
        dtype=eng.precision_dtype(role.precision, on_gpu),
        backend=role.engine_backend,
    )


def _frozen_reference(cfg: Config, model_path: str, on_gpu: bool) -> torch.nn.Module:
    """The reference policy as `rl.reference` asks (precision, ZeRO stage), frozen."""
    from rlhf import engine as eng
    from rlhf.models.factory import load_causal_lm

    ref = cfg.rl.reference
    dtype = eng.precision_dtype(ref.precision, on_gpu)
    model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    return eng.init_frozen(model, ref.zero_stage, ref.micro_batch_size, dtype)


class _Trained(_Rank):
    """A trained role (policy, critic) and its engine: checkpoint state and the abort on
    repeated non-finite updates."""

    engine: Any
    rl: Any
    role_name: str

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def save_state(self, path: str, step: int, fingerprint: str) -> float:
        """This rank's part of an RL checkpoint under `path` (shared by the role's ranks), written
        by the training core the offline stages use; rank 0 adds the actor's own state. Every
        rank must call it. Returns the seconds it took."""
        from pathlib import Path

        from rlhf.train.core import save_part

        t0 = time.perf_counter()
        state = {"nonfinite_streak": self.nonfinite_streak, **self._extra_state()}
        save_part(
            self.engine,
            Path(path),
            state,
            rank=self.rank,
            world=self.world,
            step=step,
            fingerprint=fingerprint,
        )
        return time.perf_counter() - t0

    def load_state(self, path: str) -> None:
        from pathlib import Path

        from rlhf.train.core import load_part

        state = load_part(self.engine, Path(path))
        self.nonfinite_streak = state["nonfinite_streak"]
        self._load_extra_state(state)

    def _check_nonfinite(self, out: dict[str, float]) -> None:
        """Abort after rl.max_nonfinite_steps RL steps in a row whose updates were all skipped."""
        from rlhf.train.core import nonfinite_streak

        all_skipped = out[f"{self.role_name}/skipped_steps"] >= _optimizer_steps(self.rl, 1)
        self.nonfinite_streak = nonfinite_streak(
            self.nonfinite_streak,
            all_skipped,
            self.rl.max_nonfinite_steps,
            f"every optimizer step of those RL steps of rl.{self.role_name} was skipped: lower "
            f"rl.{self.role_name}.lr or check the rewards",
        )


def _optimizer_steps(rl: Any, rl_steps: int | None = None) -> int:
    """Optimizer steps of `rl_steps` RL steps (default: the whole stage)."""
    rl_steps = rl.max_steps if rl_steps is None else rl_steps
    return rl_steps * rl.ppo_epochs * (rl.rollout_batch_size // rl.mini_batch_size)


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
            self.reference = _frozen_reference(cfg, reference_path, self.on_gpu)
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


class ReferenceActor(_Rank):
    """The frozen reference policy: logprobs for the KL term."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        self.rl = cfg.rl
        self._setup(cfg.rl.reference, model_path)
        self.model = _frozen_reference(cfg, model_path, self.on_gpu)

    def logprobs(self, batch: dict) -> dict:
        return self._logprobs_part(self.model, batch, self.rl.reference.micro_batch_size)


class RewardActor(_Rank):
    """A trained reward model: one score per (prompt, response)."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        from rlhf import engine as eng
        from rlhf.models.factory import load_reward_model

        self.rl = cfg.rl
        self._setup(cfg.rl.reward_model, model_path)
        dtype = eng.precision_dtype(cfg.rl.reward_model.precision, self.on_gpu)
        self.model = load_reward_model(
            model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        self.model = eng.init_frozen(
            self.model, cfg.rl.reward_model.zero_stage, cfg.rl.reward_model.micro_batch_size, dtype
        )

    def scores(self, batch: dict) -> dict:
        from rlhf.rl.worker import my_rows, sequence_scores

        t0 = time.perf_counter()
        mine = self._to_device(my_rows(batch, self.rank, self.world))
        out = sequence_scores(self.model, mine, self.rl.reward_model.micro_batch_size)
        return {"out": out.cpu(), "compute_s": time.perf_counter() - t0}


class CriticActor(_Trained):
    """The value model of PPO: values for GAE, and its own regression updates."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        from rlhf import engine as eng
        from rlhf.models.factory import load_critic

        rl = self.rl = cfg.rl
        self._setup(rl.critic, model_path)
        torch.manual_seed(cfg.run.seed)
        dtype = eng.precision_dtype(rl.critic.precision, self.on_gpu)
        model = load_critic(
            model_path,
            dtype=dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.run.seed,
        )
        self.engine = _engine(model, rl.critic, rl, _optimizer_steps(rl), self.on_gpu, self.world)
        self.role_name = "critic"
        self.nonfinite_streak = 0

    def values(self, batch: dict) -> dict:
        from rlhf.rl.worker import my_rows, response_values

        t0 = time.perf_counter()
        self.engine.module.eval()
        mine = self._to_device(my_rows(batch, self.rank, self.world))
        out = response_values(
            self.engine.module, mine, self.rl.critic.micro_batch_size, self.rl.shared_prompt_forward
        )
        return {"out": out.cpu(), "compute_s": time.perf_counter() - t0}

    def train(self, batch: dict, step: int) -> dict[str, float]:
        from rlhf.rl.worker import critic_update

        t0 = time.perf_counter()
        self.engine.module.train()
        out = critic_update(
            self.engine,
            self._to_device(batch),
            self.rl,
            self.rl.critic,
            self.rank,
            self.world,
            step,
        )
        self._check_nonfinite(out)
        out["compute/train_critic_s"] = time.perf_counter() - t0
        return out


ROLE_ACTORS = {
    "policy": PolicyActor,
    "reference": ReferenceActor,
    "critic": CriticActor,
    "reward_model": RewardActor,
}
