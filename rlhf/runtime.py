"""Starting or joining Ray: an embedded single-node cluster bound to loopback, or an existing one.

    from rlhf.runtime import init_ray, shutdown_ray
    init_ray(num_cpus=2, object_store_memory_gb=1.0)   # embedded: every port on 127.0.0.1
    ...
    shutdown_ray()

Which cluster, in order: the `address` argument; `RAY_ADDRESS` (set by the user, or by
`ray job submit` for its entrypoint, which also sets RAY_JOB_CONFIG_JSON_ENV_VAR); otherwise a new
embedded cluster in this process.

Loopback binding: Ray 2.60 has no bind-address option on Linux; every server (GCS, raylet, core
workers, dashboard agent, runtime-env agent, metrics ports) binds to the node IP when that IP is a
loopback address, and to all interfaces otherwise. The node IP is the machine's routable address
unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the single-machine mode Ray uses on macOS and
Windows), in which case it is 127.0.0.1. `init_ray` turns that mode on for embedded clusters (and
checks the node IP afterwards) and for joining a cluster at a loopback address, which Ray would
otherwise rewrite to the routable address, where nothing listens.

torch.distributed follows no node IP: rank 0's TCPStore (every process group's rendezvous: Ray
Train workers, RL role actors) listens on all interfaces whatever MASTER_ADDR says, and gloo on
the address the host name resolves to. In loopback mode every Ray worker of the job therefore runs
`bind_stores_to_loopback` at start (`worker_process_setup_hook`): a store whose MASTER_ADDR is a
loopback address listens there only, and gloo uses the loopback interface (GLOO_SOCKET_IFNAME).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

# Read by ray._private.ray_constants at import time; `_loopback_only` also covers a late import.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set by `ray job submit` in the entrypoint's environment, next to RAY_ADDRESS.
JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What SINGLE_MACHINE_ENV held before `_loopback_only` set it; `shutdown_ray` puts it back.
_saved_env: list[str | None] = []
# The embedded cluster this process started ({"dashboard": bool}); empty when it joined one.
_embedded: dict[str, bool] = {}


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS, else "auto" under `ray job submit`.

    None means: start an embedded cluster.
    """
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if os.environ.get(JOB_SUBMISSION_ENV):
        return "auto"
    return None


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory_gb: float = 1.0,
    dashboard: bool = False,
    runtime_env: dict | None = None,
) -> str:
    """Start the embedded cluster or join an existing one; return the address joined.

    Idempotent: when Ray is already initialised in this process nothing changes. `num_cpus`,
    `object_store_memory_gb` and `dashboard` apply only to an embedded cluster (the dashboard, if
    asked for, serves on 127.0.0.1). Usage statistics are never sent.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    join = cluster_address(address)
    if join is not None:
        if _is_loopback_cluster(join):
            _loopback_only()  # else Ray rewrites 127.0.0.1 to this machine's routable address
            runtime_env = _with_loopback_hook(runtime_env)
            _local_token_auth()
        ray.init(address=join, runtime_env=runtime_env)
        return join
    _loopback_only()
    runtime_env = _with_loopback_hook(runtime_env)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=int(object_store_memory_gb * 2**30),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
    )
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(f"embedded Ray took node IP {node_ip}, not loopback; refusing to run")
    _embedded.update(dashboard=dashboard)
    return ray.get_runtime_context().gcs_address


def embedded_cluster() -> dict[str, bool] | None:
    """{"dashboard": whether it serves one} when this process started the cluster it is connected
    to (`init_ray` without an address: one machine, loopback only); None when it joined one."""
    import ray

    return dict(_embedded) if _embedded and ray.is_initialized() else None


def shutdown_ray() -> None:
    """Disconnect from Ray (an embedded cluster stops with it) and undo the loopback mode.

    A no-op when Ray is not initialised.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _embedded.clear()
    if _saved_env:
        from ray._private import ray_constants

        previous = _saved_env.pop()
        if previous is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
            ray_constants.ENABLE_RAY_CLUSTER = not ray_constants.IS_WINDOWS_OR_OSX
        else:
            os.environ[SINGLE_MACHINE_ENV] = previous
            ray_constants.ENABLE_RAY_CLUSTER = previous != "0"


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1); False for 0.0.0.0/::."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening_sockets(pid: int | None = None) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every listening TCP socket of a process and its children.

    `pid=None` is this process: with an embedded cluster that covers every Ray process (GCS,
    raylet, agents, workers), and an in-process vLLM engine.
    """
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.NoSuchProcess:  # exited meanwhile
            continue
        found += [
            (proc.pid, name, c.laddr.ip, c.laddr.port)
            for c in conns
            if c.status == psutil.CONN_LISTEN
        ]
    return found


def _local_token_auth() -> None:
    """A cluster on this machine's loopback gets this machine's token, as Ray does for "auto".

    A new local cluster (`ray.init()`, e.g. `rlhf serve`'s) turns token auth on by default with
    the token in ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH]); Ray sends it only when it found
    the cluster itself ("auto"), never to an explicit address. A loopback address is this
    machine: unless RAY_AUTH_MODE says otherwise, token mode when a token is available."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _is_loopback_cluster(address: str) -> bool:
    """Whether `address` ("host:port", or "auto": the latest local cluster) is on loopback."""
    if address.startswith("ray://"):  # Ray Client: no local node, nothing binds here
        return False
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            address = get_ray_address_from_environment("auto", None) or ""
        except ConnectionError:  # no cluster running: ray.init reports it
            return False
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or is_loopback(host)
    except ValueError:  # a host name
        return False


