"""`rlhf kuberay`: manifests that match the config, use KubeRay's field names and stay current."""

import math
import shlex
from pathlib import Path

import pytest
import yaml

from rlhf import kuberay
from rlhf.cli import build_parser, main
from rlhf.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_cpu.yaml"
GPU = "configs/qwen2.5_1.5b_gpu.yaml"

# Allowed keys, from the json tags of KubeRay's ray.io/v1 Go types (ray-operator/apis/ray/v1/
# rayjob_types.go, raycluster_types.go) and the Kubernetes core/v1 fields we use. A dict maps a
# key to the schema of its value; [schema] is a list of those; None is a leaf or a free-form map.
# REQUIRED: the fields whose json tag has no `omitempty` (the CRD schema requires them).
META = {"name": None, "namespace": None, "labels": None, "annotations": None}
ENV_VAR = {
    "name": None,
    "value": None,
    "valueFrom": {"secretKeyRef": {"name": None, "key": None, "optional": None}},
}
CONTAINER = {
    "name": None,
    "image": None,
    "command": None,
    "args": None,
    "env": [ENV_VAR],
    "resources": {"requests": None, "limits": None},
    "volumeMounts": [{"name": None, "mountPath": None, "readOnly": None, "subPath": None}],
    "ports": [{"containerPort": None, "name": None, "protocol": None}],
}
VOLUME = {
    "name": None,
    "persistentVolumeClaim": {"claimName": None, "readOnly": None},
    "emptyDir": {"medium": None, "sizeLimit": None},
}
POD_TEMPLATE = {
    "metadata": META,
    "spec": {
        "containers": [CONTAINER],
        "volumes": [VOLUME],
        "restartPolicy": None,
        "nodeSelector": None,
        "tolerations": None,
        "serviceAccountName": None,
    },
}
HEAD_GROUP = {
    "serviceType": None,
    "headService": None,
    "enableIngress": None,
    "rayStartParams": None,
    "template": POD_TEMPLATE,
}
WORKER_GROUP = {
    "groupName": None,
    "replicas": None,
    "minReplicas": None,
    "maxReplicas": None,
    "numOfHosts": None,
    "rayStartParams": None,
    "template": POD_TEMPLATE,
    "scaleStrategy": None,
}
CLUSTER_SPEC = {
    "headGroupSpec": HEAD_GROUP,
    "workerGroupSpecs": [WORKER_GROUP],
    "rayVersion": None,
    "enableInTreeAutoscaling": None,
    "autoscalerOptions": None,
    "headServiceAnnotations": None,
    "suspend": None,
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds": None,
    "backoffLimit": None,
    "rayClusterSpec": CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE,
    "metadata": None,
    "clusterSelector": None,
    "submitterConfig": None,
    "managedBy": None,
    "deletionStrategy": None,
    "entrypoint": None,
    "runtimeEnvYAML": None,
    "jobId": None,
    "submissionMode": None,
    "entrypointResources": None,
    "entrypointNumCpus": None,
    "entrypointNumGpus": None,
    "ttlSecondsAfterFinished": None,
    "shutdownAfterJobFinishes": None,
    "suspend": None,
    "schedule": None,
}
TOP = {"apiVersion": None, "kind": None, "metadata": META}
SCHEMAS = {
    "RayJob": {**TOP, "spec": RAYJOB_SPEC},
    "RayCluster": {**TOP, "spec": CLUSTER_SPEC},
}
REQUIRED = {
    id(CLUSTER_SPEC): {"headGroupSpec"},
    id(HEAD_GROUP): {"rayStartParams", "template"},
    id(WORKER_GROUP): {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"},
}


def unknown_keys(node, schema, path="") -> list[str]:
    """Paths of keys the schema does not allow, and of required keys that are missing."""
    if schema is None:
        return []
    if isinstance(schema, list):
        assert isinstance(node, list), path
        return [bad for i, item in enumerate(node) for bad in unknown_keys(item, schema[0], path)]
    assert isinstance(node, dict), path
    bad = [f"{path}.{k}" for k in node if k not in schema]
    bad += [f"{path}.{k} (required)" for k in REQUIRED.get(id(schema), ()) if k not in node]
    for k, v in node.items():
        if k in schema:
            bad += unknown_keys(v, schema[k], f"{path}.{k}")
    return bad


def manifest(config, *args):
    parsed = build_parser().parse_args(["kuberay", config, *args])
    cfg = load_config(REPO / config, parsed.overrides)
    opts = kuberay.options_from_args(parsed)
    if parsed.cluster:
        return cfg, kuberay.raycluster(cfg, opts)
    return cfg, kuberay.rayjob(cfg, parsed.config, parsed.overrides, opts)


def cluster_of(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pods(doc):
    spec = cluster_of(doc)
    out = [spec["headGroupSpec"]["template"]]
    out += [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        out.append(doc["spec"]["submitterPodTemplate"])
    return out


RL_GPU = [
    "run.stages=[sft,rl]",
    "rl.colocate=[]",
    "rl.prompt_files=[{path: rlhf/data/samples/prompts.jsonl}]",
    "rl.policy.num_actors=2",
    "rl.policy.gpus_per_actor=1",
    "rl.policy.cpus_per_actor=4",
    "rl.critic.num_actors=2",
    "rl.critic.gpus_per_actor=1",
    "rl.reference.gpus_per_actor=1",
    "rl.rollout.backend=vllm",  # the CPU demo config samples in the policy's actor
    "rl.rollout.num_engines=3",
    "rl.rollout.gpus_per_engine=1",
    "rl.rollout.cpus_per_engine=2.5",
    "rl.policy.micro_batch_size=4",
    "rl.critic.micro_batch_size=4",
    "rl.mini_batch_size=64",
]


@pytest.mark.parametrize(
    "config,args",
    [(TINY, []), (TINY, ["--cluster"]), (GPU, []), (GPU, ["--cluster", "--mount", "m:/mnt/m"])],
)
def test_every_field_is_one_the_kuberay_crds_define(config, args):
    _, doc = manifest(config, *args)
    assert doc["apiVersion"] == "ray.io/v1"
    assert unknown_keys(doc, SCHEMAS[doc["kind"]]) == []
    for group in [cluster_of(doc)["headGroupSpec"], *cluster_of(doc)["workerGroupSpecs"]]:
        # map[string]string in the CRD: numbers must be quoted
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_the_train_group_is_sized_by_the_largest_offline_stage_that_runs():
    cfg, doc = manifest(
        TINY,
        "run.stages=[sft,rm,dpo]",
        "rm.num_workers=4",
        "rm.micro_batch_size=8",
        "rm.cpus_per_worker=2",
        "dpo.cpus_per_worker=3",
    )
    (train,) = cluster_of(doc)["workerGroupSpecs"]
    assert train["groupName"] == "train"
    # max(num_workers) = max(1, 4, 1); max(cpus_per_worker) = max(2, 2, 3)
    assert train["replicas"] == train["maxReplicas"] == 4
    assert train["rayStartParams"] == {"num-cpus": "3"}
    limits = train["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "3", "memory": "12Gi"}  # 4 GiB per CPU by default

    _, gpu = manifest(GPU)
    train, *rl_groups = cluster_of(gpu)["workerGroupSpecs"]
    assert {g["groupName"] for g in rl_groups} == {
        "rl-policy",
        "rl-reference",
        "rl-critic",
        "rl-reward-model",
        "rl-rollout",
    }
    # sft, rm, dpo: 8 workers x (8 CPUs, 1 GPU) each
    assert (train["replicas"], train["rayStartParams"]) == (8, {"num-cpus": "8", "num-gpus": "1"})
    limits = train["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_rl_roles_get_a_gpu_group_each_and_the_sums_match_the_config():
    cfg, doc = manifest(TINY, *RL_GPU)
    groups = {g["groupName"]: g for g in cluster_of(doc)["workerGroupSpecs"]}
    assert set(groups) == {"train", "rl-policy", "rl-reference", "rl-critic", "rl-rollout"}
    rl_groups = [g for name, g in groups.items() if name.startswith("rl-")]
    gpus = sum(g["replicas"] * int(g["rayStartParams"].get("num-gpus", 0)) for g in rl_groups)
    cpus = sum(g["replicas"] * int(g["rayStartParams"]["num-cpus"]) for g in rl_groups)
    # GPUs: policy 2 + critic 2 + reference 1 + rollout 3 = 8, as the config reserves them
    assert gpus == 8 == sum(r["GPU"] for r in cfg.rl.resource_requests().values())
    # CPUs per pod rounded up: 2 * 4 + 2 * 1 (0.5) + 1 * 1 (0.5) + 3 * 3 (2.5) = 20
    assert cpus == 2 * 4 + 2 * math.ceil(0.5) + 1 * math.ceil(0.5) + 3 * math.ceil(2.5) == 20
    assert groups["rl-rollout"]["replicas"] == 3


def test_colocated_roles_share_one_group_of_gpu_pods():
    cfg, doc = manifest(
        TINY,
        *[o for o in RL_GPU if "gpus_per_actor" not in o and "policy.num_actors" not in o],
        "rl.policy.gpus_per_actor=0.5",
        "rl.reference.gpus_per_actor=0.5",
        "rl.critic.gpus_per_actor=1",
        "rl.colocate=[[policy, reference]]",
        "rl.mini_batch_size=32",
        "rl.critic.num_actors=1",
    )
    groups = {g["groupName"]: g for g in cluster_of(doc)["workerGroupSpecs"]}
    assert set(groups) == {"train", "rl-policy-reference", "rl-critic", "rl-rollout"}
    shared = groups["rl-policy-reference"]
    # one actor of each role on one bundle: one pod holding one GPU (0.5 + 0.5)
    assert shared["replicas"] == 1 and shared["rayStartParams"]["num-gpus"] == "1"
    total = sum(
        g["replicas"] * int(g["rayStartParams"].get("num-gpus", 0))
        for name, g in groups.items()
        if name.startswith("rl-")
    )
    assert total == sum(r["GPU"] for r in cfg.rl.resource_requests().values()) == 1 + 1 + 3


@pytest.mark.parametrize(
    "config,extra", [(TINY, ["sft.max_steps=50", "run.stages=[sft]"]), (GPU, [])]
)
def test_the_entrypoint_is_an_rlhf_run_call_that_gives_the_same_config(config, extra):
    cfg, doc = manifest(config, *extra)
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[0] == "rlhf"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.config) == ("run", config)
    run_cfg = load_config(REPO / args.config, args.overrides)
    if Path(cfg.run.output_dir).is_absolute():
        assert run_cfg.fingerprint() == cfg.fingerprint()
    else:  # the one added override puts outputs on the shared volume
        assert args.overrides == [*extra, "run.output_dir=/mnt/rlhf-runs"]
    # every pod mounts the shared volume where the run writes
    for pod in pods(doc)[:-1]:
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert run_cfg.run.output_dir in [m["mountPath"] for m in mounts]
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]


def test_every_ray_container_and_the_submitter_take_the_token_from_a_secret():
    _, doc = manifest(GPU, "--token-secret", "my-token")
    containers = [c for pod in pods(doc) for c in pod["spec"]["containers"]]
    assert len(containers) == 1 + 1 + 5 + 1  # head, train group, 5 RL role groups, submitter
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "my-token", "key": "auth_token"}},
        }


def test_a_bad_mount_flag_is_a_config_error_naming_it():
    args = build_parser().parse_args(["kuberay", TINY, "--mount", "no-path"])
    with pytest.raises(ConfigError, match="--mount 'no-path': expected CLAIM:/absolute/path"):
        kuberay.options_from_args(args)


EXAMPLES = sorted((REPO / "configs/kuberay").glob("*.yaml"))


def test_the_examples_cover_the_cpu_and_gpu_configs():
    commands = [f.read_text().splitlines()[1] for f in EXAMPLES]
    assert any(TINY in c for c in commands) and any(GPU in c for c in commands)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_shipped_example_is_what_its_command_prints_today(example, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    text = example.read_text()
    command = text.splitlines()[1].lstrip("#").strip()  # "rlhf kuberay ..."
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out
    assert printed == text, f"stale: regenerate with {command} > {example.relative_to(REPO)}"
