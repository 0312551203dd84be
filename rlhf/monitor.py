"""Watch a run's metrics and turn anomalies into warn / pause / stop.

The RL loop calls the monitor after every step with that step's metrics (unprefixed names, as
`RLRun.step` returns them) and acts on what comes back:

    monitor = Monitor(cfg.monitor)
    events = monitor.check(step, metrics)        # list[MonitorEvent], logged to metrics.jsonl
    event = blocking(events)                     # the first stop, else the first pause, else None
    if event and event.action == "stop": raise MonitorStop(event)         # error:, exit 2
    if event: checkpoint; write_pause(stage_dir, event, step); raise PausedRun(event, path)  # exit 3

Rules (one config section each under `monitor.`, with thresholds, `enabled`, `action`, `patience`):
non_finite, kl, reward_zscore, no_signal, length, diversity, entropy, logprob_gap, reward_hacking.
A rule trips when its condition has held `patience` steps in a row. A pause or stop fires on every
such step (a resumed run that changed nothing pauses again); a warning fires once per streak.
`monitor.acknowledge=[kl]` demotes a rule to warn, so a paused run goes on without new thresholds.
Running windows live in `state_dict()` (plain JSON) and go into the RL checkpoint.

The rules are pure functions in rlhf/monitor_rules.py; this module keeps their streaks and
windows, makes the events and writes the pause.

Offline stages use `overfit_event` on their held-out losses. Pure Python: no Ray, vLLM, DeepSpeed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.config import MonitorConfig
from rlhf.monitor_rules import (
    RULES,
    Finding,
    _finite,
    distinct_ngram_frac,
    linear_change,
    rising_streak,
)

__all__ = [
    "Monitor",
    "MonitorEvent",
    "MonitorStop",
    "PausedRun",
    "blocking",
    "distinct_ngram_frac",
    "linear_change",
    "overfit_event",
    "pause_message",
    "rising_streak",
    "write_pause",
]


STATE_VERSION = 1


@dataclass
class MonitorEvent:
    """One tripped rule at one step: what was seen, against which threshold, and what to change."""

    rule: str
    action: str  # warn | pause | stop (after acknowledgement)
    step: int
    values: dict[str, float]
    message: str  # one line: what was seen vs the threshold, the config key to change
    config_key: str = ""  # the setting that moves the threshold
    threshold: float | None = None  # its current value (None: the rule has no threshold)
    observed: float | None = None  # the value compared against it

    def to_dict(self) -> dict:
        out = asdict(self)
        out["values"] = _json_floats(self.values)
        return out


class PausedRun(Exception):
    """The monitor paused the run: a checkpoint and paused.json exist; the CLI exits with 3."""

    def __init__(self, event: MonitorEvent, path: Path | None = None) -> None:
        self.event, self.path = event, path
        super().__init__(pause_message(event, path))

    def __reduce__(self):  # picklable across Ray: rebuild from the event, not the message
        return PausedRun, (self.event, self.path)


class MonitorStop(RuntimeError):
    """A rule whose action is `stop` tripped: a user-facing error (exit code 2)."""

    def __init__(self, event: MonitorEvent) -> None:
        self.event = event
        super().__init__(
            f"monitor stopped the run: {event.message} (monitor.{event.rule}.action=pause "
            f"checkpoints and pauses instead)"
        )

    def __reduce__(self):
        return MonitorStop, (self.event,)


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Plain floats of every numeric metric (numpy / torch scalars included); the rest dropped."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _json_floats(values: dict[str, float]) -> dict[str, float | str]:
    """JSON has no NaN: non-finite values become strings ("nan", "inf")."""
    return {k: (float(v) if _finite(v) else str(v)) for k, v in values.items()}


# ---- the monitor -----------------------------------------------------------------------------------


class Monitor:
    """Checks every rule of `cfg` on each step's metrics; its windows survive a resume."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.state: dict[str, Any] = {"version": STATE_VERSION, "streaks": {}, "fired": {}}
        self.state.update({rule: {} for rule in RULES})

    def check(self, step: int, metrics: dict[str, float]) -> list[MonitorEvent]:
        """Run every enabled rule on this step's metrics; return the events it fires."""
        if not self.cfg.enabled:
            return []
        metrics, events = _as_floats(metrics), []
        for rule, fn in RULES.items():
            rc = getattr(self.cfg, rule)
            if not rc.enabled:
                continue
            found = fn(rc, metrics, self.state[rule])
            streaks, fired = self.state["streaks"], self.state["fired"]
            if found is None:
                streaks[rule], fired[rule] = 0, False
                continue
            streaks[rule] = streaks.get(rule, 0) + 1
            action = self.cfg.action_of(rule)
            if streaks[rule] < rc.patience or (action == "warn" and fired.get(rule)):
                continue
            fired[rule] = True
            events.append(self._event(rule, action, step, found, streaks[rule]))
        return events

    def _event(self, rule: str, action: str, step: int, f: Finding, streak: int) -> MonitorEvent:
        held = f" for {streak} steps in a row" if streak > 1 else ""
        now = f" (now {f.threshold:g})" if f.threshold is not None else ""
        message = (
            f"step {step}: monitor rule {rule!r}: {f.detail}{held}; change {f.key}{now}, or "
            f"monitor.acknowledge=[{rule}] to only warn"
        )
        return MonitorEvent(rule, action, step, f.values, message, f.key, f.threshold, f.observed)

    def state_dict(self) -> dict:
        """Streaks and running windows, as plain JSON (goes into the RL checkpoint)."""
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or set(RULES) - set(state):
            raise ValueError(f"monitor state of an unknown layout: keys {sorted(state)}")
        self.state = json.loads(json.dumps(state))


