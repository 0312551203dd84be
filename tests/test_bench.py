"""The benchmark's measuring parts: peak memory of a process tree and the RL step report."""

import json
import sys

from rlhf.bench import peak_memory, rl_step_report


def test_peak_memory_sees_a_child_process_allocation():
    # The parent allocates nothing; its child holds 400 MiB for a second. The tree's peak must
    # include the child, and the exit code must come back.
    child = "import time; b = bytearray(400 * 2**20); time.sleep(1.5)"
    parent = (
        f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]) + 3)"
    )
    result = peak_memory([sys.executable, "-c", parent], interval=0.1)
    assert result["exit_code"] == 3
    assert 0.35 < result["tree_pss_gib"] < 1.5, result


def test_rl_step_report_averages_phases_and_skips_the_warm_up_step(tmp_path):
    rows = [
        {"step": 0, "rl/eval/exact_match": 0.5},
        {
            "step": 1,
            "rl/timing/step": 9.0,
            "rl/timing/generate": 8.0,
            "rl/perf/outside_compute_frac": 0.5,
        },
        {
            "step": 2,
            "rl/timing/step": 2.0,
            "rl/timing/generate": 1.0,
            "rl/perf/outside_compute_frac": 0.1,
        },
        {
            "step": 3,
            "rl/timing/step": 4.0,
            "rl/timing/generate": 2.0,
            "rl/perf/outside_compute_frac": 0.3,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = rl_step_report(path)
    assert report["steps"] == 2
    assert report["timing/step"] == 3.0
    assert report["timing/generate"] == 1.5
    assert report["perf/outside_compute_frac"] == 0.2
