"""KubeRay manifests from a config: a RayJob that runs `rlhf run`, or a long-lived RayCluster.

    rlhf kuberay configs/qwen2.5_1.5b_gpu.yaml --image registry/rlhf:1.0 > rayjob.yaml
    rlhf kuberay configs/tiny_cpu.yaml sft.max_steps=50 --cluster > raycluster.yaml
    kubectl create secret generic rlhf-ray-token --from-literal=auth_token=$(openssl rand -hex 32)
    kubectl apply -f rayjob.yaml

Pure: config in, dicts out (`rayjob`, `raycluster`); nothing here talks to Kubernetes or Ray.
Worker groups follow the config: one group `train` for the Ray Train stages, sized by the largest
stage that runs (num_workers pods of cpus_per_worker CPUs and one GPU each with use_gpu), and for
the RL stage one group per placement group (a role, or a `rl.colocate` group), one pod per actor or
engine with its bundle's CPUs (rounded up) and one GPU when the role has a GPU share. Stages run one
after another, so the in-tree autoscaler (minReplicas 0) removes a group's pods while it idles.
The head runs only the driver (`num-cpus: 0`). Every Ray container and the submitter get
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret; a PVC is mounted at `run.output_dir` on every
pod (workers write checkpoints there). The image must hold this project installed (`pip install .`)
with its `configs/` in the working directory, or pass `--working-dir` (a zip URI) for the code.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath

import yaml

from rlhf.config import Config

API_VERSION = "ray.io/v1"
TOKEN_KEY = "auth_token"  # key of the token in the Secret
SHARED_VOLUME = "runs"


@dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group: `replicas` pods of `cpus` CPUs and `gpus` GPUs each."""

    name: str
    replicas: int
    cpus: int
    gpus: int


@dataclass(frozen=True)
class Options:
    """Cluster-side settings the config does not hold (all have flags in `rlhf kuberay`)."""

    image: str = "rlhf:latest"
    namespace: str = "default"
    name: str | None = None  # None: from run.name
    pvc: str = "rlhf-runs"  # claim mounted at run.output_dir (ReadWriteMany: every pod writes)
    mount_path: str = "/mnt/rlhf-runs"  # for a relative run.output_dir
    token_secret: str = "rlhf-ray-token"
    memory_per_cpu_gb: int = 4
    head_cpus: int = 4
    head_memory_gb: int = 16
    ttl_seconds: int = 600
    working_dir: str | None = None  # runtime_env working_dir (a zip URI); None: the image's code
    mounts: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # extra (claim, path)


def dns_name(text: str) -> str:
    """A Kubernetes object name from `text`: lower case, [a-z0-9-], at most 40 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    return name or "rlhf"


def _rl_groups(cfg: Config) -> list[WorkerGroup]:
    rl = cfg.rl
    needed = rl.roles()
    groups = []
    for host, totals in rl.resource_requests().items():
        count = rl.rollout.num_engines if host == "rollout" else getattr(rl, host).num_actors
        members = next(([r for r in g if r in needed] for g in rl.colocate if host in g), [host])
        groups.append(
            WorkerGroup(
                name="rl-" + "-".join(members).replace("_", "-"),
                replicas=count,
                cpus=max(1, math.ceil(totals["CPU"] / count - 1e-9)),
                gpus=round(totals["GPU"] / count),
            )
        )
    return groups


def worker_groups(cfg: Config) -> list[WorkerGroup]:
    """The worker groups the configured stages need (see the module docstring)."""
    train = [s for s in cfg.run.stages if s != "rl"]
    groups = []
    if train:
        specs = [getattr(cfg, s) for s in train]
        groups.append(
            WorkerGroup(
                name="train",
                replicas=max(s.num_workers for s in specs),
                cpus=max(s.cpus_per_worker for s in specs),
                gpus=1 if any(s.use_gpu for s in specs) else 0,
            )
        )
    if "rl" in cfg.run.stages:
        groups += _rl_groups(cfg)
    return groups


def output_mount(cfg: Config, opts: Options) -> tuple[str, list[str]]:
    """(where the shared volume is mounted, overrides the entrypoint adds for it)."""
    if PurePosixPath(cfg.run.output_dir).is_absolute():
        return cfg.run.output_dir, []
    return opts.mount_path, [f"run.output_dir={opts.mount_path}"]


def entrypoint(config_path: str, overrides: list[str]) -> str:
    """The job's command: `rlhf run CONFIG [overrides]`, shell-quoted."""
    return shlex.join(["rlhf", "run", config_path, *overrides])


