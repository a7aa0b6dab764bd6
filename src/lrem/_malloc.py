"""Freed memory kept in the process for reuse (glibc's `mallopt`), for the CPU forwards.

Why: a forward allocates and frees tensors of a few MB in every layer (a batch of 64 items: 8.8 MB
for each MLP product's output). glibc serves blocks above its mmap threshold with fresh `mmap`s,
and gives the free top of its heap back to the OS past its trim threshold; both thresholds adapt
to the largest block freed so far (up to 32 MB), but a layer frees several blocks at once, so the
heap is trimmed and grown again layer after layer. Every new page then faults in, zeroed by the
kernel: ~1.5 us a 4 KiB page on this VM. Embedding 192 product titles at batch 64 took 309,000-
661,000 faults a run, 1.6 s of kernel time, and none with memory kept: 1.08-1.18x faster
(`benchmarks/malloc.py`). PyTorch's own CPU advice is another allocator (jemalloc, tcmalloc)
through LD_PRELOAD, which a Python package cannot set for its own process; the same two
thresholds, set once, do it here.

The cost: the heap no longer shrinks, so the process keeps its peak memory (as PyTorch's CUDA
caching allocator does on a GPU). `LREM_MALLOC=system` leaves glibc's defaults, as does any
malloc setting of the user's own (MALLOC_*_ variables, GLIBC_TUNABLES, an LD_PRELOADed allocator).
"""
from __future__ import annotations

import os
import platform

MMAP_THRESHOLD = 64 << 20  # blocks up to this come from the heap, where freed ones are reused
TRIM_THRESHOLD = 1 << 30  # the free top of the heap that may stay in the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_applied: bool | None = None  # None: not tried yet; then whether the thresholds are set


def users_own(env=os.environ) -> str | None:
    """The user's own malloc setting that lrem leaves alone, named; None where there is none.

    >>> users_own({"LREM_MALLOC": "system"}), users_own({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    ('LREM_MALLOC=system', 'LD_PRELOAD')
    >>> users_own({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}), users_own({})
    ('GLIBC_TUNABLES', None)
    """
    if env.get("LREM_MALLOC", "keep") == "system":
        return "LREM_MALLOC=system"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        if name in env:
            return name
    if "malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (`MMAP_THRESHOLD`, `TRIM_THRESHOLD`) once per process,
    unless the user chose (`users_own`) or the C library is not glibc. Returns whether they are set.
    `LREM.from_pretrained` calls it for a model on the CPU."""
    global _applied
    if _applied is None:
        value = os.environ.get("LREM_MALLOC", "keep")
        if value not in ("keep", "system"):
            raise ValueError(f"LREM_MALLOC={value!r}; expected 'keep' (the default) or 'system'")
        _applied = False
        if users_own() is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):  # no such library or symbol: glibc's defaults stay
                pass
    return _applied
