"""Data of the SFT, reward-model and DPO stages: read, validate, mix, tokenize with loss masks.

    train, evals, report = prepare_sft(cfg.sft, tokenizer_dir, seed=0)
    train, evals, report = prepare_preferences(cfg.rm, tokenizer_dir, seed=0)

Mixing: a file's `weight` multiplies its record count (0.5: a seeded random half; 2.0: every
record twice), so the shares follow the weights times the file sizes. Fields are renamed first
(`<stage>.columns`); fields no format uses are kept out and counted per field (`extra_fields`).
Tokenization renders prompts by `<stage>.prompt_format` (rlhf/data/render.py, the rule RL and
evaluation use too) and trains only on answers (content and end-of-turn token); prompt tokens get
label -100. Over-length samples are truncated or dropped (`overlong`), and every truncation, drop
and skipped record is counted in the report.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from rlhf.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    FieldError,
    detect_format,
    extra_keys,
    rename_columns,
    to_chat,
    to_pairs,
    to_prompt,
)
from rlhf.data.records import DataError, Skips, read_records
from rlhf.data.render import resolve_prompt_format, tokenize_chat, tokenize_example

__all__ = ["load_items", "load_prompts", "prepare_preferences", "prepare_sft", "tokenize_chat"]


def _mapped(field: str, columns: dict[str, str]) -> str:
    """A field as the user's data names it: `question (mapped to prompt)`."""
    root = re.split(r"[\[.]", field, maxsplit=1)[0]
    if root not in columns:
        return field
    return f"{columns[root]}{field[len(root) :]} (mapped to {root})"


def load_items(
    files: list,
    allowed: tuple[str, ...],
    fmt: str,
    normalise,
    on_error: str,
    seed: int,
    columns: dict[str, str] | None = None,
) -> tuple[list, dict]:
    """Normalised items of every file, mixed by weight; report of counts, formats, extra fields
    and skips."""
    columns = columns or {}
    skips, items, per_file = Skips(on_error), [], {}
    formats, extras, message_lists = Counter(), Counter(), 0
    rng = random.Random(seed)
    for spec in files:
        got = []
        for rec in read_records(spec.path, skips, split=getattr(spec, "split", None)):
            try:
                data = rename_columns(rec.data, columns)
                name = fmt if fmt != "auto" else detect_format(data, allowed)
                if fmt != "auto":
                    detect_format(data, (fmt,))
                got.extend(normalise(data, name))
            except FieldError as exc:
                field = _mapped(exc.field, columns)
                reason = f"{field.split('[')[0]}: {exc.problem.split(' (')[0].split(':')[0]}"
                skips.handle(DataError(f"{rec.where}: {field}: {exc.problem}"), reason)
                continue
            formats[name] += 1
            extras.update(extra_keys(data, name))
            message_lists += name == "messages" or isinstance(data.get("prompt"), list)
        whole, frac = divmod(spec.weight, 1.0)
        mixed = got * int(whole) + rng.sample(got, round(frac * len(got)))
        per_file[spec.path] = {"read": len(got), "used": len(mixed)}
        items.extend(mixed)
    report = {
        "files": per_file,
        "formats": dict(formats),
        "extra_fields": dict(sorted(extras.items())),
        "message_lists": message_lists,
        **skips.report(),
    }
    return items, report


def _fit(ids: list[int], labels: list[int], max_length: int, overlong: str, counts: Counter):
    if len(ids) <= max_length:
        counts["kept"] += 1
        return ids, labels
    if overlong == "drop" or all(x == -100 for x in labels[:max_length]):
        counts["dropped_overlong"] += 1
        return None
    counts["truncated"] += 1
    return ids[:max_length], labels[:max_length]


def _sft_rows(chats: list, tok, scfg: Any, fmt: str) -> tuple[list[dict], Counter]:
    rows, counts = [], Counter()
    for chat in chats:
        fitted = _fit(*tokenize_example(chat, tok, fmt), scfg.max_length, scfg.overlong, counts)
        if fitted:
            rows.append({"input_ids": fitted[0], "labels": fitted[1]})
    return rows, counts


def _pair_rows(pairs: list, tok, scfg: Any, fmt: str) -> tuple[list[dict], Counter]:
    rows, counts = [], Counter()
    for prompt, chosen, rejected in pairs:
        sides = []
        for answer in (chosen, rejected):
            chat = [*prompt, {"role": "assistant", "content": answer}]
            ids, labels = tokenize_example(chat, tok, fmt)
            sides.append(_fit(ids, labels, scfg.max_length, scfg.overlong, Counter()))
        if sides[0] is None or sides[1] is None:
            counts["dropped_overlong"] += 1
            continue
        counts["truncated" if max(len(s[0]) for s in sides) == scfg.max_length else "kept"] += 1
        rows.append(
            {
                "chosen_input_ids": sides[0][0],
                "chosen_labels": sides[0][1],
                "rejected_input_ids": sides[1][0],
                "rejected_labels": sides[1][1],
            }
        )
    return rows, counts


def _prepare(scfg: Any, tokenizer_dir: str, seed: int, allowed, normalise, to_rows, stage: str):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    loaded = {
        split: load_items(files, allowed, scfg.format, normalise, scfg.on_error, seed, scfg.columns)
        for split, files in (("train", scfg.train_files), ("eval", scfg.eval_files))
    }
    lists = sum(rep["message_lists"] for _, rep in loaded.values())
    fmt = resolve_prompt_format(scfg.prompt_format, tok, lists, f"{stage}.prompt_format")
    report: dict[str, Any] = {"prompt_format": fmt}
    out = []
    for split, (items, rep) in loaded.items():
        rows, counts = to_rows(items, tok, scfg, fmt)
        if split == "train" and not rows:
            raise DataError(f"no usable training samples in {[f.path for f in scfg.train_files]}")
        report[split] = {**rep, "samples": len(rows), **dict(counts)}
        out.append(datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({}))
    return out[0], out[1], report


def _sft_items(rec: dict, fmt: str) -> list:
    return [to_chat(rec, fmt)]


def _prompt_items(rec: dict, fmt: str) -> list:
    return [to_prompt(rec)]


def prepare_sft(scfg: Any, tokenizer_dir: str, seed: int = 0, stage: str = "sft"):
    return _prepare(scfg, tokenizer_dir, seed, SFT_FORMATS, _sft_items, _sft_rows, stage)


def prepare_preferences(scfg: Any, tokenizer_dir: str, seed: int = 0, stage: str = "rm"):
    return _prepare(scfg, tokenizer_dir, seed, PREFERENCE_FORMATS, to_pairs, _pair_rows, stage)


def load_eval_prompts(scfg: Any) -> tuple[list[list[dict]], list[str], dict]:
    """Held-out SFT chats as (prompt turns, reference answer) for generation-based evaluation,
    and the read report."""
    chats, report = load_items(
        scfg.eval_files, SFT_FORMATS, scfg.format, _sft_items, "fail", 0, scfg.columns
    )
    return [c[:-1] for c in chats], [c[-1]["content"] for c in chats], report


def load_prompts(
    files: list, on_error: str = "fail", columns: dict[str, str] | None = None
) -> tuple[list, dict]:
    """RL prompts: [(prompt turns, label or None)] and the read report."""
    return load_items(files, ("prompts",), "prompts", _prompt_items, on_error, 0, columns)
