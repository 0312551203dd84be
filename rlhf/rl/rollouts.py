"""RLRun's engine side: the prompt stream, sampling (synchronous or generated ahead), rewards
and the held-out evaluation.

A mixin of `rlhf.rl.trainer.RLRun` (it reads `self.rl`, `self.dispatcher`, `self.ahead`,
`self.groups`, `self.prompt_cursor`, ...). `_rollouts` is the step's `generate` and `reward`
phases.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray

from rlhf.rl.errors import RLStageError


def wait_refs(refs: list) -> list:
    """Wait for refs without fetching them into the driver."""
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return refs


class RolloutPhase:
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
            prompts, samples, batch_ref, compute_s = self._round(step, r, t)
            generate_s += compute_s
            t1 = time.perf_counter()
            scores = self._rewards(prompts, samples, batch_ref)
            if not rl.filter_groups:
                if isinstance(scores, ray.ObjectRef):
                    wait_refs([scores])
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

    def _round(self, step: int, round_: int, t: dict[str, float]) -> tuple[list, list, Any, float]:
        """One round's prompts and samples (round 0: those generated ahead, if any), the batch's
        object ref where it is needed before the scores, and the engine's compute seconds;
        timed as `generate`."""
        rl = self.rl
        t0 = time.perf_counter()
        got = self.ahead.take(step, self.prompt_cursor) if round_ == 0 else None
        if got is None:
            prompts = self._next_prompts()
            samples, compute_s = self._generate(prompts, step, round_)
        else:  # generated while the previous step(s) trained
            prompts, samples, compute_s, hidden_s = got
            self.prompt_cursor += len(prompts)
            t["rollout/generate_hidden_s"] = hidden_s
        self.dispatcher.check_versions(samples, self.version, rl.max_staleness)
        batch_ref = None
        if not rl.filter_groups or rl.reward.kind == "model":
            batch_ref = self._batch_ref(prompts, samples)
        t["timing/generate"] += time.perf_counter() - t0
        return prompts, samples, batch_ref, compute_s

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
