"""glibc malloc settings for the processes that run for days: the server and its worker.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB); from then on,
blocks of that size come from the heap instead of their own mapping, and the heap keeps the pages
when they are freed. The process's RSS then steps up once, some jobs into a run, and stays there
(`bench serve`, 2026-11-26: +3-5 MB in both processes between job 10 and job 20). A fixed threshold
keeps large buffers in their own mappings, which go back to the OS when freed, and two arenas bound
the per-thread heaps of the server's request threads.

    steady_malloc()  # once, at process start; False where the C library is not glibc
"""
from __future__ import annotations

import sys

M_MMAP_THRESHOLD = -3  # malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 10  # blocks from 256 KB up get their own mapping (glibc's default start: 128 KB)


def steady_malloc(mmap_threshold: int = MMAP_THRESHOLD, arenas: int = 2) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise) and cap its arenas; True when both took."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to set
        return False
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_ARENA_MAX, arenas) == 1
