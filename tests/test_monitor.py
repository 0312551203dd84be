"""The monitor's rules, its state across a resume, acknowledgement, pausing and the exit codes."""

import json
import math
import pickle
import random

import pytest

from rlhf.config import ConfigError, MonitorConfig, load_config
from rlhf.monitor import (
    Monitor,
    MonitorEvent,
    MonitorStop,
    PausedRun,
    blocking,
    distinct_ngram_frac,
    linear_change,
    overfit_event,
    pause_message,
    rising_streak,
    write_pause,
)


def monitor(**sections) -> Monitor:
    return Monitor(MonitorConfig.model_validate(sections))


def demo_like(steps: int = 50, seed: int = 0, gold: bool = False) -> list[dict[str, float]]:
    """Metrics shaped like the demo's PPO stage (configs/tiny_cpu.yaml): KL per answer 0.1-0.4,
    reward 0.89 -> 0.94, 3-4 token answers out of 8, ~3 prompt groups in 4 flat, short answers
    repeated within a prompt (distinct answers ~0.15, distinct 2-grams ~0.05), and one k3 spike."""
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        t = i / max(1, steps - 1)
        m = {
            "kl/mean_per_sequence": 0.1 + 0.3 * t + rng.gauss(0, 0.03),
            "kl/mean_per_token": 0.03 + 0.08 * t,
            # step-to-step noise of a 64-prompt mean whose prompts differ in difficulty
            "reward/score_mean": min(1.0, 0.89 + 0.05 * t + rng.gauss(0, 0.035)),
            "reward/score_std": 0.3 + rng.gauss(0, 0.02),
            "reward/flat_group_frac": 0.75 + rng.gauss(0, 0.04),
            "response/length_mean": 3.4 + rng.gauss(0, 0.15),
            "response/length_max": 8.0,
            "response/clipped_frac": max(0.0, rng.gauss(0.01, 0.01)),
            "response/distinct_frac": 0.15 + rng.gauss(0, 0.02),
            "response/distinct_ngram_frac": 0.05 + rng.gauss(0, 0.005),
            "policy/entropy": 0.12 - 0.05 * t + rng.gauss(0, 0.01),
            "rollout/logprob_gap": abs(rng.gauss(0, 1e-4)),
            "filter/signal_frac": 0.3 + rng.gauss(0, 0.03),
            "timing/step": 4.8 + rng.gauss(0, 0.3),
        }
        if gold:  # a reward model whose score tracks the rule's: both rise together
            m["reward/gold_mean"] = m["reward/score_mean"] - 0.02 + rng.gauss(0, 0.01)
        out.append(m)
    if steps > 30:
        out[30]["kl/mean_per_sequence"] = 2.8  # a single-step k3 spike, as the README reports
    return out


def run(mon: Monitor, seq: list[dict[str, float]], start: int = 1) -> list[MonitorEvent]:
    events = []
    for i, metrics in enumerate(seq):
        events += mon.check(start + i, metrics)
    return events


def with_(base: dict[str, float], **changes: float) -> dict[str, float]:
    return {**base, **{k.replace("__", "/"): v for k, v in changes.items()}}


BASE = demo_like(1)[0]


# ---- the defaults stay quiet on the demo ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gold", [False, True])
def test_default_rules_never_trip_on_a_demo_like_run(seed, gold):
    assert run(Monitor(MonitorConfig()), demo_like(200 if gold else 50, seed, gold)) == []


def test_shipped_demo_config_keeps_every_rule_on_by_default():
    cfg = load_config("configs/tiny_cpu.yaml").monitor
    assert cfg.enabled and cfg.acknowledge == []
    assert all(getattr(cfg, rule).enabled for rule in ("kl", "reward_zscore", "no_signal"))


# ---- each rule trips on what it watches ---------------------------------------------------------


def test_non_finite_metric_stops_at_once():
    events = Monitor(MonitorConfig()).check(7, with_(BASE, policy__entropy=math.nan))
    assert [(e.rule, e.action, e.step) for e in events] == [("non_finite", "stop", 7)]
    assert "policy/entropy = nan" in events[0].message
    assert math.isnan(events[0].values["policy/entropy"])


def test_kl_above_limit_pauses_after_patience_steps_in_a_row():
    mon = Monitor(MonitorConfig())  # limit 1.0 nats per answer, patience 3
    high = with_(BASE, kl__mean_per_sequence=1.3)
    assert run(mon, [high, high]) == []
    assert run(mon, [BASE, high, high]) == []  # the streak restarted
    (event,) = mon.check(9, high)
    assert (event.rule, event.action, event.config_key) == (
        "kl",
        "pause",
        "monitor.kl.max_per_sequence",
    )
    assert event.values == {"kl/mean_per_sequence": 1.3} and event.threshold == 1.0
    assert "1.3 > 1" in event.message and "3 steps in a row" in event.message


