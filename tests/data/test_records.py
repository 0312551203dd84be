"""Strict readers and the bad-input cases: every error names file, line and field."""

import json
from types import SimpleNamespace

import datasets
import pytest

from rlhf.config import DataFile
from rlhf.data.records import DataError, read_records
from rlhf.data.stages import load_items, load_prompts, prepare_preferences, prepare_sft

SFT = ("input_output", "instruction", "messages")


def write_lines(path, *lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def chats(path, on_error="fail"):
    from rlhf.data.formats import to_chat

    return load_items(
        [DataFile(path=str(path))], SFT, "auto", lambda rec, fmt: [to_chat(rec, fmt)], on_error, 0
    )


GOOD = json.dumps({"input": "What is 1+2?", "output": "3"})
BAD_CASES = [
    ("truncated_line", '{"input": "What is 1+2?", "outp', r":2: <json>: invalid JSON"),
    (
        "wrong_type",
        json.dumps({"input": "q", "output": 3}),
        r":2: output: expected a string, got int",
    ),
    ("missing_key", json.dumps({"input": "q"}), r":2: output: missing key"),
    ("empty_response", json.dumps({"input": "q", "output": "  "}), r":2: output: empty"),
    (
        "unknown_role",
        json.dumps(
            {
                "messages": [
                    {"role": "robot", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        r":2: messages\[0\]\.role: unknown role 'robot'",
    ),
    ("nan", '{"input": "q", "output": NaN}', r":2: <json>: NaN is not valid JSON"),
    ("infinity", '{"input": "q", "output": -Infinity}', r":2: <json>: -Infinity is not valid"),
    ("invalid_utf8", b'{"input": "q\xff", "output": "3"}', r":2: <utf-8>: invalid UTF-8 byte"),
    (
        "last_turn_user",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        r":2: messages\[0\]\.role: the last turn must be the assistant's",
    ),
]


@pytest.mark.parametrize("name,line,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_a_bad_sft_record_fails_fast_naming_file_line_and_field(tmp_path, name, line, message):
    path = write_lines(tmp_path / f"{name}.jsonl", GOOD, line, GOOD)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + message):
        chats(path)


def test_skip_mode_keeps_good_records_and_counts_each_bad_one_by_reason(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", GOOD, *[c[1] for c in BAD_CASES], GOOD)
    items, report = chats(path, on_error="skip")
    assert len(items) == 2
    assert report["skipped"] == len(BAD_CASES)
    assert report["skipped_by_reason"] == {
        "<json>": 3,
        "<utf-8>": 1,
        "output: expected a string, got int": 1,
        "output: missing key": 1,
        "output: empty": 1,
        "messages: unknown role 'robot'": 1,
        "messages: the last turn must be the assistant's": 1,
    }


def pref(path, on_error="fail"):
    from rlhf.data.formats import to_pairs

    return load_items(
        [DataFile(path=str(path))], ("pairwise", "ranked"), "auto", to_pairs, on_error, 0
    )


def ranked(*ranks):
    return json.dumps({"prompt": "q", "responses": [{"text": f"a{r}", "rank": r} for r in ranks]})


def test_ranked_lists_expand_into_every_ordered_pair(tmp_path):
    items, _ = pref(write_lines(tmp_path / "r.jsonl", ranked(2, 1, 3, 4)))
    pairs = [(c, r) for _, c, r in items]
    # C(4,2) = 6 pairs, the better-ranked response always first
    assert pairs == [
        ("a1", "a2"),
        ("a1", "a3"),
        ("a1", "a4"),
        ("a2", "a3"),
        ("a2", "a4"),
        ("a3", "a4"),
    ]


@pytest.mark.parametrize(
    "ranks,message",
    [((1, 1, 2), "ranks have ties: \\[1, 1, 2\\]"), ((1, 3), "ranks must be 1..2 without gaps")],
)
def test_ranks_with_ties_or_gaps_are_rejected(tmp_path, ranks, message):
    path = write_lines(tmp_path / "r.jsonl", ranked(1, 2), ranked(*ranks))
    with pytest.raises(DataError, match=r":2: responses: " + message):
        pref(path)


def test_an_extra_key_names_the_key_and_the_format(tmp_path):
    row = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "score": 1})
    with pytest.raises(DataError, match=r":1: score: unexpected key for pairwise format"):
        pref(write_lines(tmp_path / "p.jsonl", row))


def test_json_parquet_and_save_to_disk_read_the_same_records(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name in ("a.json", "a.parquet", "folder"):
        got = [r.data for r in read_records(tmp_path / name)]
        assert got == rows, name
        assert [r.where for r in read_records(tmp_path / name)][-1] == f"{tmp_path / name}:3"


def test_a_missing_file_and_an_unknown_extension_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_records(tmp_path / "absent.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        list(read_records(tmp_path / "x.csv"))


def test_file_weights_scale_each_files_share_deterministically(tmp_path):
    a = write_lines(
        tmp_path / "a.jsonl", *[json.dumps({"input": f"a{i}", "output": "x"}) for i in range(10)]
    )
    b = write_lines(
        tmp_path / "b.jsonl", *[json.dumps({"input": f"b{i}", "output": "x"}) for i in range(10)]
    )
    from rlhf.data.formats import to_chat

    def load(seed):
        return load_items(
            [DataFile(path=str(a), weight=2.0), DataFile(path=str(b), weight=0.5)],
            SFT,
            "auto",
            lambda rec, fmt: [to_chat(rec, fmt)],
            "fail",
            seed,
        )

    items, report = load(0)
    assert report["files"][str(a)] == {"read": 10, "used": 20}
    assert report["files"][str(b)] == {"read": 10, "used": 5}
    assert items == load(0)[0]


def test_rl_prompts_keep_their_optional_label(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        json.dumps({"prompt": "What is 1+1?", "label": "2"}),
        json.dumps({"prompt": "Say hi"}),
    )
    items, _ = load_prompts([DataFile(path=str(path))])
    assert items == [
        ([{"role": "user", "content": "What is 1+1?"}], "2"),
        ([{"role": "user", "content": "Say hi"}], None),
    ]


def _stage(path, **kw):
    base = dict(
        train_files=[DataFile(path=str(path))],
        eval_files=[],
        format="auto",
        on_error="fail",
        max_length=64,
        overlong="truncate",
    )
    return SimpleNamespace(**{**base, **kw})


def test_shipped_samples_cover_every_format_and_prepare_without_errors(tiny_tokenizer_dir):
    from pathlib import Path

    samples = Path(__file__).resolve().parents[2] / "rlhf/data/samples"
    for name in ("sft_io", "sft_instruction", "sft_messages"):
        train, _, report = prepare_sft(_stage(samples / f"{name}.jsonl"), tiny_tokenizer_dir)
        assert len(train) > 0 and report["train"]["skipped"] == 0, name
    for name in ("pairwise", "ranked"):
        train, _, report = prepare_preferences(
            _stage(samples / f"{name}.jsonl"), tiny_tokenizer_dir
        )
        assert len(train) > 0 and report["train"]["skipped"] == 0, name
    items, _ = load_prompts([DataFile(path=str(samples / "prompts.jsonl"))])
    assert all(label is not None for _, label in items)
