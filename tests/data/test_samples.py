"""The bundled data: reproducible from its generators, and no held-out question leaks into training."""

import json
import re
from pathlib import Path

import pytest

from rlhf.data import addition, pretrain_corpus

SAMPLES = Path(__file__).resolve().parents[2] / "rlhf/data/samples"
EVAL_FILES = {"sft_eval", "pairwise_eval", "prompts_eval"}
# Every surface form a sum takes in the bundled files: 23+45, 23 + 45, 23 plus 45, add 23 and 45,
# sum of 23 and 45, add_pair(23, 45).
PAIR = re.compile(
    r"(\d+) ?\+ ?(\d+)|(\d+) plus (\d+)|(?:add|sum of) (\d+) and (\d+)"
    r"|add_pair\((\d+), (\d+)\)"
)


def _pairs(text: str) -> set[tuple[int, int]]:
    out = set()
    for m in PAIR.finditer(text):
        a, b = (int(g) for g in m.groups() if g is not None)
        out.add((a, b))
    return out


def _pairs_in(*paths: Path) -> set[tuple[int, int]]:
    """Every operand pair asked or stated in the files."""
    return set().union(*(_pairs(p.read_text(encoding="utf-8")) for p in paths))


def _shipped(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_the_shipped_files_are_what_the_generators_write():
    for name, rows in addition.build().items():
        assert _shipped(SAMPLES / f"{name}.jsonl") == [json.dumps(r) for r in rows], name
    for name, docs in pretrain_corpus.build().items():
        want = [json.dumps({"text": d}) for d in docs]
        assert _shipped(SAMPLES / "pretrain" / f"{name}.jsonl") == want, name


def test_no_held_out_pair_appears_in_any_training_file():
    held = set(addition.split()[1])
    assert len(held) == addition.HELD_OUT
    training = [p for p in sorted(SAMPLES.rglob("*.jsonl")) if p.stem not in EVAL_FILES]
    assert len(training) >= 9  # pretraining sources, SFT formats, preferences, prompts
    seen = _pairs_in(*training)
    assert len(seen) > 5000  # the parser does find the sums in the training text
    assert not held & seen, sorted(held & seen)[:10]


def test_the_evaluation_files_are_the_held_out_pairs():
    held = set(addition.split()[1])
    for name in sorted(EVAL_FILES):
        found = _pairs_in(SAMPLES / f"{name}.jsonl")
        assert found and found <= held, name


@pytest.mark.parametrize(
    "text,pair",
    [
        ("What is 3+40?", (3, 40)),
        ("7 plus 8 equals 15.", (7, 8)),
        ("If you add 1 and 2 you get 3.", (1, 2)),
        ("# 4 + 95 == 99", (4, 95)),
        ("The sum of 5 and 6", (5, 6)),
    ],
)
def test_the_pair_parser_reads_each_surface_form(text, pair):
    assert _pairs(text) == {pair}


def test_the_rl_prompts_are_every_training_question_once():
    rows = [json.loads(x) for x in (SAMPLES / "prompts.jsonl").read_text().splitlines()]
    train, held = addition.split()
    assert len(rows) == len(train) == 9600
    assert _pairs_in(SAMPLES / "prompts.jsonl") == set(train)
    assert all(r["label"] == str(sum(_pairs(r["prompt"]).pop())) for r in rows)
    assert not set(train) & set(held)


def test_the_demonstrations_ask_6800_of_the_training_questions():
    names = ("sft_io", "sft_instruction", "sft_messages")
    asked = _pairs_in(*(SAMPLES / f"{name}.jsonl" for name in names))
    train, _ = addition.split()
    assert len(asked) == 6800 and asked <= set(train)
    rows = _shipped(SAMPLES / "sft_io.jsonl")
    assert len(rows) == len(set(rows)) == 6000
