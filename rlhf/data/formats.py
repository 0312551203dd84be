"""A schema per record format, and normalisation to one shape per stage.

SFT formats become a chat (`messages`); preference formats become (prompt messages, chosen,
rejected) pairs; RL prompts become (prompt messages, label). Problems raise `FieldError(field,
problem)`, which the caller turns into `file:line: field: problem`. Keys beyond a format's (`id`,
`source`, ...) are allowed: `extra_keys` names them for the data report. `rename_columns` maps
differently named fields onto these names (`columns: {prompt: question}`).

| format       | keys                                              | becomes                       |
|--------------|---------------------------------------------------|-------------------------------|
| input_output | input, output                                     | user input, assistant output  |
| instruction  | instruction, input ("" allowed), output           | user instruction\\n\\ninput, ... |
| messages     | messages: [{role, content}], last turn assistant  | the chat itself               |
| pairwise     | prompt, chosen, rejected                          | one pair                      |
| ranked       | prompt, responses: [{text, rank}], ranks 1..K     | all C(K,2) pairs, better first|
| prompts      | prompt, label (optional)                          | (user prompt, label)          |
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {
    "input_output": ({"input", "output"}, set()),
    "instruction": ({"instruction", "input", "output"}, set()),
    "messages": ({"messages"}, set()),
    "pairwise": ({"prompt", "chosen", "rejected"}, set()),
    "ranked": ({"prompt", "responses"}, set()),
    "prompts": ({"prompt"}, {"label"}),
}
SFT_FORMATS = ("input_output", "instruction", "messages")
PREFERENCE_FORMATS = ("pairwise", "ranked")

Chat = list[dict[str, str]]


class FieldError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def detect_format(record: dict, allowed: tuple[str, ...]) -> str:
    """The format whose required keys the record has (other keys are extra fields); of formats
    nested in each other (input_output in instruction) the larger. Otherwise name the missing key;
    two unrelated matches are ambiguous."""
    keys = set(record)
    found = [n for n in allowed if FORMAT_KEYS[n][0] <= keys]
    found = [n for n in found if not any(FORMAT_KEYS[n][0] < FORMAT_KEYS[m][0] for m in found)]
    if len(found) == 1:
        return found[0]
    if found:
        both = " and ".join(found)
        raise FieldError("<format>", f"ambiguous record: has the keys of {both} formats")
    best = min(allowed, key=lambda n: len(FORMAT_KEYS[n][0] - keys))
    required = FORMAT_KEYS[best][0]
    missing = sorted(required - keys)
    raise FieldError(missing[0], f"missing key (expected {best} format: {sorted(required)})")


def extra_keys(record: dict, fmt: str) -> list[str]:
    """Keys the format does not use (`id`, `source`, ...): kept out of training, counted."""
    required, optional = FORMAT_KEYS[fmt]
    return sorted(set(record) - required - optional)


def rename_columns(record: dict, columns: dict[str, str]) -> dict:
    """The record with each mapped field under its format name: {prompt: question} reads the
    record's `question` as `prompt`."""
    if not columns:
        return record
    out = dict(record)
    for name, source in columns.items():
        if source not in record:
            continue  # the format check then reports the missing field under its mapped name
        if name in record and name != source:
            raise FieldError(name, f"present besides {source}, which columns maps to {name}")
        out[name] = out.pop(source)
    return out


def _text(record: dict, key: str, *, allow_empty: bool = False, path: str | None = None) -> str:
    value = record.get(key)
    name = path or key
    if not isinstance(value, str):
        raise FieldError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FieldError(name, "empty")
    return value


def _messages(value: Any, name: str = "messages", *, end_with_assistant: bool = True) -> Chat:
    if not isinstance(value, list) or not value:
        raise FieldError(name, "expected a non-empty list of {role, content}")
    chat = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise FieldError(where, f"expected an object, got {type(turn).__name__}")
        if set(turn) != {"role", "content"}:
            raise FieldError(where, f"expected keys role and content, got {sorted(turn)}")
        role = turn["role"]
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"unknown role {role!r} (expected one of {ROLES})")
        content = _text(turn, "content", path=f"{where}.content")
        chat.append({"role": role, "content": content})
    if end_with_assistant and chat[-1]["role"] != "assistant":
        raise FieldError(f"{name}[{len(chat) - 1}].role", "the last turn must be the assistant's")
    if not any(t["role"] == "user" for t in chat):
        raise FieldError(name, "no user turn")
    return chat


def _prompt(record: dict) -> Chat:
    """A preference/RL prompt: a string (one user turn) or a list of turns."""
    value = record.get("prompt")
    if isinstance(value, list):
        return _messages(value, "prompt", end_with_assistant=False)
    return [{"role": "user", "content": _text(record, "prompt")}]


def to_chat(record: dict, fmt: str) -> Chat:
    """Any SFT format as a chat whose last turn is the assistant's answer."""
    if fmt == "messages":
        return _messages(record["messages"])
    output = _text(record, "output")
    if fmt == "input_output":
        user = _text(record, "input")
    else:
        user = _text(record, "instruction")
        extra = _text(record, "input", allow_empty=True)
        user = f"{user}\n\n{extra}" if extra.strip() else user
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def to_pairs(record: dict, fmt: str) -> list[tuple[Chat, str, str]]:
    """(prompt, chosen, rejected) pairs; ranked lists give all C(K,2) pairs, better first."""
    prompt = _prompt(record)
    if fmt == "pairwise":
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
        if chosen.strip() == rejected.strip():
            raise FieldError("rejected", "same text as chosen (a pair needs two different answers)")
        return [(prompt, chosen, rejected)]
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise FieldError("responses", "expected a list of at least 2 {text, rank}")
    ranked = []
    for i, r in enumerate(responses):
        if not isinstance(r, dict) or set(r) != {"text", "rank"}:
            raise FieldError(f"responses[{i}]", "expected keys text and rank")
        rank = r["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise FieldError(f"responses[{i}].rank", f"expected an integer, got {rank!r}")
        ranked.append((rank, _text(r, "text", path=f"responses[{i}].text")))
    ranks = sorted(rank for rank, _ in ranked)
    if len(set(ranks)) != len(ranks):
        raise FieldError("responses", f"ranks have ties: {ranks}")
    if ranks != list(range(1, len(ranks) + 1)):
        raise FieldError("responses", f"ranks must be 1..{len(ranks)} without gaps, got {ranks}")
    texts = [text.strip() for _, text in ranked]
    for i, text in enumerate(texts):
        if text in texts[:i]:
            first = texts.index(text)
            raise FieldError(f"responses[{i}].text", f"same text as responses[{first}].text")
    ranked.sort()
    return [(prompt, better, worse) for (_, better), (_, worse) in combinations(ranked, 2)]


def to_prompt(record: dict) -> tuple[Chat, str | None]:
    label = record.get("label")
    if label is not None and not isinstance(label, str):
        raise FieldError("label", f"expected a string, got {type(label).__name__}")
    return _prompt(record), label