def test_numpy_and_torch_scalars_are_read_as_numbers_and_other_values_ignored():
    import numpy as np
    import torch

    metrics = {**BASE, "policy/entropy": np.float32(0.1), "kl/coef": torch.tensor(0.05)}
    assert Monitor(MonitorConfig()).check(1, {**metrics, "note": "text"}) == []
    (event,) = Monitor(MonitorConfig()).check(1, {**metrics, "x": np.float32("nan")})
    assert event.rule == "non_finite" and event.values.keys() == {"x"}


def test_kl_limit_is_configurable():
    events = run(monitor(kl={"max_per_sequence": 0.05, "patience": 1}), [BASE])
    assert [e.rule for e in events] == ["kl"]


def test_reward_collapse_against_the_running_window_pauses():
    steady = demo_like(20)  # the warm-up: 20 steps of history
    events = run(Monitor(MonitorConfig()), [*steady, with_(BASE, reward__score_mean=0.4)])
    (event,) = events
    assert (event.rule, event.action, event.step) == ("reward_zscore", "pause", 21)
    assert "reward collapse" in event.message and event.values["z"] < -6
    # The window mean is the previous 20 steps' (the anomaly itself is not in it).
    mean = sum(m["reward/score_mean"] for m in steady) / 20
    assert event.values["window_mean"] == pytest.approx(mean)


def test_reward_spike_trips_too_and_warmup_steps_never_do():
    mon = Monitor(MonitorConfig())
    # A jump within the first 20 steps (the warm-up) is not judged.
    assert run(mon, [*demo_like(15), with_(BASE, reward__score_mean=0.1)]) == []
    mon = Monitor(MonitorConfig())
    (event,) = run(mon, [*demo_like(35), with_(BASE, reward__score_mean=1.5)])
    assert "reward spike" in event.message and event.values["z"] > 6


def test_no_learning_signal_pauses_after_patience_flat_steps():
    mon = Monitor(MonitorConfig())  # flat share above 0.95 for 5 steps
    flat = with_(BASE, reward__flat_group_frac=1.0)
    assert run(mon, [flat] * 4) == []
    (event,) = mon.check(5, flat)
    assert (event.rule, event.action) == ("no_signal", "pause")
    assert event.config_key == "monitor.no_signal.max_flat_group_frac"


def test_every_reward_equal_counts_as_no_signal():
    mon = monitor(no_signal={"patience": 2})
    same = {k: v for k, v in with_(BASE, reward__score_std=0.0).items() if "flat" not in k}
    events = run(mon, [same, same])
    assert [(e.rule, e.config_key) for e in events] == [("no_signal", "monitor.no_signal.zero_std")]
    assert run(monitor(no_signal={"patience": 1, "zero_std": False}), [same]) == []


def test_length_drift_against_the_first_steps_warns_both_ways():
    for drifted in (12.0, 1.0):  # 3.5x longer, 3.4x shorter than the 3.4-token baseline
        mon = Monitor(MonitorConfig())
        seq = [*demo_like(5), *[with_(BASE, response__length_mean=drifted)] * 3]
        (event,) = run(mon, seq)
        assert (event.rule, event.action, event.step) == ("length", "warn", 8)
        assert event.config_key == "monitor.length.max_ratio" and event.values["ratio"] > 0


def test_answers_cut_at_max_length_warn():
    (event,) = run(Monitor(MonitorConfig()), [with_(BASE, response__clipped_frac=0.8)] * 3)
    assert event.config_key == "monitor.length.max_clipped_frac" and event.observed == 0.8


@pytest.mark.parametrize(
    "metric,key",
    [
        ("response/distinct_frac", "monitor.diversity.min_distinct_frac"),
        ("response/distinct_ngram_frac", "monitor.diversity.min_distinct_ngram_frac"),
    ],
)
def test_diversity_collapse_warns(metric, key):
    (event,) = run(Monitor(MonitorConfig()), [{**BASE, metric: 0.001}] * 3)
    assert (event.rule, event.action, event.config_key) == ("diversity", "warn", key)


def test_entropy_collapse_warns():
    (event,) = run(Monitor(MonitorConfig()), [with_(BASE, policy__entropy=1e-4)] * 3)
    assert (event.rule, event.config_key) == ("entropy", "monitor.entropy.min_entropy")


