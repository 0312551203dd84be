"""What clients send to the server, validated: generation requests and feedback (pure, no I/O).

    body = parse_body(raw_bytes)                        # JSON object, NaN/Infinity rejected
    gen = parse_generation(body, "chat", defaults)      # GenerationRequest
    fb = parse_feedback(body)                           # Feedback, one of four kinds
    check_references(fb, rows)                          # the response ids exist, same prompt

Every problem raises `RequestError(field, problem)`; the server answers it with a 4xx JSON body
naming the field, never a traceback. Feedback kinds (`id` is the client's, for idempotency):

| kind       | fields                                     | means                                  |
|------------|--------------------------------------------|----------------------------------------|
| rating     | response_id, rating (integer 1..5)         | how good one answer is                 |
| comparison | chosen, rejected (response ids)            | chosen is better than rejected         |
| ranking    | response_ids (best first, >= 2)            | the order of several answers           |
| correction | response_id, text                          | text is what the answer should have been|

Optional on every kind: `rater` (who judged; agreement is measured across raters), `comment`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from rlhf.data.formats import FieldError, _messages

MAX_BODY_BYTES = 1 << 20
RATING_RANGE = (1, 5)
FEEDBACK_FIELDS = {
    "rating": ("response_id", "rating"),
    "comparison": ("chosen", "rejected"),
    "ranking": ("response_ids",),
    "correction": ("response_id", "text"),
}
COMMON_FIELDS = ("id", "kind", "rater", "comment")


class RequestError(ValueError):
    """A bad request: `field` names what is wrong, `status` is the HTTP code to answer with."""

    def __init__(self, field: str, problem: str, status: int = 400) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.status = field, problem, status


@dataclass
class GenerationRequest:
    endpoint: str  # "chat" or "completion"
    prompt: list[dict[str, str]] | str  # chat turns, or raw text for /v1/completions
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool


@dataclass
class Feedback:
    id: str
    kind: str
    response_ids: list[str]  # rating/correction: [one]; comparison: [chosen, rejected]; ranking
    rating: int | None = None
    text: str | None = None
    rater: str | None = None
    comment: str | None = None

    def canonical(self) -> str:
        """The stored payload; a retry with the same id must match it exactly."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError("body", f"larger than {MAX_BODY_BYTES} bytes", status=413)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RequestError("body", "not UTF-8") from None
    except ValueError as exc:
        raise RequestError("body", f"not valid JSON ({str(exc).split(':')[0]})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(key, f"expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(key, f"{value} is outside [{lo}, {hi}]")
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(key, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise RequestError(key, f"{value} is outside [{lo}, {hi}]")
    return value


def parse_generation(
    body: dict, endpoint: str, max_tokens: int, max_tokens_limit: int, temperature: float
) -> GenerationRequest:
    """A /v1/chat/completions or /v1/completions body; unknown OpenAI options are ignored."""
    if endpoint == "chat":
        if "messages" not in body:
            raise RequestError("messages", "missing (a list of {role, content})")
        try:
            prompt: Any = _messages(body["messages"], "messages", end_with_assistant=False)
        except FieldError as exc:
            raise RequestError(exc.field, exc.problem) from None
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError("prompt", "missing (a string)")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt", "expected a non-empty string")
    if body.get("n", 1) != 1:
        raise RequestError("n", "only n=1 is supported (send several requests)")
    if body.get("stop"):
        raise RequestError("stop", "stop sequences are not supported (answers end at EOS)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"expected true or false, got {stream!r}")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return GenerationRequest(
        endpoint=endpoint,
        prompt=prompt,
        max_tokens=_integer(body, key, max_tokens, 1, max_tokens_limit),
        temperature=_number(body, "temperature", temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=_integer(body, "seed", None, 0, 2**31 - 1),
        stream=stream,
    )


def _string(body: dict, key: str, *, required: bool = True, limit: int = 100_000) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise RequestError(key, "missing")
    if not isinstance(value, str) or not value.strip():
        raise RequestError(key, f"expected a non-empty string, got {value!r}"[:200])
    if len(value) > limit:
        raise RequestError(key, f"longer than {limit} characters")
    return value


def parse_feedback(body: dict) -> Feedback:
    """One feedback record; see the module docstring for the kinds and their fields."""
    fid = _string(body, "id", limit=128)
    kind = _string(body, "kind", limit=32)
    if kind not in FEEDBACK_FIELDS:
        raise RequestError(
            "kind", f"unknown kind {kind!r} (expected one of {list(FEEDBACK_FIELDS)})"
        )
    allowed = set(COMMON_FIELDS) | set(FEEDBACK_FIELDS[kind])
    extra = sorted(set(body) - allowed)
    if extra:
        raise RequestError(
            extra[0], f"unexpected field for kind {kind!r} (allowed: {sorted(allowed)})"
        )
    fb = Feedback(
        id=fid,
        kind=kind,
        response_ids=[],
        rater=_string(body, "rater", required=False, limit=128),
        comment=_string(body, "comment", required=False),
    )
    if kind in ("rating", "correction"):
        fb.response_ids = [_string(body, "response_id", limit=128)]
    if kind == "rating":
        lo, hi = RATING_RANGE
        fb.rating = _integer(body, "rating", None, lo, hi)
        if fb.rating is None:
            raise RequestError("rating", f"missing (an integer {lo}..{hi})")
    elif kind == "correction":
        fb.text = _string(body, "text")
    elif kind == "comparison":
        fb.response_ids = [_string(body, "chosen", limit=128), _string(body, "rejected", limit=128)]
        if fb.response_ids[0] == fb.response_ids[1]:
            raise RequestError("rejected", "the same response as chosen")
    else:
        ids = body.get("response_ids")
        if not isinstance(ids, list) or len(ids) < 2:
            raise RequestError("response_ids", "expected a list of at least 2 response ids")
        for i, rid in enumerate(ids):
            if not isinstance(rid, str) or not rid:
                raise RequestError(f"response_ids[{i}]", f"expected a response id, got {rid!r}")
        if len(set(ids)) != len(ids):
            raise RequestError("response_ids", "a response appears twice")
        fb.response_ids = list(ids)
    return fb


def reference_fields(fb: Feedback) -> list[str]:
    """The request field that named each of `fb.response_ids`, for error messages."""
    if fb.kind == "comparison":
        return ["chosen", "rejected"]
    if fb.kind == "ranking":
        return [f"response_ids[{i}]" for i in range(len(fb.response_ids))]
    return ["response_id"]


def check_references(fb: Feedback, prompt_keys: dict[str, str]) -> None:
    """Every referenced response exists (`prompt_keys`: id -> its prompt's key, for those found),
    and the answers a comparison or ranking puts in order answer the same prompt."""
    names = reference_fields(fb)
    for name, rid in zip(names, fb.response_ids):
        if rid not in prompt_keys:
            raise RequestError(name, f"unknown response id {rid!r}")
    first = prompt_keys[fb.response_ids[0]]
    for name, rid in zip(names[1:], fb.response_ids[1:]):
        if prompt_keys[rid] != first:
            raise RequestError(name, f"{rid!r} answers a different prompt than {names[0]}")
