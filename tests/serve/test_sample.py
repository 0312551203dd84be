"""`rlhf sample`: K answers per prompt from the vLLM engine into a ranked-list file to fill in."""

import json

import pytest

from rlhf.cli import main
from rlhf.config import DataFile, RewardModelConfig
from rlhf.data.stages import prepare_preferences

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_sampled_file_once_ranked_goes_straight_into_the_reward_model_stage(
    tiny_policy, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "12+34="}, {"prompt": [{"role": "user", "content": "5+5="}], "label": "10"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "to_rank.jsonl"
    args = ["sample", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}"]
    args += ["serve.max_model_len=256", "serve.max_tokens=6"]
    args += ["--model", str(tiny_policy), "--prompts", str(prompts), "--k", "3", "--out", str(out)]
    assert main(args) == 0
    assert '"answers": 6' in capsys.readouterr().out  # the printed report (vLLM logs too)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["12+34=", "5+5="]
    assert all(len(r["responses"]) == 3 for r in records)
    assert all(x["rank"] is None and x["text"] for r in records for x in r["responses"])

    # A person fills in the ranks (1 = best); the file is then reward-model data as it is.
    for r in records:
        for rank, x in enumerate(r["responses"], start=1):
            x["rank"] = rank
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps(r) + "\n" for r in records))
    scfg = RewardModelConfig(
        train_files=[DataFile(path=str(ranked))], num_workers=1, micro_batch_size=1
    )
    train, _, report = prepare_preferences(scfg, str(tiny_policy))
    assert len(train) == 2 * 3  # C(3, 2) pairs per prompt
    assert report["train"]["skipped"] == 0


def test_sample_refuses_k_below_two_with_a_clear_error(tiny_policy, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    args = ["sample", "configs/tiny_cpu.yaml", "--model", str(tiny_policy)]
    args += ["--prompts", str(prompts), "--k", "1", "--out", str(tmp_path / "x.jsonl")]
    assert main(args) == 2
    assert "--k 1" in capsys.readouterr().err
