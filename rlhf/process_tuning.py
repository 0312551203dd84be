"""Per-process settings of the processes that compute (RL role actors, rollout engines, Ray Train
workers) on machines where phases take turns on the same cores.

    from rlhf.process_tuning import tune_cpu_compute, idle_gloo_loops
    tune_cpu_compute(threads, model_width(model_path))  # once, early: threads, memory, matmuls
    idle_gloo_loops()          # after every torch.distributed group of one member is created

`retain_freed_memory`: glibc's malloc hands a freed block back to the kernel once the free top of
the heap exceeds a threshold that it adapts up to 64 MiB, and maps every block above 32 MiB
afresh. A role that computes once per step (the reference's forward, the policy's update) then
page-faults its activations in again every step: ~70,000 faults per reference forward at 25.6M
parameters. Fixed thresholds (blocks up to 32 MiB from the heap, trimming only above 2 GiB) keep
that memory for the next step; the process holds its peak working set, which the roles reach
every step anyway. A no-op off glibc.

`onednn_fp32_matmul`: torch's CPU wheel computes fp32 matmuls with MKL, which took a generic
code path on a 2-core AMD EPYC (Zen 5, 2026-12-03): ~190 GFLOPS, where oneDNN's AVX-512 kernels
(also in the wheel) reached ~400 on the same products (3208 x 512 by 512 x 1376, both threads).
torch sends fp32 matmuls to oneDNN when the fp32 matmul precision is "medium", which *allows*
oneDNN to compute in bfloat16: its AMX kernels do, the AVX-512 ones of that EPYC did not (the
probe below). So the switch is never made on a CPU with AMX, and is kept only if a probe computes
fp32 exactly (a product that bfloat16 would round, random products within fp32 rounding);
otherwise the precision is put back to "highest". Small products lose on oneDNN's fixed costs,
so only models at least `ONEDNN_MIN_WIDTH` wide switch: a 2-layer Llama's forward + backward
(64 rows of 17-23 tokens, 2026-12-03) took 28-29 vs 32-35 ms at hidden size 128 (MKL vs
oneDNN), 51-55 vs 48-51 at 192, 83-88 vs 69-76 at 256, 281-296 vs 216-226 at 512; the bench's
GRPO step at 0.41M parameters (hidden 128) 0.07-0.09 vs 0.13-0.14 s, at 25.6M (hidden 512, 48
tokens) 6.97 vs 4.74-5.00 s. Attention stays on MKL: torch's CPU flash attention runs many small
products, which oneDNN took 3.5x longer for (64 rows x 8 heads x 48 tokens, forward + backward:
20 vs 71 ms; one query over 65 keys: 0.34 vs 7.8 ms), so every Hugging Face "sdpa" attention of
the process runs at "highest" precision, its backward too (`_MKLAttention`).

`cpu_attention` (every process that computes with a model): decoding asks one query per row, and
torch's CPU flash kernel took twice as long for it as a product, a softmax and a product (64 rows x
8 heads x 64 dims over 88 cached keys: 2.0-2.4 vs 1.0-1.4 ms; 512 rows x 4 heads x 32 over 40:
2.5 vs 1.2 ms; one row: 0.025 vs 0.044 ms; outputs within 1e-6; 2026-12-04, AMD EPYC Zen 4).
The 25.6M model's 64 x 48-token sampling (the bench's GRPO job) took 2.48 s instead of 2.85 s
(medians of 10 alternating calls in one process).

`idle_gloo_loops`: every gloo process group runs a thread that wakes every 10 ms (its epoll
timeout) whether or not anything is sent; the rollout engine alone holds 13 (vLLM's world, tensor,
pipeline, data and expert groups, device and CPU side), and each wake-up preempts a thread of the
phase computing on the same cores. A group of one member never sends anything, so its loop threads
may run only when a core is otherwise idle (SCHED_IDLE). Call it only in a process whose groups
all have one member: a loop thread of a real group carries its messages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

GLOO_LOOP_THREAD = "gloo_tcp_loop"


def retain_freed_memory() -> bool:
    """Fixed malloc thresholds for this process (module docstring); False off glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


ONEDNN_MIN_WIDTH = 256


def tune_cpu_compute(threads: int, width: int | None) -> bool:
    """A CPU process that computes with a model `width` wide (`model_width`; None: one that
    samples with vLLM, whose CPU kernels are its own): `threads` torch threads, freed memory
    kept (`retain_freed_memory`), fp32 matmuls on oneDNN where that pays and is exact
    (`onednn_fp32_matmul`), Hugging Face's "sdpa" attention as `cpu_attention` computes it.
    Returns whether the matmuls were switched."""
    import torch

    torch.set_num_threads(threads)
    retain_freed_memory()
    if width is None:
        return False
    switched = onednn_fp32_matmul(width)
    cpu_attention()
    return switched


def model_width(model_path: str | Path) -> int:
    """The hidden size in a Hugging Face model folder's config.json; 0 when it says none."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    return int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0)


def onednn_fp32_matmul(width: int, cpu_flags: set[str] | None = None) -> bool:
    """Send this process's fp32 CPU matmuls to oneDNN for a model `width` wide, where that pays
    and oneDNN computes them in exact fp32 (module docstring); returns whether they were
    switched. `cpu_flags`: the CPU's feature flags (default: /proc/cpuinfo's). Attention is not
    moved back to MKL here: a process that computes calls `tune_cpu_compute`, which does."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    # With AMX oneDNN computes in bfloat16.
    if width >= ONEDNN_MIN_WIDTH and not any(f.startswith("amx") for f in flags):
        torch.set_float32_matmul_precision("medium")
        if _fp32_exact(torch):
            return True
    torch.set_float32_matmul_precision("highest")
    return False


