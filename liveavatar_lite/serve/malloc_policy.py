"""glibc malloc settings for the processes that run for days: the server and its worker.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB); from then on,
blocks of that size come from the heap instead of their own mapping, and the heap keeps the pages
when they are freed. The process's RSS then steps up once, some jobs into a run, and stays there
(`bench serve`, 2026-11-26: +3-5 MB in both processes between job 10 and job 20). A fixed threshold
keeps large buffers in their own mappings, which go back to the OS when freed, and two arenas bound
the per-thread heaps of the server's request threads.

Blocks under the threshold still come from the heap, and the free ones between live blocks keep
their pages: 10-14 MB of the worker's heap was free at any time in a run of 50 jobs (2026-12-07,
mallinfo2), and how much of it was resident changed from job to job by a few MB, while the live
heap grew by 1.8 kB per job. `release_free_memory()` after each task gives those pages back, so
the worker's RSS between jobs is what it holds.

    steady_malloc()          # once, at process start; False where the C library is not glibc
    release_free_memory()    # after each task (serve/runner.py); False where nothing went back
"""
from __future__ import annotations

import ctypes
import functools
import sys

M_MMAP_THRESHOLD = -3  # malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 << 10  # blocks from 256 KB up get their own mapping (glibc's default start: 128 KB)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None (another OS, or musl and others: nothing to set)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist, or this is not glibc
    except (OSError, AttributeError):
        return None
    return libc


def steady_malloc(mmap_threshold: int = MMAP_THRESHOLD, arenas: int = 2) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise) and cap its arenas; True when both took."""
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Return the pages of the heap's free blocks to the OS (glibc's malloc_trim(0), a few ms);
    True when some went back. Live blocks are untouched: only RSS held by nothing goes."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
