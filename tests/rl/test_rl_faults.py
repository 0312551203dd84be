"""RL checkpoints, exact resume and actor restarts, on a real local cluster (Ray, vLLM, DeepSpeed).

The driver is SIGKILLed mid-run and re-run; actors are SIGKILLed mid-step. No fault is simulated:
the processes die the way a preempted node or an out-of-memory kill ends them.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from test_rl_loop import REPO, SMALL, _Scorer, rl_config

from rlhf.rl import checkpoint as ck
from rlhf.rl.stage import _train, run_rl
from rlhf.rl.trainer import RLRun
from rlhf.runtime import is_loopback, listening_sockets
from rlhf.train.metrics import MetricsWriter

# Three RL stages (or six restarts) each: above the suite's default 10-minute limit on a loaded
# 2-core machine, about 2-3 minutes on an idle one.
pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(1500),
]


def _steps(metrics_file: Path) -> list[int]:
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    return [x["step"] for x in lines if "step" in x]


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def train_in_thread(run, writer) -> tuple[threading.Thread, dict]:
    """The RL stage's step loop on a thread (not started): `done` gets "metrics" or "error"."""
    done: dict = {}

    def train():
        try:
            done["metrics"] = _train(run, writer, {})
        except BaseException as exc:  # re-raised in the test thread
            done["error"] = exc

    return threading.Thread(target=train), done


def _cpus_free(total: float = 2.0) -> bool:
    return ray.available_resources().get("CPU", 0.0) >= total - 1e-6


class _CoinFlip(_Scorer):
    rule = "coin"  # a reward that depends on the answer's text: the advantages are not zero


