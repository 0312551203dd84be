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
import torch

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
from rlhf.process_tuning import _cpu_flags, model_width, tune_cpu_compute
flags = _cpu_flags()
mode, model = sys.argv[1], sys.argv[2]
if mode == "amx":  # a CPU with AMX: oneDNN would compute in bfloat16
    import rlhf.process_tuning as tuning
    tuning._cpu_flags = lambda: flags | {"amx_bf16"}
width = model_width(model)
switched = tune_cpu_compute(2, width) if mode != "off" else False
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
    "switched": switched, "width": width, "amx": any(f.startswith("amx") for f in flags),
    "precision": torch.get_float32_matmul_precision(), "threads": torch.get_num_threads(),
    "errors": [rel(y, x64 @ w64.T), rel(x.grad, g64 @ w64), rel(w.grad, g64.T @ x64)],
    "exact": bool((torch.full((4, 64), one) @ unit.T == one).all()),
}), flush=True)
"""


def _with_onednn_log(script: str, *args: str) -> tuple[dict, list[str]]:
    """A script's RESULT line, and the shapes of the matmuls oneDNN ran (its verbose log)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    result = json.loads(next(ln for ln in lines if ln.startswith("RESULT ")).split(" ", 1)[1])
    return result, [ln.split(",")[-2] for ln in lines if ",exec,cpu,matmul," in ln]


def _matmuls(mode: str, model: Path) -> tuple[dict, int]:
    """The MATMUL script's result, and how many of its three products (300 rows or columns, unlike
    the probe's) oneDNN ran."""
    result, shapes = _with_onednn_log(MATMUL, mode, str(model))
    return result, sum("300" in shape for shape in shapes)


@pytest.fixture(scope="module")
def widths(tmp_path_factory) -> dict[int, Path]:
    """Model folders (one layer) as wide as oneDNN's threshold and narrower."""
    from rlhf.models.factory import save_tiny_model
    from rlhf.process_tuning import ONEDNN_MIN_WIDTH

    root = tmp_path_factory.mktemp("widths")
    return {
        w: save_tiny_model(root / str(w), hidden_size=w, num_layers=1, num_heads=4, num_kv_heads=4)
        for w in (ONEDNN_MIN_WIDTH, ONEDNN_MIN_WIDTH // 2)
    }


def test_fp32_matmuls_move_to_onednn_only_where_they_pay_and_stay_exact_fp32(widths):
    wide, narrow = sorted(widths, reverse=True)
    on, on_runs = _matmuls("on", widths[wide])
    off, off_runs = _matmuls("off", widths[wide])
    small, small_runs = _matmuls("on", widths[narrow])
    amx, amx_runs = _matmuls("amx", widths[wide])
    assert (on["width"], small["width"]) == (wide, narrow) and on["threads"] == 2
    # Left alone, a model narrower than the threshold, a CPU with AMX: MKL, "highest".
    for result, runs in ((off, off_runs), (small, small_runs), (amx, amx_runs)):
        assert not result["switched"] and result["precision"] == "highest"
        assert runs == 0
    # Elsewhere every product of the forward and the backward runs in oneDNN, as exact as MKL's
    # (bfloat16 inputs would be ~1e-3 off). A CPU with AMX of its own keeps MKL.
    assert on["switched"] is not on["amx"]
    if on["switched"]:
        assert on["precision"] == "medium" and on_runs == 3
    for result in (on, off, small, amx):
        assert result["exact"] and max(result["errors"]) < 1e-5, result


def test_model_width_reads_the_config_and_is_0_without_one(tmp_path, widths):
    from rlhf.process_tuning import model_width

    assert {model_width(path) for path in widths.values()} == set(widths)
    assert model_width(tmp_path) == 0
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 768}}')
    assert model_width(tmp_path) == 768


ATTENTION = """
import json, sys, torch
from rlhf.models.factory import load_causal_lm
from rlhf.process_tuning import model_width, tune_cpu_compute
switched = tune_cpu_compute(2, model_width(sys.argv[1])) if sys.argv[2] == "tuned" else False
model = load_causal_lm(sys.argv[1])
ids = torch.randint(3, 259, (3, 37), generator=torch.Generator().manual_seed(0))
model(ids).logits.logsumexp(-1).sum().backward()
with torch.no_grad():
    logits = model(ids).logits
grads = {n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters()}
print("RESULT " + json.dumps({"switched": switched, "logits": logits[0, :5, :8].tolist(),
                              "grads": grads}), flush=True)
"""


