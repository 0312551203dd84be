"""Prompt dispatch over N rollout engines, least-loaded first.

Prompts are cut into chunks; each chunk goes to the engine with the fewest requests in flight
(at most `max_inflight` per engine, so a slow engine stops receiving work); results come back in
prompt order whatever engine served them. A chunk's sampling seed depends on its position only, so
the samples do not depend on which engine ran it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import ray


class StaleEngineError(RuntimeError):
    """A rollout engine generated with weights older than the policy's."""


class RolloutDispatcher:
    def __init__(self, engines: list[Any], max_inflight: int = 2) -> None:
        self.engines = engines
        self.max_inflight = max_inflight
        self.served = [0] * len(engines)  # prompts each engine served, over the run
        self.last_compute_s = 0.0  # the busiest engine's generation seconds in the last call

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        chunk_size: int,
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list:
        """`n` samples per prompt from whichever engines are free: len = len(prompts) * n."""
        queue = deque((s, prompts[s : s + chunk_size]) for s in range(0, len(prompts), chunk_size))
        inflight = [0] * len(self.engines)
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}
        results: dict[int, list] = {}
        busy = [0.0] * len(self.engines)
        while queue or pending:
            while queue and min(inflight) < self.max_inflight:
                engine = min(range(len(self.engines)), key=lambda i: (inflight[i], i))
                start, chunk = queue.popleft()
                ref = self.engines[engine].generate.remote(
                    chunk,
                    n,
                    max_tokens,
                    temperature,
                    top_p,
                    None if seed is None else seed + start * n,
                )
                pending[ref] = (engine, start)
                inflight[engine] += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            engine, start = pending.pop(done[0])
            inflight[engine] -= 1
            samples, seconds = ray.get(done[0])
            busy[engine] += seconds
            self.served[engine] += len(samples) // max(1, n)
            for s in samples:
                s.prompt_index += start
            results[start] = samples
        self.last_compute_s = max(busy)
        return [s for start in sorted(results) for s in results[start]]

    def check_versions(self, samples: list, expected: int) -> None:
        stale = sorted({s.weights_version for s in samples if s.weights_version != expected})
        if stale:
            raise StaleEngineError(
                f"samples generated with weights version(s) {stale}, but the policy is at "
                f"version {expected}: a rollout engine missed a weight update"
            )
