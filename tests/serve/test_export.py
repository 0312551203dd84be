import json

import pytest

from rlhf.config import DataFile, RewardModelConfig
from rlhf.data import DataError
from rlhf.data.stages import prepare_preferences
from rlhf.models.tokenizer import build_byte_tokenizer
from rlhf.serve.db import FeedbackStore, default_url, prompt_key
from rlhf.serve.export import agreement_stats, build_preferences, export_feedback
from rlhf.serve.protocol import parse_feedback

P1 = [{"role": "user", "content": "12+34="}]
P2 = [{"role": "user", "content": "5+5="}]


def answer(rid, prompt, text, endpoint="chat"):
    return dict(
        id=rid,
        model_version="v1",
        endpoint=endpoint,
        prompt=prompt,
        answer=text,
        finish_reason="stop",
        completion_tokens=len(text),
        params={},
    )


ANSWERS = [
    answer("a", P1, "46"),
    answer("b", P1, "45"),
    answer("c", P1, "4"),
    answer("d", P2, "10"),
    answer("e", P2, "11"),
    answer("x", "raw text", "more", endpoint="completion"),
]


def fb(**body):
    return parse_feedback(body)


FEEDBACK = [
    fb(id="1", kind="comparison", chosen="a", rejected="b", rater="ann"),
    fb(id="2", kind="comparison", chosen="a", rejected="b", rater="bob"),
    fb(id="3", kind="comparison", chosen="b", rejected="a", rater="cy"),  # disagrees
    fb(id="4", kind="ranking", response_ids=["a", "c", "b"], rater="ann"),
    fb(id="5", kind="correction", response_id="e", text="10"),
    fb(id="6", kind="rating", response_id="d", rating=5, rater="ann"),
    fb(id="7", kind="rating", response_id="e", rating=1, rater="ann"),
    fb(id="8", kind="rating", response_id="e", rating=3, rater="bob"),  # e: mean 2 < 5
    fb(id="9", kind="rating", response_id="x", rating=2),  # a completion: not exported
]


def with_keys(rows):
    return [{**r, "prompt_key": prompt_key(r["endpoint"], r["prompt"])} for r in rows]


def test_each_kind_of_feedback_becomes_preference_records():
    pairwise, ranked, report = build_preferences(with_keys(ANSWERS), FEEDBACK)
    assert pairwise == [
        {"prompt": P1, "chosen": "46", "rejected": "45"},
        {"prompt": P1, "chosen": "46", "rejected": "45"},
        {"prompt": P1, "chosen": "45", "rejected": "46"},
        {"prompt": P2, "chosen": "10", "rejected": "11"},  # the correction
        {"prompt": P2, "chosen": "10", "rejected": "11"},  # ratings: d (5) > e (mean 2)
    ]
    texts = [(r["text"], r["rank"]) for r in ranked[0]["responses"]]
    assert ranked == [{"prompt": P1, "responses": ranked[0]["responses"]}]
    assert texts == [("46", 1), ("4", 2), ("45", 3)]
    assert report["feedback"] == {"comparison": 3, "ranking": 1, "correction": 1, "rating": 4}
    assert report["written"] == {
        "pairwise": 5,
        "ranked": 1,
        "pairs_from_comparison": 3,
        "pairs_from_correction": 1,
        "pairs_from_rating": 1,
    }
    assert report["skipped"] == {"completion_prompt": 1}
    # P1 was judged by ann, bob and cy; P2 by ann, bob and an anonymous corrector.
    assert report["prompts_judged_by_several_raters"] == 2


def test_conflicts_and_rater_agreement_are_counted():
    # Pair {a, b}: a>b (ann), a>b (bob), b>a (cy), a>b (ann, ranking). Couples from different
    # raters: ann-bob agree, ann-cy no, bob-cy no, ann(rank)-bob agree, ann(rank)-cy no;
    # ann-ann is the same rater and not counted: 2 of 5 agree. {a, c} and {c, b}: one rater each.
    stats = agreement_stats(
        [("a", "b", "ann"), ("a", "b", "bob"), ("b", "a", "cy"), ("a", "b", "ann")]
        + [("a", "c", "ann"), ("c", "b", "ann")]
    )
    assert stats == {
        "judged_pairs": 3,
        "conflicting_pairs": 1,
        "pairs_judged_by_several_raters": 1,
        "rater_agreement": pytest.approx(2 / 5),
    }
    assert agreement_stats([("a", "b", "ann")])["rater_agreement"] is None


def test_exported_files_go_straight_into_the_reward_model_data_preparation(tmp_path):
    url = default_url(tmp_path / "run")
    store = FeedbackStore(url)
    store.create_tables()
    for row in ANSWERS:
        store.log_response(row)
    for item in FEEDBACK:
        store.add_feedback(item)
    report = export_feedback(url, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    tok_dir = tmp_path / "tok"
    build_byte_tokenizer().save_pretrained(tok_dir)
    files = [DataFile(path=str(tmp_path / "out" / f)) for f in ("pairwise.jsonl", "ranked.jsonl")]
    scfg = RewardModelConfig(train_files=files, num_workers=1, micro_batch_size=1)
    train, _, data_report = prepare_preferences(scfg, str(tok_dir))
    # 5 pairs + C(3, 2) = 3 pairs from the ranking
    assert len(train) == 8
    assert data_report["train"]["skipped"] == 0


def test_an_unfilled_ranking_file_is_refused_naming_the_rank(tmp_path):
    path = tmp_path / "to_rank.jsonl"
    record = {
        "prompt": "2+2=",
        "responses": [{"text": "4", "rank": None}, {"text": "5", "rank": None}],
    }
    path.write_text(json.dumps(record) + "\n")
    tok_dir = tmp_path / "tok"
    build_byte_tokenizer().save_pretrained(tok_dir)
    scfg = RewardModelConfig(
        train_files=[DataFile(path=str(path))], num_workers=1, micro_batch_size=1
    )
    with pytest.raises(DataError, match=r"responses\[0\].rank"):
        prepare_preferences(scfg, str(tok_dir))
