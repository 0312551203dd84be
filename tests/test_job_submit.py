"""`ray job submit` as users run it: a real Ray head on loopback with token auth, the CLI as client.

The head is a separate `ray start --head` (own temp dir, own ports, its own token), not the
session-wide embedded `ray_cluster`; the clients are the `ray` CLI in subprocesses and the Jobs
REST API. A job is stopped with `ray job stop` after the stage's first checkpoint, and the same
command submitted again resumes from that checkpoint and finishes. The head's processes are ended
at the end, found by its temp dir (never `ray stop`, which ends every Ray process on the machine).

    .venv/bin/python -m pytest -q tests/test_job_submit.py
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from rlhf.train.checkpoint import CheckpointError, newest_valid_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
]
MAX_STEPS = 6


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _end_processes_under(temp_dir: str) -> None:
    """End the processes of the head started in `temp_dir` (their command lines name it)."""
    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != me and temp_dir in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with token auth; yields (dashboard address, client environment)."""
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit on a socket path).
    temp_dir = tempfile.mkdtemp(prefix="rlhf-job-", dir="/tmp")
    gcs, dashboard, agent, client = _free_ports(4)
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the nodes' `rlhf`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1 (see rlhf/runtime.py)
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",  # default 52365 would collide with others
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--object-store-memory=500000000",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    try:  # killing a worker while DeepSpeed JIT-builds its op leaves a stale torch_extensions lock:
        # the job is stopped only after its first checkpoint, so that happens only on a failure
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _end_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submit(address: str, env: dict, job_id: str, entrypoint: list[str], *flags: str):
    """`ray job submit`, retried while the head's job agent is still starting."""
    runtime_env = json.dumps({"excludes": [".venv", "runs", ".git", "**/__pycache__"]})
    args = ["job", "submit", "--address", address, "--submission-id", job_id]
    args += ["--working-dir", str(REPO), "--runtime-env-json", runtime_env, *flags, "--"]
    deadline = time.time() + 90
    while True:
        done = _ray(env, *args, *entrypoint, timeout=300)
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline:
            return done
        time.sleep(2)


def _has_valid_checkpoint(folder: Path) -> bool:
    try:  # the first checkpoint may be half-copied: "none validates" is an error there
        return newest_valid_checkpoint(sorted(folder.glob("checkpoint_*"))) is not None
    except CheckpointError:
        return False


def _status(address: str, env: dict, job_id: str) -> str:
    """The job's status from the Jobs REST API (what the CLI and SDK call), with the token."""
    request = urllib.request.Request(
        f"{address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def test_a_submitted_run_stopped_after_its_first_checkpoint_resumes_when_submitted_again(
    tmp_path, ray_head
):
    address, env = ray_head
    out = tmp_path / "runs"  # absolute: the job's working dir is a copy, outputs must not be
    entrypoint = [
        "rlhf",
        "run",
        "configs/tiny_cpu.yaml",
        f"run.output_dir={out}",
        "run.name=job",
        "run.stages=[sft]",
        *TINY,
        "sft.num_workers=1",
        "sft.micro_batch_size=2",
        "sft.global_batch_size=8",
        f"sft.max_steps={MAX_STEPS}",
        "sft.warmup_steps=1",
        "sft.save_interval=1",
        f"sft.eval_interval={MAX_STEPS}",
        "sft.log_interval=1",
        "eval.num_prompts=4",
        "eval.samples=0",
    ]

    # A client without the cluster's token is turned away.
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    refused = _ray(wrong, "job", "list", "--address", address)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()

    first = _submit(address, env, "first", entrypoint, "--no-wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpts = out / "job/ray_train/sft"
    deadline = time.time() + 480
    next_status = 0.0
    while not _has_valid_checkpoint(ckpts):
        if time.time() > next_status:
            status = _status(address, env, "first")
            if status not in ("PENDING", "RUNNING"):
                logs = _ray(env, "job", "logs", "--address", address, "first").stdout
                pytest.fail(f"job first is {status} before its first checkpoint:\n{logs[-3000:]}")
            next_status = time.time() + 5
        assert time.time() < deadline, "no checkpoint within 480 s"
        time.sleep(0.5)
    stopped = _ray(env, "job", "stop", "--address", address, "first", timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert _status(address, env, "first") == "STOPPED"
    assert not (out / "job/sft/done.json").exists(), "stopped too late: the stage had finished"

    second = _submit(address, env, "second", entrypoint)  # waits, streaming the job's log
    logs = second.stdout + second.stderr
    assert second.returncode == 0, logs[-4000:]
    assert _status(address, env, "second") == "SUCCEEDED"
    assert "== sft: resuming from" in logs

    rows = [json.loads(x) for x in (out / "job/sft/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r]
    assert steps.count(1) == 1 and steps[-1] == MAX_STEPS  # continued, not restarted at step 0
    summary = json.loads((out / "job/summary.json").read_text())
    assert summary["stages"]["sft"]["model"] == str(out / "job/sft/model")
    assert (out / "job/sft/model/config.json").is_file()
    assert (out / "job/sft/model/model.safetensors").is_file()
