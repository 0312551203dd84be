"""One prompt rule: SFT rows, preference rows, RL prompts and evaluation see the same tokens."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from rlhf.config import DataFile, load_config
from rlhf.data import DataError
from rlhf.data.render import render_prompt, resolve_prompt_format, tokenize_example
from rlhf.data.stages import prepare_preferences, prepare_sft

QUESTION = "What is 12+30?"


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory):
    """The byte tokenizer without a chat template, as a base model ships it."""
    from rlhf.models.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    tok.chat_template = None
    path = tmp_path_factory.mktemp("plain_tok")
    tok.save_pretrained(str(path))
    return str(path)


def _stage(path, fmt):
    return SimpleNamespace(
        train_files=[DataFile(path=str(path))],
        eval_files=[],
        format="auto",
        prompt_format=fmt,
        columns={},
        on_error="fail",
        max_length=64,
        overlong="truncate",
    )


def _write(path, row):
    path.write_text(json.dumps(row) + "\n")
    return path


def _prompt_part(ids, labels):
    return ids[: next(i for i, lab in enumerate(labels) if lab != -100)]


def prompt_tokens_of_every_stage(tmp_path, tokenizer_dir, fmt):
    """The prompt tokens of QUESTION as SFT, DPO/RM, RL and evaluation render it."""
    from rlhf.answers import encode_prompts
    from rlhf.rl.trainer import RLRun

    sft_file = _write(tmp_path / "sft.jsonl", {"input": QUESTION, "output": "42"})
    train, _, report = prepare_sft(_stage(sft_file, fmt), tokenizer_dir)
    pref_file = _write(tmp_path / "p.jsonl", {"prompt": QUESTION, "chosen": "42", "rejected": "4"})
    pairs, _, _ = prepare_preferences(_stage(pref_file, fmt), tokenizer_dir)
    rl_file = _write(tmp_path / "rl.jsonl", {"prompt": QUESTION, "label": "42"})
    rl = load_config(None, ["run.stages=[]", f"rl.prompt_format={fmt}"]).rl
    # RLRun's own prompt loader, on a run holding just what it reads (no actors started).
    run = SimpleNamespace(tok=AutoTokenizer.from_pretrained(tokenizer_dir), rl=rl)
    rl_items, _ = RLRun._load_prompts(run, [DataFile(path=str(rl_file))])
    _, evaluated = encode_prompts(tokenizer_dir, [[{"role": "user", "content": QUESTION}]], fmt)
    return report["prompt_format"], {
        "sft": _prompt_part(train[0]["input_ids"], train[0]["labels"]),
        "chosen": _prompt_part(pairs[0]["chosen_input_ids"], pairs[0]["chosen_labels"]),
        "rejected": _prompt_part(pairs[0]["rejected_input_ids"], pairs[0]["rejected_labels"]),
        "rl": rl_items[0][0],
        "eval": evaluated[0],
    }


@pytest.mark.parametrize("fmt", ["chat", "raw", "auto"])
def test_sft_preference_rl_and_eval_render_the_same_prompt_tokens(
    tmp_path, tiny_tokenizer_dir, fmt
):
    resolved, tokens = prompt_tokens_of_every_stage(tmp_path, tiny_tokenizer_dir, fmt)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    expected = {
        "chat": f"<|user|>{QUESTION}<|eos|><|assistant|>",  # the chat template, turn opened
        "raw": QUESTION,  # the text alone
    }[resolved]
    assert resolved == ("chat" if fmt == "auto" else fmt)  # the demo tokenizer has a template
    for stage, ids in tokens.items():
        assert tok.decode(ids) == expected, stage


def test_auto_renders_plain_text_for_a_tokenizer_without_a_chat_template(
    tmp_path, plain_tokenizer_dir
):
    resolved, tokens = prompt_tokens_of_every_stage(tmp_path, plain_tokenizer_dir, "auto")
    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    assert resolved == "raw"
    assert all(tok.decode(ids) == QUESTION for ids in tokens.values()), tokens


def test_raw_rows_train_on_the_answer_and_eos_after_the_plain_prompt(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    chat = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
    ]
    ids, labels = tokenize_example(chat, tok, "raw")
    # "Add.\n\n1+1" is 9 byte tokens of prompt, then "2" and <|eos|> carry the loss
    assert tok.decode(ids) == "Add.\n\n1+1" + "2<|eos|>"
    assert labels == [-100] * 9 + ids[9:]
    assert ids[:9] == render_prompt(chat[:-1], tok, "raw")


def test_chat_without_a_template_and_message_lists_under_auto_name_the_setting(
    plain_tokenizer_dir,
):
    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    with pytest.raises(DataError, match=r"sft.prompt_format = 'chat': the tokenizer has no chat"):
        resolve_prompt_format("chat", tok, 0, "sft.prompt_format")
    with pytest.raises(
        DataError, match=r"'auto': 3 records are lists of turns.*rl.prompt_format=raw"
    ):
        resolve_prompt_format("auto", tok, 3, "rl.prompt_format")
    assert resolve_prompt_format("raw", tok, 3, "rl.prompt_format") == "raw"
