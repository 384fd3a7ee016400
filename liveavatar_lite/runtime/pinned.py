"""Host buffers of exact size, page-locked (pinned) for the GPU when one is used.

`torch.empty(n, pin_memory=True)` goes through torch's caching host allocator, which rounds every
request up to a power of two: a 351.8 MB unit takes 536.9 MB, +1.3 GB to +6.8 GB over a 14B plan's
host figure. Here the bytes come from torch's ordinary CPU allocator at their exact size and are
then page-locked in place with `cudaHostRegister` (unregistered when the buffer is freed). The copy
engine reads such memory directly, so `copy_(non_blocking=True)` from it is asynchronous, as from
torch's own pinned memory. Every live buffer is counted, so telemetry can report the host bytes the
runtime holds next to the plan's figure.

    buf = host_buffer(unit_nbytes, pin=True)   # uint8 [unit_nbytes], page-locked, exactly that size
    host_buffer_bytes()                        # bytes of all live host buffers (pinned or not)
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

_lock = threading.Lock()
_live = {"bytes": 0, "pinned": 0}


def host_buffer(nbytes: int, pin: bool, zero: bool = False) -> Tensor:
    """A uint8 CPU tensor of exactly `nbytes` bytes; page-locked for async H2D/D2H copies when `pin`.

    The buffer stays registered as long as this tensor object lives: keep it (views of it are only
    valid while it does).
    """
    buf = (torch.zeros if zero else torch.empty)(int(nbytes), dtype=torch.uint8)
    pinned = bool(pin and nbytes > 0)
    if pinned:
        _check(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0), "cudaHostRegister")
    with _lock:
        _live["bytes"] += buf.numel()
        _live["pinned"] += buf.numel() if pinned else 0
    # Unregister before the memory can go back to the allocator: the finalizer runs when this tensor
    # object is collected, before its storage is released.
    weakref.finalize(buf, _release, buf.data_ptr(), buf.numel(), pinned)
    return buf


def host_buffer_bytes() -> int:
    """Bytes of all live `host_buffer`s (what the plan's host figure counts besides the baseline)."""
    return _live["bytes"]


def pinned_bytes() -> int:
    """Bytes of live `host_buffer`s that are page-locked, plus what torch's own pinned allocator holds
    (`torch.cuda.host_memory_stats`, rounded-up blocks included)."""
    torch_pinned = 0
    if torch.cuda.is_available():
        stats = torch.cuda.host_memory_stats()
        torch_pinned = int(stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0)) or 0)
    return _live["pinned"] + torch_pinned


def _release(ptr: int, nbytes: int, pinned: bool) -> None:
    if pinned:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    with _lock:
        _live["bytes"] -= nbytes
        _live["pinned"] -= nbytes if pinned else 0


def _check(err: object, what: str) -> None:
    code = getattr(err, "value", err)
    if code not in (0, None):
        raise RuntimeError(f"{what} failed with CUDA error {code} (page-locking host memory)")