def test_rl_resumes_exactly_after_the_driver_is_killed(tmp_path, tiny_dir, ray_cluster):
    """An uninterrupted run and a run whose driver is SIGKILLed after its step-2 checkpoint and
    then re-run end with identical policy weights, and the re-run logs every step once."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _CoinFlip)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        _resume_matches_uninterrupted(tmp_path, tiny_dir, srv.server_address[1])
    finally:
        srv.shutdown()


def _resume_matches_uninterrupted(tmp_path, tiny_dir, port):
    overrides = [
        "rl.reward.kind=http",
        f"rl.reward.url=http://127.0.0.1:{port}/score",
        "rl.algorithm=grpo",
        f"rl.init_from={tiny_dir}",
        "rl.max_steps=4",
        "rl.save_interval=2",
        "rl.eval_interval=100",
        "rl.eval_prompts=4",
    ]
    run_rl(rl_config(tmp_path / "a", *overrides), str(tiny_dir))
    reference = load_file(str(tmp_path / "a/t/rl/model/model.safetensors"))
    initial = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(initial[k], reference[k]) for k in reference)  # it trained

    cli = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "run",
        str(REPO / "configs/tiny_cpu.yaml"),
        f"run.output_dir={tmp_path / 'b'}",
        "run.name=t",
        "run.stages=[rl]",
        "eval.num_prompts=4",
        "eval.samples=0",
        *SMALL,
        *overrides,
    ]
    # The re-run joins this test's cluster, as a driver submitted to a cluster does.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    stage = tmp_path / "b/t/rl"
    driver = subprocess.Popen(cli, env=env, cwd=REPO)
    try:
        _wait_for(
            lambda: (stage / "checkpoints/step_000002").is_dir() or driver.poll() is not None,
            600,
            "the step-2 checkpoint",
        )
        assert driver.poll() is None, "the driver ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not (stage / "done.json").exists()
    assert 2 in _steps(stage / "metrics.jsonl")
    _wait_for(_cpus_free, 120, "the killed driver's actors to be released")

    rerun = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and "step_000002" in rerun.stdout
    resumed = load_file(str(stage / "model/model.safetensors"))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    assert _steps(stage / "metrics.jsonl") == [0, 1, 2, 3, 4]
    # The checkpoint kept the driver's state: the next checkpoint would find it valid.
    ok, why, step = ck.validate(stage / "checkpoints/step_000002")
    assert (ok, step) == (True, 2), why


def test_rl_survives_killed_engine_reward_model_and_policy_rank(tmp_path, tiny_dir, ray_cluster):
    """SIGKILL a rollout engine, then the reward model, then the policy rank, each mid-step:
    the run finishes all its steps, every restart is counted, and the policy's death rolls
    back to the newest checkpoint with the metrics log rewound to it."""
    _wait_for(_cpus_free, 120, "free CPUs")
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.reward.kind=model",
        f"rl.reward.model_path={tiny_dir}",
        "rl.max_steps=6",
        "rl.save_interval=2",
        "rl.eval_interval=100",
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=str(tiny_dir))
    # the policy's actor holds the reference too (one CPU bundle): re-created, it loads both
    assert run.rl.reference_in_policy and "reference" not in run.groups
    writer = MetricsWriter(run.stage_dir, resume_step=-1)
    pids = {
        "rollout": _pid(run.groups["rollout"].actors[0]),
        "reward_model": _pid(run.groups["reward_model"].actors[0]),
        "policy": _pid(run.groups["policy"].actors[0]),
    }
    thread, done = train_in_thread(run, writer)
    exposed: set = set()  # listening sockets of this cluster outside loopback, while RL runs

    def running(step: int) -> bool:
        exposed.update(
            (name, ip, port) for _, name, ip, port in listening_sockets() if not is_loopback(ip)
        )
        return run.steps_done >= step or not thread.is_alive()

    try:
        thread.start()
        for after_step, role in ((1, "rollout"), (2, "reward_model"), (3, "policy")):
            _wait_for(lambda s=after_step: running(s), 600, role)
            if role == "policy":  # the roll-back target
                assert (run.stage_dir / "checkpoints/step_000002").is_dir()
            os.kill(pids[role], signal.SIGKILL)
        _wait_for(lambda: running(10**9), 900, "the end of the run")
        thread.join(timeout=60)
        assert not thread.is_alive()
        if "error" in done:
            raise done["error"]
        metrics = done["metrics"]
        assert ray.get([e.version.remote() for e in run.groups["rollout"].actors]) == [6]
    finally:
        writer.close()
        run.shutdown()
    assert not exposed, exposed  # role actors' gloo groups and stores bind loopback only
    assert run.steps_done == 6
    assert run.restores == 1  # the policy's death
    # engine 1 + reward model 1 + policy 1 (the critic-free run has no other trained role)
    assert run.restarts >= 3 and metrics["fault/restarts"] == run.restarts
    assert _steps(run.stage_dir / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert run.version == 6


def test_a_killed_policy_that_generates_is_restored_and_samples_again(
    tmp_path, tiny_dir, ray_cluster
):
    """rollout.backend='policy': the policy's actor is also the engine. SIGKILL it mid-run: it
    is re-created from the newest checkpoint, the dispatcher samples from the new actor, and its
    samples carry the driver's version to the end."""
    _wait_for(_cpus_free, 120, "free CPUs")
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.rollout.backend=policy",
        "monitor.enabled=false",  # a random model's groups all score 0: no_signal would pause
        "rl.max_steps=4",
        "rl.save_interval=2",
        "rl.eval_interval=100",
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    writer = MetricsWriter(run.stage_dir, resume_step=-1)
    pid = _pid(run.groups["policy"].actors[0])
    thread, done = train_in_thread(run, writer)
    try:
        thread.start()
        _wait_for(lambda: run.steps_done >= 2 or not thread.is_alive(), 600, "step 2")
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive()
        if "error" in done:
            raise done["error"]
        (policy,) = run.groups["policy"].actors
        assert _pid(policy) != pid and run.dispatcher.engines == [policy]
        samples, _ = ray.get(policy.generate.remote([[2, 6, 7, 1, 4]], 2, 4, 1.0, 1.0, 0))
        assert [s.weights_version for s in samples] == [4, 4]
    finally:
        writer.close()
        run.shutdown()
    assert run.steps_done == 4 and run.restores == 1
    assert _steps(run.stage_dir / "metrics.jsonl") == [1, 2, 3, 4]