def _env(opts: Options) -> list[dict]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": opts.token_secret, "key": TOKEN_KEY}},
        },
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]


def _resources(cpus: int, memory_gb: int, gpus: int) -> dict:
    amount = {"cpu": str(cpus), "memory": f"{memory_gb}Gi"}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def _pod(container: str, resources: dict, mount: str, opts: Options, ports=None) -> dict:
    claims = [(opts.pvc, mount), *opts.mounts]
    volumes = [
        {"name": f"{SHARED_VOLUME}-{i}", "persistentVolumeClaim": {"claimName": claim}}
        for i, (claim, _) in enumerate(claims)
    ]
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})  # Ray's object store
    mounts = [{"name": f"{SHARED_VOLUME}-{i}", "mountPath": p} for i, (_, p) in enumerate(claims)]
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    spec = {
        "name": container,
        "image": opts.image,
        "env": _env(opts),
        "resources": resources,
        "volumeMounts": mounts,
    }
    if ports:
        spec["ports"] = ports
    return {"spec": {"containers": [spec], "volumes": volumes}}


def cluster_spec(cfg: Config, opts: Options) -> dict:
    """spec.rayClusterSpec of a RayJob, or spec of a RayCluster."""
    mount, _ = output_mount(cfg, opts)
    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    try:
        ray_version = version("ray")
    except PackageNotFoundError:  # the manifest is still valid without it
        ray_version = None
    spec: dict = {}
    if ray_version:
        spec["rayVersion"] = ray_version
    spec["enableInTreeAutoscaling"] = True
    spec["headGroupSpec"] = {
        "rayStartParams": {"num-cpus": "0"},  # the driver only; training runs on workers
        "template": _pod(
            "ray-head",
            _resources(opts.head_cpus, opts.head_memory_gb, 0),
            mount,
            opts,
            head_ports,
        ),
    }
    spec["workerGroupSpecs"] = []
    for g in worker_groups(cfg):
        params = {"num-cpus": str(g.cpus)}
        if g.gpus:
            params["num-gpus"] = str(g.gpus)
        memory = g.cpus * opts.memory_per_cpu_gb
        spec["workerGroupSpecs"].append(
            {
                "groupName": g.name,
                "replicas": g.replicas,
                "minReplicas": 0,
                "maxReplicas": g.replicas,
                "rayStartParams": params,
                "template": _pod("ray-worker", _resources(g.cpus, memory, g.gpus), mount, opts),
            }
        )
    return spec


def _metadata(cfg: Config, opts: Options) -> dict:
    return {
        "name": opts.name or dns_name(cfg.run.name),
        "namespace": opts.namespace,
        "labels": {"app.kubernetes.io/name": "rlhf", "rlhf/run": dns_name(cfg.run.name)},
    }


def rayjob(cfg: Config, config_path: str, overrides: list[str], opts: Options) -> dict:
    """A RayJob: a cluster shaped by the config that runs `rlhf run` once, then goes away."""
    _, extra = output_mount(cfg, opts)
    runtime_env: dict = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if opts.working_dir:
        runtime_env["working_dir"] = opts.working_dir
    submitter = {
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": opts.image,
                    "env": _env(opts),
                    "resources": _resources(1, 1, 0),
                }
            ],
        }
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(cfg, opts),
        "spec": {
            "entrypoint": entrypoint(config_path, [*overrides, *extra]),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_seconds,
            "submitterPodTemplate": submitter,
            "rayClusterSpec": cluster_spec(cfg, opts),
        },
    }


def raycluster(cfg: Config, opts: Options) -> dict:
    """A long-lived RayCluster of the same shape; submit runs to it with `ray job submit`."""
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(cfg, opts),
        "spec": cluster_spec(cfg, opts),
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML) as `|` blocks."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def to_yaml(manifest: dict, header: str = "") -> str:
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()) + body


