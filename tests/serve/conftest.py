"""Fixtures of the serving tests: a tiny vLLM-loadable policy and a real PostgreSQL server.

The PostgreSQL server is Debian's `postgresql` package (the Makefile bootstrap installs it where
missing), started by the test in a temporary folder on a free loopback port and stopped after the
module. Its binaries missing is a failure, not a skip: the multi-node feedback path must be tested.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from actors.group import free_port
from rlhf.models.factory import ensure_tiny_model

# Head size 32 (64 / 2): the smallest vLLM's CPU attention accepts.
TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("serve_models") / "tiny", seed=0, **TINY)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    if shutil.which("pg_ctl"):
        return Path(shutil.which("pg_ctl")).parent
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql "
        "package (`make venv` does it as root: apt-get install -y postgresql)"
    )


@pytest.fixture(scope="module")
def postgres_url():
    """postgresql+psycopg URL of a fresh server owned by this test module."""
    bindir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "rlhf", "--auth=trust", "-E", "UTF8")
    options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200 -c fsync=on"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(root / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql+psycopg://rlhf@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"])
        shutil.rmtree(root, ignore_errors=True)
