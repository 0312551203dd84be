"""The monitor's rules: pure functions from one step's metrics to a `Finding` or None.

    found = RULES["kl"](cfg.monitor.kl, {"kl/mean_per_sequence": 1.31}, {})
    # Finding("kl/mean_per_sequence = 1.31 > 1 nats per answer", ..., threshold=1.0, observed=1.31)

Each rule takes (its config section, the step's metrics as floats, its own state dict) and keeps
any running window in that dict, which the `Monitor` (rlhf/monitor.py) saves with the RL
checkpoint; patience, actions and events are the Monitor's. The numeric helpers live here too:
`distinct_ngram_frac` (an RL metric the diversity rule reads), `linear_change` (reward hacking),
`rising_streak` (the offline stages' `overfit_event`). Pure Python: no Ray, vLLM, DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf.config import MONITOR_RULES


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