@contextmanager
def _highest_precision() -> Iterator[None]:
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cpu_attention() -> None:
    """Hugging Face's "sdpa" attention for every model of this process (module docstring): at
    "highest" precision, forward and backward (`_MKLAttention` where the matmuls were switched);
    a single query per row without gradients (decoding) of an fp32 model through
    `one_query_attention` (torch's kernel keeps a lower-precision model's probabilities in fp32)."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            if torch.get_float32_matmul_precision() == "highest":
                return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            qkv = (query, key, value)
            return _mkl_attention().apply(module, attention_mask, kwargs, *qkv), None
        with _highest_precision():
            if query.shape[2] == 1 and query.dtype == torch.float32 and not _special(kwargs):
                scale = kwargs.get("scaling")
                return one_query_attention(query, key, value, attention_mask, scale), None
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa", attention)


def _special(kwargs: dict) -> bool:
    """Settings `one_query_attention` does not take: dropout, a position bias, a paged cache."""
    return bool(kwargs.get("dropout")) or any(
        kwargs.get(k) is not None for k in ("position_bias", "cache")
    )


def one_query_attention(query, key, value, mask=None, scale=None):
    """Attention of one query per row over its keys, as products, a softmax and a product:
    query (B, H, 1, D), key and value (B, KV, L, D) with H a multiple of KV (grouped queries
    share their key/value head, none repeated), `mask` None, boolean (True attends) or additive,
    broadcastable to (B, H, 1, L); `scale` defaults to D**-0.5. Returns (B, 1, H, D), the layout
    Hugging Face's attention functions return. torch's CPU flash kernel took twice as long for
    decoding's shapes (module docstring)."""
    import torch

    rows, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    q = query.reshape(rows, key.shape[1], groups, dim)  # head h = kv * groups + g
    scores = torch.matmul(q, key.transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
    if mask is not None:  # (B or 1, H or 1, 1, L) -> (B, KV, groups, L)
        mask = mask.expand(rows, heads, 1, mask.shape[-1]).reshape(scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (B, KV, groups, D)
    return out.reshape(rows, 1, heads, dim)


@cache
def _mkl_attention():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class _MKLAttention(torch.autograd.Function):
        """sdpa_attention_forward whose forward and backward both run at "highest" precision:
        the forward builds its graph on detached inputs, the backward differentiates it."""

        @staticmethod
        def forward(ctx, module, mask, kwargs, *qkv):
            with _highest_precision(), torch.enable_grad():
                leaves = [t.detach().requires_grad_(t.requires_grad) for t in qkv]
                out, _ = sdpa_attention_forward(module, *leaves, mask, **kwargs)
            ctx.graph = (leaves, out)
            return out.detach()

        @staticmethod
        def backward(ctx, grad):
            leaves, out = ctx.graph
            del ctx.graph
            wanted = [t for t in leaves if t.requires_grad]
            with _highest_precision():
                grads = iter(torch.autograd.grad(out, wanted, grad))
            return None, None, None, *(next(grads) if t.requires_grad else None for t in leaves)

    return _MKLAttention


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _fp32_exact(torch) -> bool:
    """Matmuls (linear, 2-D, batched) of several shapes as exact as fp32: 1 + 2**-12 survives
    (bfloat16 keeps 8 significant bits), random products within 1e-5 of float64's."""
    one = 1 + 2**-12
    g = torch.Generator().manual_seed(0)
    for rows in (1, 64, 1024):
        x = torch.full((rows, 64), one)
        w = torch.zeros(96, 64)
        w[:, 0] = 1.0
        if not bool((torch.nn.functional.linear(x, w)[:, 0] == one).all()):
            return False
        a, b = torch.randn(2, rows, 256, generator=g), torch.randn(2, 256, 128, generator=g)
        for got, want in (
            (a[0] @ b[0], a[0].double() @ b[0].double()),
            (a @ b, a.double() @ b.double()),
        ):
            if float((got.double() - want).abs().max() / want.abs().max()) > 1e-5:
                return False
    return True


def threads_named(name: str) -> list[int]:
    """Thread ids of this process whose name (/proc comm) is `name`; [] off Linux."""
    found = []
    for task in sorted(Path("/proc/self/task").glob("[0-9]*")):
        try:
            if (task / "comm").read_text().strip() == name:
                found.append(int(task.name))
        except OSError:  # the thread ended meanwhile
            continue
    return found


def idle_gloo_loops(settle_s: float = 0.05, timeout_s: float = 1.0) -> int:
    """Put this process's gloo loop threads under SCHED_IDLE; returns how many (0 off Linux).

    A loop thread names itself only once it runs, so a group created just now may not show yet:
    the scan repeats every `settle_s` until it finds the same threads twice (at most
    `timeout_s`)."""
    if not hasattr(os, "SCHED_IDLE"):
        return 0
    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        found = threads_named(GLOO_LOOP_THREAD)
        if (found and found == seen) or time.monotonic() > deadline:
            break
        seen = found
        time.sleep(settle_s)
    count = 0
    for tid in found:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            count += 1
        except OSError:  # the thread ended meanwhile
            continue
    return count
