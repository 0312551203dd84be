"""The Ray Serve app for real: the tiny policy on a vLLM engine, HTTP on loopback, a SQLite file;
the last test redeploys it onto a PostgreSQL server under load. Serve starts once per module."""

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from actors.group import free_port
from rlhf.config import DataFile, RewardModelConfig, load_config
from rlhf.data.stages import prepare_preferences
from rlhf.serve.db import FeedbackStore, default_url
from rlhf.serve.export import export_feedback

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"messages": [{"role": "user", "content": "12+34="}], "max_tokens": 8}


def overrides(tmp, database_url=None):
    out = [
        f"run.output_dir={tmp}",
        "serve.cpus_per_replica=0.5",
        "serve.max_model_len=256",
        "serve.max_tokens=8",
        "serve.max_tokens_limit=64",
    ]
    return out + ([f"serve.database_url={database_url}"] if database_url else [])


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_policy, tmp_path_factory):
    from ray import serve

    from rlhf.serve.app import start_app

    tmp = tmp_path_factory.mktemp("serve_run")
    cfg = load_config("configs/tiny_cpu.yaml", overrides(tmp))
    base, version = start_app(cfg, str(tiny_policy), TOKEN, port=free_port())
    state = {"base": base, "version": version, "url": default_url(cfg.run.dir), "tmp": tmp}
    yield state
    serve.shutdown()


