"""Pretraining data: heuristic cleaning, exact + MinHash near-duplicate removal, mixing by source,
and packing into fixed-length blocks with EOS between documents, with a report of every step.

    train, evals, report = build_pretraining_data(cfg.pretrain, tokenizer_dir, seed=0)
    print(format_report(report))

Filters follow Gopher's quality rules (Rae et al. 2021, appendix A) and C4's (Raffel et al. 2020):
length, share of alphanumeric characters, duplicated lines, the share of the text taken by its
most frequent word bigram, and a charset rule. Code sources keep only the length and duplicate-line
rules (symbols and short lines are normal there). Mixing is by tokens: source s gets
`mix[s] * token_budget` tokens, cycling through its shuffled documents (repeats are counted as
epochs). Packing concatenates `doc + EOS` and cuts blocks of `max_length` tokens; the tail that
does not fill a block is dropped and counted. 5% of blocks (at least one) are held out for eval.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from rlhf.data.records import DataError, Skips, read_records

WORD = re.compile(r"\w+", re.UNICODE)


def too_short(text: str, min_words: int = 8) -> bool:
    return len(WORD.findall(text)) < min_words


def too_long(text: str, max_chars: int = 100_000) -> bool:
    return len(text) > max_chars


def low_alnum(text: str, min_share: float = 0.6) -> bool:
    """C4/Gopher-style symbol rule: too few letters and digits among non-space characters."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalnum() for c in chars) / len(chars) < min_share