def test_attention_stays_on_mkl_and_the_model_computes_as_at_full_precision(widths):
    """After the switch a model's linear layers run on oneDNN, its attention (torch's flash
    kernel, many small products oneDNN is slow at) on MKL, forward and backward; logits and
    gradients match the untouched process's."""
    model = widths[max(widths)]

    tuned, shapes = _with_onednn_log(ATTENTION, str(model), "tuned")
    plain, plain_shapes = _with_onednn_log(ATTENTION, str(model), "plain")
    assert not plain["switched"] and plain_shapes == []
    if tuned["switched"]:
        # 3 x 37 = 111 rows through the linear layers; attention's products are 37 queries or
        # keys long (per row and head): none of those may reach oneDNN.
        assert sum("111" in s for s in shapes) >= 3 * 7  # 7 linear layers, forward + backward
        assert [s for s in shapes if "37" in s and "111" not in s] == []
    torch.testing.assert_close(tuned["logits"], plain["logits"], rtol=1e-5, atol=1e-5)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(tuned["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
def test_one_query_attention_is_torchs_attention(kv_heads, mask_kind):
    """Decoding's attention as products and a softmax: torch's sdpa's output for one query per
    row, grouped key/value heads shared (not repeated), padding masked (a mask for every row, or
    for every row and head), in the (B, 1, H, D) layout Hugging Face's attention functions
    return."""
    from rlhf.process_tuning import one_query_attention

    g = torch.Generator().manual_seed(0)
    rows, heads, keys, dim = 5, 8, 13, 16
    q = torch.randn(rows, heads, 1, dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, keys, dim, generator=g) for _ in range(2))
    attend = torch.ones(rows, 1, 1, keys, dtype=torch.bool)
    attend[0, ..., :4] = False  # a left-padded row
    attend[1, ..., -3:] = False  # a static cache's unfilled tail
    per_head = attend.repeat(1, heads, 1, 1)
    per_head[2, 3, :, :2] = False  # one head of one row
    mask = {"none": None, "bool": attend, "per_head": per_head}.get(mask_kind)
    if mask_kind == "additive":
        mask = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    for scale in (None, 0.3):
        want = torch.nn.functional.scaled_dot_product_attention(
            q,
            k.repeat_interleave(heads // kv_heads, dim=1),
            v.repeat_interleave(heads // kv_heads, dim=1),
            attn_mask=mask,
            scale=scale,
        ).transpose(1, 2)
        got = one_query_attention(q, k, v, mask, scale)
        assert got.shape == (rows, 1, heads, dim)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


DECODE = """
import json, sys, torch
import rlhf.process_tuning as tuning
from rlhf.models.factory import load_causal_lm
calls = []
if sys.argv[2] != "plain":
    tuning.tune_cpu_compute(2, tuning.model_width(sys.argv[1]))
    inner = tuning.one_query_attention
    tuning.one_query_attention = lambda *a: calls.append(a[0].shape) or inner(*a)
model = load_causal_lm(sys.argv[1]).eval()
model = model.bfloat16() if sys.argv[2] == "bf16" else model
ids = torch.randint(3, 259, (3, 11), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[0, :4] = 0  # a left-padded prompt
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
print(json.dumps({"calls": [list(s) for s in calls], "tokens": out.sequences.tolist(),
                  "scores": [s[:, :16].tolist() for s in out.scores]}), flush=True)
"""


def test_decoding_runs_one_query_attention_and_samples_as_before(widths):
    """In a tuned process (a model wide enough for oneDNN, and one narrower) every decoding step
    after the prompt's runs `one_query_attention`, and greedy decoding picks the same tokens with
    the same scores as an untouched process. A bfloat16 model keeps torch's kernel."""
    assert _run(DECODE, str(widths[min(widths)]), "bf16")["calls"] == []
    for model in widths.values():
        tuned = _run(DECODE, str(model), "tuned")
        plain = _run(DECODE, str(model), "plain")
        assert plain["calls"] == []
        assert len(tuned["calls"]) == 5 and all(s[0] == 3 and s[2] == 1 for s in tuned["calls"])
        assert tuned["tokens"] == plain["tokens"]
        torch.testing.assert_close(tuned["scores"], plain["scores"], rtol=1e-5, atol=1e-5)
