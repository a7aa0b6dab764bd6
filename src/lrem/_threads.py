"""How many CPU threads torch and FAISS use: by default, the cores that other jobs leave free.

torch and FAISS run their parallel loops on OpenMP threads, and each loop waits at its end for
the slowest thread (the work is split evenly). When other processes keep cores busy, a thread
that shares its core gets only part of it, so every loop runs at that thread's pace, and the
threads that finished first spin-wait on cores the others need. On this 2-core machine with the
load average near 3, two threads built the demo index 16x slower per batch than on a quiet
machine; see benchmarks/threads.py for the measured 1 vs 2 threads.
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """`OMP_NUM_THREADS` when it is set to a positive integer: the user's explicit choice."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def default_threads() -> int:
    """`OMP_NUM_THREADS` when set; else the cores not busy: cores minus the 1-minute load
    average, rounded, at least 1."""
    if (n := env_threads()) is not None:
        return n
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def set_threads(threads: int | None = None, log=None) -> int:
    """Use `threads` (None: `default_threads()`) in torch and FAISS; returns the number set."""
    import faiss
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}; need >= 1")
    n = threads or default_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    if log is not None:
        how = ("" if threads else " (OMP_NUM_THREADS)" if env_threads() else
               f" (load average {os.getloadavg()[0]:.1f} on {available_cores()} cores)")
        log(f"using {n} thread{'s' if n > 1 else ''}{how}")
    return n
