"""The run report's figures: matplotlib PNGs as base64, ready to embed in report.html.

    b64 = line_figure(rl_panels(rows))   # None when no panel has data
    b64 = timing_figure(rows)            # stacked seconds per phase per step

matplotlib's object-oriented API only (no pyplot global state), imported when a figure is drawn.
Metric rows come from rlhf/report_read.py; rlhf/report_html.py places the figures.
"""

from __future__ import annotations

import base64
import io
import math

from rlhf.report_read import _number, series

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
