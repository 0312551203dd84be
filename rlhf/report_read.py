"""What the run report reads: a run folder's stages, their metrics.jsonl rows and events, status.

    rows, events, bad = read_metrics(Path("runs/tiny_cpu/rl/metrics.jsonl"))
    stages = run_stages(Path("runs/tiny_cpu"), config)   # one dict per stage, in pipeline order

Only files on disk, nothing else: lines with "step" are metrics, lines with "event" are events; a
resumed stage's later line for a step wins; an unreadable line is counted, not fatal. The figures
(rlhf/report_figures.py) and HTML (rlhf/report_html.py) draw on `series`; rlhf/report.py builds
the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "rm", "dpo", "rl")


def _number(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings "nan"/"inf" the writer uses."""
    try:
        return float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None


def read_metrics(path: Path) -> tuple[list[dict], list[dict], int]:
    """(metric rows, events, unreadable lines) of a metrics.jsonl; a missing file is empty.

    A resumed stage logs some steps twice; the later line wins and rows come sorted by step."""
    if not path.is_file():
        return [], [], 0
    by_step: dict[float, dict] = {}
    events, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a killed run, half written
            continue
        if isinstance(rec, dict) and "event" in rec:
            events.append(rec)
        elif isinstance(rec, dict) and _number(rec.get("step")) is not None:
            by_step[_number(rec["step"])] = rec
        else:
            bad += 1
    return [by_step[s] for s in sorted(by_step)], events, bad


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the rows that have it."""
    xs, ys = [], []
    for row in rows:
        y = _number(row.get(key))
        if y is not None:
            xs.append(_number(row["step"]))
            ys.append(y)
    return xs, ys


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_stage(run_dir: Path, stage: str, config: dict | None) -> dict:
    """Everything the report shows about one stage folder."""
    folder = run_dir / stage
    rows, events, bad = read_metrics(folder / "metrics.jsonl")
    done, paused = _json(folder / "done.json"), _json(folder / "paused.json")
    if isinstance(done, dict):
        status = "done"
    elif paused is not None:
        status = "paused"
    elif rows or events:
        status = "partial"
    else:
        status = "missing"
    max_steps = ((config or {}).get(stage) or {}).get("max_steps")
    return {
        "name": stage,
        "status": status,
        "rows": rows,
        "events": events,
        "bad_lines": bad,
        "done": done if isinstance(done, dict) else None,
        "paused": paused,
        "max_steps": max_steps,
    }


def is_run_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "config.json").is_file() or (path / "summary.json").is_file():
        return True
    return any((path / s / "metrics.jsonl").is_file() for s in STAGES)


def run_stages(run_dir: Path, config: dict | None) -> list[dict]:
    """The configured stages and any other stage that has a folder, in pipeline order."""
    wanted = list(((config or {}).get("run") or {}).get("stages") or [])
    found = [s for s in STAGES if (run_dir / s).is_dir()]
    names = [s for s in STAGES if s in wanted or s in found]
    return [read_stage(run_dir, s, config) for s in names]
