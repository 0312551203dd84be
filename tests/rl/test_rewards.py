"""Reward sources: built-in and user rules, and a real HTTP endpoint (good and broken replies)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.rl.rewards import RewardError, exact_match, http_rewards, load_rule, rule_rewards


def test_exact_match_and_rule_loading():
    assert exact_match("What is 2+3?", " 5\n", "5") == 1.0
    assert exact_match("What is 2+3?", "6", "5") == 0.0
    with pytest.raises(RewardError, match="needs a label"):
        exact_match("q", "5", None)
    assert load_rule("exact_match") is exact_match
    assert load_rule("rlhf.rl.rewards:exact_match") is exact_match
    with pytest.raises(RewardError, match="not a built-in rule"):
        load_rule("exactmatch")
    with pytest.raises(RewardError, match="cannot load"):
        load_rule("rlhf.rl.rewards:nope")
    assert rule_rewards(exact_match, ["a", "b"], ["1", "2"], ["1", "3"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="returned nan"):
        rule_rewards(lambda p, r, y: float("nan"), ["a"], ["1"], ["1"])


class _Handler(BaseHTTPRequestHandler):
    mode = "ok"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = type(self).mode
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        rewards = [float(r.strip() == y) for r, y in zip(body["responses"], body["labels"])]
        reply = {
            "ok": {"rewards": rewards},
            "short": {"rewards": rewards[:-1]},
            "text": {"rewards": ["high"] * len(rewards)},
            "junk": None,
        }[mode]
        data = b"not json" if reply is None else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/reward"
    srv.shutdown()


@pytest.mark.parametrize(
    "mode, message",
    [
        ("500", "HTTP 500"),
        ("short", "sent 2 samples, got 1"),
        ("text", "not a finite number"),
        ("junk", "expected JSON"),
    ],
)
def test_http_rewards_errors_name_the_endpoint(server, mode, message):
    _Handler.mode = mode
    url = server[1]
    with pytest.raises(RewardError, match=message) as err:
        http_rewards(url, ["q1", "q2"], ["5", "6"], ["5", "5"])
    assert url in str(err.value)


def test_http_rewards_round_trip_and_unreachable(server):
    _Handler.mode = "ok"
    assert http_rewards(server[1], ["q1", "q2"], ["5", "6"], ["5", "5"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="unreachable"):
        http_rewards("http://127.0.0.1:9/x", ["q"], ["r"], ["y"], timeout_s=2)
