"""Ray runtime: which cluster is joined, and an embedded cluster that listens on loopback only."""

import json
import os
import subprocess
import sys

import pytest

from rlhf.runtime import (
    cluster_address,
    embedded_cluster,
    init_ray,
    is_loopback,
    listening_sockets,
)


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

    # The ray_cluster fixture joins RAY_ADDRESS when it is set: then this test would check a
    # cluster it did not start. Fail, saying so, rather than skip and prove nothing.
    assert cluster_address() is None, "unset RAY_ADDRESS: this test checks the embedded cluster"

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
    assert embedded_cluster() == {"dashboard": False}  # the conftest's cluster, started here


@pytest.mark.ray
def test_a_stage_on_the_embedded_cluster_runs_ray_train_without_its_cluster_helpers(ray_cluster):
    from rlhf.train.trainer import ray_train_env

    env = ray_train_env()
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert env["RAY_TRAIN_METRICS_ENABLED"] == "0"  # no dashboard: nothing reads them
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


@pytest.mark.ray
def test_a_stage_on_a_joined_cluster_keeps_ray_trains_defaults(ray_cluster, monkeypatch):
    """A cluster this process joined may span nodes that get preempted: Ray's defaults stay."""
    import rlhf.runtime
    from rlhf.train.trainer import ray_train_env

    monkeypatch.setattr(rlhf.runtime, "_embedded", {})  # as after init_ray(address=...)
    assert embedded_cluster() is None
    assert ray_train_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


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
from rlhf.train.trainer import ray_train_env
print(json.dumps({"state_api": isinstance(actors, list), "sockets": listening_sockets(),
                  "train_env": ray_train_env()}))
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
    # Ray Train keeps its metrics where a dashboard serves; no preemption watcher on one machine.
    assert "RAY_TRAIN_METRICS_ENABLED" not in result["train_env"]
    assert result["train_env"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert len(result["sockets"]) > 3, result["sockets"]  # GCS, raylet, dashboard, agents
    exposed = [s for s in result["sockets"] if not is_loopback(s[2])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


_PROCESS_GROUP_PROBE = """
import json, os, socket, sys
from rlhf.runtime import bind_stores_to_loopback, listening_sockets
if sys.argv[1] == "hook-first":  # as in a Ray worker: before anything imports torch
    bind_stores_to_loopback()
    assert "torch" not in sys.modules
import torch.distributed as dist
if sys.argv[1] == "hook":
    bind_stores_to_loopback()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
dist.all_reduce(__import__("torch").ones(1))
print(json.dumps({"sockets": listening_sockets(), "gloo": os.environ.get("GLOO_SOCKET_IFNAME")}))
"""


def _process_group_sockets(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROCESS_GROUP_PROBE, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_worker_hook_makes_a_process_groups_store_listen_on_its_loopback_address_only():
    """torch's TCPStore master binds all interfaces whatever MASTER_ADDR says; with the hook
    Ray workers run at start, it listens on the loopback MASTER_ADDR only."""
    plain = _process_group_sockets("plain")
    assert [s for s in plain["sockets"] if not is_loopback(s[2])], plain  # what the hook fixes
    for mode in ("hook", "hook-first"):  # torch.distributed imported before / after the hook
        hooked = _process_group_sockets(mode)
        assert hooked["sockets"] and hooked["gloo"]  # the store listens; gloo is on loopback
        assert [s for s in hooked["sockets"] if not is_loopback(s[2])] == [], (mode, hooked)


@pytest.mark.ray
@pytest.mark.e2e
def test_a_training_stage_without_held_out_files_trains_and_its_workers_listen_on_loopback_only(
    tmp_path, ray_cluster
):
    """Ray Train workers: rank 0's torch.distributed store and gloo bind loopback; `sft.eval_files:
    []` trains without evaluation (it used to fail loading the empty held-out split)."""
    import threading
    import time
    from pathlib import Path

    from rlhf.config import load_config
    from rlhf.driver import base_model
    from rlhf.train.trainer import run_stage

    # The ray_cluster fixture joins RAY_ADDRESS when it is set: then this test would check a
    # cluster it did not start. Fail, saying so, rather than skip and prove nothing.
    assert cluster_address() is None, "unset RAY_ADDRESS: this test checks the embedded cluster"
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(
        repo / "configs/tiny_cpu.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "run.stages=[sft]",
            "model.tiny.hidden_size=32",
            "model.tiny.num_layers=1",
            "model.tiny.num_heads=1",
            "model.tiny.num_kv_heads=1",
            "model.tiny.intermediate_size=32",
            "sft.eval_files=[]",
            "sft.max_steps=2",
            "sft.warmup_steps=1",
            "sft.micro_batch_size=2",
            "sft.global_batch_size=8",
            "sft.eval_interval=1",
            "sft.log_interval=1",
        ],
    )
    seen: set = set()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen.update(listening_sockets())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run_stage(cfg, "sft", base_model(cfg))
    finally:
        done.set()
        sampler.join()
    workers = [s for s in seen if "RayTrainWorker" in s[1]]
    assert workers, sorted(seen)  # the sampler saw the workers' own listeners (store, gloo)
    exposed = sorted(s for s in seen if not is_loopback(s[2]))
    assert exposed == [], f"listening beyond loopback: {exposed}"
    lines = (Path(summary["model"]).parent / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows if "step" in r] == [1, 2]
    assert not any(k.startswith("sft/eval_") for r in rows for k in r), rows
    assert summary["data"]["eval"]["samples"] == 0