def repeated_lines(text: str, max_share: float = 0.3) -> bool:
    """Gopher: the share of lines that duplicate an earlier line is above `max_share`."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return len(lines) > 2 and 1 - len(set(lines)) / len(lines) > max_share


def repeated_bigram(text: str, max_share: float = 0.2) -> bool:
    """Gopher: the most frequent word bigram covers more than `max_share` of the characters."""
    words = WORD.findall(text.lower())
    if len(words) < 10:
        return False
    top, count = Counter(zip(words, words[1:])).most_common(1)[0]
    return count * (len(top[0]) + len(top[1])) / max(1, sum(map(len, words))) > max_share


def wrong_charset(text: str, max_share: float = 0.3) -> bool:
    """Share of characters outside Latin-1 (the bundled corpus is English)."""
    return bool(text) and sum(ord(c) > 0xFF for c in text) / len(text) > max_share


PROSE_FILTERS: dict[str, Callable[[str], bool]] = {
    "too_short": too_short,
    "too_long": too_long,
    "low_alnum": low_alnum,
    "repeated_lines": repeated_lines,
    "repeated_bigram": repeated_bigram,
    "wrong_charset": wrong_charset,
}
CODE_FILTERS = {k: PROSE_FILTERS[k] for k in ("too_long", "repeated_lines")}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_dedup(docs: list[str], seen: set[str]) -> tuple[list[str], int]:
    kept = []
    for doc in docs:
        h = hashlib.sha1(normalise(doc).encode()).hexdigest()
        if h not in seen:
            seen.add(h)
            kept.append(doc)
    return kept, len(docs) - len(kept)


def near_dedup(
    docs: list[str], lsh: Any, threshold: float, num_perm: int = 64, shingle: int = 5, tag: str = ""
) -> tuple[list[str], int]:
    """Drop documents whose word-shingle MinHash matches an earlier one (Broder 1997; LSH)."""
    from datasketch import MinHash

    kept = []
    for i, doc in enumerate(docs):
        words = normalise(doc).split()
        grams = {" ".join(words[j : j + shingle]) for j in range(max(1, len(words) - shingle + 1))}
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch([g.encode() for g in grams])
        if lsh.query(mh):
            continue
        lsh.insert(f"{tag}{i}", mh)
        kept.append(doc)
    return kept, len(docs) - len(kept)


def _read_texts(files: list, skips: Skips) -> list[str]:
    texts = []
    for spec in files:
        for rec in read_records(spec.path, skips):
            text = rec.data.get("text")
            if not isinstance(text, str):
                skips.handle(
                    DataError(f"{rec.where}: text: expected a string, got {type(text).__name__}"),
                    "text: not a string",
                )
                continue
            texts.append(text)
    return texts


def clean_source(
    name: str,
    docs: list[str],
    seen: set[str],
    lsh: Any,
    threshold: float,
    count_tokens: Callable[[str], int] = len,
) -> tuple[list[str], dict]:
    """Filters, then exact and near dedup (across all sources), with docs and tokens per step."""
    filters = CODE_FILTERS if name == "code" else PROSE_FILTERS
    removed: Counter = Counter()
    removed_tokens: Counter = Counter()
    kept = []
    for doc in docs:
        reason = next((f for f, rule in filters.items() if rule(doc)), None)
        if reason:
            removed[reason] += 1
            removed_tokens[reason] += count_tokens(doc)
        else:
            kept.append(doc)
    for step, fn in (
        ("exact_duplicate", lambda d: exact_dedup(d, seen)),
        ("near_duplicate", lambda d: near_dedup(d, lsh, threshold, tag=f"{name}:")),
    ):
        before = kept
        kept, removed[step] = fn(kept)
        removed_tokens[step] = sum(map(count_tokens, before)) - sum(map(count_tokens, kept))
    return kept, {
        "docs_in": len(docs),
        "tokens_in": sum(map(count_tokens, docs)),
        "removed": dict(removed),
        "removed_tokens": dict(removed_tokens),
        "docs_kept": len(kept),
    }


def mix_by_tokens(
    sources: dict[str, list[list[int]]], mix: dict[str, float], budget: int, seed: int
) -> tuple[list[list[int]], dict]:
    """Take `mix[s] * budget` tokens from each source, cycling its shuffled docs if needed."""
    rng = random.Random(seed)
    out, report = [], {}
    for name in sorted(sources):
        docs = sources[name]
        target, got, used = int(mix[name] * budget), 0, 0
        order = list(range(len(docs)))
        rng.shuffle(order)
        while docs and got < target:
            doc = docs[order[used % len(order)]]
            out.append(doc)
            got += len(doc) + 1
            used += 1
        report[name] = {"docs": used, "tokens": got, "epochs": round(used / max(1, len(docs)), 2)}
    rng.shuffle(out)
    total = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["share"] = round(r["tokens"] / max(1, total), 4)
    return out, report


def pack(docs: list[list[int]], block: int, eos: int) -> tuple[list[list[int]], int]:
    """Concatenate `doc + [eos]` and cut `block`-token rows; return rows and dropped tail size."""
    stream = [t for doc in docs for t in (*doc, eos)]
    n = len(stream) // block
    return [stream[i * block : (i + 1) * block] for i in range(n)], len(stream) - n * block


def build_pretraining_data(pcfg: Any, tokenizer_dir: str, seed: int = 0):
    """The whole pipeline; returns (train Dataset, eval Dataset, report)."""
    import datasets
    from datasketch import MinHashLSH
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    skips, seen = Skips(pcfg.on_error), set()
    lsh = MinHashLSH(threshold=pcfg.near_dup_threshold, num_perm=64)
    report: dict[str, Any] = {"sources": {}}
    tokenized = {}
    for name, files in sorted(pcfg.sources.items()):
        texts = _read_texts(files, skips)
        # Every document tokenized once, in one batch (the fast tokenizer's threads): the
        # report counts tokens before and after each step, and the kept ones are packed.
        ids = dict(zip(texts, tok(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        lengths = {text: len(tokens) for text, tokens in ids.items()}
        kept, rep = clean_source(
            name, texts, seen, lsh, pcfg.near_dup_threshold, lengths.__getitem__
        )
        tokenized[name] = [ids[d] for d in kept]
        rep["tokens_kept"] = sum(map(len, tokenized[name]))
        report["sources"][name] = rep
    docs, report["mix"] = mix_by_tokens(tokenized, pcfg.mix, pcfg.token_budget, seed)
    blocks, report["packing_dropped_tokens"] = pack(docs, pcfg.max_length, tok.eos_token_id)
    if len(blocks) < 2:
        raise DataError(
            f"pretraining data packs into {len(blocks)} block(s) of "
            f"{pcfg.max_length} tokens; raise pretrain.token_budget"
        )
    n_eval = max(1, len(blocks) // 20)
    report.update(
        skips.report(),
        blocks_train=len(blocks) - n_eval,
        blocks_eval=n_eval,
        block_tokens=pcfg.max_length,
    )
    as_rows = [{"input_ids": b} for b in blocks]
    return (
        datasets.Dataset.from_list(as_rows[n_eval:]),
        datasets.Dataset.from_list(as_rows[:n_eval]),
        report,
    )


def format_report(report: dict) -> str:
    lines = ["source   docs_in  kept  removed (by reason)"]
    for name, r in report["sources"].items():
        why = ", ".join(f"{k}={v}" for k, v in r["removed"].items() if v)
        lines.append(f"{name:8} {r['docs_in']:7} {r['docs_kept']:5}  {why}")
    lines.append(
        "mix: "
        + ", ".join(
            f"{k} {v['share']:.0%} ({v['tokens']} tok, {v['epochs']} ep)"
            for k, v in report["mix"].items()
        )
    )
    return "\n".join(lines)
