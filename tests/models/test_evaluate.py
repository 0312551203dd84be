"""Held-out evaluation: paired tests, greedy and sampled accuracy of real checkpoints, `rlhf eval`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.answers import policies_answers, policy_answers, reloadable
from rlhf.config import load_config
from rlhf.data import DataError
from rlhf.evaluate import evaluate_policies, mcnemar_p, paired_p, reward_scores
from rlhf.models.factory import ensure_tiny_model

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [f"What is {a}+{b}?" for a, b in [(1, 2), (30, 4), (5, 77), (12, 12), (9, 0), (40, 41)]]


def test_mcnemar_counts_only_the_questions_that_changed():
    before = [True] * 20 + [False] * 10
    after = [True] * 20 + [True] * 10  # 10 fixed, none broken: p = 2 / 2**10
    assert mcnemar_p(before, after) == pytest.approx(2 / 2**10)
    assert mcnemar_p(after, before) == pytest.approx(2 / 2**10)
    assert mcnemar_p(before, before) == 1.0
    one_each = [True, False] + [True] * 5
    assert mcnemar_p(one_each, [False, True] + [True] * 5) == 1.0


def test_paired_test_sees_a_consistent_shift_and_not_a_reshuffle():
    a = [0.5, 0.25, 0.75, 0.5, 0.0, 1.0, 0.5, 0.25, 0.75, 0.5] * 2
    assert paired_p(a, [x + 0.125 for x in a]) < 0.001
    assert paired_p(a, list(reversed(a))) > 0.5
    assert paired_p(a, a) == 1.0


def _cfg(tmp_path, labels, *extra):
    rows = [{"prompt": q, "label": y} for q, y in zip(QUESTIONS, labels)]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(
        None,
        [
            "run.stages=[]",
            "sft.eval_files=[]",
            f"eval.prompt_files=[{{path: {path}}}]",
            "eval.max_new_tokens=4",
            *extra,
        ],
    ), path


def test_accuracy_fixed_and_broken_counts_on_real_checkpoints(tmp_path, tiny_dir, tiny_size):
    # Reference answers that model A gives greedily on half the questions: A scores 0.5.
    other = ensure_tiny_model(tmp_path / "other", seed=1, **tiny_size)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    mine, _ = policy_answers(str(tiny_dir), chats, max_new_tokens=4)
    theirs, _ = policy_answers(str(other), chats, max_new_tokens=4)
    labels = [a.strip() if i % 2 == 0 else "never" for i, a in enumerate(mine)]
    # transformers: vLLM raises a temperature below 0.01 to 0.01, not near-greedy enough here.
    cfg, _ = _cfg(
        tmp_path, labels, "eval.samples=4", "eval.temperature=0.001", "eval.engine=transformers"
    )
    out = evaluate_policies(cfg, {"a": str(tiny_dir), "b": str(other)}, "a", ["b"])
    assert out["eval/num_prompts"] == 6
    assert out["eval/a_accuracy"] == 0.5
    b_right = [t.strip() == y for t, y in zip(theirs, labels)]
    assert out["eval/b_accuracy"] == round(sum(b_right) / 6, 4)
    assert out["eval/b_vs_a_fixed"] == 0
    assert out["eval/b_vs_a_broken"] == 3 - sum(b_right)
    # Near-zero temperature: sampling picks the greedy answer.
    assert out["eval/a_sampled_accuracy"] == 0.5
    assert 0.0 <= out["eval/b_vs_a_greedy_p"] <= 1.0 and 0.0 <= out["eval/b_vs_a_sampled_p"] <= 1.0
    # At temperature 1 a random model rarely repeats its greedy answer 4 times out of 4.
    cfg, _ = _cfg(tmp_path, labels, "eval.samples=4", "eval.temperature=1.0")
    hot = evaluate_policies(cfg, {"a": str(tiny_dir)}, "a", [])
    assert hot["eval/a_sampled_accuracy"] < 0.5


def test_the_vllm_engine_answers_greedily_as_transformers_does(tiny_dir):
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ours, sampled = policy_answers(str(tiny_dir), chats, 6, num_samples=3, engine="vllm")
    theirs, _ = policy_answers(str(tiny_dir), chats, 6, engine="transformers")
    assert ours == theirs and len(set(ours)) > 1  # fp32 on both sides; a random model varies
    assert [len(many) for many in sampled] == [3] * len(QUESTIONS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs where a CUDA GPU is")
def test_a_process_with_a_gpu_answers_scores_and_judges_there_as_on_the_cpu(tiny_dir):
    # Held-out answers, reward-model scores and the AI judge run on the driver's GPU by default.
    from rlhf.judge import ai_first_probs
    from rlhf.models.factory import local_device

    assert local_device().type == "cuda"
    torch.cuda.reset_peak_memory_stats()
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ours, sampled = policy_answers(str(tiny_dir), chats, 6, num_samples=2)
    assert torch.cuda.max_memory_allocated() > 0  # the model ran there
    cpu, _ = policy_answers(str(tiny_dir), chats, 6, device="cpu")
    assert ours == cpu and len(set(ours)) > 1  # fp32 on both sides; a random model varies
    assert [len(many) for many in sampled] == [2] * len(QUESTIONS)
    # The checkpoint as a reward model (a seeded new head), in bf16 on both devices.
    scores = reward_scores(str(tiny_dir), chats, ours)
    assert scores == pytest.approx(
        reward_scores(str(tiny_dir), chats, ours, device="cpu"), abs=0.05
    )
    queries = [(q, a, "0") for q, a in zip(QUESTIONS, ours)]
    probs = ai_first_probs(str(tiny_dir), queries, "Prefer the correct answer.")
    cpu_probs = ai_first_probs(str(tiny_dir), queries, "Prefer the correct answer.", device="cpu")
    assert probs == pytest.approx(cpu_probs, abs=1e-4)


def test_one_vllm_engine_answers_for_each_policy_as_transformers_does(
    tmp_path, tiny_dir, tiny_size
):
    # Two checkpoints of one architecture: the engine built for the first takes the second's
    # weights in place, and must answer with them (greedy answers of each = transformers').
    other = ensure_tiny_model(tmp_path / "other", seed=1, **tiny_size)
    assert reloadable(str(tiny_dir), str(other))
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    policies = {"a": str(tiny_dir), "b": str(other), "a_again": str(tiny_dir)}
    ours = policies_answers(policies, chats, 6, num_samples=2, engine="vllm")
    theirs = policies_answers(policies, chats, 6, engine="transformers")
    assert {k: greedy for k, (greedy, _) in ours.items()} == {k: g for k, (g, _) in theirs.items()}
    assert ours["a"][0] != ours["b"][0] and ours["a"] == ours["a_again"]  # sampled too (seeded)


def test_an_engine_is_reused_only_for_the_same_architecture(tmp_path, tiny_dir, tiny_size):
    wider = ensure_tiny_model(
        tmp_path / "wider", **{**tiny_size, "hidden_size": 2 * tiny_size["hidden_size"]}
    )
    assert not reloadable(str(tiny_dir), str(wider))
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_dir, renamed)
    config = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere"}))
    tok_config = json.loads((renamed / "tokenizer_config.json").read_text())
    (renamed / "tokenizer_config.json").write_text(json.dumps({**tok_config, "is_local": True}))
    assert reloadable(str(tiny_dir), str(renamed))  # what transformers writes back after loading
    (renamed / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert not reloadable(str(tiny_dir), str(renamed))  # the engine would stop at the old EOS


def test_an_eval_prompt_without_a_label_is_named(tmp_path, tiny_dir):
    cfg, path = _cfg(tmp_path, ["3", None, "34", "82", "24", "9"])
    with pytest.raises(DataError, match=rf"{path}: record 2: no 'label'"):
        evaluate_policies(cfg, {"a": str(tiny_dir)}, "a", [])


def test_rlhf_eval_command(tmp_path, tiny_dir):
    cfg_path = tmp_path / "c.yaml"
    _, held = _cfg(tmp_path, ["3"] * 6)
    cfg_path.write_text(
        f"run: {{stages: []}}\nsft: {{eval_files: []}}\n"
        f"eval: {{prompt_files: [{{path: {held}}}], samples: 2, max_new_tokens: 3}}\n"
    )
    cmd = [sys.executable, "-m", "rlhf.cli", "eval", str(cfg_path)]
    ok = subprocess.run(
        [*cmd, "--model", f"x={tiny_dir}", "--model", f"y={tiny_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["eval/x_accuracy"] == out["eval/y_accuracy"]
    assert (out["eval/y_vs_x_fixed"], out["eval/y_vs_x_broken"], out["eval/y_vs_x_greedy_p"]) == (
        0,
        0,
        1.0,
    )
    bad = subprocess.run(
        [*cmd, "--model", f"x={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert f"error: --model 'x={tmp_path}': {tmp_path} is not a saved model" in bad.stderr
