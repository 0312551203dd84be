from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from rlhf.serve.db import FeedbackConflict, FeedbackStore, default_url
from rlhf.serve.protocol import parse_feedback


def answer(rid: str, prompt: str = "12+34=", text_: str = "46") -> dict:
    return dict(
        id=rid,
        model_version="v1",
        endpoint="chat",
        prompt=[{"role": "user", "content": prompt}],
        answer=text_,
        finish_reason="stop",
        completion_tokens=3,
        params={"temperature": 1.0},
    )


def rating(fid: str, rid: str = "r1", value: int = 4):
    return parse_feedback({"id": fid, "kind": "rating", "response_id": rid, "rating": value})


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = (
        default_url(tmp_path)
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = FeedbackStore(url)
    s.create_tables()
    yield s
    if request.param == "postgresql":  # one server per module: empty it for the next test
        with s.engine.begin() as conn:
            conn.execute(text("DROP TABLE feedback, responses"))
    s.engine.dispose()


def test_sqlite_default_lives_under_the_run_folder_in_wal_mode(tmp_path):
    s = FeedbackStore(default_url(tmp_path / "run"))
    s.create_tables()
    assert (tmp_path / "run" / "serve" / "feedback.db").is_file()
    with s.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_feedback_is_idempotent_by_id_and_a_reused_id_is_refused(store):
    store.log_response(answer("r1"))
    assert store.prompt_keys(["r1", "nope"]).keys() == {"r1"}
    assert store.add_feedback(rating("f1")) == "stored"
    assert store.add_feedback(rating("f1")) == "duplicate"
    with pytest.raises(FeedbackConflict, match="f1"):
        store.add_feedback(rating("f1", value=2))
    assert store.count("feedback") == 1
    assert store.all_feedback()[0].rating == 4
    assert store.all_responses()[0]["prompt"] == [{"role": "user", "content": "12+34="}]


def test_concurrent_writers_lose_no_row(store):
    store.log_response(answer("r1"))

    def write(worker: int) -> list[str]:
        return [store.add_feedback(rating(f"w{worker}-{i}")) for i in range(40)]

    with ThreadPoolExecutor(8) as pool:
        results = [s for batch in pool.map(write, range(8)) for s in batch]
    assert results == ["stored"] * 320
    assert store.count("feedback") == 320
    assert {fb.id for fb in store.all_feedback()} == {
        f"w{w}-{i}" for w in range(8) for i in range(40)
    }


def test_answers_holding_nul_characters_are_stored_and_read_back_unchanged(store):
    """A byte-level model can answer a NUL, which PostgreSQL refuses in text: such an answer
    (and one that looks like the store's own escape) comes back exactly as served."""
    texts = {"r1": "4\x006", "r2": '\x1bjson:"x"', "r3": "46"}
    for rid, text_ in texts.items():
        store.log_response(answer(rid, text_=text_))
    assert {r["id"]: r["answer"] for r in store.all_responses()} == texts
    with store.engine.connect() as conn:  # a plain answer is stored as it is
        plain = conn.execute(text("SELECT answer FROM responses WHERE id = 'r3'")).scalar()
    assert plain == "46"
