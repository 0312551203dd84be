"""Per-process settings of the processes that compute (RL role actors, rollout engines, Ray Train
workers) on machines where phases take turns on the same cores.

    from rlhf.process_tuning import tune_cpu_compute, idle_gloo_loops
    tune_cpu_compute(threads)  # once, early: threads, freed memory kept, fp32 matmuls on oneDNN
    idle_gloo_loops()          # after every torch.distributed group of one member is created

`retain_freed_memory`: glibc's malloc hands a freed block back to the kernel once the free top of
the heap exceeds a threshold that it adapts up to 64 MiB, and maps every block above 32 MiB
afresh. A role that computes once per step (the reference's forward, the policy's update) then
page-faults its activations in again every step: ~70,000 faults per reference forward at 25.6M
parameters. Fixed thresholds (blocks up to 32 MiB from the heap, trimming only above 2 GiB) keep
that memory for the next step; the process holds its peak working set, which the roles reach
every step anyway. A no-op off glibc.

`onednn_fp32_matmul`: torch's CPU wheel computes fp32 matmuls with MKL, which takes a generic
code path on AMD CPUs: ~190 GFLOPS on the 2-core EPYC (Zen 5) of CI, where oneDNN's AVX-512
kernels (also in the wheel) reach ~400 on the same products (3208 x 512 by 512 x 1376, both
threads). torch sends fp32 matmuls to oneDNN when the fp32 matmul precision is "medium", which
*allows* oneDNN to compute in bfloat16; oneDNN does so only on CPUs with AMX and computes fp32
otherwise. So the switch is never made on a CPU with AMX, and is kept only if a probe computes
fp32 exactly (a product that bfloat16 would round, random products within fp32 rounding);
otherwise the precision is put back to "highest".

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
import os
import time
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


def tune_cpu_compute(threads: int, matmul: bool = True) -> bool:
    """A CPU process that computes: `threads` torch threads, freed memory kept
    (`retain_freed_memory`), fp32 matmuls on oneDNN where exact (`onednn_fp32_matmul`; not with
    `matmul=False`). Returns whether the matmuls were switched."""
    import torch

    torch.set_num_threads(threads)
    retain_freed_memory()
    return onednn_fp32_matmul() if matmul else False


def onednn_fp32_matmul(cpu_flags: set[str] | None = None) -> bool:
    """Send this process's fp32 CPU matmuls to oneDNN where it computes them in exact fp32
    (module docstring); returns whether they were switched. `cpu_flags`: the CPU's feature
    flags (default: /proc/cpuinfo's)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if not any(f.startswith("amx") for f in flags):  # with AMX oneDNN computes in bfloat16
        torch.set_float32_matmul_precision("medium")
        if _fp32_exact(torch):
            return True
    torch.set_float32_matmul_precision("highest")
    return False


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
