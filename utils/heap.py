"""CPU sampling without page faults: glibc malloc keeps freed memory for the next allocation.

glibc gives every allocation above its mmap threshold (dynamic, at most 32 MB on 64-bit Linux) fresh pages from
``mmap`` and returns them on ``free``; each new page then faults in (and is zeroed by the kernel) on first touch.
A CPU sampling loop allocates the same big tensors every step (VAR-d6 batch 16: a 67 MB KV cache per layer,
134 MB of logits at the last scale), so one generate faulted in 0.8-1.7 GB of pages (``getrusage``;
benchmarks/RESULTS.md, "Sampling at the hardware limit"). ``keep_freed_memory()`` serves every allocation from
the heap (``M_MMAP_MAX = 0``) and keeps glibc from returning the heap's top to the system below 1 GiB
(``M_TRIM_THRESHOLD``): within a few batches the heap settles (``posix_memalign`` leaves small remainders
between the big blocks at first) and then the same pages are reused and none faults. The process's resident
memory stays at its peak instead of shrinking between batches, which is why only sampling entry points
(sample.py on CPU, the CPU benchmarks) turn it on; ``sample.py keep_freed_memory=false`` turns it off.
Where glibc is not the C library (macOS, musl) it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def _glibc():
    """The C library through ctypes where it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed heap memory (see the module docstring) -> True if set (or already set)."""
    global _applied
    libc = None if _applied else _glibc()
    if libc is not None:  # mallopt returns 1 on success
        _applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return _applied


def keeping_freed_memory() -> bool:
    """True once ``keep_freed_memory`` has set glibc's malloc: no allocation is served by mmap any more, so big
    temporaries no longer fault in fresh pages on every call (generators/layers.py then skips its workarounds)."""
    return _applied


def release_freed_memory() -> None:
    """Hand the freed heap memory back to the system now (glibc ``malloc_trim(0)``), e.g. before measuring a
    peak resident set: with ``keep_freed_memory`` the freed pages would otherwise count in every later peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
