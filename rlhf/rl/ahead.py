"""Asynchronous rollouts (`rl.max_staleness` > 0): the samples of the next steps are generated
while this step trains.

    ahead = RolloutsAhead(depth=rl.max_staleness)
    ahead.launch(step + 1, cursor, prompts, generate)   # a driver thread runs generate()
    got = ahead.take(step + 1, cursor)                  # (prompts, samples, compute_s, hidden_s)
    ahead.drop()                                        # after a fault: wait them out, forget

One driver thread runs the launched generations in order; the engines are Ray actors that run
one call at a time, so the weight sync the driver sends after the update queues behind the chunk
an engine is generating. Every sample carries the version of the weights that generated it; a
step launched `depth` steps ahead trains on samples at most `depth` versions older than the
policy (the trainer checks the stamps), weighted by the truncated importance ratio
min(pi_trainer / pi_rollout, rl.truncated_is_cap) against the policy's own logprobs, which the
step computes in its `logprobs` phase (the decoupled PPO objective of Fu et al. 2025, "AReaL").

A prefetched step is used only if the prompt stream is where it expected (`cursor`): a step that
drew more prompts than planned (rl.filter_groups) makes the ones ahead of it generate again. The
driver state in a checkpoint has no prefetched samples: a resumed run generates its first step
anew, with the current weights.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class _Launched:
    step: int
    cursor: int  # the prompt stream position its prompts were drawn at
    prompts: list
    future: Future  # -> (samples, busiest engine's compute seconds, perf_counter when done)
    started: float


class RolloutsAhead:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.queue: deque[_Launched] = deque()
        self.discarded = 0  # generated ahead but not used (the prompt stream moved)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if depth else None

    def pending(self) -> set[int]:
        return {x.step for x in self.queue}

    def launch(
        self, step: int, cursor: int, prompts: list, generate: Callable[[], tuple[list, float]]
    ) -> None:
        """Queue `generate()` -> (samples, compute seconds) for `step` on the driver thread."""
        if self._pool is None:
            raise RuntimeError("rl.max_staleness = 0: nothing is generated ahead")

        def timed() -> tuple[list, float, float]:
            samples, compute_s = generate()
            return samples, compute_s, time.perf_counter()

        self.queue.append(
            _Launched(step, cursor, prompts, self._pool.submit(timed), time.perf_counter())
        )

    def take(self, step: int, cursor: int) -> tuple[list, list, float, float] | None:
        """The samples generated ahead for `step` from prompt position `cursor`: (prompts,
        samples, compute seconds, seconds of generation that ran before this call, hidden
        behind the previous steps), or None when there are none to use. Waits for them; a
        failed generation raises its error (a dead engine: the fault path drops the rest)."""
        while self.queue and self.queue[0].step < step:
            self._forget(self.queue.popleft())
        if not self.queue or self.queue[0].step != step:
            return None
        head = self.queue.popleft()
        if head.cursor != cursor:
            self._forget(head)
            self.discarded += 1
            return None
        asked = time.perf_counter()
        samples, compute_s, finished = head.future.result()
        return head.prompts, samples, compute_s, max(0.0, min(finished, asked) - head.started)

    def drop(self) -> None:
        """Forget everything launched, after it has finished (a generation in flight uses the
        engines; a fault's recovery re-creates them)."""
        while self.queue:
            self._forget(self.queue.popleft())

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @staticmethod
    def _forget(launched: _Launched) -> None:
        with contextlib.suppress(Exception):  # its samples are discarded with its error
            launched.future.result()
