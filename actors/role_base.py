"""What every role actor shares: its torch.distributed rank, and for the trained roles the engine.

    class ReferenceActor(_Rank): ...      # _setup(role, model_path), _to_device, _logprobs_part
    class CriticActor(_Trained): ...      # + save_state / load_state, the non-finite abort

`_Rank` joins the role's own process group (gloo on CPU, NCCL on GPU) from the `RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` an `ActorGroup` sets; `_Trained` adds the RL checkpoint
part and the abort on repeated non-finite updates; `_engine` and `_frozen_reference` build the
models' engines (rlhf/engine.py). The actors themselves: actors/policy.py and actors/roles.py.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rlhf.config import Config, RoleConfig, TrainRoleConfig
from rlhf.train.core import to_device


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
            return to_device(batch, self.device)
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

    return eng.engine_for(
        model,
        role,
        max_steps=max(total_steps, role.warmup_steps + 1),
        grad_accum_steps=rl.mini_batch_size // (role.micro_batch_size * world),
        on_gpu=on_gpu,
    )


def _frozen_reference(cfg: Config, model_path: str, device: torch.device) -> torch.nn.Module:
    """The reference policy as `rl.reference` asks (precision, ZeRO stage), frozen, on `device`
    (the rank's)."""
    from rlhf import engine as eng
    from rlhf.models.factory import load_causal_lm

    ref = cfg.rl.reference
    dtype = eng.precision_dtype(ref.precision, device.type == "cuda")
    model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    return eng.init_frozen(model, ref.zero_stage, ref.micro_batch_size, dtype, device)


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
