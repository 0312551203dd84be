"""The online RL stage: PPO (critic + GAE) or a critic-free estimator, over Ray actors.

    result = run_rl(cfg, policy_dir=".../sft/model", reward_model_dir=".../rm/model")

Each step is a checklist of timed phases (`timing/<phase>` in the metrics):

    generate      rollout engines sample n responses per prompt (least-loaded dispatch);
                  with rl.max_staleness > 0 the samples were generated while the previous
                  step(s) trained (rlhf/rl/ahead.py), and this phase is the wait for them
    reward        rule function, reward model actors, or an HTTP endpoint
    ref           reference logprobs              (object refs, actor to actor); skipped, and
                  no reference actors started, when nothing reads them (`rl.needs_reference`)
    logprobs      the policy's own logprobs of the sampled tokens (PPO's old logprobs, and
                  the trainer-vs-engine gap check `rollout/logprob_gap`); skipped when the
                  update is on-policy (`rl.on_policy_update`): the training forward's own
                  logprobs are the old ones, and it measures the gap
    values        critic values (PPO only)
    advantages    KL, rewards, GAE or group baselines (a Ray task; the batch stays in the store)
    train_critic  value regression (PPO only)
    train_policy  PPO epochs over mini-batches (+ KL loss, entropy, PPO-ptx)
    weight_sync   new weights to every engine (object store, or bucketed gloo/NCCL broadcast)

The driver holds object refs and small metrics only; token tensors go from the store to actors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch

from rlhf.config import Config
from rlhf.rl.experience import Experience


class RLStageError(RuntimeError):
    """The RL stage cannot run as configured (bad prompts, resources, a broken reward)."""


@contextmanager
def phase(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[f"timing/{name}"] = time.perf_counter() - t0


def _wait(refs: list) -> list:
    """Wait for refs without fetching them into the driver."""
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return refs


@ray.remote(num_cpus=0)
class AdvantageWorker:
    """The advantage phase next to the data (a long-lived actor: Ray reaps idle task workers
    on a small machine, and re-importing torch cost ~2 s per step)."""

    @ray.method(num_returns=2)
    def compute(
        self,
        batch: Experience,
        scores: Any,
        ref_parts: list,
        old_parts: list,
        value_parts: list,
        kwargs: dict,
    ) -> tuple[Experience, dict]:
        """Returns (batch with advantages, metrics); only the metrics go to the driver."""
        return _advantages(batch, scores, ref_parts, old_parts, value_parts, kwargs)

    def concat(self, parts: list) -> dict:
        from rlhf.rl.experience import concat_rows

        got = ray.get(parts)
        return {
            "out": concat_rows([g["out"] for g in got]),
            "compute_s": max(g["compute_s"] for g in got),
        }


def _advantages(
    batch: Experience,
    scores: Any,
    ref_parts: list,
    old_parts: list,
    value_parts: list,
    kwargs: dict,
) -> tuple[Experience, dict]:
    """`old_parts` empty: the update is on-policy, the engine's logprobs stand in for the old
    logprobs here (KL in the reward, `kl/` metrics; within ~1e-7 of the trainer's in fp32 after
    a sync) and the policy's training forward measures the gap. `ref_parts` empty: no
    reference model (kl_coef 0), no KL."""
    from rlhf.algorithms import truncated_is_weights
    from rlhf.rl.experience import compute_advantages, concat_rows, groups_with_signal

    parts = {"ref_logprobs": ref_parts, "old_logprobs": old_parts, "values": value_parts}
    compute = {}
    if isinstance(scores, dict):  # from the reward model actors
        compute["compute/reward_s"] = scores["compute_s"]
        scores = scores["out"]
    batch = batch.replace(scores=torch.as_tensor(scores, dtype=torch.float32))
    for key, refs in parts.items():
        if refs:
            got = ray.get(refs)
            batch = batch.replace(**{key: concat_rows([g["out"] for g in got])})
            compute[f"compute/{key}_s"] = max(g["compute_s"] for g in got)
    if not old_parts:
        batch = batch.replace(old_logprobs=batch.rollout_logprobs)
    batch, metrics = compute_advantages(batch, **kwargs)
    signal = groups_with_signal(batch.scores.tolist(), kwargs["group_size"])
    metrics["reward/flat_group_frac"] = 1.0 - sum(signal) / max(1, len(signal))
    if old_parts:
        _, gap = truncated_is_weights(
            batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
        )
        metrics.update(gap)
    metrics.update(compute)
    return batch, metrics


class RLRun:
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
        self.reward_rule = None
        if reward_fn is not None:
            if self.rl.reward.kind != "rule":
                raise RLStageError(
                    f"a reward function was passed in, but rl.reward.kind = "
                    f"{self.rl.reward.kind!r}: set rl.reward.kind=rule to use it"
                )
            if not callable(reward_fn):
                raise RLStageError(f"reward_fn {reward_fn!r} is not callable")
            self.reward_rule = reward_fn
        elif self.rl.reward.kind == "rule":
            from rlhf.rl.rewards import RewardError, load_rule

            try:
                self.reward_rule = load_rule(self.rl.reward.rule)
            except RewardError as exc:
                raise RLStageError(str(exc)) from None
        rl = self.rl
        self.kl = (
            KL_CONTROLLERS["fixed"](rl.kl_coef)
            if rl.kl_controller == "fixed"
            else KL_CONTROLLERS["adaptive"](rl.kl_coef, rl.kl_target, rl.kl_horizon)
        )
        self._check_lengths(policy_dir)
        self.groups = self._start_actors(
            policy_dir, reward_model_dir, critic_init_dir or reward_model_dir or policy_dir
        )
        from rlhf.rl.dispatch import RolloutDispatcher

        self.dispatcher = RolloutDispatcher(self.groups["rollout"].actors)
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

    # ---- set-up -------------------------------------------------------------------------------

    def _load_prompts(self, files: list) -> tuple[list[tuple[list[int], str | None, str]], dict]:
        from rlhf.data.records import DataError
        from rlhf.data.render import render_prompt, resolve_prompt_format
        from rlhf.data.stages import load_prompts

        try:
            items, report = load_prompts(files, self.rl.on_error, self.rl.columns)
            fmt = resolve_prompt_format(
                self.rl.prompt_format, self.tok, report["message_lists"], "rl.prompt_format"
            )
        except DataError as exc:
            raise RLStageError(str(exc)) from None
        report["prompt_format"] = fmt
        out = []
        for i, (turns, label) in enumerate(items):
            ids = render_prompt(turns, self.tok, fmt)  # as SFT rows and evaluation render it
            if len(ids) > self.rl.max_prompt_length:
                names = ", ".join(f.path for f in files)
                raise RLStageError(
                    f"prompt {i} of {names} has {len(ids)} tokens > rl.max_prompt_length = "
                    f"{self.rl.max_prompt_length}: raise it or shorten the prompt"
                )
            out.append((ids, label, turns[-1]["content"]))
        if not out:
            raise RLStageError(f"no prompts in {[f.path for f in files]}")
        return out, report

    def _check_lengths(self, policy_dir: str) -> None:
        """Prompt + answer must fit the model's positions: checked before any engine starts (vLLM
        would refuse it there with a traceback)."""
        config = json.loads((Path(policy_dir) / "config.json").read_text())
        limit = config.get("max_position_embeddings")
        need = self.rl.max_prompt_length + self.rl.rollout.max_new_tokens
        if limit is not None and need > limit:
            raise RLStageError(
                f"rl.max_prompt_length + rl.rollout.max_new_tokens = {self.rl.max_prompt_length} "
                f"+ {self.rl.rollout.max_new_tokens} = {need} exceeds the model's "
                f"max_position_embeddings = {limit} ({policy_dir}/config.json): lower one of them"
            )

    def _start_actors(self, policy_dir: str, rm_dir: str | None, critic_dir: str) -> dict:
        from actors.group import ActorGroup, ResourceError, validate_resources

        rl = self.rl
        available = ray.available_resources()
        try:
            # A colocated group's bundles: rl.colocate_cpus, or its first role's CPUs.
            bundles = {
                g[0]: rl.bundle_cpus(g, available.get("CPU", 0.0)) for g in rl.colocated_groups()
            }
            validate_resources(rl.resource_requests(available.get("CPU", 0.0)), available)
        except (ResourceError, ValueError) as exc:
            raise RLStageError(f"rl: {exc}") from None
        paths = {
            "policy": policy_dir,
            "reference": policy_dir,
            "rollout": policy_dir,
            "critic": critic_dir,
            "reward_model": rm_dir,
        }
        if "reward_model" in rl.roles() and not rm_dir:
            raise RLStageError(
                "rl.reward.kind='model' but no reward model checkpoint: add 'rm' "
                "to run.stages or set rl.reward.model_path"
            )
        # a colocated role that is not started hosts nobody
        host = {r: g[0] for g in rl.colocated_groups() for r in g}
        groups: dict[str, ActorGroup] = {}
        try:
            self._spawn_groups(groups, host, paths, bundles)
            ray.get([a.__ray_ready__.remote() for g in groups.values() for a in g.actors])
        except BaseException:  # an actor that failed to start: free what was reserved
            for group in reversed(list(groups.values())):
                group.kill()
            raise
        return groups

    def _spawn_groups(self, groups: dict, host: dict, paths: dict, bundles: dict) -> None:
        """One ActorGroup per role, hosts (reserving `bundles[host]` CPUs per bundle) before the
        roles colocated on their bundles.

        Colocated roles take turns: each actor runs as many torch threads as its bundle has CPUs
        (`actors.group.bundle_threads`), which is right only while no two roles of one bundle
        compute at once. `step` keeps that: every phase waits for the previous one; the only
        overlaps are the weight sync (the policy sends while the engines receive: I/O) and
        checkpoint save/restore (policy and critic write or read at once: I/O)."""
        from actors.group import ActorGroup
        from actors.roles import ROLE_ACTORS
        from actors.rollout import RolloutActor

        rl = self.rl
        order = sorted(rl.roles(), key=lambda r: (host.get(r, r) != r, r != "policy"))
        for role in order:
            spec = rl.rollout if role == "rollout" else getattr(rl, role)
            count = rl.rollout.num_engines if role == "rollout" else spec.num_actors
            cpus = rl.rollout.cpus_per_engine if role == "rollout" else spec.cpus_per_actor
            cpus = bundles.get(role, cpus)  # ignored by a colocated rider: its host's bundles
            gpus = (  # a tensor-parallel engine holds tensor_parallel_size whole GPUs
                rl.rollout.gpus_per_engine * rl.rollout.tensor_parallel_size
                if role == "rollout"
                else spec.gpus_per_actor
            )
            first = next((r for r in [host.get(role, role)] if r in groups and r != role), None)
            cls = RolloutActor if role == "rollout" else ROLE_ACTORS[role]
            groups[role] = ActorGroup(
                cls,
                role,
                count,
                cpus_per_actor=cpus,
                gpus_per_actor=gpus,
                colocate_with=groups[first] if first else None,
                actor_kwargs={"cfg": self.cfg, "model_path": paths[role]},
            )

    def init_weight_broadcast(self) -> None:
        """A fresh weight-sync group (gloo or NCCL): policy rank 0 as member 0 and the host of
        its TCP store (a new port on its node), engine i as member 1 + i. All join at once."""
        from actors.group import _master_address

        policy, engines = self.groups["policy"], self.groups["rollout"].actors
        strategy = policy._strategy(0)  # the store listens on policy rank 0's node
        address, port = ray.get(_master_address.options(scheduling_strategy=strategy).remote())
        world, backend = 1 + len(engines), self.rl.weight_sync_backend
        ray.get(
            [policy.actors[0].init_weight_transfer.remote(address, port, world, backend)]
            + [e.init_weight_sync.remote(address, port, world, backend) for e in engines]
        )

    def shutdown(self) -> None:
        self.ahead.close()
        for group in self.groups.values():
            group.kill()
        ray.kill(self.helper)

    # ---- one step -----------------------------------------------------------------------------

    def _next_prompts(self) -> list[tuple[list[int], str | None, str]]:
        """The next prompts_per_step prompts of the shuffled stream (a new order every epoch)."""
        prompts = self._prompts_at(self.prompt_cursor)
        self.prompt_cursor += len(prompts)
        return prompts

    def _prompts_at(self, cursor: int) -> list[tuple[list[int], str | None, str]]:
        from rlhf.train.loop import stream_indices

        ids = stream_indices(cursor, self.rl.prompts_per_step, len(self.prompts), self.cfg.run.seed)
        return [self.prompts[i] for i in ids]

    def _seed(self, step: int, round_: int) -> int:
        k, n = self.rl.prompts_per_step, self.rl.samples_per_prompt
        return self.cfg.run.seed * 1_000_003 + step * 65_536 + round_ * k * n

    def _generate(self, prompts: list, step: int, round_: int) -> tuple[list, float]:
        """(samples, busiest engine's seconds) of one round's prompts; thread-safe."""
        ro = self.rl.rollout
        return self.dispatcher.generate_timed(
            [p[0] for p in prompts],
            n=self.rl.samples_per_prompt,
            chunk_size=ro.chunk_size,
            max_tokens=ro.max_new_tokens,
            temperature=ro.temperature,
            top_p=ro.top_p,
            seed=self._seed(step, round_),
        )

    def _launch_ahead(self, step: int) -> None:
        """rl.max_staleness > 0: start generating the next steps' first rounds (from the prompt
        stream positions they will have if no step draws extra prompts)."""
        rl, pending = self.rl, self.ahead.pending()
        for ahead in range(step + 1, min(step + rl.max_staleness, rl.max_steps - 1) + 1):
            if ahead in pending:
                continue
            cursor = self.prompt_cursor + (ahead - step - 1) * rl.prompts_per_step
            prompts = self._prompts_at(cursor)
            self.ahead.launch(
                ahead, cursor, prompts, lambda p=prompts, s=ahead: self._generate(p, s, 0)
            )

    def _rollouts(self, step: int, t: dict[str, float]) -> tuple[list, list, Any, Any, dict]:
        """One step's prompts, samples, batch (object ref) and scores, plus metrics; timed as
        `generate` and `reward`.

        With rl.filter_groups (DAPO's dynamic sampling), rounds of prompts_per_step prompts are
        sampled and scored until prompts_per_step prompts whose samples' scores differ are found,
        or for rl.filter_max_rounds rounds; a batch still short is filled with equal-score groups
        (they carry no policy gradient, and `filter/padded_groups` counts them), so the training
        batch always has rollout_batch_size samples.
        """
        from rlhf.rl.experience import groups_with_signal

        rl = self.rl
        k, n = rl.prompts_per_step, rl.samples_per_prompt
        t["timing/generate"] = t["timing/reward"] = 0.0
        generate_s = reward_compute_s = 0.0  # engine-reported compute seconds
        rich: list[tuple] = []  # (prompt, samples, scores) of groups whose scores differ
        flat: list[tuple] = []  # and of the others
        seen: list[float] = []
        rounds = rl.filter_max_rounds if rl.filter_groups else 1
        for r in range(rounds):
            t0 = time.perf_counter()
            got = self.ahead.take(step, self.prompt_cursor) if r == 0 else None
            if got is None:
                prompts = self._next_prompts()
                samples, compute_s = self._generate(prompts, step, r)
            else:  # generated while the previous step(s) trained
                prompts, samples, compute_s, hidden_s = got
                self.prompt_cursor += len(prompts)
                t["rollout/generate_hidden_s"] = hidden_s
            generate_s += compute_s
            self.dispatcher.check_versions(samples, self.version, rl.max_staleness)
            batch_ref = None
            if not rl.filter_groups or rl.reward.kind == "model":
                batch_ref = self._batch_ref(prompts, samples)
            t1 = time.perf_counter()
            t["timing/generate"] += t1 - t0
            scores = self._rewards(prompts, samples, batch_ref)
            if not rl.filter_groups:
                if isinstance(scores, ray.ObjectRef):
                    _wait([scores])
                t["timing/reward"] += time.perf_counter() - t1
                return prompts, samples, batch_ref, scores, {"compute/generate_s": generate_s}
            if isinstance(scores, ray.ObjectRef):
                got = ray.get(scores)
                reward_compute_s += got["compute_s"]
                scores = got["out"].tolist()
            t["timing/reward"] += time.perf_counter() - t1
            seen += scores
            for i, signal in enumerate(groups_with_signal(scores, n)):
                group = (prompts[i], samples[i * n : (i + 1) * n], scores[i * n : (i + 1) * n])
                (rich if signal else flat).append(group)
            if len(rich) >= k:
                break
        groups = (rich + flat)[:k]
        t0 = time.perf_counter()
        prompts = [g[0] for g in groups]
        samples = [
            dataclasses.replace(s, prompt_index=i) for i, g in enumerate(groups) for s in g[1]
        ]
        scores = [x for g in groups for x in g[2]]
        batch_ref = self._batch_ref(prompts, samples)
        t["timing/generate"] += time.perf_counter() - t0
        metrics = {
            "filter/rounds": float(r + 1),
            "filter/signal_frac": len(rich) / ((r + 1) * k),
            "filter/padded_groups": float(max(0, k - len(rich))),
            "reward/flat_group_frac": 1.0 - len(rich) / ((r + 1) * k),
            "reward/score_mean": sum(seen) / len(seen),
            "compute/generate_s": generate_s,
        }
        if rl.reward.kind == "model":
            metrics["compute/reward_s"] = reward_compute_s
        return prompts, samples, batch_ref, scores, metrics

    def _batch_ref(self, prompts: list, samples: list) -> ray.ObjectRef:
        from rlhf.rl.experience import build_batch

        return ray.put(
            build_batch(
                [prompts[s.prompt_index][0] for s in samples],
                [s.token_ids for s in samples],
                [s.logprobs for s in samples],
                pad_id=self.tok.pad_token_id,
            )
        )

    def _rewards(self, prompts: list, samples: list, batch_ref: Any) -> Any:
        """Scores (B,) as a list of floats, or an object ref to a tensor (reward model)."""
        rc = self.rl.reward
        if rc.kind == "model":
            return self.helper.concat.remote(
                self.groups["reward_model"].call_async("scores", batch_ref)
            )
        texts = [self.tok.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        questions = [prompts[s.prompt_index][2] for s in samples]
        labels = [prompts[s.prompt_index][1] for s in samples]
        from rlhf.rl.rewards import RewardError, http_rewards, rule_rewards

        try:
            if rc.kind == "http":
                scores = http_rewards(rc.url, questions, texts, labels, rc.timeout_s)
            else:
                scores = rule_rewards(self.reward_rule, questions, texts, labels)
        except RewardError as exc:
            raise RLStageError(str(exc)) from None
        if rc.clip is not None:
            scores = [max(-rc.clip, min(rc.clip, s)) for s in scores]
        return scores

    def _gold_mean(self, prompts: list, samples: list) -> dict[str, float]:
        """`reward/gold_mean`: rl.reward.rule's mean score of the answers, when every prompt has a
        label (the reward model is the proxy; the rule, the gold standard)."""
        from rlhf.rl.rewards import RewardError, load_rule, rule_rewards

        labels = [prompts[s.prompt_index][1] for s in samples]
        if any(label is None for label in labels):
            return {}
        try:
            rule = load_rule(self.rl.reward.rule)
            texts = [self.tok.decode(s.token_ids, skip_special_tokens=True) for s in samples]
            questions = [prompts[s.prompt_index][2] for s in samples]
            scores = rule_rewards(rule, questions, texts, labels)
        except RewardError:
            return {}
        return {"reward/gold_mean": sum(scores) / len(scores)}

    def step(self, step: int) -> dict[str, float]:
        from rlhf.monitor import distinct_ngram_frac
        from rlhf.rl.faults import recoverable

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
        on_policy, ref_parts, old_parts = rl.on_policy_update, [], []
        if "reference" in self.groups:  # started only when something reads its logprobs
            with phase(t, "ref"):
                ref_parts = _wait(self.groups["reference"].call_async("logprobs", batch_ref))
        if not on_policy:
            with phase(t, "logprobs"):
                old_parts = _wait(self.groups["policy"].call_async("logprobs", batch_ref))
        value_parts = []
        if rl.algorithm == "ppo":
            with phase(t, "values"):
                value_parts = _wait(self.groups["critic"].call_async("values", batch_ref))
        with phase(t, "advantages"):
            adv_ref, metrics_ref = self.helper.compute.remote(
                batch_ref,
                scores,
                ref_parts,
                old_parts,
                value_parts,
                dict(
                    algorithm=rl.algorithm,
                    group_size=rl.samples_per_prompt,
                    kl_coef=self.kl.value,
                    kl_estimator=rl.kl_estimate,
                    kl_in_reward=rl.kl_as_reward,
                    gamma=rl.gamma,
                    lam=rl.lam,
                    whiten=rl.whiten_advantages,
                ),
            )
            metrics = ray.get(metrics_ref)
        if not on_policy and not any(lags):  # older weights' samples differ by design
            self._check_gap(step, metrics, "")
        if rl.engines_sleep:  # GPU: engines sharing the policy's GPUs free them while it trains
            with phase(t, "engine_sleep"):
                ray.get(self.groups["rollout"].call_async("sleep"))  # the weight sync wakes them
        if rl.algorithm == "ppo":
            with phase(t, "train_critic"):
                critic_metrics = ray.get(self.groups["critic"].call_async("train", adv_ref, step))
            metrics.update(critic_metrics[0])
        with phase(t, "train_policy"):
            policy_metrics = ray.get(
                self.groups["policy"].call_async("train", adv_ref, step, self.kl.value, on_policy)
            )
        metrics.update(policy_metrics[0])
        if on_policy:  # the gap was measured by the update's own forward
            self._check_gap(
                step,
                metrics,
                " (measured in the on-policy update's forward: the stage stops before the weight "
                "sync and before any checkpoint, so the update is never used; a model with "
                "dropout active in training shows a gap here too: set rl.skip_passes=never)",
            )
        with phase(t, "weight_sync"):
            try:
                self.sync_weights()
            except recoverable() as exc:  # the policy has trained: re-sync, don't redo the step
                from rlhf.rl.faults import resync_after_train

                resync_after_train(self, exc)
        if "kl/mean_per_sequence" in metrics:  # absent without a reference (kl_coef 0, fixed)
            self.kl.update(metrics["kl/mean_per_sequence"], rl.rollout_batch_size)
        if rl.filter_groups:  # the policy's reward is that of everything it generated
            metrics["reward/trained_score_mean"] = metrics["reward/score_mean"]
        metrics.update(metrics_rollout)
        lengths = [len(s.token_ids) for s in samples]
        metrics.update(
            {
                "kl/coef": self.kl.value,
                "response/length_mean": sum(lengths) / len(lengths),
                "response/length_max": float(max(lengths)),
                "response/clipped_frac": sum(s.finish_reason == "length" for s in samples)
                / len(samples),
                "response/distinct_frac": len({tuple(s.token_ids) for s in samples}) / len(samples),
                "response/distinct_ngram_frac": distinct_ngram_frac([s.token_ids for s in samples]),
                "policy/version": float(self.version),
            }
        )
        metrics.update(t)
        metrics["timing/step"] = time.perf_counter() - t0
        metrics["compute/weight_reload_s"] = self.reload_s
        compute = sum(v for k, v in metrics.items() if k.startswith("compute/"))
        metrics["perf/model_compute_s"] = compute
        metrics["perf/outside_compute_frac"] = max(0.0, 1.0 - compute / metrics["timing/step"])
        return metrics

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

    def sync_weights(self) -> None:
        """The policy's current weights into every engine, as the next version."""
        self.version += 1
        self.push_weights()

    def push_weights(self) -> None:
        """The policy's weights into every engine as `self.version`, in buckets of
        `rl.rollout.weight_bucket_mb`; afterwards all report it. `sync_stats` gets the seconds of
        each part (`weight_sync/...`)."""
        policy, engines = self.groups["policy"], self.groups["rollout"].actors
        bucket_bytes = int(self.rl.rollout.weight_bucket_mb * 2**20)
        if self.rl.uses_broadcast_sync:  # every policy rank gathers, rank 0 broadcasts buckets
            sent = policy.call_async("send_weights", bucket_bytes)
            got = [e.receive_weights.remote(self.version) for e in engines]
            self.sync_stats = ray.get(sent)[0]
            self.reload_s = max(ray.get(got))
            versions = ray.get([e.version.remote() for e in engines])
        else:  # rank 0 puts flat buckets in the object store; every engine maps and loads them
            sent = ray.get(policy.call_async("weights_ref", bucket_bytes))[0]
            buckets = sent.pop("buckets")
            loaded = ray.get([e.load_weights.remote(buckets, self.version) for e in engines])
            del buckets  # the objects are freed once no engine holds them either
            self.reload_s = max(x["reload_s"] for x in loaded)
            fetch_s = max(x["fetch_s"] for x in loaded)
            self.sync_stats = {
                **sent,
                "weight_sync/fetch_s": fetch_s,
                "weight_sync/reload_s": self.reload_s,
            }
            versions = [x["version"] for x in loaded]
        if any(v != self.version for v in versions):
            from rlhf.rl.dispatch import StaleEngineError

            raise StaleEngineError(
                f"after the weight sync engines report versions {versions}, expected {self.version}"
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

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy answers of the current policy (through the engines) on held-out prompts."""
        if not self.eval_prompts:
            return {}
        samples = self.dispatcher.generate(
            [p[0] for p in self.eval_prompts],
            n=1,
            chunk_size=32,
            max_tokens=self.rl.rollout.max_new_tokens,
            temperature=0.0,
        )
        texts = [self.tok.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        out = {"eval/num_prompts": float(len(samples))}
        labels = [p[1] for p in self.eval_prompts]
        if all(y is not None for y in labels):
            from rlhf.rl.rewards import exact_match, rule_rewards

            questions = [p[2] for p in self.eval_prompts]
            hits = rule_rewards(exact_match, questions, texts, labels)
            out["eval/exact_match"] = sum(hits) / len(hits)
            if self.reward_rule is not None:
                scores = rule_rewards(self.reward_rule, questions, texts, labels)
                out["eval/reward_mean"] = sum(scores) / len(scores)
        return out
