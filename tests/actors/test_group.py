"""ActorGroup on a real local Ray cluster: placement, ranks, fan-out, resource validation."""

import os
import sys

import pytest
import ray
from ray import cloudpickle

from actors.group import ActorGroup, ResourceError, validate_resources

pytestmark = pytest.mark.ray
# Ray workers cannot import this test module by name: ship the test's classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Echo:
    def env(self):
        return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}

    def take(self, items):
        return list(items)


def test_each_actor_gets_its_rank_and_one_master_address(ray_cluster):
    group = ActorGroup(Echo, "echo", num_actors=2, cpus_per_actor=0.5)
    try:
        envs = ray.get(group.call_async("env"))
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
        assert envs[0]["MASTER_ADDR"] == "127.0.0.1"
        # 5 items over 2 ranks: contiguous slices of sizes 2 and 3
        assert ray.get(group.call_sliced_async("take", list(range(5)))) == [[0, 1], [2, 3, 4]]
    finally:
        group.kill()


def test_a_colocated_role_shares_the_placement_group(ray_cluster):
    first = ActorGroup(Echo, "policy", num_actors=2, cpus_per_actor=0.5)
    second = ActorGroup(Echo, "reference", num_actors=2, colocate_with=first)
    try:
        assert second.pg.id == first.pg.id
        assert [e["RANK"] for e in ray.get(second.call_async("env"))] == ["0", "1"]
        with pytest.raises(ResourceError, match="colocated roles need the same count"):
            ActorGroup(Echo, "critic", num_actors=1, colocate_with=first)
    finally:
        second.kill()
        first.kill()
    # Killing the groups gave every bundle back: the whole cluster is free again.
    ray.get(ray.remote(num_cpus=2)(lambda: None).remote(), timeout=60)


class Threads:
    def threads(self):
        import torch

        from actors.group import bundle_threads

        torch.set_num_threads(bundle_threads(0.25))  # as every role actor's set-up does
        return os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"], torch.get_num_threads()


def test_colocated_roles_each_size_their_threads_to_the_whole_bundle(ray_cluster):
    host = ActorGroup(Threads, "policy", num_actors=1, cpus_per_actor=2)
    rider = ActorGroup(Threads, "reference", num_actors=1, cpus_per_actor=0.25, colocate_with=host)
    try:
        assert rider.bundle_cpus == host.bundle_cpus == 2
        # Both get the bundle's 2 CPUs (not the rider's 0.25), and idle OpenMP threads sleep
        # after a short spin.
        assert ray.get(host.call_async("threads") + rider.call_async("threads")) == [
            ("PASSIVE", "30000", 2),
            ("PASSIVE", "30000", 2),
        ]
    finally:
        rider.kill()
        host.kill()


def test_resource_arithmetic_is_checked_before_anything_starts():
    validate_resources({"policy": {"CPU": 1}, "rollout": {"CPU": 1}}, {"CPU": 2.0})
    with pytest.raises(
        ResourceError,
        match=r"roles need 4 GPU \(policy 2 \+ critic 2\) but the "
        r"cluster has 2",
    ):
        validate_resources({"policy": {"GPU": 2}, "critic": {"GPU": 2}}, {"CPU": 8, "GPU": 2})
