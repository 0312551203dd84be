"""Shared fixtures: one embedded Ray cluster (loopback only) for every test that needs Ray."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    from rlhf.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=2, object_store_memory_gb=1.0)
    yield
    shutdown_ray()
