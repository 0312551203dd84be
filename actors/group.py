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
"""

from __future__ import annotations

import socket
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ResourceError(ValueError):
    """The roles ask for more than the cluster has, or for an impossible layout."""


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
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
            bundle = {"CPU": cpus_per_actor, **({"GPU": 1.0} if gpus_per_actor else {})}
            self.pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy="PACK")
            ray.get(self.pg.ready(), timeout=120)
        master = ray.get(_master_address.options(scheduling_strategy=self._strategy(0)).remote())
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        self.actors = [
            remote_cls.options(
                num_cpus=cpus_per_actor if colocate_with is None else 0,
                num_gpus=gpus_per_actor,
                scheduling_strategy=self._strategy(rank),
                runtime_env={
                    "env_vars": {
                        "RANK": str(rank),
                        "WORLD_SIZE": str(num_actors),
                        "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": master[0],
                        "MASTER_PORT": str(master[1]),
                    }
                },
            ).remote(**(actor_kwargs or {}))
            for rank in range(num_actors)
        ]

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