def test_logprob_gap_above_limit_warns():
    (event,) = run(Monitor(MonitorConfig()), [with_(BASE, rollout__logprob_gap=0.03)])
    assert (event.rule, event.action) == ("logprob_gap", "warn")


def test_reward_hacking_score_rising_while_gold_falls_pauses():
    seq = [
        with_(BASE, reward__score_mean=0.1 * i, reward__gold_mean=0.8 - 0.01 * i) for i in range(20)
    ]
    events = run(Monitor(MonitorConfig()), seq)
    (event,) = [e for e in events if e.rule == "reward_hacking"]
    assert event.step == 20 and event.action == "pause"
    # Fitted changes over the 20 steps: +0.1 * 19 and -0.01 * 19.
    assert event.values["score_change"] == pytest.approx(1.9)
    assert event.values["gold_change"] == pytest.approx(-0.19)
    # Without a gold metric the rule has nothing to compare.
    no_gold = [{k: v for k, v in m.items() if k != "reward/gold_mean"} for m in seq]
    assert [e for e in run(Monitor(MonitorConfig()), no_gold) if e.rule == "reward_hacking"] == []


# ---- actions, acknowledgement, state ------------------------------------------------------------


def test_a_warning_fires_once_per_streak_and_a_pause_on_every_step():
    gap = with_(BASE, rollout__logprob_gap=0.03)
    mon = Monitor(MonitorConfig())
    assert len(run(mon, [gap, gap, gap])) == 1
    assert len(run(mon, [BASE, gap])) == 1  # a new streak warns again
    mon = monitor(kl={"patience": 1})
    high = with_(BASE, kl__mean_per_sequence=3.0)
    assert len(run(mon, [high, high, high])) == 3  # a resumed run that changed nothing re-pauses


def test_acknowledged_rules_only_warn():
    mon = monitor(acknowledge=["kl", "non_finite"], kl={"patience": 1})
    events = run(mon, [with_(BASE, kl__mean_per_sequence=3.0, policy__entropy=math.inf)])
    assert sorted((e.rule, e.action) for e in events) == [("kl", "warn"), ("non_finite", "warn")]
    assert blocking(events) is None


def test_acknowledging_an_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="monitor.acknowledge"):
        load_config("configs/tiny_cpu.yaml", ["monitor.acknowledge=[kll]"])
    with pytest.raises(ConfigError, match="warmup"):
        load_config("configs/tiny_cpu.yaml", ["monitor.reward_zscore.warmup=40"])


def test_disabled_rules_and_a_disabled_monitor_never_fire():
    nan = with_(BASE, policy__entropy=math.nan)
    assert run(monitor(non_finite={"enabled": False}), [nan]) == []
    assert run(monitor(enabled=False), [nan]) == []


def test_blocking_prefers_stop_over_pause_over_warn():
    warn, pause, stop = (MonitorEvent("r", a, 1, {}, "") for a in ("warn", "pause", "stop"))
    assert blocking([warn, pause, stop]) is stop
    assert blocking([warn, pause]) is pause
    assert blocking([warn]) is None


def test_state_round_trip_keeps_the_running_windows():
    seq = demo_like(30)
    collapse = with_(BASE, reward__score_mean=0.3, kl__mean_per_sequence=1.5)
    first = Monitor(MonitorConfig())
    run(first, seq[:22])
    run(first, [with_(BASE, kl__mean_per_sequence=1.5)] * 2)  # a KL streak of 2 so far
    saved = json.dumps(first.state_dict())  # what goes into the checkpoint
    resumed = Monitor(MonitorConfig())
    resumed.load_state_dict(json.loads(saved))
    a, b = first.check(25, collapse), resumed.check(25, collapse)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert sorted(e.rule for e in a) == ["kl", "reward_zscore"]  # the streak and window survived
    assert Monitor(MonitorConfig()).check(25, collapse) == []  # a fresh monitor sees neither


def test_loading_a_foreign_state_is_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        Monitor(MonitorConfig()).load_state_dict({"version": 99})


# ---- pausing -------------------------------------------------------------------------------------


def kl_pause_event() -> MonitorEvent:
    mon = monitor(kl={"patience": 1})
    (event,) = mon.check(12, with_(BASE, kl__mean_per_sequence=1.31))
    return event


def test_write_pause_records_rule_values_step_and_how_to_go_on(tmp_path):
    event = kl_pause_event()
    path = write_pause(tmp_path / "rl", event, 12)
    assert path == tmp_path / "rl" / "paused.json"
    record = json.loads(path.read_text())
    assert record["rule"] == "kl" and record["step"] == 12 and record["action"] == "pause"
    assert record["values"] == {"kl/mean_per_sequence": 1.31}
    assert record["config_key"] == "monitor.kl.max_per_sequence" and record["threshold"] == 1.0
    assert "monitor.kl.max_per_sequence above 1.31" in record["change"]
    assert record["acknowledge"] == "monitor.acknowledge=[kl]"
    assert "re-run the same command" in record["resume"]


