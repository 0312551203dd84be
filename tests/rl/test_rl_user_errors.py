"""An RL stage that cannot run as configured ends like every user mistake: `error:` and exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_a_prompt_longer_than_max_prompt_length_exits_2_with_an_error_line_not_a_traceback(
    tmp_path, tiny_dir
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "1+1=", "label": "2"})
        + "\n"
        + json.dumps({"prompt": "x" * 100, "label": "y"})
        + "\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf.cli",
            "run",
            str(REPO / "configs/tiny_cpu.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "run.stages=[rl]",
            f"rl.init_from={tiny_dir}",
            f"rl.prompt_files=[{{path: {prompts}}}]",
            "rl.eval_prompt_files=[]",
            "rl.max_prompt_length=32",
            "ray.num_cpus=2",
            "ray.dashboard=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    # <|user|> + 100 bytes + <|eos|> + <|assistant|> = 103 tokens
    assert last.startswith("error: prompt 1 of ") and "103 tokens > rl.max_prompt_length" in last


@pytest.mark.parametrize(
    "error",
    [
        "rlhf.rl.trainer.RLStageError",
        "rlhf.rl.dispatch.StaleEngineError",
        "rlhf.rl.rewards.RewardError",
    ],
)
def test_rl_errors_raised_in_an_actor_print_their_own_message_not_the_remote_traceback(
    error, capsys
):
    import importlib

    from ray.exceptions import RayTaskError

    from rlhf.cli import exit_status

    module, name = error.rsplit(".", 1)
    cause = getattr(importlib.import_module(module), name)("reward endpoint x: HTTP 500")
    # What ray.get raises for an actor's exception: a RayTaskError that is also the cause's type.
    wrapped = RayTaskError("RewardActor.score", "Traceback (most recent call last): ...", cause)
    wrapped = wrapped.as_instanceof_cause()
    assert exit_status(wrapped) == 2
    assert capsys.readouterr().err == "error: reward endpoint x: HTTP 500\n"
