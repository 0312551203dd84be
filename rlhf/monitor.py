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

Offline stages use `overfit_event` on their held-out losses. Pure Python: no Ray, vLLM, DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import MONITOR_RULES, MonitorConfig

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


@dataclass
class Finding:
    """A rule's condition holds this step: what it saw and the threshold it crossed."""

    detail: str  # "kl/mean_per_sequence = 1.31 > 1.0"
    values: dict[str, float] = field(default_factory=dict)
    key: str = ""  # the config key of the threshold crossed
    threshold: float | None = None
    observed: float | None = None


# ---- pure helpers ----------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


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


def distinct_ngram_frac(token_lists: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a step's responses (1.0 when there are none).

    A response shorter than n counts as one n-gram of itself, so a batch of empty or one-token
    answers scores low, not undefined. Example: [1,2,3], [1,2,3] -> n-grams (1,2),(2,3),(1,2),(2,3)
    -> 2 distinct / 4 = 0.5.
    """
    seen, total = set(), 0
    for tokens in token_lists:
        tokens = tuple(tokens)
        grams = [tokens[i : i + n] for i in range(len(tokens) - n + 1)] or [tokens]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 1.0


def linear_change(values: Sequence[float]) -> float:
    """Least-squares slope times (len - 1): how much a noisy series moved from its first point to
    its last. Example: [0, 1, 2] -> slope 1 -> change 2."""
    n = len(values)
    if n < 2:
        return 0.0
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    sxy = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    return sxy / sxx * (n - 1)


def rising_streak(losses: Sequence[float]) -> int:
    """How many evaluations in a row, ending with the last, were higher than the one before."""
    streak = 0
    for prev, cur in zip(reversed(losses[:-1]), reversed(losses[1:])):
        if not cur > prev:
            break
        streak += 1
    return streak


# ---- the rules: (rule config, metrics, rule state) -> Finding | None --------------------------------


def _non_finite(rc: Any, m: dict, st: dict) -> Finding | None:
    bad = {k: v for k, v in sorted(m.items()) if not _finite(v)}
    if not bad:
        return None
    shown = ", ".join(f"{k} = {v}" for k, v in list(bad.items())[:4])
    return Finding(f"non-finite metrics: {shown}", bad, "monitor.non_finite.action")


def _kl(rc: Any, m: dict, st: dict) -> Finding | None:
    kl = m.get("kl/mean_per_sequence")
    if _finite(kl) and kl > rc.max_per_sequence:
        return Finding(
            f"kl/mean_per_sequence = {kl:.4g} > {rc.max_per_sequence:g} nats per answer",
            {"kl/mean_per_sequence": kl},
            "monitor.kl.max_per_sequence",
            rc.max_per_sequence,
            kl,
        )
    return None


def _reward_zscore(rc: Any, m: dict, st: dict) -> Finding | None:
    score = m.get("reward/score_mean")
    if not _finite(score):
        return None
    history = st.setdefault("history", [])
    found = None
    if len(history) >= rc.warmup:
        mean = sum(history) / len(history)
        std = math.sqrt(sum((x - mean) ** 2 for x in history) / (len(history) - 1))
        z = (score - mean) / max(std, rc.min_std)
        if abs(z) > rc.max_abs_z:
            kind = "collapse" if z < 0 else "spike"
            found = Finding(
                f"reward {kind}: reward/score_mean = {score:.4g} is {abs(z):.1f} std "
                f"{'below' if z < 0 else 'above'} the previous {len(history)} steps "
                f"({mean:.4g} +- {std:.2g}); |z| limit {rc.max_abs_z:g}",
                {"reward/score_mean": score, "window_mean": mean, "window_std": std, "z": z},
                "monitor.reward_zscore.max_abs_z",
                rc.max_abs_z,
                abs(z),
            )
    history.append(score)
    del history[: -rc.window]
    return found


def _no_signal(rc: Any, m: dict, st: dict) -> Finding | None:
    flat, std = m.get("reward/flat_group_frac"), m.get("reward/score_std")
    if _finite(flat) and flat > rc.max_flat_group_frac:
        return Finding(
            f"reward/flat_group_frac = {flat:.3g} > {rc.max_flat_group_frac:g} (prompt groups "
            "whose answers all score the same teach nothing)",
            {"reward/flat_group_frac": flat},
            "monitor.no_signal.max_flat_group_frac",
            rc.max_flat_group_frac,
            flat,
        )
    if rc.zero_std and _finite(std) and std == 0.0:
        return Finding(
            "every reward of the step is equal (reward/score_std = 0)",
            {"reward/score_std": std},
            "monitor.no_signal.zero_std",
        )
    return None


def _length(rc: Any, m: dict, st: dict) -> Finding | None:
    length, clipped = m.get("response/length_mean"), m.get("response/clipped_frac")
    if _finite(clipped) and clipped > rc.max_clipped_frac:
        return Finding(
            f"response/clipped_frac = {clipped:.3g} > {rc.max_clipped_frac:g} (answers cut at "
            "rl.rollout.max_new_tokens)",
            {"response/clipped_frac": clipped},
            "monitor.length.max_clipped_frac",
            rc.max_clipped_frac,
            clipped,
        )
    if not _finite(length):
        return None
    first = st.setdefault("baseline", [])
    if len(first) < rc.baseline_steps:
        first.append(length)
        return None
    base = sum(first) / len(first)
    ratio = length / base if base > 0 else 1.0
    if ratio > rc.max_ratio or ratio < 1 / rc.max_ratio:
        return Finding(
            f"response/length_mean = {length:.3g} is {ratio:.2f}x the mean of the first "
            f"{len(first)} steps ({base:.3g}); allowed ratio {1 / rc.max_ratio:.2f}-"
            f"{rc.max_ratio:g}",
            {"response/length_mean": length, "baseline": base, "ratio": ratio},
            "monitor.length.max_ratio",
            rc.max_ratio,
            max(ratio, 1 / ratio) if ratio > 0 else math.inf,
        )
    return None


def _below(m: dict, metric: str, floor: float, key: str, what: str) -> Finding | None:
    value = m.get(metric)
    if _finite(value) and value < floor:
        return Finding(
            f"{metric} = {value:.4g} < {floor:g} ({what})", {metric: value}, key, floor, value
        )
    return None


def _diversity(rc: Any, m: dict, st: dict) -> Finding | None:
    return _below(
        m,
        "response/distinct_frac",
        rc.min_distinct_frac,
        "monitor.diversity.min_distinct_frac",
        "distinct answers / all",
    ) or _below(
        m,
        "response/distinct_ngram_frac",
        rc.min_distinct_ngram_frac,
        "monitor.diversity.min_distinct_ngram_frac",
        "distinct 2-grams / all",
    )


def _entropy(rc: Any, m: dict, st: dict) -> Finding | None:
    return _below(
        m, "policy/entropy", rc.min_entropy, "monitor.entropy.min_entropy", "nats per token"
    )


def _logprob_gap(rc: Any, m: dict, st: dict) -> Finding | None:
    gap = m.get("rollout/logprob_gap")
    if _finite(gap) and gap > rc.max_gap:
        return Finding(
            f"rollout/logprob_gap = {gap:.4g} > {rc.max_gap:g} (the engines' logprobs drift "
            "from the trainer's)",
            {"rollout/logprob_gap": gap},
            "monitor.logprob_gap.max_gap",
            rc.max_gap,
            gap,
        )
    return None


def _reward_hacking(rc: Any, m: dict, st: dict) -> Finding | None:
    score, gold = m.get("reward/score_mean"), m.get("reward/gold_mean")
    if not (_finite(score) and _finite(gold)):
        return None
    pairs = st.setdefault("pairs", [])
    pairs.append([score, gold])
    del pairs[: -rc.window]
    if len(pairs) < rc.window:
        return None
    rise = linear_change([p[0] for p in pairs])
    drop = -linear_change([p[1] for p in pairs])
    if rise > rc.min_score_rise and drop > rc.min_gold_drop:
        return Finding(
            f"over the last {len(pairs)} steps reward/score_mean rose by {rise:.3g} while "
            f"reward/gold_mean fell by {drop:.3g} (> {rc.min_gold_drop:g}): the reward model "
            "is being gamed",
            {
                "reward/score_mean": score,
                "reward/gold_mean": gold,
                "score_change": rise,
                "gold_change": -drop,
            },
            "monitor.reward_hacking.min_gold_drop",
            rc.min_gold_drop,
            drop,
        )
    return None


RULES: dict[str, Callable[[Any, dict, dict], Finding | None]] = {
    "non_finite": _non_finite,
    "kl": _kl,
    "reward_zscore": _reward_zscore,
    "no_signal": _no_signal,
    "length": _length,
    "diversity": _diversity,
    "entropy": _entropy,
    "logprob_gap": _logprob_gap,
    "reward_hacking": _reward_hacking,
}
assert tuple(RULES) == MONITOR_RULES


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
