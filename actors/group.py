"""ActorGroup: one role's Ray actors on their own placement group, with ranks and fan-out.

    group = ActorGroup(PolicyActor, "policy", num_actors=2, gpus_per_actor=1, cpus_per_actor=4)
    refs = group.call_async("train", batches)            # one ObjectRef per rank
    refs = group.call_sliced_async("score", items)       # items split into contiguous slices
    results = ray.get(refs)

Each actor gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in its
environment, so it can join a torch.distributed group with its peers. Colocation: pass the
placement group of another role (`colocate_with=other_group`) and a fractional `gpus_per_actor`, so
two roles share the same bundles. `validate_resources` checks the arithmetic against the cluster
before anything is started, with an error that names the numbers.

Time-sharing: every actor also gets `RLHF_BUNDLE_CPUS`, the CPUs of the bundle it runs on (its
host's bundle when colocated), and sizes its torch thread pool with `bundle_threads()`. Colocated
roles therefore each use the whole bundle during their own phase; this is only right because the
RL step runs the phases of roles sharing a bundle one after another (rlhf/rl/trainer.py).
Actors' OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE` unless the driver's environment
sets it): spinning threads of an idle role would steal the cores of the one computing, and on a
busy machine a spinning barrier made a 2-thread training step 7x slower than 1 thread. torch's
OpenMP (libgomp) still spins briefly before it sleeps (`GOMP_SPINCOUNT=30000`, about 0.3 ms,
unless set): fully passive, every one of a step's many small parallel regions paid a wake-up; a
25.6M policy update took 1.11-1.18 s instead of 0.96 s (idle machine) and 2.67 s instead of 2.57 s
(two CPU hogs running; 3.38 s with libgomp's default spinning), 2026-12-02. A spin of 3000 was
still too short: in one process the update took 1.01-1.05 s against 0.93-0.96 s with 30000 (idle;
2.37-2.50 vs 2.31-2.43 s next to two hogs), and the bench's GRPO step at 0.41M 0.163 s against
0.131 s (0.126 s at libgomp's default 300000).
"""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ResourceError(ValueError):
    """The roles ask for more than the cluster has, or for an impossible layout."""


BUNDLE_CPUS_ENV = "RLHF_BUNDLE_CPUS"


def bundle_threads(fallback_cpus: float) -> int:
    """Torch threads for an actor of an `ActorGroup`: the CPUs of its bundle (`RLHF_BUNDLE_CPUS`,
    shared with any colocated roles), else `fallback_cpus`; at least one."""
    cpus = float(os.environ.get(BUNDLE_CPUS_ENV, fallback_cpus))
    return max(1, int(round(cpus)))


def validate_resources(requests: dict[str, dict[str, float]], available: dict[str, float]) -> None:
    """`requests`: role -> {"CPU": total, "GPU": total}; raise when the sum does not fit."""
    for kind in ("CPU", "GPU"):
        need = sum(r.get(kind, 0.0) for r in requests.values())
        have = available.get(kind, 0.0)
        if need > have + 1e-9:
            parts = " + ".join(f"{role} {r.get(kind, 0.0):g}" for role, r in requests.items())
            raise ResourceError(
                f"roles need {need:g} {kind} ({parts}) but the cluster has {have:g}"
            )


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(low: int = 20000) -> int:
    """A port nothing is bound to, for a store that binds it a moment later in another process.

    Drawn at random from [low, start of the kernel's ephemeral range): a port the kernel hands
    out for port 0 is also what it hands to outgoing connections, and a Ray node opens many, so
    such a port could be taken before the store bound it (a re-created rank died with EADDRINUSE
    that way). Ray's worker ports end at 19999 by default. Random, so groups picking at once
    rarely draw the same port; checked by binding the wildcard address."""
    high = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200 if high - low >= 1000 else 0):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # an unusual port range
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _master_address() -> tuple[str, int]:
    return ray.util.get_node_ip_address(), free_port()


