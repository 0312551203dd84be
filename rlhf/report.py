"""The run report: one self-contained `runs/<name>/report.html` a person can look at.

    rlhf report runs/tiny_cpu            # rebuild it; `rlhf run` writes it at the end
    path = build_report(Path("runs/tiny_cpu"))

It reads what the run left on disk and nothing else: per stage folder (pretrain, sft, rm, dpo,
rl) `metrics.jsonl` (lines with "step" are metrics, lines with "event" are events: the data
report, the RL prompt report, monitor events), `done.json` and `paused.json`; at the top
`config.json` and `summary.json` (the evaluation). Figures are matplotlib PNGs embedded as base64
and the CSS is inline, so the file opens anywhere with no network. A stage that is missing,
interrupted or paused is shown as such; an unreadable line is counted, not fatal.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "rm", "dpo", "rl")
MAX_ROWS = 200  # rows of one list shown in a data report table

# RL panels: title -> {metric under rl/: legend label}; a panel with no data is left out.
RL_PANELS = {
    "Reward": {"reward/score_mean": "all samples", "reward/trained_score_mean": "trained on"},
    "Held-out (greedy, engines)": {"eval/exact_match": "exact match", "eval/reward_mean": "reward"},
    "KL to the reference": {
        "kl/mean_per_sequence": "per sequence",
        "kl/mean_per_token": "per token",
        "ppo/approx_kl": "approx KL of the update",
    },
    "Response length (tokens)": {"response/length_mean": "mean", "response/length_max": "max"},
    "Entropy (nats / token)": {"policy/entropy": "policy", "ppo/entropy": "ppo"},
    "Diversity": {
        "response/distinct_frac": "distinct responses",
        "response/distinct_ngram_frac": "distinct n-grams",
    },
    "Clipped fraction": {
        "response/clipped_frac": "responses cut at max tokens",
        "ppo/clipfrac": "PPO ratio clipped",
        "critic/clipfrac": "value clipped",
    },
    "Losses": {
        "policy/pg_loss": "policy gradient",
        "critic/value_loss": "value",
        "policy/kl_loss": "KL loss",
        "policy/ptx_loss": "ptx",
    },
}
# Training-stage metrics drawn last (TAIL), or not at all (HIDDEN); panel titles.
TRAIN_TAIL = ("lr", "grad_norm", "tokens_per_s")
TRAIN_HIDDEN = ("skipped_steps", "nonfinite_loss", "tokens", "pairs")
TRAIN_TITLES = {"ppl": "perplexity", "lr": "learning rate", "grad_norm": "gradient norm"}
EVAL_COLUMNS = {
    "fixed": "fixed",
    "broken": "broken",
    "greedy_p": "greedy p (McNemar)",
    "sampled_p": "sampled p (Wilcoxon)",
    "win_rate_exact": "win rate (exact match)",
    "win_rate_rm": "win rate (reward model)",
}


class ReportError(ValueError):
    """The folder is not a run (no config.json, summary.json or stage folder)."""


# ---- reading ------------------------------------------------------------------------------------


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


# ---- figures ------------------------------------------------------------------------------------


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, ncols: int = 3):
    """A figure of n panels in rows of ncols (matplotlib's OO API: no global pyplot state)."""
    from matplotlib.figure import Figure

    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.1 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _axes_style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _panel(ax, title: str, lines: list[tuple[list[float], list[float], str]]) -> None:
    for i, (xs, ys, label) in enumerate(lines):  # dashes keep a line visible under another
        style = ("-", "--", ":", "-.")[i % 4]
        ys = [y if math.isfinite(y) else math.nan for y in ys]  # inf would wreck the axis: a gap
        ax.plot(xs, ys, style, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
    _axes_style(ax, title)
    if len(lines) > 1 or lines[0][2]:
        ax.legend(fontsize=8)


def line_figure(panels: list[tuple[str, list[tuple[list, list, str]]]]) -> str | None:
    """Base64 PNG of line panels; None when no panel has data."""
    panels = [(t, [ln for ln in lines if ln[0]]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (title, lines) in zip(axes, panels):
        _panel(ax, title, lines)
    return _png(fig)


def train_panels(stage: str, rows: list[dict]) -> list[tuple[str, list]]:
    """Loss (train and held-out) first, then each metric with its held-out twin, then lr etc."""
    names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(stage + "/")})
    base = [n for n in names if not n.startswith("eval_")]
    base += [n[5:] for n in names if n.startswith("eval_") and n[5:] not in base]
    base = sorted(set(base) - set(TRAIN_HIDDEN), key=lambda n: (n != "loss", n in TRAIN_TAIL, n))
    panels = []
    for name in base:
        lines = [
            (*series(rows, f"{stage}/{name}"), "train"),
            (*series(rows, f"{stage}/eval_{name}"), "held-out"),
        ]
        if not lines[1][0]:
            lines = [(lines[0][0], lines[0][1], "")]
        panels.append((TRAIN_TITLES.get(name, name.replace("_", " ")), lines))
    return panels


def rl_panels(rows: list[dict]) -> list[tuple[str, list]]:
    return [
        (title, [(*series(rows, f"rl/{key}"), label) for key, label in metrics.items()])
        for title, metrics in RL_PANELS.items()
    ]


def timing_phases(rows: list[dict], prefix: str = "rl/timing/") -> list[str]:
    """Phases of a step in the order they first appear (the step total left out)."""
    phases: list[str] = []
    for row in rows:
        for k in row:
            if k.startswith(prefix) and k != prefix + "step" and k[len(prefix) :] not in phases:
                phases.append(k[len(prefix) :])
    return phases


def timing_figure(rows: list[dict], prefix: str = "rl/timing/") -> str | None:
    """Stacked seconds per phase per step (bars for short runs, areas for long ones)."""
    phases = timing_phases(rows, prefix)
    rows = [r for r in rows if any(prefix + p in r for p in phases)]
    if not phases or not rows:
        return None
    from matplotlib.figure import Figure

    steps = [_number(r["step"]) for r in rows]
    stack = [[_number(r.get(prefix + p)) or 0.0 for r in rows] for p in phases]
    fig = Figure(figsize=(13.8, 3.6), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(phases))]
    if len(steps) <= 60:
        bottom = [0.0] * len(steps)
        for name, ys, color in zip(phases, stack, colors):
            ax.bar(steps, ys, bottom=bottom, width=0.8, label=name, color=color)
            bottom = [b + y for b, y in zip(bottom, ys)]
    else:
        ax.stackplot(steps, stack, labels=phases, colors=colors)
    _axes_style(ax, "Time per step by phase")
    ax.set_ylabel("seconds", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


# ---- HTML ---------------------------------------------------------------------------------------


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


def run_stages(run_dir: Path, config: dict | None) -> list[dict]:
    """The configured stages and any other stage that has a folder, in pipeline order."""
    wanted = list(((config or {}).get("run") or {}).get("stages") or [])
    found = [s for s in STAGES if (run_dir / s).is_dir()]
    names = [s for s in STAGES if s in wanted or s in found]
    return [read_stage(run_dir, s, config) for s in names]


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
