"""rlhf/process_tuning.py: freed memory stays for the next step; a one-member gloo group's loop
threads run only on idle cores. Each case runs in a fresh interpreter (malloc's state and
torch.distributed are per process)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STEP_FAULTS = """
import json, resource, sys, torch
from rlhf.process_tuning import retain_freed_memory
tuned = retain_freed_memory() if sys.argv[1] == "tuned" else False
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8)
model = LlamaForCausalLM(config).eval()
tokens = torch.randint(0, 320, (64, 23))
faults = []
with torch.no_grad():  # a reference's forward, once per RL step
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(tokens).logits.log_softmax(-1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults[1:]}))
"""

GLOO_GROUP = """
import json, os, torch.distributed as dist
from rlhf.process_tuning import GLOO_LOOP_THREAD, idle_gloo_loops, threads_named
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
idled = idle_gloo_loops()  # waits for the loop threads to name themselves (late under load)
loops = threads_named(GLOO_LOOP_THREAD)
policies = {tid: os.sched_getscheduler(tid) for tid in loops}
dist.all_reduce(__import__("torch").ones(3))  # the group still works
print(json.dumps({"loops": len(loops), "idled": idled,
                  "all_idle": all(p == os.SCHED_IDLE for p in policies.values()),
                  "main": os.sched_getscheduler(0) == os.SCHED_OTHER}))
"""


def _run(script: str, *args: str, env: dict | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_step_reuses_the_memory_the_previous_step_freed():
    plain = _run(STEP_FAULTS, "plain")
    tuned = _run(STEP_FAULTS, "tuned")
    assert tuned["tuned"] is True
    # Forwards 2-8: glibc hands the activations back and faults them in again (~16,000 pages a
    # forward, measured) until its adaptive thresholds happen to settle; with the fixed ones they
    # stay mapped from the second forward's end on (a stray fault allowed).
    assert sum(plain["faults"]) > sum(tuned["faults"]), (plain, tuned)
    assert statistics.median(tuned["faults"][3:]) < 1_000, tuned


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE")
def test_a_group_of_one_member_idles_its_loop_threads_and_still_works():
    from actors.group import free_port

    out = _run(GLOO_GROUP, env={"PORT": str(free_port())})
    assert out["loops"] >= 1
    assert out["idled"] == out["loops"]
    assert out["all_idle"] and out["main"]


MATMUL = """
import json, sys, torch
from rlhf.process_tuning import _cpu_flags, onednn_fp32_matmul
flags = _cpu_flags()
mode = sys.argv[1]
switched = {"on": lambda: onednn_fp32_matmul(), "amx": lambda: onednn_fp32_matmul(flags | {"amx_bf16"}),
            "off": lambda: False}[mode]()
torch.manual_seed(0)
x64 = torch.randn(300, 512, dtype=torch.float64)
w64 = torch.randn(384, 512, dtype=torch.float64)
g64 = torch.randn(300, 384, dtype=torch.float64)
x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
y = torch.nn.functional.linear(x, w)   # forward and both backward products: three matmuls
y.backward(g64.float())
def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())
one = 1 + 2**-12                       # bfloat16 would round it to 1
unit = torch.zeros(8, 64); unit[:, 0] = 1
print("RESULT " + json.dumps({
    "switched": switched, "amx": any(f.startswith("amx") for f in flags),
    "precision": torch.get_float32_matmul_precision(),
    "errors": [rel(y, x64 @ w64.T), rel(x.grad, g64 @ w64), rel(w.grad, g64.T @ x64)],
    "exact": bool((torch.full((4, 64), one) @ unit.T == one).all()),
}), flush=True)
"""


def _matmuls(mode: str) -> tuple[dict, int]:
    """The MATMUL script's result, and how many of its three products (300 rows or columns, unlike
    the probe's) oneDNN ran (its verbose log)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MATMUL), mode],
        cwd=REPO,
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    result = json.loads(next(ln for ln in lines if ln.startswith("RESULT ")).split(" ", 1)[1])
    shapes = [ln.split(",")[-2] for ln in lines if ",exec,cpu,matmul," in ln]
    return result, sum("300" in shape for shape in shapes)


def test_fp32_matmuls_move_to_onednn_only_where_they_stay_exact_fp32():
    on, on_runs = _matmuls("on")
    off, off_runs = _matmuls("off")
    amx, amx_runs = _matmuls("amx")
    # Left alone (and where oneDNN would compute in bfloat16): MKL, "highest".
    for result, runs in ((off, off_runs), (amx, amx_runs)):
        assert not result["switched"] and result["precision"] == "highest"
        assert runs == 0
    # Elsewhere every product of the forward and the backward runs in oneDNN, as exact as MKL's
    # (bfloat16 inputs would be ~1e-3 off). A CPU with AMX of its own keeps MKL.
    assert on["switched"] is not on["amx"]
    if on["switched"]:
        assert on["precision"] == "medium" and on_runs == 3
    for result in (on, off, amx):
        assert result["exact"] and max(result["errors"]) < 1e-5, result
