"""serve/malloc_policy.py: glibc's malloc settings for the long-running processes, shown on glibc itself.

Each case runs in a fresh interpreter, so its heap starts from a known state and this process's
heap is left alone.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from liveavatar_lite.serve.malloc_policy import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only (this C library is not glibc)")

PRELUDE = """
import ctypes, json
from liveavatar_lite.serve.malloc_policy import release_free_memory, steady_malloc
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
"""


def _run(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_steady_malloc_keeps_large_blocks_in_their_own_mappings_after_a_large_free():
    """glibc raises its mmap threshold when a mapped block is freed, so the next block of that size
    comes from the heap (and stays there when freed); after steady_malloc() it gets its own mapping."""
    body = """
steady = {steady}
if steady:
    assert steady_malloc()
p = libc.malloc(4 << 20); libc.free(p)      # a mapped 4 MB block, freed: glibc's dynamic raise
q = libc.malloc(1 << 20)                   # 1 MB: under the raised threshold, over ours
mapped = libc.mallinfo2().hblkhd >= (1 << 20)
libc.free(q)
print(json.dumps({{"mapped": mapped}}))
"""
    assert _run(body.format(steady=False)) == {"mapped": False}  # glibc alone: from the heap
    assert _run(body.format(steady=True)) == {"mapped": True}


def test_release_free_memory_returns_the_pages_of_free_blocks_between_live_ones():
    """40 MB of 100 kB blocks (heap, under the threshold), freed below a live block that pins the
    heap's top: glibc keeps their pages resident until release_free_memory()."""
    result = _run("""
steady_malloc()
blocks = [libc.malloc(100_000) for _ in range(401)]
for b in blocks:
    libc.memset(b, 1, 100_000)
top = max(blocks)                           # stays live, above the others: the heap cannot simply shrink
for b in blocks:
    if b != top:
        libc.free(b)
before = rss_anon()
released = release_free_memory()
after = rss_anon()
print(json.dumps({"released": released, "freed_mb": (before - after) / 1e6}))
""")
    assert result["released"] is True
    assert result["freed_mb"] > 30, result  # of the 40 MB freed


def test_release_free_memory_leaves_live_blocks_intact():
    result = _run("""
steady_malloc()
live = [libc.malloc(100_000) for _ in range(50)]
for i, b in enumerate(live):
    libc.memset(b, i + 1, 100_000)
gaps = [libc.malloc(100_000) for _ in range(50)]
for b in gaps:
    libc.free(b)
release_free_memory()
ok = all(ctypes.string_at(b, 100_000) == bytes([i + 1]) * 100_000 for i, b in enumerate(live))
print(json.dumps({"ok": ok}))
""")
    assert result == {"ok": True}