def header(manifest: dict, command: str, opts: Options) -> str:
    """How the manifest was made and what it needs before `kubectl apply`."""
    return (
        f"KubeRay {manifest['kind']} made by (run it again to regenerate this file):\n"
        f"  {command}\n"
        f"Needs in namespace {opts.namespace}: ReadWriteMany claims "
        f"{', '.join([opts.pvc, *(c for c, _ in opts.mounts)])}, and the Ray token Secret:\n"
        f"  kubectl create secret generic {opts.token_secret} "
        f"--from-literal={TOKEN_KEY}=$(openssl rand -hex 32)"
    )


# ---- `rlhf kuberay` (wired in rlhf/cli.py) ---------------------------------------------------


def add_parser(sub) -> None:
    d = Options()
    p = sub.add_parser("kuberay", help="print a KubeRay RayJob (or --cluster: RayCluster) as YAML")
    p.add_argument("config", help="YAML file of overrides, e.g. configs/qwen2.5_1.5b_gpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, passed on to `rlhf run`")
    p.add_argument("--cluster", action="store_true", help="a long-lived RayCluster instead")
    p.add_argument("--image", default=d.image, help="image with this project installed")
    p.add_argument("--namespace", default=d.namespace, help="Kubernetes namespace")
    p.add_argument("--name", help="object name (default: from run.name)")
    p.add_argument("--pvc", default=d.pvc, help="ReadWriteMany claim mounted at run.output_dir")
    p.add_argument(
        "--mount-path",
        default=d.mount_path,
        help="where the claim goes if run.output_dir is relative",
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="CLAIM:PATH",
        help="another claim to mount on every pod (models, data), e.g. models:/mnt/models",
    )
    p.add_argument("--token-secret", default=d.token_secret, help="Secret with key auth_token")
    p.add_argument("--memory-per-cpu-gb", type=int, default=d.memory_per_cpu_gb)
    p.add_argument("--head-cpus", type=int, default=d.head_cpus)
    p.add_argument("--head-memory-gb", type=int, default=d.head_memory_gb)
    p.add_argument("--ttl-seconds", type=int, default=d.ttl_seconds, help="RayJob: keep after end")
    p.add_argument("--working-dir", help="runtime_env working_dir URI (zip) with the code")


def options_from_args(args) -> Options:
    from rlhf.config import ConfigError

    mounts = []
    for spec in args.mount:
        claim, sep, path = spec.partition(":")
        if not sep or not claim or not path.startswith("/"):
            raise ConfigError(f"--mount {spec!r}: expected CLAIM:/absolute/path")
        mounts.append((claim, path))
    return Options(
        image=args.image,
        namespace=args.namespace,
        name=args.name,
        pvc=args.pvc,
        mount_path=args.mount_path,
        token_secret=args.token_secret,
        memory_per_cpu_gb=args.memory_per_cpu_gb,
        head_cpus=args.head_cpus,
        head_memory_gb=args.head_memory_gb,
        ttl_seconds=args.ttl_seconds,
        working_dir=args.working_dir,
        mounts=tuple(mounts),
    )


def command_line(args) -> str:
    """`rlhf kuberay ...` as given (flags at their defaults left out)."""
    words = ["rlhf", "kuberay", args.config, *args.overrides]
    defaults = Options()
    for flag in ("image", "namespace", "name", "pvc", "mount_path", "token_secret"):
        if getattr(args, flag) not in (None, getattr(defaults, flag)):
            words += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    for flag in ("memory_per_cpu_gb", "head_cpus", "head_memory_gb", "ttl_seconds"):
        if getattr(args, flag) != getattr(defaults, flag):
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for spec in args.mount:
        words += ["--mount", spec]
    if args.working_dir:
        words += ["--working-dir", args.working_dir]
    if args.cluster:
        words.append("--cluster")
    return shlex.join(words)


def run_command(cfg: Config, args) -> int:
    opts = options_from_args(args)
    if args.cluster:
        manifest = raycluster(cfg, opts)
    else:
        manifest = rayjob(cfg, args.config, args.overrides, opts)
    print(to_yaml(manifest, header(manifest, command_line(args), opts)), end="")
    return 0
