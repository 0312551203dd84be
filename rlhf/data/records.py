"""Reading records strictly, with provenance: every record knows its file and line.

    for rec in read_records("data/train.jsonl"):   # rec.where == "data/train.jsonl:12"
        ...

Formats: JSONL (one object per line), JSON (a top-level array; "line" is the record number),
Parquet files and `datasets.save_to_disk` folders (via `datasets`; "line" is the row number; a
saved `DatasetDict` needs `split` unless it has one split), and any other folder: every .jsonl,
.json and .parquet file under it, in path order (a local dataset folder, as `git clone` of a
dataset repository leaves it). Files of a split are named for it (`train.jsonl`,
`data/test-00000-of-00001.parquet`) or sit in a folder named for it (`train/`); a folder holding
several splits needs `split`, so held-out files never mix into training silently.
Strict: invalid UTF-8, invalid JSON, `NaN` / `Infinity` and non-object records raise `DataError`
with `file:line: field: problem`. `Skips` implements the explicit skip-and-count mode.
"""

from __future__ import annotations

import json
import re
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


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_table(path: Path, split: str | None) -> Iterator[Record]:
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_pick_split(path, list(ds), split)]
    else:
        ds = datasets.Dataset.from_parquet(str(path))
    for i, row in enumerate(ds, start=1):
        yield Record(f"{path}:{i}", dict(row))


def _pick_split(path: Path, splits: list[str], split: str | None) -> str:
    if split is None and len(splits) == 1:
        return splits[0]
    if split in splits:
        return split
    what = "no split given" if split is None else f"no split {split!r}"
    raise DataError(f"{path}: {what}; the dataset has splits {splits} (set the file's split)")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")
_SPLIT_FILE = re.compile(rf"^({'|'.join(SPLIT_NAMES)})([-_.]|$)")


def _split_of(relative: Path) -> str | None:
    """The split a data file belongs to by its folder or file name (Hugging Face's layout)."""
    for part in relative.parts[:-1]:
        if part in SPLIT_NAMES:
            return part
    found = _SPLIT_FILE.match(relative.name)
    return found.group(1) if found else None


def _folder_files(path: Path, split: str | None) -> list[Path]:
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix in DATA_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: a folder with no {', '.join(DATA_SUFFIXES)} files")
    splits = {f: _split_of(f.relative_to(path)) for f in files}
    named = sorted({s for s in splits.values() if s})
    if split is not None:
        files = [f for f in files if splits[f] == split]
        if not files:
            raise DataError(f"{path}: no files of split {split!r} (splits found: {named})")
    elif len(named) > 1:
        raise DataError(f"{path}: the folder has splits {named}; set the file's split")
    return files


def _read_folder(path: Path, skips: Skips | None, split: str | None) -> Iterator[Record]:
    for f in _folder_files(path, split):
        yield from read_records(f, skips)


def read_records(
    path: str | Path, skips: Skips | None = None, split: str | None = None
) -> Iterator[Record]:
    """Records of one file or folder, in order, each with its `file:line`.

    Unreadable JSONL lines raise, or with `skips` are counted there (reason `<json>` etc.).
    `split` picks a split of a saved `DatasetDict` or of a dataset folder.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if split is not None and not path.is_dir():
        raise DataError(f"{path}: split {split!r} given, but this is a file, not a dataset folder")
    if split is not None and (path / "state.json").is_file():
        raise DataError(f"{path}: split {split!r} given, but this saved dataset has no splits")
    if path.is_dir() and not _is_saved_dataset(path):
        return _read_folder(path, skips, split)
    if path.is_dir() or path.suffix == ".parquet":
        return _read_table(path, split)
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