def post(server, path, body=None, headers=AUTH, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(server["base"] + path, data=data, headers=headers, timeout=120, **kw)


def chat(server, content="12+34=", **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_is_open_and_every_other_route_needs_the_token(server):
    health = requests.get(server["base"] + "/health", timeout=30)
    assert health.json()["status"] == "ok"
    assert health.json()["model_version"] == server["version"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(server["base"] + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "unauthorized"
        assert post(server, "/v1/chat/completions", CHAT, headers=headers).status_code == 401
        assert post(server, "/v1/feedback", {}, headers=headers).status_code == 401
    models = requests.get(server["base"] + "/v1/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in models["data"]] == [server["version"]]


def test_the_server_listens_on_loopback_only(server):
    port = int(server["base"].rsplit(":", 1)[1])
    outside = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    for address in outside:  # a machine with no other interface has nothing to check here
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(5)
            s.connect((address, port))


@pytest.mark.parametrize(
    "path, body, field, status",
    [
        ("/v1/chat/completions", b"{not json", "body", 400),
        ("/v1/chat/completions", {"max_tokens": 4}, "messages", 400),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 1000}, "max_tokens", 400),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", 400),
        ("/v1/completions", {"max_tokens": 4}, "prompt", 400),
        ("/v1/completions", {"prompt": "x" * 300}, "prompt", 400),  # longer than the model
        ("/v1/feedback", {"id": "f", "kind": "vote"}, "kind", 400),
        ("/v1/feedback", {"id": "f", "kind": "rating", "response_id": "r"}, "rating", 400),
        (
            "/v1/feedback",
            {"id": "f", "kind": "correction", "response_id": "nope", "text": "x"},
            "response_id",
            400,
        ),
    ],
)
def test_bad_requests_get_a_4xx_json_error_naming_the_field_without_a_traceback(
    server, path, body, field, status
):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    assert field in r.json()["error"]["message"]
    assert "Traceback" not in r.text and ".py" not in r.text


def test_chat_and_completion_answers_carry_a_response_id_and_the_model_version(server):
    answer = chat(server)
    assert answer["response_id"].startswith("resp-") and answer["id"] == answer["response_id"]
    assert answer["model_version"] == server["version"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= answer["usage"]["completion_tokens"] <= 8
    r = post(server, "/v1/completions", {"prompt": "12+34=", "max_tokens": 5})
    completion = r.json()
    assert completion["object"] == "text_completion"
    assert completion["model_version"] == server["version"]
    assert completion["response_id"] != answer["response_id"]
    logged = {r["id"]: r for r in FeedbackStore(server["url"]).all_responses()}
    assert logged[answer["response_id"]]["answer"] == answer["choices"][0]["message"]["content"]
    assert logged[completion["response_id"]]["prompt"] == "12+34="


def test_concurrent_chats_with_different_settings_are_all_answered(server):
    bodies = [{"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"max_tokens": 3}, {}] * 3
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda extra: chat(server, "9+9=", **extra), bodies))
    assert len({a["response_id"] for a in answers}) == 12
    greedy = {a["choices"][0]["message"]["content"] for a in answers[0::4]}
    seeded = {a["choices"][0]["message"]["content"] for a in answers[1::4]}
    assert len(greedy) == 1 and len(seeded) == 1  # reproducible whatever the batch they ran in
    assert all(a["usage"]["completion_tokens"] <= 3 for a in answers[2::4])


def test_a_streamed_answer_arrives_as_server_sent_events_and_matches_the_greedy_answer(server):
    greedy = chat(server, "7+8=", temperature=0, max_tokens=12)
    body = {"messages": [{"role": "user", "content": "7+8="}], "max_tokens": 12}
    r = post(
        server, "/v1/chat/completions", {**body, "temperature": 0, "stream": True}, stream=True
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["response_id"] for c in chunks}) == 1
    assert all(c["model_version"] == server["version"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == greedy["choices"][0]["finish_reason"]
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    # Chunked generation continues the token ids, so greedy decoding gives the same answer.
    assert streamed == greedy["choices"][0]["message"]["content"]
    logged = {r["id"]: r for r in FeedbackStore(server["url"]).all_responses()}
    assert logged[chunks[0]["response_id"]]["answer"] == streamed


def test_feedback_of_each_kind_is_stored_once_and_exports_into_the_reward_model_data(
    server, tiny_policy
):
    a, b, c = (chat(server, "12+34=")["response_id"] for _ in range(3))
    other = chat(server, "1+1=")["response_id"]
    sent = [
        {"id": "k1", "kind": "rating", "response_id": a, "rating": 5, "rater": "ann"},
        {"id": "k2", "kind": "rating", "response_id": b, "rating": 2, "rater": "ann"},
        {"id": "k3", "kind": "comparison", "chosen": a, "rejected": c, "rater": "bob"},
        {"id": "k4", "kind": "ranking", "response_ids": [c, a, b], "rater": "cy"},
        {"id": "k5", "kind": "correction", "response_id": other, "text": "2"},
    ]
    for body in sent:
        r = post(server, "/v1/feedback", body)
        assert (r.status_code, r.json()) == (201, {"id": body["id"], "status": "stored"})
    retry = post(server, "/v1/feedback", sent[0])
    assert (retry.status_code, retry.json()["status"]) == (200, "duplicate")
    reused = post(server, "/v1/feedback", {**sent[0], "rating": 1})
    assert (reused.status_code, reused.json()["error"]["field"]) == (409, "id")
    mixed = post(
        server, "/v1/feedback", {"id": "k6", "kind": "comparison", "chosen": a, "rejected": other}
    )
    assert (mixed.status_code, mixed.json()["error"]["field"]) == (400, "rejected")
    stored = {fb.id: fb for fb in FeedbackStore(server["url"]).all_feedback()}
    assert stored.keys() == {"k1", "k2", "k3", "k4", "k5"}
    assert stored["k4"].response_ids == [c, a, b]

    out = server["tmp"] / "export"
    report = export_feedback(server["url"], out)
    assert report["feedback"] == {"rating": 2, "comparison": 1, "ranking": 1, "correction": 1}
    assert report["written"]["ranked"] == 1
    files = [DataFile(path=str(out / f)) for f in ("pairwise.jsonl", "ranked.jsonl")]
    scfg = RewardModelConfig(train_files=files, num_workers=1, micro_batch_size=1)
    train, _, _ = prepare_preferences(scfg, str(tiny_policy))
    assert len(train) == report["written"]["pairwise"] + 3  # a ranking of 3: C(3, 2) pairs


def hammer(server, prefix: str, threads: int = 16, per_thread: int = 25) -> set[str]:
    """`threads` clients each send `per_thread` ratings (and retry one); return the ids sent."""
    rid = chat(server, "3+4=")["response_id"]
    failures = []

    def client(worker: int) -> None:
        with requests.Session() as http:
            for i in range(per_thread):
                body = {
                    "id": f"{prefix}-{worker}-{i}",
                    "kind": "rating",
                    "response_id": rid,
                    "rating": 1 + (worker + i) % 5,
                    "rater": f"user{worker}",
                }
                r = http.post(server["base"] + "/v1/feedback", json=body, headers=AUTH, timeout=120)
                if r.status_code != 201:
                    failures.append(r.text)
            again = http.post(server["base"] + "/v1/feedback", json=body, headers=AUTH, timeout=120)
            if again.json().get("status") != "duplicate":
                failures.append(again.text)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client, range(threads)))
    assert failures == []
    return {f"{prefix}-{w}-{i}" for w in range(threads) for i in range(per_thread)}


def test_many_concurrent_clients_lose_no_feedback_row_in_sqlite(server):
    sent = hammer(server, "sqlite")
    stored = {fb.id for fb in FeedbackStore(server["url"]).all_feedback()}
    assert sent <= stored and len(stored & sent) == 400


def test_many_concurrent_clients_lose_no_feedback_row_in_postgresql(
    server, tiny_policy, postgres_url
):
    from rlhf.serve.app import start_app

    # The running app redeployed onto PostgreSQL (a rolling update), while a client keeps
    # chatting: no request fails during the switch.
    cfg = load_config("configs/tiny_cpu.yaml", overrides(server["tmp"], postgres_url))
    port = int(server["base"].rsplit(":", 1)[1])
    replica = requests.get(server["base"] + "/health", timeout=30).json()["replica"]
    switching, answers = threading.Event(), []

    def chat_during_switch() -> None:
        while not switching.is_set():
            r = post(server, "/v1/chat/completions", CHAT)
            answers.append((r.status_code, r.json().get("response_id")))

    client = threading.Thread(target=chat_during_switch)
    client.start()
    try:
        assert start_app(cfg, str(tiny_policy), TOKEN, port=port)[0] == server["base"]
    finally:
        switching.set()
        client.join()
    assert answers and {status for status, _ in answers} == {200}
    assert requests.get(server["base"] + "/health", timeout=30).json()["replica"] != replica
    sent = hammer(server, "pg")  # its 400 ratings refer to an answer logged in PostgreSQL
    store = FeedbackStore(postgres_url)
    assert {fb.id for fb in store.all_feedback()} == sent
    # Every answer given during the switch is logged, by the old replica or the new one.
    logged = {r["id"] for r in store.all_responses()}
    before = {r["id"] for r in FeedbackStore(server["url"]).all_responses()}
    assert {rid for _, rid in answers} <= logged | before
