"""Chat tokenization with loss masks, and the over-length policy (always counted)."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from rlhf.config import DataFile
from rlhf.data.stages import prepare_preferences, prepare_sft, tokenize_chat


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_only_assistant_content_and_its_end_token_carry_loss(tok):
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = tokenize_chat(chat, tok)
    assert tok.decode(ids) == "<|user|>What is 2+2?<|eos|><|assistant|>4<|eos|>"
    assert trained_text(tok, ids, labels) == "4<|eos|>"
    # byte tokens: "4" + <|eos|> are the last two positions
    assert labels[-2:] == ids[-2:] and all(x == -100 for x in labels[:-2])


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained_and_nothing_else(tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    ids, labels = tokenize_chat(chat, tok)
    assert trained_text(tok, ids, labels) == "2<|eos|>5<|eos|>"


def _stage(tmp_path, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(
        train_files=[DataFile(path=str(path))],
        eval_files=[],
        format="auto",
        prompt_format="auto",
        columns={},
        on_error="fail",
        max_length=24,
        overlong="truncate",
    )
    return SimpleNamespace(**{**base, **kw})


ROWS = [{"input": "hi", "output": "ok"}, {"input": "hi", "output": "a much longer answer here"}]


def test_overlong_samples_are_truncated_and_counted(tmp_path, tiny_tokenizer_dir):
    train, _, report = prepare_sft(_stage(tmp_path, ROWS), tiny_tokenizer_dir)
    # <|user|> h i <|eos|> <|assistant|> o k <|eos|> = 8 tokens; the long answer makes
    # 4 + 25 + 1 = 30 > 24, cut to 24
    assert [len(r) for r in train["input_ids"]] == [8, 24]
    assert report["train"]["kept"] == 1 and report["train"]["truncated"] == 1


def test_overlong_samples_are_dropped_and_counted_when_configured(tmp_path, tiny_tokenizer_dir):
    train, _, report = prepare_sft(_stage(tmp_path, ROWS, overlong="drop"), tiny_tokenizer_dir)
    assert len(train) == 1 and report["train"]["dropped_overlong"] == 1


def test_a_prompt_longer_than_max_length_is_dropped_even_when_truncating(
    tmp_path, tiny_tokenizer_dir
):
    rows = [{"input": "x" * 40, "output": "y"}, ROWS[0]]
    train, _, report = prepare_sft(_stage(tmp_path, rows), tiny_tokenizer_dir)
    assert len(train) == 1 and report["train"]["dropped_overlong"] == 1


def test_preference_pairs_share_the_prompt_and_mask_it(tmp_path, tiny_tokenizer_dir, tok):
    rows = [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}]
    train, _, _ = prepare_preferences(_stage(tmp_path, rows, max_length=64), tiny_tokenizer_dir)
    row = train[0]
    assert trained_text(tok, row["chosen_input_ids"], row["chosen_labels"]) == "2<|eos|>"
    assert trained_text(tok, row["rejected_input_ids"], row["rejected_labels"]) == "3<|eos|>"
    assert row["chosen_input_ids"][:-2] == row["rejected_input_ids"][:-2]
