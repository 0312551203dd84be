import json

import pytest

from rlhf.serve.protocol import (
    RequestError,
    check_references,
    parse_body,
    parse_feedback,
    parse_generation,
)

CHAT = {"messages": [{"role": "user", "content": "12+34="}]}


def gen(body, endpoint="chat"):
    return parse_generation(body, endpoint, max_tokens=16, max_tokens_limit=64, temperature=1.0)


def field_of(fn, *args) -> str:
    with pytest.raises(RequestError) as err:
        fn(*args)
    return err.value.field


def test_chat_request_takes_the_configured_defaults():
    req = gen(CHAT)
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stream) == (
        16,
        1.0,
        1.0,
        None,
        False,
    )
    assert req.prompt == CHAT["messages"]
    req = gen({**CHAT, "max_completion_tokens": 8, "temperature": 0, "stream": True, "seed": 3})
    assert (req.max_tokens, req.temperature, req.stream, req.seed) == (8, 0.0, True, 3)


def test_body_must_be_a_json_object_without_nan():
    assert field_of(parse_body, b"{bad") == "body"
    assert field_of(parse_body, b"[1, 2]") == "body"
    assert field_of(parse_body, b'{"temperature": NaN}') == "body"
    assert field_of(parse_body, b"\xff\xfe") == "body"
    with pytest.raises(RequestError) as err:
        parse_body(b" " * (1 << 21))
    assert err.value.status == 413


@pytest.mark.parametrize(
    "body, endpoint, field",
    [
        ({}, "chat", "messages"),
        ({"messages": []}, "chat", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "chat", "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "chat", "messages[0].content"),
        ({**CHAT, "max_tokens": 65}, "chat", "max_tokens"),
        ({**CHAT, "max_tokens": "8"}, "chat", "max_tokens"),
        ({**CHAT, "temperature": -1}, "chat", "temperature"),
        ({**CHAT, "n": 2}, "chat", "n"),
        ({**CHAT, "stop": ["\n"]}, "chat", "stop"),
        ({**CHAT, "stream": "yes"}, "chat", "stream"),
        ({}, "completion", "prompt"),
        ({"prompt": ["a"]}, "completion", "prompt"),
    ],
)
def test_bad_generation_requests_name_the_field(body, endpoint, field):
    assert field_of(gen, body, endpoint) == field


def test_feedback_of_each_kind_parses():
    rating = parse_feedback({"id": "f1", "kind": "rating", "response_id": "r1", "rating": 4})
    assert (rating.response_ids, rating.rating) == (["r1"], 4)
    pair = parse_feedback({"id": "f2", "kind": "comparison", "chosen": "a", "rejected": "b"})
    assert pair.response_ids == ["a", "b"]
    ranking = parse_feedback({"id": "f3", "kind": "ranking", "response_ids": ["c", "a", "b"]})
    assert ranking.response_ids == ["c", "a", "b"]
    fix = parse_feedback(
        {"id": "f4", "kind": "correction", "response_id": "a", "text": "46", "rater": "ann"}
    )
    assert (fix.text, fix.rater) == ("46", "ann")
    # The stored payload is canonical: the same feedback always serialises the same way.
    assert json.loads(fix.canonical())["text"] == "46"
    assert (
        fix.canonical()
        == parse_feedback(
            {"rater": "ann", "text": "46", "response_id": "a", "kind": "correction", "id": "f4"}
        ).canonical()
    )


@pytest.mark.parametrize(
    "body, field",
    [
        ({"kind": "rating", "response_id": "r", "rating": 3}, "id"),
        ({"id": "f", "kind": "vote"}, "kind"),
        ({"id": "f", "kind": "rating", "response_id": "r"}, "rating"),
        ({"id": "f", "kind": "rating", "response_id": "r", "rating": 6}, "rating"),
        ({"id": "f", "kind": "rating", "response_id": "r", "rating": 2.5}, "rating"),
        ({"id": "f", "kind": "rating", "rating": 3}, "response_id"),
        ({"id": "f", "kind": "rating", "response_id": "r", "rating": 3, "chosen": "x"}, "chosen"),
        ({"id": "f", "kind": "comparison", "chosen": "a", "rejected": "a"}, "rejected"),
        ({"id": "f", "kind": "ranking", "response_ids": ["a"]}, "response_ids"),
        ({"id": "f", "kind": "ranking", "response_ids": ["a", 7]}, "response_ids[1]"),
        ({"id": "f", "kind": "ranking", "response_ids": ["a", "a"]}, "response_ids"),
        ({"id": "f", "kind": "correction", "response_id": "a", "text": " "}, "text"),
    ],
)
def test_bad_feedback_names_the_field(body, field):
    assert field_of(parse_feedback, body) == field


def test_references_must_exist_and_answer_one_prompt():
    ranking = parse_feedback({"id": "f", "kind": "ranking", "response_ids": ["a", "b", "c"]})
    check_references(ranking, {"a": "p1", "b": "p1", "c": "p1"})
    assert field_of(check_references, ranking, {"a": "p1", "c": "p1"}) == "response_ids[1]"
    assert field_of(check_references, ranking, {"a": "p1", "b": "p1", "c": "p2"}) == (
        "response_ids[2]"
    )
    pair = parse_feedback({"id": "g", "kind": "comparison", "chosen": "a", "rejected": "b"})
    assert field_of(check_references, pair, {"a": "p1", "b": "p2"}) == "rejected"
