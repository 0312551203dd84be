"""The loop after training, for real: a served policy gets chats and corrections over HTTP, the
feedback is exported, a DPO round trains on it, and `rlhf deploy` gates the new policy against the
served one and swaps it in while a client keeps chatting; then a refusal and a forced rollback."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from actors.group import free_port
from rlhf.serve.deploy import gate

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.timeout(1200),
]
REPO = Path(__file__).resolve().parents[2]
TOKEN = "lifecycle-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTIONS = [("12+34=", "46"), ("7+8=", "15"), ("20+22=", "42"), ("5+5=", "10")]


class Dcfg:
    min_win_rate = 0.5
    max_refusal_drop = 0.0


def entry(win_rates, refusal_change):
    return {
        "win_rate": {f"judge{i}": {"win_rate": w} for i, w in enumerate(win_rates)},
        "refusal_rate_change": {"all": refusal_change},
    }


def test_the_gate_needs_every_judge_at_the_threshold_and_no_fewer_refusals():
    assert gate(entry([0.5, 0.9], 0.0), Dcfg) == []
    assert gate(entry([0.75], 0.1), Dcfg) == []  # refusing more is not worse
    assert gate(entry([0.9, 0.49], 0.0), Dcfg) == [
        "win rate 0.49 by judge1 < deploy.min_win_rate 0.5"
    ]
    (why,) = gate(entry([0.6], -0.25), Dcfg)
    assert why == "refusal rate on the safety probes fell by 0.2500 > deploy.max_refusal_drop 0.0"
    assert len(gate(entry([None], -0.1), Dcfg)) == 2  # no prompts judged: no win rate


def rlhf(*args, env=None, timeout=600):
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return done


def test_feedback_becomes_a_dpo_round_that_the_gate_deploys_without_dropping_requests(
    ray_cluster, tiny_policy, tmp_path
):
    import ray
    from ray import serve

    from rlhf.config import load_config
    from rlhf.serve.app import model_version, start_app
    from rlhf.serve.deploy import history_path

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": q, "label": y}) + "\n" for q, y in QUESTIONS))
    config = tmp_path / "round.yaml"
    config.write_text(
        f"""
run: {{output_dir: {tmp_path / "runs"}, name: life, stages: [dpo]}}
model: {{path: {os.path.relpath(tiny_policy, REPO)}}}  # relative: the workers' cwd differs
serve: {{cpus_per_replica: 0.5, max_model_len: 256, max_tokens: 8, max_tokens_limit: 64}}
sft: {{eval_files: []}}
eval: {{prompt_files: [{{path: {held}}}], max_new_tokens: 8}}
dpo:
  train_files: [{{path: {tmp_path / "feedback" / "pairwise.jsonl"}}}]
  eval_files: []
  num_workers: 1
  cpus_per_worker: 1
  micro_batch_size: 4
  max_steps: 30
  lr: 1.0e-3
  save_interval: 1000
  eval_interval: 1000
deploy: {{judges: ["rule=digit_match"], min_win_rate: 0.5}}
"""
    )
    cfg = load_config(str(config))
    base, served = start_app(cfg, str(tiny_policy), TOKEN, port=free_port())
    try:
        # Chats over HTTP, and a person correcting each answer with the right sum.
        for n, (question, label) in enumerate(QUESTIONS):
            for seed in (n, n + 100):
                answer = chat(base, question, seed=seed)
                assert answer["model_version"] == served
                feedback = {
                    "id": f"fix-{n}-{seed}",
                    "kind": "correction",
                    "response_id": answer["response_id"],
                    "text": label,
                    "rater": "tester",
                }
                r = requests.post(base + "/v1/feedback", json=feedback, headers=AUTH, timeout=60)
                assert r.status_code == 201, r.text
        out = rlhf("feedback", "export", str(config), "--out", str(tmp_path / "feedback"))
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout)["written"]["pairwise"] == 2 * len(QUESTIONS)

        # The DPO round, a driver joined to the serving cluster.
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        trained = rlhf("run", str(config), env=env, timeout=900)
        assert trained.returncode == 0, trained.stderr[-3000:]
        candidate = tmp_path / "runs" / "life" / "dpo" / "model"
        new = model_version(candidate)

        # The gate, then the swap, while a client keeps chatting.
        stop, statuses = threading.Event(), []

        def keep_chatting() -> None:
            while not stop.is_set():
                body = {"messages": [{"role": "user", "content": "1+1="}], "max_tokens": 4}
                r = requests.post(
                    base + "/v1/chat/completions", json=body, headers=AUTH, timeout=300
                )
                statuses.append((r.status_code, r.json().get("model_version")))

        client = threading.Thread(target=keep_chatting)
        client.start()
        try:
            deployed = rlhf("deploy", str(config), "--model", str(candidate))
        finally:
            stop.set()
            client.join()
        decision = json.loads(deployed.stdout)
        (judge,) = decision["gate"]["candidate"]["win_rate"]
        win = decision["gate"]["candidate"]["win_rate"][judge]["win_rate"]
        # The corrections taught the sums: the candidate's digits match more often.
        assert win > 0.5, decision
        assert deployed.returncode == 0 and decision["deployed"], deployed.stderr[-3000:]
        assert {code for code, _ in statuses} == {200} and len(statuses) > 3
        assert {version for _, version in statuses} <= {served, new}
        assert chat(base, "12+34=")["model_version"] == new
        assert requests.get(base + "/health", timeout=30).json()["model_version"] == new

        # A candidate below the gate is refused and the served model stays; --force rolls back.
        refused = rlhf("deploy", str(config), "--model", str(tiny_policy))
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "refused: win rate" in refused.stderr
        assert chat(base, "12+34=")["model_version"] == new
        back = rlhf("deploy", str(config), "--model", str(tiny_policy), "--force")
        assert back.returncode == 0, back.stderr[-3000:]
        assert chat(base, "12+34=")["model_version"] == served
        history = [json.loads(x) for x in history_path(cfg.run.dir).read_text().splitlines()]
        assert [(h["deployed"], h["forced"]) for h in history] == [
            (True, False),
            (False, False),
            (True, True),
        ]
    finally:
        serve.shutdown()


def test_deploy_without_a_served_app_is_a_clear_error(tmp_path, tiny_policy):
    out = rlhf(
        "deploy", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}", "--model", str(tiny_policy)
    )
    assert out.returncode == 2
    assert "deployment.json: no deployment recorded for this run" in out.stderr
    assert "Traceback" not in out.stderr


def chat(base: str, content: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    r = requests.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()
