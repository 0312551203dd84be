"""Monitoring the RL stage: the rules checked on every RL step's metrics (rlhf/monitor.py runs
them), each with what a trip does and how long its condition must last.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from rlhf.config.base import Section

MonitorRuleName = Literal[
    "non_finite",
    "kl",
    "reward_zscore",
    "no_signal",
    "length",
    "diversity",
    "entropy",
    "logprob_gap",
    "reward_hacking",
]
MONITOR_RULES: tuple[str, ...] = get_args(MonitorRuleName)
MonitorAction = Literal["warn", "pause", "stop"]


class MonitorRule(Section):
    """What every monitor rule has: on/off, what a trip does, and how long the condition must last."""

    enabled: bool = Field(True, description="Check this rule after every RL step.")
    action: MonitorAction = Field(
        "pause", description="warn: log it; pause: checkpoint, paused.json, exit 3; stop: error."
    )
    patience: int = Field(1, ge=1, description="RL steps in a row the condition must hold.")


class NonFiniteRule(MonitorRule):
    action: MonitorAction = Field("stop", description="A NaN/inf metric: stop (exit 2).")


class KLRule(MonitorRule):
    max_per_sequence: float = Field(
        1.0, gt=0, description="Limit on kl/mean_per_sequence (nats per answer; demo 0.1-0.4)."
    )
    patience: int = Field(3, ge=1, description="Steps in a row (single-step k3 spikes happen).")


class RewardZScoreRule(MonitorRule):
    window: int = Field(30, ge=2, description="Previous steps the reward is compared against.")
    warmup: int = Field(20, ge=2, description="Steps of history needed before the rule checks.")
    max_abs_z: float = Field(
        6.0, gt=0, description="|reward/score_mean - window mean| / window std above this trips."
    )
    min_std: float = Field(
        0.01,
        gt=0,
        description="Floor on the window std (reward units), so a flat window "
        "does not turn noise into huge z-scores.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> RewardZScoreRule:
        if self.warmup > self.window:
            raise ValueError(f"warmup={self.warmup} must be <= window={self.window}")
        return self


class NoSignalRule(MonitorRule):
    max_flat_group_frac: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Limit on reward/flat_group_frac (share of prompt groups "
        "whose scores all agree: no advantage; the demo has about 0.75).",
    )
    zero_std: bool = Field(True, description="Also trip when every reward of the step is equal.")
    patience: int = Field(5, ge=1, description="RL steps in a row without signal.")


class LengthRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    baseline_steps: int = Field(
        5, ge=1, description="The first steps whose mean response/length_mean is the baseline."
    )
    max_ratio: float = Field(
        3.0, gt=1, description="Length / baseline above this, or below 1/this, trips."
    )
    max_clipped_frac: float = Field(
        0.5, gt=0, le=1, description="Limit on response/clipped_frac (answers cut at max length)."
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class DiversityRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    min_distinct_frac: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Floor on response/distinct_frac (distinct answers / all; "
        "1/samples_per_prompt when every prompt gets one repeated answer).",
    )
    min_distinct_ngram_frac: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Floor on response/distinct_ngram_frac (distinct 2-grams "
        "/ all 2-grams of the step's answers).",
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class EntropyRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    min_entropy: float = Field(
        0.005, ge=0, description="Floor on policy/entropy (nats per response token)."
    )
    patience: int = Field(3, ge=1, description="RL steps in a row.")


class LogprobGapRule(MonitorRule):
    action: MonitorAction = Field("warn", description="What a trip does.")
    max_gap: float = Field(
        0.02, gt=0, description="Limit on rollout/logprob_gap (rl.rollout.max_logprob_gap stops)."
    )


class RewardHackingRule(MonitorRule):
    window: int = Field(20, ge=3, description="Steps over which both trends are fitted.")
    min_gold_drop: float = Field(
        0.05, gt=0, description="reward/gold_mean must fall by more than this over the window..."
    )
    min_score_rise: float = Field(
        0.0, ge=0, description="...while reward/score_mean rises by more than this."
    )


class MonitorConfig(Section):
    """Rules checked on every RL step's metrics; each can warn, pause (exit 3) or stop (exit 2)."""

    enabled: bool = Field(True, description="Run the monitor at all.")
    acknowledge: list[MonitorRuleName] = Field(
        default_factory=list,
        description="Rules demoted to warn, e.g. [kl] to resume past a kl pause unchanged.",
    )
    non_finite: NonFiniteRule = Field(default_factory=NonFiniteRule)
    kl: KLRule = Field(default_factory=KLRule)
    reward_zscore: RewardZScoreRule = Field(default_factory=RewardZScoreRule)
    no_signal: NoSignalRule = Field(default_factory=NoSignalRule)
    length: LengthRule = Field(default_factory=LengthRule)
    diversity: DiversityRule = Field(default_factory=DiversityRule)
    entropy: EntropyRule = Field(default_factory=EntropyRule)
    logprob_gap: LogprobGapRule = Field(default_factory=LogprobGapRule)
    reward_hacking: RewardHackingRule = Field(default_factory=RewardHackingRule)

    def action_of(self, rule: str) -> str:
        """The rule's action after acknowledgement: an acknowledged rule only warns."""
        return "warn" if rule in self.acknowledge else getattr(self, rule).action
