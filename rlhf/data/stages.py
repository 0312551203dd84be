"""Data of the SFT, reward-model and DPO stages: read, validate, mix, tokenize with loss masks.

    train, evals, report = prepare_sft(cfg.sft, tokenizer_dir, seed=0)
    train, evals, report = prepare_preferences(cfg.rm, tokenizer_dir, seed=0)

Mixing: a file's `weight` multiplies its record count (0.5: a seeded random half; 2.0: every
record twice), so the shares follow the weights times the file sizes. Tokenization renders the
chat template and trains only on assistant turns (content and end-of-turn token); prompt tokens get
label -100. Over-length samples are truncated or dropped (`overlong`), and every truncation, drop
and skipped record is counted in the report.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from rlhf.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    FieldError,
    detect_format,
    to_chat,
    to_pairs,
    to_prompt,
)
from rlhf.data.records import DataError, Skips, read_records


def load_items(
    files: list, allowed: tuple[str, ...], fmt: str, normalise, on_error: str, seed: int
) -> tuple[list, dict]:
    """Normalised items of every file, mixed by weight; report of counts and skips."""
    skips, items, per_file = Skips(on_error), [], {}
    rng = random.Random(seed)
    for spec in files:
        got = []
        for rec in read_records(spec.path, skips):
            try:
                name = fmt if fmt != "auto" else detect_format(rec.data, allowed)
                if fmt != "auto":
                    detect_format(rec.data, (fmt,))
                got.extend(normalise(rec.data, name))
            except FieldError as exc:
                reason = f"{exc.field.split('[')[0]}: {exc.problem.split(' (')[0].split(':')[0]}"
                skips.handle(DataError(f"{rec.where}: {exc}"), reason)
        whole, frac = divmod(spec.weight, 1.0)
        mixed = got * int(whole) + rng.sample(got, round(frac * len(got)))
        per_file[spec.path] = {"read": len(got), "used": len(mixed)}
        items.extend(mixed)
    return items, {"files": per_file, **skips.report()}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(chat: list[dict], tok) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 outside assistant turns) by rendering growing prefixes."""
    full = _ids(tok, tok.apply_chat_template(chat, tokenize=False))
    labels = [-100] * len(full)
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        start = _ids(
            tok, tok.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
        )
        end = _ids(tok, tok.apply_chat_template(chat[: i + 1], tokenize=False))
        if full[: len(end)] != end or end[: len(start)] != start:
            raise DataError("the tokenizer's chat template is not prefix-stable; cannot mask turns")
        labels[len(start) : len(end)] = full[len(start) : len(end)]
    return full, labels


def _fit(ids: list[int], labels: list[int], max_length: int, overlong: str, counts: Counter):
    if len(ids) <= max_length:
        counts["kept"] += 1
        return ids, labels
    if overlong == "drop" or all(x == -100 for x in labels[:max_length]):
        counts["dropped_overlong"] += 1
        return None
    counts["truncated"] += 1
    return ids[:max_length], labels[:max_length]


def _sft_rows(chats: list, tok, max_length: int, overlong: str) -> tuple[list[dict], Counter]:
    rows, counts = [], Counter()
    for chat in chats:
        fitted = _fit(*tokenize_chat(chat, tok), max_length, overlong, counts)
        if fitted:
            rows.append({"input_ids": fitted[0], "labels": fitted[1]})
    return rows, counts


def _pair_rows(pairs: list, tok, max_length: int, overlong: str) -> tuple[list[dict], Counter]:
    rows, counts = [], Counter()
    for prompt, chosen, rejected in pairs:
        sides = []
        for answer in (chosen, rejected):
            ids, labels = tokenize_chat([*prompt, {"role": "assistant", "content": answer}], tok)
            sides.append(_fit(ids, labels, max_length, overlong, Counter()))
        if sides[0] is None or sides[1] is None:
            counts["dropped_overlong"] += 1
            continue
        counts["truncated" if max(len(s[0]) for s in sides) == max_length else "kept"] += 1
        rows.append(
            {
                "chosen_input_ids": sides[0][0],
                "chosen_labels": sides[0][1],
                "rejected_input_ids": sides[1][0],
                "rejected_labels": sides[1][1],
            }
        )
    return rows, counts


def _prepare(scfg: Any, tokenizer_dir: str, seed: int, allowed, normalise, to_rows):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    report: dict[str, Any] = {}
    out = []
    for split, files in (("train", scfg.train_files), ("eval", scfg.eval_files)):
        items, rep = load_items(files, allowed, scfg.format, normalise, scfg.on_error, seed)
        rows, counts = to_rows(items, tok, scfg.max_length, scfg.overlong)
        if split == "train" and not rows:
            raise DataError(f"no usable training samples in {[f.path for f in files]}")
        report[split] = {**rep, "samples": len(rows), **dict(counts)}
        out.append(datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({}))
    return out[0], out[1], report


def prepare_sft(scfg: Any, tokenizer_dir: str, seed: int = 0):
    return _prepare(
        scfg, tokenizer_dir, seed, SFT_FORMATS, lambda rec, fmt: [to_chat(rec, fmt)], _sft_rows
    )


def prepare_preferences(scfg: Any, tokenizer_dir: str, seed: int = 0):
    return _prepare(scfg, tokenizer_dir, seed, PREFERENCE_FORMATS, to_pairs, _pair_rows)


def load_eval_prompts(scfg: Any) -> tuple[list[list[dict]], list[str]]:
    """Held-out SFT chats as (prompt turns, reference answer) for generation-based evaluation."""
    chats, _ = load_items(
        scfg.eval_files, SFT_FORMATS, scfg.format, lambda rec, fmt: [to_chat(rec, fmt)], "fail", 0
    )
    return [c[:-1] for c in chats], [c[-1]["content"] for c in chats]


def load_prompts(files: list, on_error: str = "fail") -> tuple[list, dict]:
    """RL prompts: [(prompt turns, label or None)] and the read report."""
    return load_items(
        files, ("prompts",), "prompts", lambda rec, fmt: [to_prompt(rec)], on_error, 0
    )