class ActorGroup:
    def __init__(
        self,
        actor_cls: type,
        role: str,
        num_actors: int,
        *,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        colocate_with: ActorGroup | None = None,
        actor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_actors < 1:
            raise ResourceError(f"{role}: num_actors={num_actors} must be >= 1")
        self.role, self.num_actors = role, num_actors
        self.owns_pg = colocate_with is None
        if colocate_with is not None:
            if colocate_with.num_actors != num_actors:
                raise ResourceError(
                    f"{role} colocated with {colocate_with.role}: {num_actors} actors vs "
                    f"{colocate_with.num_actors}; colocated roles need the same count"
                )
            self.pg = colocate_with.pg
        else:
            # A fractional share rides on one whole GPU; more than one (a tensor-parallel
            # engine) takes that many whole GPUs in its bundle.
            gpu = max(1.0, gpus_per_actor)
            bundle = {"CPU": cpus_per_actor, **({"GPU": gpu} if gpus_per_actor else {})}
            self.pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy="PACK")
            ray.get(self.pg.ready(), timeout=120)
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        self._remote_cls, self._kwargs = remote_cls, actor_kwargs or {}
        self._cpus = cpus_per_actor if colocate_with is None else 0
        # What the bundle holds, whoever reserved it: colocated roles take turns on all of it.
        self.bundle_cpus = cpus_per_actor if colocate_with is None else colocate_with.bundle_cpus
        self._gpus = gpus_per_actor
        self.restarts = 0  # actors re-created over the group's life
        self.actors: list = [None] * num_actors
        self._spawn(range(num_actors))

    def _spawn(self, ranks: Any) -> None:
        """Start the actors of `ranks` on their bundles; a whole group gets a fresh master port
        (its torch.distributed group is new)."""
        ranks = list(ranks)
        if len(ranks) == self.num_actors or not hasattr(self, "master"):
            self.master = ray.get(
                _master_address.options(scheduling_strategy=self._strategy(0)).remote()
            )
        for rank in ranks:
            self.actors[rank] = self._remote_cls.options(
                num_cpus=self._cpus,
                num_gpus=self._gpus,
                scheduling_strategy=self._strategy(rank),
                runtime_env={
                    "env_vars": {
                        "RANK": str(rank),
                        "WORLD_SIZE": str(self.num_actors),
                        "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": self.master[0],
                        "MASTER_PORT": str(self.master[1]),
                        BUNDLE_CPUS_ENV: str(self.bundle_cpus),
                        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "30000"),
                    }
                },
            ).remote(**self._kwargs)

    def dead_ranks(self, timeout_s: float = 120.0) -> list[int]:
        """Ranks whose actor has died (a call on it fails with RayActorError)."""
        pings = [a.__ray_ready__.remote() for a in self.actors]
        dead = []
        for rank, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=timeout_s)
            except ray.exceptions.RayActorError:
                dead.append(rank)
        return dead

    def restart(self, ranks: list[int] | None = None) -> None:
        """Kill (if still alive) and re-create the actors of `ranks` (default: every rank) on
        the same bundles, and wait until they are ready. Ranks joined in a torch.distributed
        group must be restarted together."""
        ranks = list(range(self.num_actors)) if ranks is None else ranks
        for rank in ranks:
            ray.kill(self.actors[rank], no_restart=True)
        self._spawn(ranks)
        ray.get([self.actors[r].__ray_ready__.remote() for r in ranks])
        self.restarts += len(ranks)

    def _strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=rank
        )

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """The same call on every rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_sliced_async(self, method: str, items: list, **kwargs: Any) -> list[ray.ObjectRef]:
        """Rank r gets the r-th contiguous slice of `items` (sizes differ by at most one)."""
        n, k = len(items), self.num_actors
        bounds = [r * n // k for r in range(k + 1)]
        return [
            getattr(a, method).remote(items[bounds[r] : bounds[r + 1]], **kwargs)
            for r, a in enumerate(self.actors)
        ]

    def kill(self) -> None:
        """Kill the actors and free the bundles (a colocated group leaves its host's group)."""
        for a in self.actors:
            ray.kill(a)
        if self.owns_pg:
            remove_placement_group(self.pg)