def blocking(events: list[MonitorEvent]) -> MonitorEvent | None:
    """The event the run must act on: the first stop, else the first pause, else None."""
    for action in ("stop", "pause"):
        for event in events:
            if event.action == action:
                return event
    return None


# ---- pausing -----------------------------------------------------------------------------------------


def _what_to_change(event: MonitorEvent) -> str:
    if event.threshold is None or event.observed is None or not _finite(event.observed):
        return f"fix the cause, or change {event.config_key}"
    beyond = "above" if event.observed > event.threshold else "below"
    return (
        f"set {event.config_key} {beyond} {event.observed:.4g} (now {event.threshold:g}), "
        "or fix the cause"
    )


def pause_message(event: MonitorEvent, path: Path | None = None) -> str:
    """The short paragraph a paused run prints: why it stopped and how to go on."""
    where = f" Details: {path}." if path else ""
    return (
        f"paused: {event.message}.{where} The step's checkpoint is saved; re-running the same "
        f"command resumes from it. Before that, either {_what_to_change(event)}, or add "
        f"monitor.acknowledge=[{event.rule}] to go on with the same thresholds (the rule then "
        "only warns)."
    )


def write_pause(stage_dir: Path, event: MonitorEvent, step: int) -> Path:
    """Write `<stage_dir>/paused.json` atomically (rule, values, step, what to change, how to
    resume) and return its path."""
    path = Path(stage_dir) / "paused.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **event.to_dict(),
        "step": step,
        "change": _what_to_change(event),
        "acknowledge": f"monitor.acknowledge=[{event.rule}]",
        "resume": "re-run the same command (after changing the config or adding the "
        "acknowledge override); the run resumes from the checkpoint of this step",
    }
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record, indent=1, allow_nan=False))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(path)
    return path


# ---- offline stages ----------------------------------------------------------------------------------


def overfit_event(
    stage: str, evals: Sequence[Sequence[float]], patience: int
) -> MonitorEvent | None:
    """A warning when the held-out loss has risen `patience` evaluations in a row, ending now.

    `evals` holds [step, loss] pairs in order; fires once per rising streak (when it reaches
    `patience`), so a loss that keeps rising is not reported at every evaluation.
    """
    losses = [float(loss) for _, loss in evals]
    if patience < 1 or rising_streak(losses) != patience:
        return None
    (s0, l0), (s1, l1) = evals[-patience - 1], evals[-1]
    best_step, best = min(((s, v) for s, v in evals if _finite(v)), key=lambda x: x[1])
    message = (
        f"{stage}: held-out loss rose {patience} evaluations in a row ({l0:.4g} at step "
        f"{int(s0)} -> {l1:.4g} at step {int(s1)}; best {best:.4g} at step {int(best_step)}): "
        f"overfitting? {stage}.select=best exports the best checkpoint; "
        f"{stage}.overfit_patience sets when this warns"
    )
    return MonitorEvent(
        "overfit",
        "warn",
        int(s1),
        {f"{stage}/eval_loss": l1, "first_loss": l0, "best_loss": best, "best_step": best_step},
        message,
        f"{stage}.overfit_patience",
        float(patience),
        float(patience),
    )
