"""RLAIF labelling (rlhf/judge.py): verdict arithmetic, the AI judge's label probabilities on a
real tiny model, `rlhf label` with a rule and an AI judge, and SFT model -> sample -> label -> RM."""

import json
from pathlib import Path

import pytest
import torch

from rlhf.cli import main
from rlhf.config import DataFile, RewardModelConfig, load_config
from rlhf.data.stages import prepare_preferences
from rlhf.judge import (
    JUDGE_TEMPLATE,
    Item,
    agreement,
    ai_first_probs,
    answer_pairs,
    combine_orders,
    verdicts_from_scores,
)
from rlhf.models.factory import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
# Head size 32 (64 / 2): the smallest vLLM's CPU attention accepts (the e2e samples with vLLM).
TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)
SHORT_PRINCIPLES = "Prefer the correct answer."  # the tiny model's context is 256 bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("judge") / "tiny", seed=0, **TINY)


@pytest.fixture
def constitution(tmp_path) -> Path:
    path = tmp_path / "principles.md"
    path.write_text(SHORT_PRINCIPLES)
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answers(*texts: str) -> list[dict]:
    return [{"text": t, "rank": None} for t in texts]


def test_combine_orders_prefers_an_answer_only_when_both_orders_agree():
    # pair 1: x as A 0.9, y as A 0.3 -> x both times; pair 2: 0.2 / 0.6 -> y both times;
    # pair 3: A both times (0.7, 0.8) -> position bias: no verdict, flagged; pair 4: exactly 1/2.
    verdicts, disagree = combine_orders([0.9, 0.2, 0.7, 0.5], [0.3, 0.6, 0.8, 0.4])
    assert verdicts == [1, -1, 0, 0]
    assert disagree == [False, False, True, False]


def test_score_verdicts_call_gaps_within_the_margin_ties():
    # gaps 1.0, -0.1, 0.0, 0.04 with margin 0.05 -> win, loss, tie, tie
    assert verdicts_from_scores([1.0, 0.2, 0.5, 0.54], [0.0, 0.3, 0.5, 0.5], 0.05) == [1, -1, 0, 0]
    assert verdicts_from_scores([0.54], [0.5]) == [1]


def test_agreement_counts_only_pairs_both_judges_decided():
    # decided by both: pairs 1 and 4 (pair 2 is a tie for b, pair 3 a tie for a); alike: pair 1
    assert agreement([1, -1, 0, 1], [1, 0, 1, -1]) == {"decided_by_both": 2, "agreement": 0.5}
    assert agreement([0, 0], [1, -1]) == {"decided_by_both": 0, "agreement": None}


def test_answer_pairs_compare_every_two_different_texts_once():
    chat = [{"role": "user", "content": "1+1="}]
    items = [Item(chat, ["2", "3", " 2 ", "4"], "2", "1+1="), Item(chat, ["5", "5"], None, "1+1=")]
    # distinct texts of item 0 at 0, 1, 3 (" 2 " repeats "2"): C(3,2) = 3; item 1: none
    assert answer_pairs(items) == [(0, 0, 1), (0, 0, 3), (0, 1, 3)]


def test_ai_judge_reads_the_softmax_of_the_two_label_logits_and_batches_without_drift(tiny):
    queries = [("What is 2+3?", "5", "6"), ("What is 10+4?", "fourteen, I think", "14")]
    batched = ai_first_probs(str(tiny), queries, SHORT_PRINCIPLES, batch_size=2)
    single = [ai_first_probs(str(tiny), [q], SHORT_PRINCIPLES, batch_size=1)[0] for q in queries]
    assert batched == pytest.approx(single, abs=1e-5)  # left padding does not change the answer

    # By hand for the first query: the chat-rendered judge prompt, then P(A) / (P(A) + P(B)).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    text = JUDGE_TEMPLATE.format(
        constitution=SHORT_PRINCIPLES, question=queries[0][0], first="5", second="6"
    )
    chat = [{"role": "user", "content": text}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    a, b = tok.convert_tokens_to_ids(["A", "B"])
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1]
    assert batched[0] == pytest.approx(torch.softmax(last[[a, b]], -1)[0].item(), abs=1e-5)


