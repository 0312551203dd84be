"""The run report's HTML: tables of any JSON report, the stage, monitor and evaluation sections.

    table(["metric", "value"], [["loss", 0.5]], "kv")
    stage_section(read_stage(run_dir, "sft", config))   # curves, events, final metrics

Cells escape their text (a `Raw` cell is HTML already); CSS is inline, so the page needs no
network. rlhf/report.py assembles the page from these sections.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from rlhf.report_figures import line_figure, rl_panels, timing_figure, timing_phases, train_panels
from rlhf.report_read import _number, series

MAX_ROWS = 200  # rows of one list shown in a data report table
EVAL_COLUMNS = {
    "fixed": "fixed",
    "broken": "broken",
    "greedy_p": "greedy p (McNemar)",
    "sampled_p": "sampled p (Wilcoxon)",
    "win_rate_exact": "win rate (exact match)",
    "win_rate_rm": "win rate (reward model)",
}


class Raw(str):
    """A table cell that is already HTML."""


def _cell(value: Any) -> str:
    if isinstance(value, Raw):
        return value
    if value is None or value == {} or value == []:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = [_cell(v) for v in value[:20]]
        return "<br>".join(
            shown + ([f"&hellip; {len(value) - 20} more"] if len(value) > 20 else [])
        )
    if isinstance(value, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_cell(v)}" for k, v in value.items())
    return html.escape(str(value))


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any) -> str:
    if isinstance(value, tuple):  # (value, css class)
        return f'<td class="{value[1]}">{_cell(value[0])}</td>'
    return f"<td>{_cell(value)}</td>"


def _flat(value: Any) -> bool:
    """Shown in one cell: a scalar, a list of scalars, or an empty dict."""
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return not isinstance(value, dict) or not value


def data_tables(obj: Any) -> str:
    """Any JSON report as tables: flat items as key / value, dicts of dicts as a matrix."""
    if _flat(obj):
        return f"<p>{_cell(obj)}</p>"
    if isinstance(obj, list):
        more = f"<p class=note>and {len(obj) - MAX_ROWS} more</p>" if len(obj) > MAX_ROWS else ""
        obj = obj[:MAX_ROWS]
        if all(isinstance(x, dict) and all(_flat(v) for v in x.values()) for x in obj):
            cols = list(dict.fromkeys(k for x in obj for k in x))
            return table(cols, [[x.get(c) for c in cols] for x in obj]) + more
        return "".join(data_tables(x) for x in obj) + more
    if all(isinstance(v, dict) and v for v in obj.values()):
        return _matrix(obj)
    flat = [[k, v] for k, v in obj.items() if _flat(v)]
    out = table(["", "value"], flat, "kv") if flat else ""
    for k, v in obj.items():
        if not _flat(v):
            out += f"<h5>{html.escape(str(k))}</h5>" + data_tables(v)
    return out


def _matrix(rows: dict[str, dict]) -> str:
    """Rows are the outer keys; columns the keys whose values fit a cell; the rest below."""
    keys = list(dict.fromkeys(k for v in rows.values() for k in v))
    cols = [k for k in keys if all(_flat(v[k]) for v in rows.values() if k in v)]
    if not cols and all(isinstance(x, dict) for v in rows.values() for x in v.values()):
        # e.g. {"train": {"a.jsonl": {...}}}: one row per "train › a.jsonl"
        return _matrix({f"{a} › {b}": x for a, v in rows.items() for b, x in v.items()})
    out = table(["", *cols], [[name, *(v.get(c) for c in cols)] for name, v in rows.items()])
    for k in keys:
        if k in cols:
            continue
        sub = {name: v[k] for name, v in rows.items() if k in v and not _flat(v[k])}
        out += f"<h5>{html.escape(str(k))}</h5>"
        if all(isinstance(x, dict) for x in sub.values()):
            out += _matrix(sub)
        else:
            out += "".join(f"<h5>{html.escape(n)}</h5>" + data_tables(x) for n, x in sub.items())
    return out


def _when(t: Any) -> str:
    t = _number(t)
    ok = t is not None and math.isfinite(t)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if ok else ""


def monitor_table(events: list[dict]) -> str:
    """Monitor events, one row each: the event name, when, and every field of its data."""
    datas = [
        e.get("data") if isinstance(e.get("data"), dict) else {"data": e.get("data")}
        for e in events
    ]
    cols = list(dict.fromkeys(k for d in datas for k in d))
    rows = [
        [e["event"], _when(e.get("time")), *(d.get(c) for c in cols)] for e, d in zip(events, datas)
    ]
    return table(["event", "time", *cols], rows, "monitor")


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _last(rows: list[dict], key: str) -> float | None:
    _, ys = series(rows, key)
    return ys[-1] if ys else None


STATUS_TEXT = {
    "done": "done",
    "partial": "partial: no done.json (interrupted, failed or still running)",
    "paused": "paused by the monitor (paused.json); a re-run resumes it",
    "missing": "missing: configured, no output (not reached yet, or the run stopped before it)",
}


def _steps(st: dict) -> str:
    last = _number(st["rows"][-1]["step"]) if st["rows"] else None
    shown = "—" if last is None else f"{last:g}"
    return shown + (f" / {st['max_steps']}" if st["max_steps"] else "")


def _key_results(st: dict) -> str:
    rows, s = st["rows"], st["name"]
    if s == "rl":
        keys = ["rl/reward/score_mean", "rl/kl/mean_per_sequence", "rl/eval/exact_match"]
    else:
        names = dict.fromkeys(k for r in rows for k in r if k.startswith(s + "/"))
        keys = [k for k in names if k.endswith("/loss") or "/eval_" in k]
    shown = [(k.split("/", 1)[1], _last(rows, k)) for k in keys]
    return ", ".join(f"{k} {v:.4g}" for k, v in shown if v is not None)


def overview(stages: list[dict]) -> str:
    rows = []
    for st in stages:
        n_mon = sum(str(e.get("event", "")).startswith("monitor") for e in st["events"])
        link = Raw(f'<a href="#stage-{st["name"]}">{st["name"]}</a>')
        rows.append(
            [
                link,
                (st["status"], f"status-{st['status']}"),
                _steps(st),
                (st["done"] or {}).get("wall_s"),
                _key_results(st),
                n_mon or None,
            ]
        )
    return table(["stage", "status", "steps", "wall s", "final values", "monitor events"], rows)


def stage_section(st: dict) -> str:
    name, rows = st["name"], st["rows"]
    out = [f'<section id="stage-{name}"><h2>{name}</h2>']
    out.append(f'<p class="status status-{st["status"]}">{STATUS_TEXT[st["status"]]}</p>')
    if st["bad_lines"]:
        out.append(f"<p class=note>{st['bad_lines']} unreadable line(s) in metrics.jsonl</p>")
    if st["paused"] is not None:
        since = " (an earlier pause: the stage has finished since)" if st["done"] else ""
        out.append(f"<h3>paused.json{since}</h3>" + data_tables(st["paused"]))
    if name == "rl":
        out.append(_img(line_figure(rl_panels(rows)), "rl curves"))
        out.append(_img(timing_figure(rows), "rl time per step"))
        out.append(timing_table(rows))
    else:
        out.append(_img(line_figure(train_panels(name, rows)), f"{name} curves"))
    monitor = [e for e in st["events"] if str(e.get("event", "")).startswith("monitor")]
    if monitor:
        out.append("<h3>Monitor events</h3>" + monitor_table(monitor))
    for e in st["events"]:
        if e not in monitor:
            title = {"data": "Data report", "prompts": "Prompt report"}.get(e["event"], e["event"])
            out.append(f"<h3>{html.escape(str(title))}</h3>" + data_tables(e.get("data")))
    if st["done"]:
        final = sorted((st["done"].get("metrics") or {}).items())
        out.append(
            f"<details><summary>final metrics ({len(final)}) and checkpoint</summary>"
            f"<p><code>{html.escape(str(st['done'].get('model', '')))}</code></p>"
            + table(["metric", "value"], [list(kv) for kv in final], "kv")
            + "</details>"
        )
    return "\n".join(out) + "</section>"


def timing_table(rows: list[dict], prefix: str = "rl/timing/") -> str:
    """Mean seconds per phase over the logged steps, and each phase's share of a step."""
    phases = timing_phases(rows, prefix)
    means = {p: series(rows, prefix + p)[1] for p in phases}
    means = {p: sum(ys) / len(ys) for p, ys in means.items() if ys}
    if not means:
        return ""
    _, steps = series(rows, prefix + "step")
    total = sum(steps) / len(steps) if steps else sum(means.values())
    body = [[p, m, (f"{100 * m / total:.1f}%" if total else None)] for p, m in means.items()]
    body.append(["whole step", total, "100%"])
    return table(["phase", "mean s", "share"], body, "kv")


