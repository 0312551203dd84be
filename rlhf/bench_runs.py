"""Measurements of a whole run (used by `python -m rlhf.bench rl-step | memory`, rlhf/bench.py):
where an RL run's step time went, and the peak memory of any command's process tree.

    from rlhf.bench_runs import peak_memory, rl_step_report
    rl_step_report(Path("runs/tiny_cpu/rl/metrics.jsonl"))   # mean phase seconds per step
    peak_memory(["rlhf", "run", "configs/tiny_cpu.yaml"])      # peak PSS, Ray included
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

# ---- RL step breakdown ------------------------------------------------------------------------------


def rl_step_report(metrics_file: Path) -> dict:
    """Mean phase seconds of an RL run's steps and the share outside model compute."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    # The pipeline's file prefixes every key with the stage ("rl/timing/step").
    rows = [{k.removeprefix("rl/"): v for k, v in r.items()} for r in rows]
    steps = [r for r in rows if "timing/step" in r]
    if not steps:
        raise SystemExit(f"{metrics_file}: no RL step rows (no 'rl/timing/step' key)")
    steps = steps[1:] or steps  # the first step pays one-off warm-ups
    keys = sorted({k for r in steps for k in r if k.startswith(("timing/", "compute/", "perf/"))})
    return {
        "steps": len(steps),
        **{k: round(statistics.mean(r[k] for r in steps if k in r), 4) for k in keys},
    }


# ---- peak memory ------------------------------------------------------------------------------------


def peak_memory(cmd: list[str], interval: float = 0.5) -> dict:
    """Run `cmd`; sample the proportional set size (PSS: shared pages split between the processes
    that map them) of its whole process tree, Ray's GCS, raylet, workers and object store
    included, and the machine's used memory. Returns peaks in GiB and the exit code."""
    import psutil

    baseline = psutil.virtual_memory().total - psutil.virtual_memory().available
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak = {"tree_pss_gib": 0.0, "machine_used_delta_gib": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += p.memory_full_info().pss
            vm = psutil.virtual_memory()
            peak["tree_pss_gib"] = max(peak["tree_pss_gib"], total / 2**30)
            peak["machine_used_delta_gib"] = max(
                peak["machine_used_delta_gib"], (vm.total - vm.available - baseline) / 2**30
            )
            done.wait(interval)

    t0 = time.time()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    rc = proc.wait()
    done.set()
    watcher.join()
    return {
        "cmd": " ".join(cmd),
        "exit_code": rc,
        "wall_s": round(time.time() - t0, 1),
        **{k: round(v, 2) for k, v in peak.items()},
    }
