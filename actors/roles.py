"""The RL roles as thin Ray actors: policy, reference, reward model, critic.

Each actor is one data-parallel rank of its role (an `ActorGroup` starts them with `RANK`,
`WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); ranks of a role form their own torch.distributed
group (gloo on CPU, NCCL on GPU) and train through DeepSpeed, or, one CPU rank in fp32, through
rlhf/engine.py's plain-torch engine (`engine: auto`). The computing lives in
`rlhf/rl/worker.py`; these classes only hold the model and translate calls.

Every method takes the whole experience batch (an object ref resolved by Ray in the actor, never
by the driver) and returns its own slice's result as `{"out": tensor, "compute_s": seconds}`
(the seconds feed the step's compute-vs-orchestration split), or metrics.

The policy's actor is in actors/policy.py and what every role shares in actors/role_base.py;
`ROLE_ACTORS` maps each role's config name to its class.
"""

from __future__ import annotations

import time

import torch

from actors.policy import PolicyActor
from actors.role_base import _engine, _frozen_reference, _optimizer_steps, _Rank, _Trained
from rlhf.config import Config


class ReferenceActor(_Rank):
    """The frozen reference policy: logprobs for the KL term."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        self.rl = cfg.rl
        self._setup(cfg.rl.reference, model_path)
        self.model = _frozen_reference(cfg, model_path, self.device)

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
        rm = cfg.rl.reward_model
        self.model = eng.init_frozen(
            self.model, rm.zero_stage, rm.micro_batch_size, dtype, self.device
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
