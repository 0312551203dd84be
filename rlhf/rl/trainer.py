"""The online RL stage: PPO (critic + GAE) or a critic-free estimator, over Ray actors.

    result = run_rl(cfg, policy_dir=".../sft/model", reward_model_dir=".../rm/model")

Each step is a checklist of timed phases (`timing/<phase>` in the metrics):

    generate      rollout engines sample n responses per prompt (least-loaded dispatch);
                  with rl.max_staleness > 0 the samples were generated while the previous
                  step(s) trained (rlhf/rl/ahead.py), and this phase is the wait for them
    reward        rule function, reward model actors, or an HTTP endpoint
    ref           reference logprobs              (object refs, actor to actor); skipped, and
                  no reference actors started, when nothing reads them (`rl.needs_reference`);
                  on-policy without a critic, waited for inside `train_policy` instead; from
                  the policy's own actor with `rl.reference_in_policy` (in `train_policy` too)
    logprobs      the policy's own logprobs of the sampled tokens (PPO's old logprobs, and
                  the trainer-vs-engine gap check `rollout/logprob_gap`); skipped when the
                  update is on-policy (`rl.on_policy_update`): the training forward's own
                  logprobs are the old ones, and it measures the gap; skipped when the policy
                  sampled them itself (`rl.old_logprobs_from_sampler`): the sampling logprobs
                  are the old ones, and the first mini-batch's forward measures the gap
    values        critic values (PPO only)
    advantages    KL, rewards, GAE or group baselines (a helper actor; the batch stays in the
                  store); on-policy without a critic, inside the policy's train call instead
    train_critic  value regression (PPO only)
    train_policy  PPO epochs over mini-batches (+ KL loss, entropy, PPO-ptx)
    weight_sync   new weights to every engine (object store, or bucketed gloo/NCCL broadcast)

The driver holds object refs and small metrics only; token tensors go from the store to actors.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from rlhf.config import Config, RLConfig
from rlhf.rl.advantages import AdvantageWorker
from rlhf.rl.errors import RLStageError
from rlhf.rl.layout import ActorLayout
from rlhf.rl.rollouts import RolloutPhase, wait_refs
from rlhf.rl.weight_sync import WeightSync

__all__ = ["AdvantageWorker", "RLRun", "RLStageError", "phase"]


@contextmanager
def phase(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[f"timing/{name}"] = time.perf_counter() - t0


def _reward_rule(rl: RLConfig, reward_fn: Any) -> Any:
    """The rule scoring samples: `reward_fn` when given (it needs rl.reward.kind='rule'), else
    rl.reward.rule loaded by name; None for a reward model. RLStageError for a bad one."""
    from rlhf.rl.rewards import RewardError, load_rule, reward_fn_problem

    if reward_fn is not None:
        problem = reward_fn_problem(reward_fn, rl.reward.kind)
        if problem:
            raise RLStageError(problem)
        return reward_fn
    if rl.reward.kind != "rule":
        return None

    try:
        return load_rule(rl.reward.rule)
    except RewardError as exc:
        raise RLStageError(str(exc)) from None


class RLRun(ActorLayout, RolloutPhase, WeightSync):
    """Actors, data and state of one RL stage; `step()` is one checklist."""

    def __init__(
        self,
        cfg: Config,
        policy_dir: str,
        reward_model_dir: str | None,
        critic_init_dir: str | None = None,
        reward_fn: Any = None,
    ) -> None:
        """`reward_fn`: a rule `(prompt, response, label) -> float` given directly (the Python
        API); it replaces `rl.reward.rule` and needs `rl.reward.kind='rule'`."""
        from transformers import AutoTokenizer

        from rlhf.algorithms import KL_CONTROLLERS

        self.cfg, self.rl = cfg, cfg.rl
        self.stage_dir = cfg.run.dir.resolve() / "rl"
        self.tok = AutoTokenizer.from_pretrained(policy_dir)
        self.prompts, self.prompt_report = self._load_prompts(self.rl.prompt_files)
        self.eval_prompts = []
        if self.rl.eval_prompt_files:
            self.eval_prompts, _ = self._load_prompts(self.rl.eval_prompt_files)
            self.eval_prompts = self.eval_prompts[: self.rl.eval_prompts]
        self.reward_rule = _reward_rule(self.rl, reward_fn)
        rl = self.rl
        self.kl = (
            KL_CONTROLLERS["fixed"](rl.kl_coef)
            if rl.kl_controller == "fixed"
            else KL_CONTROLLERS["adaptive"](rl.kl_coef, rl.kl_target, rl.kl_horizon)
        )
        self._check_lengths(policy_dir)
        self.policy_holds_reference = rl.reference_in_policy  # as started
        self.groups = self._start_actors(
            policy_dir, reward_model_dir, critic_init_dir or reward_model_dir or policy_dir
        )
        from rlhf.rl.dispatch import RolloutDispatcher

        self.dispatcher = RolloutDispatcher(self.engine_actors())
        self.helper = AdvantageWorker.remote()
        self.version = 0  # weight updates the engines have received
        self.steps_done = 0  # RL steps finished (the checkpointed step)
        self.restarts = 0  # actors re-created after a fault (fault/restarts)
        self.restores = 0  # trained roles restored from a checkpoint after a fault
        from rlhf.monitor import Monitor

        self.monitor = Monitor(cfg.monitor)
        self.reload_s = 0.0
        self.sync_stats: dict[str, float] = {}  # the last weight sync's parts (push_weights)
        self.prompt_cursor = 0  # prompts taken from the stream so far
        from rlhf.rl.ahead import RolloutsAhead

        self.ahead = RolloutsAhead(rl.max_staleness)
        if rl.uses_broadcast_sync:
            self.init_weight_broadcast()

    def shutdown(self) -> None:
        self.ahead.close()
        for group in self.groups.values():
            group.kill()
        ray.kill(self.helper)

    # ---- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """One RL step, phase by phase (the checklist in the module docstring); its metrics."""
        rl, t = self.rl, {}
        t0 = time.perf_counter()
        prompts, samples, batch_ref, scores, metrics_rollout = self._rollouts(step, t)
        if rl.max_staleness:  # the engines go on with the next steps while this one trains
            self._launch_ahead(step)
        lags = [self.version - s.weights_version for s in samples]
        metrics_rollout["rollout/staleness_mean"] = sum(lags) / len(lags)
        metrics_rollout["rollout/staleness_max"] = float(max(lags))
        if rl.reward.kind == "model":  # a rule on the same answers, to catch reward hacking
            metrics_rollout.update(self._gold_mean(prompts, samples))
        ref_parts, old_parts, value_parts = self._forwards(batch_ref, t)
        advantage_args = dict(
            algorithm=rl.algorithm,
            group_size=rl.samples_per_prompt,
            kl_coef=self.kl.value,
            kl_estimator=rl.kl_estimate,
            kl_in_reward=rl.kl_as_reward,
            gamma=rl.gamma,
            lam=rl.lam,
            whiten=rl.whiten_advantages,
        )
        metrics: dict[str, float] = {}
        adv_ref = None
        if not rl.advantages_in_policy:
            with phase(t, "advantages"):
                adv_ref, metrics_ref = self.helper.compute.remote(
                    batch_ref, scores, ref_parts, old_parts, value_parts, advantage_args
                )
                metrics = ray.get(metrics_ref)
        if old_parts and not any(lags):  # older weights' samples differ by design
            self._check_gap(step, metrics, "")
        stamp = self._train(step, t, metrics, batch_ref, scores, ref_parts, adv_ref, advantage_args)
        with phase(t, "weight_sync"):
            self._sync(stamp)
        if "kl/mean_per_sequence" in metrics:  # absent without a reference (kl_coef 0, fixed)
            self.kl.update(metrics["kl/mean_per_sequence"], rl.rollout_batch_size)
        if rl.filter_groups:  # the policy's reward is that of everything it generated
            metrics["reward/trained_score_mean"] = metrics["reward/score_mean"]
        metrics.update(metrics_rollout)
        metrics.update(self._response_metrics(samples))
        metrics.update(t)
        metrics["timing/step"] = time.perf_counter() - t0
        metrics["compute/weight_reload_s"] = self.reload_s
        compute = sum(v for k, v in metrics.items() if k.startswith("compute/"))
        metrics["perf/model_compute_s"] = compute
        metrics["perf/outside_compute_frac"] = max(0.0, 1.0 - compute / metrics["timing/step"])
        return metrics

    def _forwards(self, batch_ref: Any, t: dict) -> tuple[list, list, list]:
        """The `ref`, `logprobs` and `values` phases, each only where something reads it:
        (reference, old-policy, value) parts, object refs or ones still running."""
        rl, ref_parts, old_parts, value_parts = self.rl, [], [], []
        # The reference runs only when something reads its logprobs: in actors of its own, or
        # in the policy's actor, which computes them in its own call when the update is fused.
        if rl.advantages_in_policy and "reference" in self.groups:  # waited for in train_policy
            ref_parts = self.groups["reference"].call_async("logprobs", batch_ref)
        elif not rl.advantages_in_policy and (
            self.policy_holds_reference or "reference" in self.groups
        ):
            role, method = (
                ("policy", "reference_logprobs")
                if self.policy_holds_reference
                else ("reference", "logprobs")
            )
            with phase(t, "ref"):
                ref_parts = wait_refs(self.groups[role].call_async(method, batch_ref))
        if not rl.on_policy_update and not rl.old_logprobs_from_sampler:
            with phase(t, "logprobs"):
                old_parts = wait_refs(self.groups["policy"].call_async("logprobs", batch_ref))
        if rl.algorithm == "ppo":
            with phase(t, "values"):
                value_parts = wait_refs(self.groups["critic"].call_async("values", batch_ref))
        return ref_parts, old_parts, value_parts

    def _train(
        self,
        step: int,
        t: dict,
        metrics: dict,
        batch_ref: Any,
        scores: Any,
        ref_parts: list,
        adv_ref: Any,
        advantage_args: dict,
    ) -> int | None:
        """`engine_sleep`, `train_critic` and `train_policy`; their metrics into `metrics`. With
        `rl.advantages_in_policy` (`train_on_rollouts`: one round trip fewer) the policy computes
        the advantages itself, waiting there for the reference. Returns the version the update
        stamped on the policy's own samples (rollout.backend='policy'), else None."""
        rl = self.rl
        on_policy, from_sampler = rl.on_policy_update, rl.old_logprobs_from_sampler
        if rl.engines_sleep:  # GPU: engines sharing the policy's GPUs free them while it trains
            with phase(t, "engine_sleep"):
                ray.get(self.groups["rollout"].call_async("sleep"))  # the weight sync wakes them
        if rl.algorithm == "ppo":
            with phase(t, "train_critic"):
                critic_metrics = ray.get(self.groups["critic"].call_async("train", adv_ref, step))
            metrics.update(critic_metrics[0])
        fused = rl.advantages_in_policy
        stamp = self.version + 1 if fused and rl.generates_in_policy else None
        policy = self.groups["policy"]
        with phase(t, "train_policy"):
            call = (
                policy.call_async(
                    "train_on_rollouts",
                    batch_ref,
                    scores,
                    ref_parts,
                    advantage_args,
                    step,
                    self.kl.value,
                    stamp,
                )
                if fused
                else policy.call_async(
                    "train", adv_ref, step, self.kl.value, on_policy, from_sampler
                )
            )
            metrics.update(ray.get(call)[0])
        if on_policy or from_sampler:  # the gap was measured by the update's own forward
            where = "on-policy update's forward" if on_policy else "update's first forward"
            self._check_gap(
                step,
                metrics,
                f" (measured in the {where}: the stage stops before the weight "
                "sync and before any checkpoint, so the update is never used; a model with "
                "dropout active in training shows a gap here too: set rl.skip_passes=never)",
            )
        return stamp

    def _response_metrics(self, samples: list) -> dict[str, float]:
        """Length, truncation and diversity of the step's responses; the KL coefficient and the
        policy's version after the step."""
        from rlhf.monitor import distinct_ngram_frac

        lengths = [len(s.token_ids) for s in samples]
        return {
            "kl/coef": self.kl.value,
            "response/length_mean": sum(lengths) / len(lengths),
            "response/length_max": float(max(lengths)),
            "response/clipped_frac": sum(s.finish_reason == "length" for s in samples)
            / len(samples),
            "response/distinct_frac": len({tuple(s.token_ids) for s in samples}) / len(samples),
            "response/distinct_ngram_frac": distinct_ngram_frac([s.token_ids for s in samples]),
            "policy/version": float(self.version),
        }

    def _check_gap(self, step: int, metrics: dict[str, float], when: str) -> None:
        """StaleEngineError when the trainer's and the engines' logprobs of the sampled tokens
        differ by more than rl.rollout.max_logprob_gap on average: the engines do not run the
        policy's weights. The stage stops (a re-run resumes from the newest checkpoint)."""
        from rlhf.rl.dispatch import StaleEngineError

        gap, limit = metrics["rollout/logprob_gap"], self.rl.rollout.max_logprob_gap
        if gap > limit:
            raise StaleEngineError(
                f"step {step + 1}: mean |trainer - rollout| logprob gap {gap:.4f} > "
                f"rl.rollout.max_logprob_gap = {limit}: the engines do not run the policy's "
                f"weights{when}"
            )

    # ---- checkpoints --------------------------------------------------------------------------

    def trained_groups(self) -> list:
        return [self.groups[r] for r in ("policy", "critic") if r in self.groups]

    def driver_state(self) -> dict:
        """What the driver needs to continue exactly; the sampling seeds are a function of
        (run.seed, step, round), so the step fixes them."""
        from rlhf.rl.checkpoint import rng_state

        return {
            "step": self.steps_done,
            "version": self.version,
            "prompt_cursor": self.prompt_cursor,
            "kl_coef": self.kl.value,
            "monitor": self.monitor.state_dict(),
            "rng": rng_state(),
            "seed_schedule": "run.seed * 1000003 + step * 65536 + round * prompts * samples",
        }

    def save_checkpoint(self, extra: dict) -> tuple[Path, float]:
        """Every trained rank's state and the driver's, committed atomically; (folder, seconds)."""
        from rlhf.rl import checkpoint as ck

        t0 = time.perf_counter()
        root, step, fp = self.stage_dir / "checkpoints", self.steps_done, self.cfg.fingerprint()
        tmp = ck.tmp_dir(root, step)
        shutil.rmtree(tmp, ignore_errors=True)
        refs = [
            ref
            for g in self.trained_groups()
            for ref in g.call_async("save_state", str(tmp / g.role), step, fp)
        ]
        ray.get(refs)
        ck.write_driver_state(tmp, {**self.driver_state(), **extra}, step, fp)
        final = ck.commit(tmp, root, step, self.rl.keep_checkpoints)
        return final, time.perf_counter() - t0

    def restore(self, path: Path) -> dict:
        """Trained roles and driver back to checkpoint `path`; engines get its weights."""
        from rlhf.rl import checkpoint as ck

        ray.get(
            [
                ref
                for g in self.trained_groups()
                for ref in g.call_async("load_state", str(path / g.role))
            ]
        )
        state = ck.read_driver_state(path)
        self.steps_done, self.version = state["step"], state["version"]
        self.prompt_cursor, self.kl.value = state["prompt_cursor"], state["kl_coef"]
        ck.set_rng_state(state["rng"])
        self.monitor.load_state_dict(state["monitor"])
        self.push_weights()
        return state
