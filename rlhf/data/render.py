"""How a prompt becomes tokens: one rule for SFT, reward model and DPO rows, RL and evaluation.

    fmt = resolve_prompt_format("auto", tok, message_lists=0, key="rl.prompt_format")
    ids = render_prompt([{"role": "user", "content": "1+2="}], tok, fmt)
    ids, labels = tokenize_example(chat, tok, fmt)     # prompt tokens get label -100

Prompt formats (`<stage>.prompt_format`):

| format | prompt tokens                                         | answer tokens                   |
|--------|-------------------------------------------------------|---------------------------------|
| chat   | the tokenizer's chat template, generation prompt open | the template's assistant turn   |
| raw    | the turns' text joined by a blank line, tokenized as   | the answer's text, then EOS     |
|        | plain text (BOS if the tokenizer adds one; TRL's      |                                 |
|        | "standard" format, for base models)                   |                                 |
| auto   | chat when the tokenizer has a chat template, else raw (message-list data then needs `raw`) |

The prompt of an SFT or preference row is exactly `render_prompt` of its prompt turns, so a policy
sees in RL and evaluation the tokens it was trained to answer. In `chat`, every assistant turn of a
multi-turn chat is trained; in `raw`, the last one (earlier turns are part of the prompt text).
"""

from __future__ import annotations

from rlhf.data.records import DataError

PROMPT_FORMATS = ("auto", "raw", "chat")


def resolve_prompt_format(fmt: str, tok, message_lists: int, key: str) -> str:
    """`raw` or `chat` for this tokenizer and data; `key` names the setting in errors.

    message_lists: how many records hold a list of turns (messages, or a prompt given as turns).
    """
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"{key} = {fmt!r}: expected one of {PROMPT_FORMATS}")
    has_template = bool(getattr(tok, "chat_template", None))
    if fmt == "raw" or (fmt == "auto" and not has_template and not message_lists):
        return "raw"
    if not has_template:
        why = f"{message_lists} records are lists of turns, and " if fmt == "auto" else ""
        raise DataError(
            f"{key} = {fmt!r}: {why}the tokenizer has no chat template; set {key}=raw to "
            "render turns as plain text"
        )
    return "chat"


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def render_prompt(turns: list[dict], tok, fmt: str) -> list[int]:
    """Token ids of a prompt (`fmt`: raw or chat, see `resolve_prompt_format`), ready for the
    answer to follow: in chat the assistant turn is opened."""
    if fmt == "chat":
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return _ids(tok, text)
    if fmt == "raw":
        return _ids(tok, "\n\n".join(t["content"] for t in turns), special=True)
    raise ValueError(f"render_prompt: fmt must be raw or chat, got {fmt!r}")


def tokenize_chat(chat: list[dict], tok) -> tuple[list[int], list[int]]:
    """Chat format: input_ids and labels (-100 outside assistant turns), by rendering growing
    prefixes; each assistant turn starts right after `render_prompt` of the turns before it."""
    full = _ids(tok, tok.apply_chat_template(chat, tokenize=False))
    labels = [-100] * len(full)
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        start = render_prompt(chat[:i], tok, "chat")
        end = _ids(tok, tok.apply_chat_template(chat[: i + 1], tokenize=False))
        if full[: len(end)] != end or end[: len(start)] != start:
            raise DataError("the tokenizer's chat template is not prefix-stable; cannot mask turns")
        labels[len(start) : len(end)] = full[len(start) : len(end)]
    return full, labels


def tokenize_example(chat: list[dict], tok, fmt: str) -> tuple[list[int], list[int]]:
    """input_ids and labels of a chat ending in the assistant's answer; the prompt part is
    `render_prompt(chat[:-1], tok, fmt)` and carries label -100."""
    if fmt == "chat":
        return tokenize_chat(chat, tok)
    prompt = render_prompt(chat[:-1], tok, fmt)
    answer = _ids(tok, chat[-1]["content"])
    if tok.eos_token_id is not None:
        answer = answer + [tok.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer
