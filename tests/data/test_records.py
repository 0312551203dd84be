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


def test_extra_fields_are_kept_out_of_training_and_counted_per_field(tmp_path):
    rows = [
        json.dumps({"id": 1, "source": "web", "prompt": "q", "chosen": "a", "rejected": "b"}),
        json.dumps({"id": 2, "prompt": "q", "chosen": "a", "rejected": "c"}),
    ]
    items, report = pref(write_lines(tmp_path / "p.jsonl", *rows))
    assert [(c, r) for _, c, r in items] == [("a", "b"), ("a", "c")]
    assert report["extra_fields"] == {"id": 2, "source": 1}
    assert report["formats"] == {"pairwise": 2}


def test_of_nested_formats_the_larger_wins_and_unrelated_matches_are_ambiguous(tmp_path):
    both = json.dumps({"instruction": "Add", "input": "1+1", "output": "2"})
    items, report = chats(write_lines(tmp_path / "i.jsonl", both))
    assert items[0][0]["content"] == "Add\n\n1+1" and report["formats"] == {"instruction": 1}
    row = json.dumps(
        {"prompt": "q", "chosen": "a", "rejected": "b", "responses": [{"text": "a", "rank": 1}]}
    )
    with pytest.raises(DataError, match=r":1: <format>: ambiguous record: .* pairwise and ranked"):
        pref(write_lines(tmp_path / "p.jsonl", row))


def test_a_pair_whose_chosen_equals_its_rejected_is_rejected_naming_file_and_line(tmp_path):
    same = json.dumps({"prompt": "q", "chosen": "4", "rejected": " 4 "})
    path = write_lines(
        tmp_path / "p.jsonl", json.dumps({"prompt": "q", "chosen": "4", "rejected": "5"}), same
    )
    with pytest.raises(DataError, match=rf"{path}:2: rejected: same text as chosen"):
        pref(path)
    dup = json.dumps(
        {"prompt": "q", "responses": [{"text": "x", "rank": 1}, {"text": "x", "rank": 2}]}
    )
    with pytest.raises(DataError, match=r":1: responses\[1\]\.text: same text as responses\[0\]"):
        pref(write_lines(tmp_path / "r.jsonl", dup))
    items, report = pref(write_lines(tmp_path / "m.jsonl", same, dup, ranked(1, 2)), "skip")
    assert len(items) == 1
    assert report["skipped_by_reason"] == {
        "rejected: same text as chosen": 1,
        "responses: same text as responses[0].text": 1,
    }


def test_columns_map_differently_named_fields_and_errors_name_the_users_field(tmp_path):
    from rlhf.data.formats import to_pairs

    def load(path, columns):
        return load_items(
            [DataFile(path=str(path))], ("pairwise", "ranked"), "auto", to_pairs, "fail", 0, columns
        )

    columns = {"prompt": "question", "chosen": "good_answer", "rejected": "bad_answer"}
    good = json.dumps({"question": "1+1?", "good_answer": "2", "bad_answer": "3", "id": 7})
    items, report = load(write_lines(tmp_path / "a.jsonl", good), columns)
    assert items == [([{"role": "user", "content": "1+1?"}], "2", "3")]
    assert report["extra_fields"] == {"id": 1}
    empty = json.dumps({"question": "1+1?", "good_answer": " ", "bad_answer": "3"})
    path = write_lines(tmp_path / "b.jsonl", good, empty)
    with pytest.raises(DataError, match=rf"{path}:2: good_answer \(mapped to chosen\): empty"):
        load(path, columns)
    missing = json.dumps({"question": "1+1?", "bad_answer": "3"})
    with pytest.raises(DataError, match=r":1: good_answer \(mapped to chosen\): missing key"):
        load(write_lines(tmp_path / "c.jsonl", missing), columns)
    prompts = write_lines(tmp_path / "p.jsonl", json.dumps({"q": "1+1?", "a": "2", "id": 1}))
    items, _ = load_prompts([DataFile(path=str(prompts))], columns={"prompt": "q", "label": "a"})
    assert items == [([{"role": "user", "content": "1+1?"}], "2")]


