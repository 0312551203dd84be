"""RLRun's weight sync: the policy's new weights into every rollout engine after an update.

A mixin of `rlhf.rl.trainer.RLRun` (it reads `self.rl`, `self.groups`, `self.version`,
`self.engine_actors()`). `_sync` is the step's `weight_sync` phase; `push_weights` also runs
after a restore and after an actor is re-created (rlhf/rl/faults.py).
"""

from __future__ import annotations

import ray


class WeightSync:
    def _sync(self, stamp: int | None) -> None:
        """The `weight_sync` phase: the engines get the new weights, or, where the policy's
        samples already carry the new version (`stamp`), the version only."""
        from rlhf.rl.faults import recoverable

        try:
            if stamp is None:
                self.sync_weights()
            else:
                self.version = stamp
        except recoverable() as exc:  # the policy has trained: re-sync, don't redo the step
            from rlhf.rl.faults import resync_after_train

            resync_after_train(self, exc)

    def sync_weights(self) -> None:
        """The policy's current weights into every engine, as the next version."""
        self.version += 1
        self.push_weights()

    def push_weights(self) -> None:
        """The policy's weights into every engine as `self.version`, in buckets of
        `rl.rollout.weight_bucket_mb`; afterwards all report it. `sync_stats` gets the seconds of
        each part (`weight_sync/...`)."""
        policy, engines = self.groups["policy"], self.engine_actors()
        bucket_bytes = int(self.rl.rollout.weight_bucket_mb * 2**20)
        if self.rl.generates_in_policy:  # the engines sample from the trained weights
            versions = ray.get(policy.call_async("set_rollout_version", self.version))
            self.reload_s, self.sync_stats = 0.0, {}
        elif self.rl.uses_broadcast_sync:  # every policy rank gathers, rank 0 broadcasts buckets
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
