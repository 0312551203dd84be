"""Reading records strictly, with provenance: every record knows its file and line.

    for rec in read_records("data/train.jsonl"):   # rec.where == "data/train.jsonl:12"
        ...

Formats: JSONL (one object per line), JSON (a top-level array; "line" is the record number),
Parquet files and `datasets.save_to_disk` folders (via `datasets`; "line" is the row number).
Strict: invalid UTF-8, invalid JSON, `NaN` / `Infinity` and non-object records raise `DataError`
with `file:line: field: problem`. `Skips` implements the explicit skip-and-count mode.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message reads `file:line: field: problem`."""


@dataclass(frozen=True)
class Record:
    where: str  # "file:line"
    data: dict


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (NaN/Infinity are rejected)")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{where}: <json>: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise DataError(f"{where}: <json>: {exc}") from None


def _object(value: Any, where: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: <record>: expected a JSON object, got {type(value).__name__}")
    return Record(where, value)


def _read_jsonl(path: Path, skips: Skips | None) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{where}: <utf-8>: invalid UTF-8 byte at offset {exc.start}"
                    ) from None
                if not text.strip():
                    continue
                yield _object(_parse_json(text, where), where)
            except DataError as err:
                if skips is None:
                    raise
                skips.handle(err, str(err).split(": ")[1])


def _read_json(path: Path) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:1: <utf-8>: invalid UTF-8 byte at offset {exc.start}") from None
    value = _parse_json(text, f"{path}:1")
    if not isinstance(value, list):
        raise DataError(f"{path}:1: <json>: expected a top-level array of records")
    for i, item in enumerate(value, start=1):
        yield _object(item, f"{path}:{i}")


def _read_table(path: Path) -> Iterator[Record]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.Dataset.from_parquet(str(path))
    for i, row in enumerate(ds, start=1):
        yield Record(f"{path}:{i}", dict(row))


def read_records(path: str | Path, skips: Skips | None = None) -> Iterator[Record]:
    """Records of one file or folder, in order, each with its `file:line`.

    Unreadable JSONL lines raise, or with `skips` are counted there (reason `<json>` etc.).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir() or path.suffix == ".parquet":
        return _read_table(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, skips)
    raise DataError(f"{path}: unknown data format (expected .jsonl, .json, .parquet or a folder)")


@dataclass
class Skips:
    """Fail fast (`on_error="fail"`) or skip bad records and count them by reason."""

    on_error: str = "fail"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def handle(self, error: DataError, reason: str) -> None:
        if self.on_error == "fail":
            raise error
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def report(self) -> dict:
        return {
            "skipped": sum(self.counts.values()),
            "skipped_by_reason": dict(self.counts),
            "skipped_examples": self.examples,
        }
