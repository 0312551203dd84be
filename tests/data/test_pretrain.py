"""Pretraining data engineering: filters, dedup, mixing, packing, and the report adding up."""

import json
from types import SimpleNamespace

import pytest
from datasketch import MinHashLSH

from rlhf.config import DataFile
from rlhf.data import pretrain as P

PROSE = "Ada went to the market on a sunny morning and bought twelve apples for the family."


@pytest.mark.parametrize(
    "rule,bad,good",
    [
        (P.too_short, "Home page", PROSE),
        (P.low_alnum, "#### {{{ }}} ||| <<< >>> ### menu", PROSE),
        (P.repeated_lines, "BUY NOW\nBUY NOW\nBUY NOW\nBUY NOW\nsomething", "a\nb\nc\nd"),
        (P.repeated_bigram, "click here " * 20, PROSE),
        (P.wrong_charset, "数据数据数据数据数据 hello", PROSE),
    ],
)
def test_each_filter_removes_its_junk_and_keeps_clean_prose(rule, bad, good):
    assert rule(bad) and not rule(good)


def test_code_sources_are_not_judged_by_prose_rules():
    code = "def f(x):\n    return {x: [x]}\n"
    kept, report = P.clean_source("code", [code], set(), MinHashLSH(0.8, num_perm=64), 0.8)
    assert kept == [code] and sum(report["removed"].values()) == 0
    kept, _ = P.clean_source("web", [code], set(), MinHashLSH(0.8, num_perm=64), 0.8)
    assert kept == []  # too short and symbol-heavy for prose


def test_exact_dedup_ignores_case_and_whitespace():
    kept, removed = P.exact_dedup([PROSE, PROSE.upper(), "  " + PROSE.replace(" ", "  ")], set())
    assert kept == [PROSE] and removed == 2


def test_near_dedup_removes_an_edited_copy_but_keeps_a_different_document():
    long_doc = " ".join([PROSE] * 3)
    edited = long_doc.replace("twelve", "eleven", 1)
    other = "Papers on reward modelling report gains on twelve tasks with careful data design."
    kept, removed = P.near_dedup([long_doc, edited, other], MinHashLSH(0.7, num_perm=64), 0.7)
    assert kept == [long_doc, other] and removed == 1


def test_mixing_reaches_the_token_shares_and_repeats_a_small_source():
    sources = {"web": [[1] * 9] * 100, "code": [[2] * 9] * 3}  # 10 tokens per doc with EOS
    docs, report = P.mix_by_tokens(sources, {"web": 0.75, "code": 0.25}, budget=400, seed=0)
    assert report["web"]["tokens"] == 300 and report["code"]["tokens"] == 100
    assert report["code"]["epochs"] == pytest.approx(3.33, abs=0.01)  # 10 docs from 3
    assert report["web"]["share"] == 0.75


def test_packing_puts_eos_between_documents_and_cuts_equal_blocks():
    blocks, dropped = P.pack([[5, 6, 7], [8, 9]], block=3, eos=1)
    # stream 5 6 7 1 8 9 1 -> [5 6 7] [1 8 9], the tail [1] dropped and counted
    assert blocks == [[5, 6, 7], [1, 8, 9]] and dropped == 1


def test_the_pipeline_report_adds_up_on_the_bundled_corpus(tmp_path, tiny_tokenizer_dir):
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "rlhf/data/samples/pretrain"
    sources = {}
    for name in ("web", "code", "papers"):
        lines = (src / f"{name}.jsonl").read_text().splitlines()[:300]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        sources[name] = [DataFile(path=str(tmp_path / f"{name}.jsonl"))]
    cfg = SimpleNamespace(
        sources=sources,
        mix={"web": 0.75, "code": 0.1, "papers": 0.15},
        token_budget=20000,
        max_length=64,
        near_dup_threshold=0.8,
        on_error="fail",
    )
    train, evals, report = P.build_pretraining_data(cfg, tiny_tokenizer_dir)
    for name, r in report["sources"].items():
        assert r["docs_in"] == 300 and r["docs_kept"] + sum(r["removed"].values()) == 300, name
    assert sum(report["sources"]["web"]["removed"].values()) > 0  # the corpus holds junk
    assert all(len(ids) == 64 for ids in list(train["input_ids"]) + list(evals["input_ids"]))
    assert len(evals) == max(1, (len(train) + len(evals)) // 20)
    assert abs(report["mix"]["web"]["share"] - 0.75) < 0.02
    assert json.dumps(report)  # serialisable for data/report.json
    assert "web" in P.format_report(report)


def test_a_text_record_of_the_wrong_type_names_file_line_and_field(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "web.jsonl"
    bad.write_text(json.dumps({"text": PROSE}) + "\n" + json.dumps({"text": 7}) + "\n")
    cfg = SimpleNamespace(
        sources={"web": [DataFile(path=str(bad))]},
        mix={"web": 1.0},
        token_budget=1000,
        max_length=16,
        near_dup_threshold=0.8,
        on_error="fail",
    )
    with pytest.raises(P.DataError, match=r"web\.jsonl:2: text: expected a string, got int"):
        P.build_pretraining_data(cfg, tiny_tokenizer_dir)