def test_a_columns_key_that_is_no_field_of_the_stages_formats_is_a_config_error():
    from rlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rm.columns: 'question' is not a field"):
        load_config(None, ["run.stages=[]", "rm.columns={question: prompt}"])


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
        prompt_format="auto",
        columns={},
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


def _save_everywhere(tmp_path, name, rows):
    """The same records as a save_to_disk folder, a DatasetDict folder and a folder of files."""
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / f"{name}_saved"))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / f"{name}_dict"))
    folder = tmp_path / f"{name}_files" / "data"
    folder.mkdir(parents=True)
    half = len(rows) // 2
    write_lines(folder / "a.jsonl", *[json.dumps(r) for r in rows[:half]])
    datasets.Dataset.from_list(rows[half:]).to_parquet(str(folder / "b.parquet"))
    (folder.parent / "README.md").write_text("not data")
    return [
        DataFile(path=str(tmp_path / f"{name}_saved")),
        DataFile(path=str(tmp_path / f"{name}_dict"), split="train"),
        DataFile(path=str(tmp_path / f"{name}_files")),
    ]


def test_saved_datasets_and_local_dataset_folders_work_in_every_stage(tmp_path, tiny_tokenizer_dir):
    sft = [{"input": f"{i}+1?", "output": str(i + 1), "source": "x"} for i in range(4)]
    pairs = [{"prompt": f"{i}+1?", "chosen": str(i + 1), "rejected": "0"} for i in range(1, 5)]
    prompts = [{"prompt": f"{i}+1?", "label": str(i + 1)} for i in range(4)]
    for spec in _save_everywhere(tmp_path, "sft", sft):
        train, _, report = prepare_sft(_stage(spec.path, train_files=[spec]), tiny_tokenizer_dir)
        assert len(train) == 4 and report["train"]["extra_fields"] == {"source": 4}, spec
    for spec in _save_everywhere(tmp_path, "pref", pairs):
        stage = _stage(spec.path, train_files=[spec])
        train, _, _ = prepare_preferences(stage, tiny_tokenizer_dir)
        assert len(train) == 4, spec
    for spec in _save_everywhere(tmp_path, "prompts", prompts):
        items, _ = load_prompts([spec])
        assert [label for _, label in items] == ["1", "2", "3", "4"], spec
    files = tmp_path / "prompts_files"
    assert [r.where for r in read_records(files)][-1] == f"{files}/data/b.parquet:2"


def test_a_dataset_with_several_splits_needs_the_split_and_reads_only_that_one(tmp_path):
    spec = _save_everywhere(tmp_path, "d", [{"input": "q", "output": "a"}] * 2)
    with pytest.raises(DataError, match=r"d_dict: no split given; the dataset has splits"):
        list(read_records(spec[1].path))
    with pytest.raises(DataError, match=r"no split 'validation'"):
        list(read_records(spec[1].path, split="validation"))
    with pytest.raises(DataError, match=r"split 'train' given, but this saved dataset has no"):
        list(read_records(spec[0].path, split="train"))
    # A dataset repository as `git clone` leaves it: a split per file name or folder.
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"input": "t", "output": "1"}] * 3).to_parquet(
        str(repo / "data/train-00000-of-00001.parquet")
    )
    write_lines(repo / "data/test.jsonl", json.dumps({"input": "held", "output": "out"}))
    with pytest.raises(DataError, match=r"repo: the folder has splits \['test', 'train'\]"):
        list(read_records(repo))
    assert [r.data["input"] for r in read_records(repo, split="test")] == ["held"]
    assert len(list(read_records(repo, split="train"))) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder with no .jsonl"):
        list(read_records(tmp_path / "empty"))