def test_write_pause_stores_non_finite_values_as_strings(tmp_path):
    mon = monitor(non_finite={"action": "pause"})
    (event,) = mon.check(3, with_(BASE, policy__entropy=math.nan))
    record = json.loads(write_pause(tmp_path, event, 3).read_text())
    assert record["values"] == {"policy/entropy": "nan"}


def test_pause_paragraph_says_why_where_and_how_to_resume(tmp_path):
    event = kl_pause_event()
    text = pause_message(event, tmp_path / "paused.json")
    assert text.startswith("paused: step 12: monitor rule 'kl'")
    for part in (
        str(tmp_path / "paused.json"),
        "re-running the same command resumes",
        "monitor.kl.max_per_sequence",
        "monitor.acknowledge=[kl]",
    ):
        assert part in text
    paused = PausedRun(event, tmp_path / "paused.json")
    assert str(paused) == text
    again = pickle.loads(pickle.dumps(paused))  # survives a trip through Ray
    assert again.event == event and str(again) == text


def test_cli_exits_3_with_the_paragraph_on_a_pause_and_2_on_a_stop(capsys):
    from rlhf.cli import exit_status

    event = kl_pause_event()
    assert exit_status(PausedRun(event)) == 3
    assert capsys.readouterr().err.strip() == pause_message(event)
    stop = MonitorEvent("non_finite", "stop", 4, {"x": math.nan}, "step 4: bad")
    assert exit_status(MonitorStop(stop)) == 2
    assert capsys.readouterr().err.startswith("error: monitor stopped the run: step 4: bad")
    assert exit_status(RuntimeError("a bug")) is None  # not ours to hide: it raises


# ---- pure helpers --------------------------------------------------------------------------------


def test_distinct_ngram_frac_counts_distinct_bigrams_over_all_responses():
    # (1,2),(2,3) twice -> 2 distinct of 4
    assert distinct_ngram_frac([[1, 2, 3], [1, 2, 3]]) == 0.5
    # (1,2),(2,3),(3,4),(4,5) -> 4 of 4
    assert distinct_ngram_frac([[1, 2, 3], [3, 4, 5]]) == 1.0
    # A one-token answer is one n-gram of itself: [7], [7], [7] -> 1 distinct of 3
    assert distinct_ngram_frac([[7], [7], [7]]) == pytest.approx(1 / 3)
    assert distinct_ngram_frac([[1, 2, 3, 4]], n=3) == 1.0  # (1,2,3),(2,3,4)
    assert distinct_ngram_frac([]) == 1.0


def test_distinct_ngram_frac_matches_a_plain_count():
    rng = random.Random(0)
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(2, 6))] for _ in range(50)]
    grams = [tuple(s[i : i + 2]) for s in seqs for i in range(len(s) - 1)]
    assert distinct_ngram_frac(seqs) == len(set(grams)) / len(grams)


def test_linear_change_and_rising_streak():
    assert linear_change([0.0, 1.0, 2.0]) == pytest.approx(2.0)
    # x = 0..3 (mean 1.5), y mean 0.5: sxy = -0.75 + 0.25 + 0.25 - 0.75 = -1, sxx = 5,
    # slope -0.2, change over 3 steps -0.6
    assert linear_change([1.0, 0.0, 1.0, 0.0]) == pytest.approx(-0.6)
    assert rising_streak([3.0, 1.0, 2.0, 2.5, 2.9]) == 3
    assert rising_streak([1.0, 2.0, 2.0]) == 0  # equal is not rising


def test_overfit_warns_once_when_held_out_loss_rises_patience_times():
    evals = [[200, 2.0], [400, 1.68], [600, 1.9], [800, 2.4]]
    assert overfit_event("sft", evals, 3) is None
    event = overfit_event("sft", [*evals, [1000, 2.97]], 3)
    assert (event.rule, event.action, event.step) == ("overfit", "warn", 1000)
    assert event.values["best_loss"] == 1.68 and event.values["best_step"] == 400
    assert "sft.select=best" in event.message and event.config_key == "sft.overfit_patience"
    assert overfit_event("sft", [*evals, [1000, 2.97], [1200, 3.1]], 3) is None  # said once
    assert overfit_event("sft", [*evals, [1000, 2.97]], 0) is None  # 0 turns it off
