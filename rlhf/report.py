"""The run report: one self-contained `runs/<name>/report.html` a person can look at.

    rlhf report runs/tiny_cpu            # rebuild it; `rlhf run` writes it at the end
    path = build_report(Path("runs/tiny_cpu"))

It reads what the run left on disk and nothing else: per stage folder (pretrain, sft, rm, dpo,
rl) `metrics.jsonl` (lines with "step" are metrics, lines with "event" are events: the data
report, the RL prompt report, monitor events), `done.json` and `paused.json`; at the top
`config.json` and `summary.json` (the evaluation). Figures are matplotlib PNGs embedded as base64
and the CSS is inline, so the file opens anywhere with no network. A stage that is missing,
interrupted or paused is shown as such; an unreadable line is counted, not fatal.
The parts: rlhf/report_read.py reads the folder, rlhf/report_figures.py draws, rlhf/report_html.py
makes the tables and sections; this module puts the page together and writes it.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from rlhf.report_html import (
    CSS,
    _when,
    data_tables,
    evaluation_section,
    evaluation_tables,
    overview,
    stage_section,
)
from rlhf.report_read import STAGES, _json, is_run_dir, read_metrics, run_stages

__all__ = [
    "ReportError",
    "build_report",
    "data_tables",
    "evaluation_tables",
    "read_metrics",
    "render",
]


class ReportError(ValueError):
    """The folder is not a run (no config.json, summary.json or stage folder)."""


def render(run_dir: Path) -> str:
    """The report's HTML (a pure function of the run folder's files)."""
    config = _json(run_dir / "config.json")
    summary = _json(run_dir / "summary.json")
    name = ((config or {}).get("run") or {}).get("name") or run_dir.name
    stages = run_stages(run_dir, config)
    nav = " ".join(f'<a href="#stage-{s["name"]}">{s["name"]}</a>' for s in stages)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>rlhf run report: {html.escape(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>rlhf run report: {html.escape(name)}</h1>",
        f'<p class="meta"><code>{html.escape(str(run_dir.resolve()))}</code> &middot; '
        f"written {_when(time.time())}</p>",
        f'<nav>{nav} <a href="#evaluation">evaluation</a></nav>',
        '<section id="overview"><h2>Stages</h2>',
        overview(stages) if stages else "<p class=note>no stage has run</p>",
        "</section>",
        *(stage_section(st) for st in stages),
        evaluation_section(summary),
    ]
    if config is not None:
        parts.append(
            '<section id="config"><h2>Config</h2><details><summary>config.json</summary>'
            f"<pre>{html.escape(json.dumps(config, indent=1))}</pre></details></section>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(run_dir: str | Path) -> Path:
    """Write `<run_dir>/report.html` (atomically) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'no such folder'}")
    if not is_run_dir(run_dir):
        raise ReportError(
            f"{run_dir}: not a run folder (no config.json, summary.json or "
            f"<stage>/metrics.jsonl for a stage in {', '.join(STAGES)})"
        )
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render(run_dir), encoding="utf-8")
    tmp.replace(out)
    return out