def _loopback_only() -> None:
    """Make Ray pick 127.0.0.1 as the node IP (its macOS/Windows single-machine mode).

    The environment variable reaches every process Ray starts; the constant is set too in case
    Ray was imported before this ran (it reads the variable once, at import).
    """
    if not _saved_env:
        _saved_env.append(os.environ.get(SINGLE_MACHINE_ENV))
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _with_loopback_hook(runtime_env: dict | None) -> dict:
    """The job's runtime env plus the loopback hook (a hook of the caller's own is kept)."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", "rlhf.runtime.bind_stores_to_loopback")
    return env


def _loopback_interface() -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return None


RENDEZVOUS = "torch.distributed.rendezvous"


def bind_stores_to_loopback() -> None:
    """Worker start-up hook: rank 0's TCPStore listens on a loopback MASTER_ADDR only; gloo binds
    the loopback interface.

    torch's `init_process_group` (env:// and tcp://) creates its store in
    `rendezvous._create_c10d_store`, whose master binds the wildcard; here the master gets a socket
    already bound to MASTER_ADDR (`master_listen_fd`). Other addresses are left as they were.

    The patch waits for torch.distributed's first import (`_AfterImport`): most processes of a
    job (Ray Train's controller and helpers, the driver's helpers) never form a process group,
    and importing torch in each cost a stage ~3 s of start-up (2026-12-02).
    """
    import sys

    iface = _loopback_interface()
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    if RENDEZVOUS in sys.modules:
        _patch_rendezvous()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(RENDEZVOUS, _patch_rendezvous))


class _AfterImport:
    """A `sys.meta_path` finder that runs `then()` right after module `name` first executes
    (it finds the module with the other finders, then wraps its loader's `exec_module`)."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        import importlib.util
        import sys

        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            self.then()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch_rendezvous() -> None:
    import importlib
    import socket

    from torch.distributed import TCPStore

    # By module path: `torch.distributed.rendezvous` the attribute is a function of that name.
    rendezvous = importlib.import_module(RENDEZVOUS)
    create = rendezvous._create_c10d_store
    if getattr(create, "loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        host = "127.0.0.1" if hostname == "localhost" else hostname
        try:
            on_loopback = is_loopback(host)
        except ValueError:  # a host name
            on_loopback = False
        if rank != 0 or not on_loopback or rendezvous._torchelastic_use_agent_store():
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        return TCPStore(
            hostname,
            port,
            world_size,
            True,
            timeout,
            multi_tenant=True,
            master_listen_fd=sock.detach(),  # the store owns the socket from here
            use_libuv=use_libuv,
        )

    create_store.loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store