def test_label_writes_the_rule_judges_pairs_and_reports_the_ai_judge_beside_it(
    tiny, constitution, tmp_path, capsys
):
    rows = [
        {"prompt": "What is 2+3?", "label": "5", "responses": _answers("5", "6", "five")},
        {
            "prompt": [{"role": "user", "content": "What is 10+4?"}],
            "responses": _answers("41", "14"),
        },
    ]
    answers = _write(tmp_path / "answers.jsonl", rows)
    labels = _write(tmp_path / "prompts.jsonl", [{"prompt": rows[1]["prompt"], "label": "14"}])
    out = tmp_path / "rlaif" / "pairwise.jsonl"
    args = ["label", "configs/tiny_cpu.yaml", f"judge.constitution={constitution}"]
    args += ["--answers", str(answers), "--prompts", str(labels), "--out", str(out)]
    assert main([*args, "--judge", "rule", "--judge", f"model={tiny}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 + 1
    rule = report["judges"]["rule=exact_match"]
    # "5" beats "6" and "five"; "6" vs "five" is a tie; "14" (second) beats "41"
    assert (rule["first_better"], rule["second_better"], rule["ties"]) == (2, 1, 1)
    ai = report["judges"][f"model={tiny}"]
    assert ai["first_better"] + ai["second_better"] + ai["ties"] + ai["order_disagreements"] == 4
    assert report["agreement_with_gold"]["rule=exact_match"] == {
        "decided_by_both": 3,
        "agreement": 1.0,
    }
    assert list(report["agreement"]) == [f"rule=exact_match vs model={tiny}"]
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert {(w["chosen"], w["rejected"]) for w in written} == {
        ("5", "6"),
        ("5", "five"),
        ("14", "41"),
    }
    assert written[-1]["prompt"] == rows[1]["prompt"]  # a list of turns stays a list of turns
    assert json.loads(Path(f"{out}.report.json").read_text())["written_pairs"] == 3

    scfg = RewardModelConfig(train_files=[DataFile(path=str(out))], num_workers=1)
    train, _, data_report = prepare_preferences(scfg, str(tiny))
    assert len(train) == 3 and data_report["train"]["skipped"] == 0

    # Only pairs both judges decide alike: the untrained judge only ever picks a position.
    assert main([*args, "--judge", "rule", "--judge", f"model={tiny}", "--require-agreement"]) == 0
    report = json.loads(capsys.readouterr().out)
    decided = report["agreement"][f"rule=exact_match vs model={tiny}"]["decided_by_both"]
    assert report["written_pairs"] <= decided


@pytest.mark.parametrize(
    ("row", "judge", "message"),
    [
        (
            {"prompt": "1+1=", "label": "2", "responses": _answers("2", "3")},
            "oracle",
            "unknown kind",
        ),
        ({"prompt": "1+1=", "label": "2"}, "rule", "answers.jsonl:1: responses:"),
        ({"prompt": "1+1=", "responses": _answers("2", "3")}, "rule", "record 1: no label"),
        (
            {"prompt": "1+1=", "label": "2", "responses": _answers("2", "3")},
            "model",
            "no checkpoint",
        ),
    ],
)
def test_label_user_mistakes_end_with_one_error_line(tmp_path, capsys, row, judge, message):
    answers = _write(tmp_path / "answers.jsonl", [row])
    args = ["label", "configs/tiny_cpu.yaml", "--answers", str(answers), "--judge", judge]
    assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_sft_model_to_sampled_answers_to_ai_and_rule_labels_to_reward_model_steps(
    tiny, constitution, tmp_path, capsys, ray_cluster
):
    from rlhf.train.trainer import run_stage

    questions = [("What is 12+30?", "42"), ("What is 5+5?", "10"), ("What is 21+21?", "42")]
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": q, "label": y} for q, y in questions])
    sampled = tmp_path / "answers.jsonl"
    args = ["sample", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}", "run.name=t"]
    args += ["serve.max_model_len=128", "serve.max_tokens=6"]
    args += ["--model", str(tiny), "--prompts", str(prompts), "--k", "3", "--out", str(sampled)]
    assert main(args) == 0
    # The untrained policy never says the sum; the reference answer joins its samples as a
    # candidate (as when demonstrations are ranked against samples), so the rule has a say.
    records = [json.loads(x) for x in sampled.read_text().splitlines()]
    for r, (_, y) in zip(records, questions):
        r["responses"].append({"text": y, "rank": None})
    _write(sampled, records)
    out = tmp_path / "rlaif" / "pairwise.jsonl"
    capsys.readouterr()
    args = ["label", "configs/tiny_cpu.yaml", f"judge.constitution={constitution}"]
    args += ["--answers", str(sampled), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--judge", "rule", "--judge", f"model={tiny}"]) == 0
    report = json.loads(capsys.readouterr().out)
    ai = report["judges"][f"model={tiny}"]
    assert ai["pairs"] == report["pairs"] >= 3 * 3  # the reference beats each distinct sample
    assert report["judges"]["rule=exact_match"]["ties"] == report["pairs"] - report["written_pairs"]

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=t",
            "run.stages=[rm]",
            f"rm.train_files=[{{path: {out}}}]",
            f"rm.eval_files=[{{path: {out}}}]",
            "rm.max_steps=2",
            "rm.warmup_steps=0",
            "rm.micro_batch_size=2",
            "rm.global_batch_size=4",
            "rm.eval_interval=2",
            "rm.save_interval=2",
            "rm.log_interval=1",
        ],
    )
    summary = run_stage(cfg, "rm", str(tiny))
    assert (Path(summary["model"]) / "config.json").is_file()
    assert summary["data"]["train"]["samples"] == report["written_pairs"]


def test_a_judge_prompt_longer_than_the_judges_context_is_a_clear_error(tiny, tmp_path, capsys):
    row = {"prompt": "1+1=", "label": "2", "responses": _answers("2", "3")}
    answers = _write(tmp_path / "answers.jsonl", [row])
    # The shipped constitution does not fit the tiny model's 256 positions.
    args = ["label", "configs/tiny_cpu.yaml", "--answers", str(answers), "--judge", f"model={tiny}"]
    assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 2
    assert "more than 256" in capsys.readouterr().err
