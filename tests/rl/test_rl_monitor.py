"""The monitor on real RL runs: rules tripped by real metrics, and the pause -> resume round trip
through the command line (exit code 3, paused.json, a re-run that acknowledges the rule)."""

import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest
import ray
from test_rl_loop import REPO, SMALL, _Scorer, rl_config

from rlhf.monitor import Monitor, PausedRun
from rlhf.rl.stage import _train
from rlhf.rl.trainer import RLRun
from rlhf.train.metrics import MetricsWriter

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(1200),
]


class _CoinFlip(_Scorer):
    rule = "coin"


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_real_runs_trip_no_signal_length_entropy_logprob_gap_and_a_reward_spike(
    tmp_path, tiny_dir, ray_cluster
):
    """A reward function that returns a constant gives every group equal scores: `no_signal`
    pauses after the first step (checkpoint + paused.json); the random model's answers all hit
    rl.rollout.max_new_tokens, so `length` warns in the same step, and so do `entropy` below an
    unreachable floor and `logprob_gap` above a limit no fp32 engine meets. Then, on the same
    actors, a reward that jumps trips `reward_zscore`."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.max_steps=3",
        "rl.eval_interval=100",
        "monitor.no_signal.patience=1",
        "monitor.length.patience=1",
        "monitor.length.max_clipped_frac=0.2",
        # A floor no policy reaches: the rule must see the trainer's entropy of this step.
        "monitor.entropy.min_entropy=1000",
        "monitor.entropy.patience=1",
        # fp32 trainer and engine agree to ~1e-7, not to 1e-12: the gap rule sees real logprobs.
        "monitor.logprob_gap.max_gap=1e-12",
    )
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda prompt, response, label: 0.5)
    writer = MetricsWriter(run.stage_dir, resume_step=-1)
    try:
        with pytest.raises(PausedRun) as paused:
            _train(run, writer, {})
        record = json.loads((run.stage_dir / "paused.json").read_text())
        spike = _reward_spike(run, tmp_path, writer)
    finally:
        writer.close()
        run.shutdown()
    assert (spike.rule, spike.step) == ("reward_zscore", 4)  # steps 2, 3 are the window
    assert paused.value.event.rule == "no_signal" and paused.value.event.step == 1
    assert record["rule"] == "no_signal" and record["step"] == 1
    assert record["acknowledge"] == "monitor.acknowledge=[no_signal]"
    assert (run.stage_dir / "checkpoints/step_000001").is_dir()
    events = [x["data"] for x in _lines(run.stage_dir / "metrics.jsonl") if x.get("event")]
    assert {(e["rule"], e["action"]) for e in events if e["step"] == 1} == {
        ("no_signal", "pause"),
        ("length", "warn"),
        ("entropy", "warn"),
        ("logprob_gap", "warn"),
    }
    assert ("reward_zscore", "pause", 4) in {(e["rule"], e["action"], e["step"]) for e in events}


def _reward_spike(run, tmp_path, writer):
    """The same actors, on: a reward that alternates 0 / 1 over the samples for two steps (mean
    0.5), then pays 50 for everything: `reward_zscore` (a window of those two steps) pauses."""
    calls = []

    def jumping(prompt, response, label):
        calls.append(1)
        step = (len(calls) - 1) // run.rl.rollout_batch_size
        return 50.0 if step >= 2 else float(len(calls) % 2)

    cfg = rl_config(
        tmp_path / "spike",
        "monitor.reward_zscore.window=2",
        "monitor.reward_zscore.warmup=2",
        "monitor.no_signal.enabled=false",
        "monitor.length.enabled=false",
    )
    run.monitor = Monitor(cfg.monitor)
    run.reward_rule = jumping
    run.rl = run.rl.model_copy(update={"max_steps": 5})
    with pytest.raises(PausedRun) as paused:
        _train(run, writer, {})
    return paused.value.event


def test_a_kl_pause_exits_3_and_a_rerun_that_acknowledges_it_resumes(
    tmp_path, tiny_dir, ray_cluster
):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _CoinFlip)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cli = [
        sys.executable,
        "-m",
        "rlhf.cli",
        "run",
        str(REPO / "configs/tiny_cpu.yaml"),
        f"run.output_dir={tmp_path}",
        "run.name=t",
        "run.stages=[rl]",
        "eval.num_prompts=4",
        "eval.samples=0",
        *SMALL,
        f"rl.init_from={tiny_dir}",
        "rl.algorithm=grpo",
        "rl.reward.kind=http",
        f"rl.reward.url=http://127.0.0.1:{srv.server_address[1]}/score",
        "rl.max_steps=4",
        "rl.save_interval=100",
        "rl.eval_interval=100",
        "rl.eval_prompts=4",
        # Step 1 samples from the reference itself (KL 0); step 2's policy has moved.
        "monitor.kl.max_per_sequence=1e-9",
        "monitor.kl.patience=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    stage = tmp_path / "t/rl"
    try:
        first = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert first.returncode == 3, first.stderr[-3000:]
        assert "paused: " in first.stderr and "monitor.acknowledge=[kl]" in first.stderr
        assert "Traceback" not in first.stderr
        record = json.loads((stage / "paused.json").read_text())
        assert (record["rule"], record["step"]) == ("kl", 2)
        assert not (stage / "done.json").exists()

        second = subprocess.run(
            [*cli, "monitor.acknowledge=[kl]"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        srv.shutdown()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_000002" in second.stdout
    assert (stage / "done.json").exists() and not (stage / "paused.json").exists()
    lines = _lines(stage / "metrics.jsonl")
    assert [x["step"] for x in lines if "step" in x] == [0, 1, 2, 3, 4]
    kl = [(x["data"]["action"], x["at_step"]) for x in lines if x.get("event") == "monitor"]
    assert kl == [("pause", 2), ("warn", 3)]  # the pause, then one warning per streak
