"""`rlhf deploy`: a new policy replaces the served one only if it passes a gate against it.

    rlhf serve  configs/tiny_cpu.yaml --model runs/tiny_cpu/sft/model    # the served policy
    rlhf deploy configs/tiny_cpu.yaml --model runs/tiny_cpu/dpo/model    # gate, then swap
    rlhf deploy configs/tiny_cpu.yaml --model runs/tiny_cpu/sft/model --force   # a rollback

The gate: both policies answer the held-out prompts (sft.eval_files, eval.prompt_files) and the
safety probes (judge.safety_probes) as `rlhf eval-judge` does, the served one as the baseline. The
candidate must win at least `deploy.min_win_rate` (ties count half) by every judge in
`deploy.judges`, and its refusal rate on the probes may fall by at most `deploy.max_refusal_drop`.
Then the running Serve app is redeployed with the candidate: Serve's rolling update (a new
replica starts; the old one finishes the requests it holds, then stops; the router queues new
requests meanwhile), so no request is dropped.

`rlhf serve` records what it deployed in <run dir>/serve/deployment.json: the cluster address, the
app, the model and the replica settings (the bearer token only as its sha256); `rlhf deploy` reads
it to find the app and the served model, and rewrites it after a swap. Every decision, deployed or
refused, is appended to <run dir>/serve/deployments.jsonl with the gate's numbers.
Exit code 0: deployed; 1: refused by the gate (the served model stays); 2: bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What runs: enough to find the app again and redeploy it with another model."""

    app_name: str
    route_prefix: str
    base_url: str  # http://host:port[/prefix], /health and /v1 below it
    ray_address: str  # the cluster Serve runs in (GCS address)
    database_url: str
    model_path: str
    model_version: str
    settings: dict[str, Any]  # PolicyServer's constructor argument
    options: dict[str, Any]  # the deployment's replicas and resources


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / "serve" / "deployment.json"


def history_path(run_dir: Path) -> Path:
    return Path(run_dir) / "serve" / "deployments.jsonl"


def load_deployment(run_dir: Path) -> Deployment:
    path = record_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no deployment recorded for this run: start `rlhf serve CONFIG --model PATH` "
            "with the same config (run.output_dir, run.name) first"
        )
    try:
        return Deployment(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a deployment record ({exc})") from None


def run_deployment(record: Deployment, run_dir: Path) -> None:
    """Deploy (or redeploy: a rolling update) the app as `record` says, then record it."""
    from ray import serve

    from rlhf.serve.app import PolicyServer

    deployment = PolicyServer.options(
        **record.options,
        user_config={
            "model_path": record.model_path,
            "model_version": record.model_version,
            "database_url": record.database_url,
        },
    )
    serve.run(
        deployment.bind(record.settings), name=record.app_name, route_prefix=record.route_prefix
    )
    path = record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def gate(candidate: dict[str, Any], dcfg: Any) -> list[str]:
    """Why the candidate fails the gate (empty: it passes), from its `rlhf eval-judge` entry.

    e.g. win_rate {"rule=exact_match": {"win_rate": 0.4, ...}} with min_win_rate 0.5 ->
    ["win rate 0.4 by rule=exact_match < deploy.min_win_rate 0.5"]."""
    reasons = []
    for judge, wr in candidate["win_rate"].items():
        if wr["win_rate"] is None or wr["win_rate"] < dcfg.min_win_rate:
            reasons.append(
                f"win rate {wr['win_rate']} by {judge} < deploy.min_win_rate {dcfg.min_win_rate}"
            )
    drop = -candidate["refusal_rate_change"]["all"]
    if drop > dcfg.max_refusal_drop + 1e-9:
        reasons.append(
            f"refusal rate on the safety probes fell by {drop:.4f} "
            f"> deploy.max_refusal_drop {dcfg.max_refusal_drop}"
        )
    return reasons


def _health(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url + "/health", timeout=30) as r:  # noqa: S310 (our URL)
        return json.loads(r.read())


def deploy(cfg: Any, model_path: str, force: bool = False) -> dict[str, Any]:
    """Gate `model_path` against the served policy and swap it in if it passes (or `force`).

    Returns the decision record appended to deployments.jsonl."""
    from ray import serve

    from rlhf.judged_eval import evaluate_judged
    from rlhf.runtime import init_ray
    from rlhf.serve.app import model_version

    if not (Path(model_path) / "config.json").is_file():
        raise ConfigError(f"--model {model_path}: not a saved model (no config.json)")
    record = load_deployment(cfg.run.dir)
    try:
        init_ray(record.ray_address)
    except ConnectionError as exc:
        raise ConfigError(
            f"{record_path(cfg.run.dir)}: the Ray cluster at {record.ray_address} that "
            f"`rlhf serve` used is not reachable ({exc}); is it still running?"
        ) from None
    app = serve.status().applications.get(record.app_name)
    if app is None or app.status != "RUNNING":
        state = "not deployed" if app is None else app.status
        raise ConfigError(f"the Serve app {record.app_name!r} is {state}; start `rlhf serve`")
    if not (Path(record.model_path) / "config.json").is_file():
        raise ConfigError(f"the served model {record.model_path} is gone: cannot compare with it")
    candidate = str(Path(model_path).resolve())
    decision: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "served": {"model_path": record.model_path, "model_version": record.model_version},
        "candidate": {"model_path": candidate, "model_version": model_version(candidate)},
        "forced": force,
    }
    if not force:
        results = evaluate_judged(
            cfg, {"served": record.model_path, "candidate": candidate}, cfg.deploy.judges
        )
        decision["gate"] = {
            "judges": results["judges"],
            "num_prompts": results["num_prompts"],
            "num_probes": results["num_probes"],
            "served": results["policies"]["served"],
            "candidate": results["policies"]["candidate"],
        }
        decision["refused_because"] = gate(results["policies"]["candidate"], cfg.deploy)
    decision["deployed"] = force or not decision["refused_because"]
    if decision["deployed"]:
        started = time.perf_counter()
        new = dataclasses.replace(
            record, model_path=candidate, model_version=decision["candidate"]["model_version"]
        )
        run_deployment(new, cfg.run.dir)
        # serve.run returns once the new replicas are healthy; old ones may still be draining.
        deadline = time.monotonic() + 120
        while (live := _health(record.base_url)["model_version"]) != new.model_version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"2 min after the update /health says {live}, not the new one")
            time.sleep(0.5)
        decision["swap_s"] = round(time.perf_counter() - started, 2)
    with open(history_path(cfg.run.dir), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(decision) + "\n")
    return decision