def evaluation_tables(ev: dict) -> tuple[list[list], list[str], list[list], list[list]]:
    """Per policy (accuracies), per compared pair (flips, win rates, p-values), and the rest."""
    keys = [k for k in ev if k.startswith("eval/")]
    policies = [
        k[5 : -len("_accuracy")]
        for k in keys
        if k.endswith("_accuracy") and "_vs_" not in k and not k.endswith("_sampled_accuracy")
    ]
    used = {"eval/num_prompts"}
    per_policy = []
    for p in policies:
        per_policy.append([p, ev.get(f"eval/{p}_accuracy"), ev.get(f"eval/{p}_sampled_accuracy")])
        used |= {f"eval/{p}_accuracy", f"eval/{p}_sampled_accuracy"}
    pairs: dict[tuple[str, str], dict] = {}
    for k in keys:
        name, sep, tail = k[5:].partition("_vs_")
        base = next(
            (b for b in sorted(policies, key=len, reverse=True) if tail.startswith(b + "_")), None
        )
        if sep and base:
            pairs.setdefault((name, base), {})[tail[len(base) + 1 :]] = ev[k]
            used.add(k)
    metrics = list(dict.fromkeys(m for v in pairs.values() for m in v))
    metrics = [m for m in EVAL_COLUMNS if m in metrics] + [
        m for m in metrics if m not in EVAL_COLUMNS
    ]
    compared = [[a, b, *(_p_cell(m, v.get(m)) for m in metrics)] for (a, b), v in pairs.items()]
    header = ["policy", "against", *(EVAL_COLUMNS.get(m, m) for m in metrics)]
    rest = [[k, v] for k, v in ev.items() if k not in used]
    return per_policy, header, compared, rest


