"""Ray runtime: which cluster is joined, and an embedded cluster that listens on loopback only."""

import json
import os
import subprocess
import sys

import pytest

from rlhf.runtime import cluster_address, init_ray, is_loopback, listening_sockets


def test_cluster_address_prefers_the_argument_then_ray_address_then_job_submission(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert cluster_address() is None  # embedded
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # `ray job submit`
    assert cluster_address() == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address() == "10.0.0.5:6379"
    assert cluster_address("ray://head:10001") == "ray://head:10001"


def test_loopback_check_accepts_only_loopback_addresses():
    for ip in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    # The wildcards Ray binds by default, and a routable address.
    for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fe80::1%eth0"):
        assert not is_loopback(ip), ip


@pytest.mark.ray
def test_embedded_ray_runs_a_task_and_every_process_listens_on_loopback_only(ray_cluster):
    import ray

    if cluster_address() is not None:
        pytest.skip("joined an external cluster; its binding is not ours to check")

    @ray.remote
    def add_one(x: int) -> int:
        return x + 1

    assert ray.get(add_one.remote(41)) == 42
    sockets = listening_sockets()
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, names  # the check saw Ray's own servers
    exposed = [s for s in sockets if not is_loopback(s[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


@pytest.mark.ray
def test_init_ray_a_second_time_keeps_the_running_cluster(ray_cluster):
    import ray

    address = ray.get_runtime_context().gcs_address
    assert init_ray(num_cpus=1) == address
    assert ray.get_runtime_context().gcs_address == address


def test_a_cluster_at_a_loopback_address_is_joined_in_loopback_mode():
    from rlhf.runtime import _is_loopback_cluster

    for address in ("127.0.0.1:6379", "localhost:6379", "[::1]:6379"):
        assert _is_loopback_cluster(address), address
    for address in ("10.0.0.5:6379", "head-node:6379", "ray://127.0.0.1:10001"):
        assert not _is_loopback_cluster(address), address


_DASHBOARD_PROBE = """
import json
from rlhf.runtime import init_ray, listening_sockets
address = init_ray(num_cpus=1, object_store_memory_gb=0.2, dashboard=True)
from ray.util.state import list_actors
actors = list_actors(address=address, raise_on_missing_output=False)  # what Ray Train's cleaner polls
print(json.dumps({"state_api": isinstance(actors, list), "sockets": listening_sockets()}))
"""


@pytest.mark.ray
def test_embedded_ray_with_dashboard_serves_the_state_api_on_loopback_only():
    """The driver's default (`ray.dashboard: true`): dashboard and agents bind loopback too."""
    out = subprocess.run(
        [sys.executable, "-c", _DASHBOARD_PROBE],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["state_api"]
    assert len(result["sockets"]) > 3, result["sockets"]  # GCS, raylet, dashboard, agents
    exposed = [s for s in result["sockets"] if not is_loopback(s[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
