"""Per-process settings of the processes that compute (RL role actors, rollout engines, Ray Train
workers) on machines where phases take turns on the same cores.

    from rlhf.process_tuning import retain_freed_memory, idle_gloo_loops
    retain_freed_memory()      # once, early: freed tensors' memory stays in the process
    idle_gloo_loops()          # after every torch.distributed group of one member is created

`retain_freed_memory`: glibc's malloc hands a freed block back to the kernel once the free top of
the heap exceeds a threshold that it adapts up to 64 MiB, and maps every block above 32 MiB
afresh. A role that computes once per step (the reference's forward, the policy's update) then
page-faults its activations in again every step: ~70,000 faults per reference forward at 25.6M
parameters. Fixed thresholds (blocks up to 32 MiB from the heap, trimming only above 2 GiB) keep
that memory for the next step; the process holds its peak working set, which the roles reach
every step anyway. A no-op off glibc.

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