def _p_cell(metric: str, value: Any) -> Any:
    """p-values below 0.05 stand out."""
    if metric.endswith("_p") and isinstance(value, (int, float)) and value < 0.05:
        return (value, "sig")
    return value


def evaluation_section(summary: dict | None) -> str:
    out = ['<section id="evaluation"><h2>Evaluation</h2>']
    if not isinstance(summary, dict):
        out.append("<p class=note>no summary.json: the run has not finished its evaluation</p>")
        return "\n".join(out) + "</section>"
    ev = summary.get("evaluation") or {}
    if not ev:
        out.append("<p class=note>no held-out evaluation in summary.json</p>")
    else:
        per_policy, header, compared, rest = evaluation_tables(ev)
        out.append(f"<p>{_cell(ev.get('eval/num_prompts'))} held-out prompts.</p>")
        out.append(table(["policy", "greedy accuracy", "sampled accuracy (pass@1)"], per_policy))
        if compared:
            out.append("<h3>Against the baseline (p &lt; 0.05 highlighted)</h3>")
            out.append(table(header, compared))
        if rest:
            out.append("<h3>Other results</h3>" + table(["metric", "value"], rest, "kv"))
    timings = summary.get("timings") or {}
    if timings:
        rows = [[k.removeprefix("timing/"), v] for k, v in timings.items()]
        out.append(
            "<h3>Wall time of the last <code>rlhf run</code> by phase (s)</h3>"
            "<p class=note>a stage finished by an earlier invocation is skipped: about 0 here, "
            "its own time is in the stage table</p>" + table(["phase", "s"], rows)
        )
    return "\n".join(out) + "</section>"


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430;
       margin: 0 auto; max-width: 1440px; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 24px; margin: 8px 0 2px; } h2 { font-size: 19px; margin: 0 0 6px; }
h3 { font-size: 15px; margin: 18px 0 6px; } h5 { font-size: 13px; margin: 10px 0 4px; color: #475569; }
section { border-top: 2px solid #e2e8f0; padding-top: 14px; margin-top: 22px; }
table { border-collapse: collapse; margin: 4px 0 10px; font-size: 13px; }
th, td { border: 1px solid #d7dde5; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
td { font-variant-numeric: tabular-nums; max-width: 760px; overflow-wrap: break-word; }
table.kv td:first-child { color: #334155; }
img { display: block; max-width: 100%; height: auto; margin: 8px 0; }
.status { font-weight: 600; }
.status-done { color: #15803d; } .status-partial, .status-paused { color: #b45309; }
.status-missing { color: #b91c1c; }
.sig { background: #dcfce7; font-weight: 600; }
.note, .meta { color: #64748b; }
details { margin: 8px 0; } summary { cursor: pointer; color: #334155; }
pre { background: #f8fafc; border: 1px solid #e2e8f0; padding: 8px; font-size: 12px;
      overflow-x: auto; }
nav a { margin-right: 12px; }
"""
