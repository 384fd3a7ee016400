"""Unit streamer: one contiguous host buffer per unit, two fixed device slots, a copy stream, events.

A *unit* is a flat uint8 buffer (a DiT block's weights as `format.read_unit` returns them, or one
layer of a KV cache). Consecutive prefetches alternate between the two slots, so unit i+1 is
copied on a dedicated copy stream while the compute stream works on unit i in the other slot.
Ordering uses two events per slot, never a device-wide sync:

  ready[s]  recorded on the copy stream after the H2D copy into slot s; the compute stream waits
            on it before reading the slot (`acquire`).
  free[s]   recorded on the compute stream after the last kernel that reads slot s (`release`);
            the copy stream waits on it before overwriting the slot (`prefetch`).

Nothing is copied back to the host, except the optional `release(..., writeback=...)` slices a KV
cache needs (the current block's new K/V), issued on the same copy stream after `free[s]`.
On CPU there are no streams: copies are plain memcpys and events are no-ops, so the same control
flow (and the same slot-reuse rules, which are asserted) runs in every test.

Weights and KV each have their own streamer and copy stream, so that a weight prefetch waiting for
its slot to be released (`free[s]`) never holds up a KV copy queued behind it, as it would on one
shared stream. Copies already handed to the copy engine run in the order they were queued, whatever
their stream: on an H100 (2026-11-26) a 16 MiB KV copy queued after a 1 GiB unit's 64 pieces landed
after the last piece. The runtime needs unit i+1 and layer i+1's KV at the same moment, so that
order costs nothing; a weight unit is still copied in pieces of `chunk_bytes` (copy timing per piece).

Timing (`timing=True`): copy time between events on the copy stream, and the time the compute
stream is blocked waiting for a copy (`wait_seconds`). On CPU the copy is done by the compute
thread itself, so its whole duration is wait; so is a wait for a disk read.

The loop a caller writes (prefetch i+1, compute i, release i):

    st = UnitStreamer([PinnedSource(b) for b in bufs], device)
    st.prefetch(0)
    for i in range(n):
        buf = st.acquire(i)                # compute stream waits for unit i's copy
        if i + 1 < n: st.prefetch(i + 1)   # overlaps with compute of i
        ...compute with views of buf...
        st.release(i)                      # slot may be overwritten once this compute is done
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .pinned import host_buffer


@dataclass(frozen=True)
class PinnedSource:
    """A unit already in host memory: ONE contiguous uint8 buffer (pinned when a GPU is used)."""

    buf: Tensor

    @property
    def nbytes(self) -> int:
        return self.buf.numel()


@dataclass(frozen=True)
class DiskSource:
    """A unit read from disk on demand into a pinned staging buffer (hosts with little RAM).

    read_into(out) fills `out` (uint8 [>= nbytes]) with the unit's bytes, e.g.
    `lambda out: format.read_unit(dir, name, out=out)`.
    """

    nbytes: int
    read_into: Callable[[Tensor], object]


@dataclass
class StreamStats:
    """What a run of the streamer cost: bytes moved, copy time, and how long compute waited."""

    copies: int = 0  # units copied
    pieces: int = 0  # copy calls issued (a unit larger than chunk_bytes takes several)
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    copy_seconds: float = 0.0  # on CUDA: measured between events on the copy stream
    wait_seconds: float = 0.0  # on CUDA: compute-stream time blocked in acquire(); on CPU: the copies
    _pending: list = field(default_factory=list, repr=False)

    def collect(self) -> None:
        """Fold finished CUDA event timings into the totals (needs the events complete)."""
        for kind, start, end in self._pending:
            end.synchronize()  # host waits for this one event only: timings are read after the fact
            secs = start.elapsed_time(end) / 1e3
            if kind == "copy":
                self.copy_seconds += secs
            else:
                self.wait_seconds += secs
        self._pending.clear()


def pack_tensors(tensors: dict[str, Tensor], pin: bool = False, align: int = 64) -> tuple[Tensor, dict[str, tuple]]:
    """Pack named tensors into ONE contiguous uint8 buffer (each at an `align`-byte offset).

        buf, layout = pack_tensors({"w": w, "b": b}); views = unpack_views(buf, layout)
    """
    layout, off = {}, 0
    for name, t in tensors.items():
        off += -off % align
        layout[name] = (off, t.dtype, tuple(t.shape))
        off += t.numel() * t.element_size()
    buf = torch.zeros(off + (-off % align), dtype=torch.uint8, pin_memory=pin)
    for name, t in tensors.items():
        o, dt, shape = layout[name]
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)  # [numel * itemsize]
        buf[o:o + raw.numel()].copy_(raw)
    return buf, layout


def unpack_views(buf: Tensor, layout: dict[str, tuple]) -> dict[str, Tensor]:
    """Typed zero-copy views of a packed buffer (on whichever device `buf` lives)."""
    out = {}
    for name, (o, dt, shape) in layout.items():
        n = dt.itemsize * math.prod(shape)
        out[name] = buf[o:o + n].view(dt).reshape(shape)  # uint8 [n] -> dt [shape]
    return out


class UnitStreamer:
    """Streams units into two fixed device slots; see the module docstring for the protocol."""

    def __init__(self, sources: Sequence[PinnedSource | DiskSource], device: torch.device | str,
                 copy_stream: object | None = None, timing: bool = False, chunk_bytes: int | None = None) -> None:
        self.sources = list(sources)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk_bytes = chunk_bytes  # None: one copy per unit
        slot_bytes = max((s.nbytes for s in self.sources), default=0)
        # Two slots, allocated once and never freed or resized (no allocator churn mid-run).
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._slot_unit: list[int | None] = [None, None]  # unit copied into each slot
        self._next_slot = 0
        self._held: list[bool] = [False, False]  # acquired and not yet released
        self.stats = StreamStats()
        self.timing = timing and self.cuda
        if self.cuda:
            self.copy_stream = copy_stream or torch.cuda.Stream(device=self.device)
            self._ready = [torch.cuda.Event() for _ in range(2)]
            self._free = [torch.cuda.Event() for _ in range(2)]
        # Disk sources: two pinned staging buffers and one reader thread, so reading unit i+1
        # from disk overlaps compute of unit i.
        disk = [s.nbytes for s in self.sources if isinstance(s, DiskSource)]
        self._staging = [host_buffer(max(disk), pin=self.cuda) for _ in range(2)] if disk else []  # exact size
        self._staged: list[object | None] = [None, None]  # event (or None) of the H2D that reads each staging buffer
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="unit-reader") if disk else None
        self._reads: dict[int, Future] = {}

    @property
    def slot_bytes(self) -> int:
        return self.slots[0].numel()

    @property
    def device_bytes(self) -> int:
        """Bytes of the two device slots."""
        return sum(t.numel() for t in self.slots)

    @property
    def staging_bytes(self) -> int:
        """Bytes of the host staging buffers of disk sources."""
        return sum(t.numel() for t in self._staging)

    def prefetch(self, i: int) -> None:
        """Start copying unit i into the slot not used last (returns at once on CUDA). A unit still
        sitting in a slot from its last use is not copied again."""
        if i in self._slot_unit:
            return
        s = self._next_slot
        if self._held[s]:
            raise RuntimeError(f"prefetch({i}) would overwrite slot {s} still held by unit {self._slot_unit[s]}")
        self._next_slot ^= 1  # ping-pong: consecutive prefetches alternate between the two slots
        self._slot_unit[s] = i
        src = self.sources[i]
        if isinstance(src, DiskSource):
            assert self._reader is not None
            self._reads[i] = self._reader.submit(self._read_and_copy, i, s, src)
        else:
            self._copy(i, s, src.buf)

    def invalidate(self) -> None:
        """Forget what the slots hold (the host copies changed, e.g. a KV cache was restored)."""
        if any(self._held):
            raise RuntimeError("invalidate() while a slot is held")
        self._slot_unit = [None, None]

    def _read_and_copy(self, i: int, s: int, src: DiskSource) -> None:
        stage = self._staging[s]
        if self._staged[s] is not None:
            # The H2D that last read this staging buffer must finish before the disk read overwrites
            # it: a host wait on that one event (not a device sync).
            self._staged[s].synchronize()
        src.read_into(stage)
        self._copy(i, s, stage[:src.nbytes], reader=True)
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            self._staged[s] = ev

    def _pieces(self, n: int) -> range:
        step = self.chunk_bytes or max(n, 1)
        return range(0, n, step)

    def _copy(self, i: int, s: int, host: Tensor, reader: bool = False) -> None:
        """Copy `host` into slot s (on CUDA: queue it on the copy stream). `reader`: called from the
        disk reader thread (on CPU, its time is then counted where acquire() waits for it)."""
        n = host.numel()
        self.stats.copies += 1
        self.stats.h2d_bytes += n
        step = self.chunk_bytes or max(n, 1)
        dst = self.slots[s][:n]
        if not self.cuda:
            t0 = time.perf_counter()
            for o in self._pieces(n):
                dst[o:o + step].copy_(host[o:o + step])
                self.stats.pieces += 1
            dt = time.perf_counter() - t0
            self.stats.copy_seconds += dt
            if not reader:
                self.stats.wait_seconds += dt  # the compute thread itself did the copy
            return
        with torch.cuda.stream(self.copy_stream):
            # Sync point: the copy stream waits until compute has released slot s (its previous
            # unit's last kernel is done); without it the copy could overwrite weights in use.
            self.copy_stream.wait_event(self._free[s])
            start = _timing_event(self.timing, self.copy_stream)
            for o in self._pieces(n):  # separate copy calls: another stream's copy may run in between
                dst[o:o + step].copy_(host[o:o + step], non_blocking=True)
                self.stats.pieces += 1
            if start is not None:
                self.stats._pending.append(("copy", start, _timing_event(True, self.copy_stream)))
            # Sync point: marks slot s complete; acquire() makes compute wait on exactly this.
            self._ready[s].record(self.copy_stream)

    def acquire(self, i: int) -> Tensor:
        """Slot buffer holding unit i, ready for kernels queued after this call on the current stream.
        A unit nobody prefetched is fetched now (a cold start: compute waits for the whole copy)."""
        if i not in self._slot_unit:
            self.prefetch(i)
        s = self._slot_unit.index(i)
        read = self._reads.pop(i, None)
        if read is not None:
            t0 = time.perf_counter()
            read.result()  # the disk read (and its H2D issue) happened on the reader thread
            self.stats.wait_seconds += time.perf_counter() - t0  # compute could not go on meanwhile
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            start = _timing_event(self.timing, compute)
            # Sync point: compute waits for unit i's copy, and for nothing else.
            compute.wait_event(self._ready[s])
            if start is not None:
                self.stats._pending.append(("wait", start, _timing_event(True, compute)))
        self._held[s] = True
        return self.slots[s][:self.sources[i].nbytes]

    def release(self, i: int, writeback: Sequence[tuple[Tensor, Tensor]] = ()) -> None:
        """Compute is done queuing work on unit i's slot. `writeback`: (device view, host view) pairs
        copied device -> host first (a KV cache's new rows); weights pass none."""
        s = self._slot_unit.index(i) if i in self._slot_unit else None
        if s is None or not self._held[s]:
            raise RuntimeError(f"release({i}) of a slot it does not hold")
        if self.cuda:
            # Sync point: everything queued so far on the compute stream may read slot s; the next
            # copy into the slot (and the write-back below) wait for this event.
            self._free[s].record(torch.cuda.current_stream(self.device))
            if writeback:
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(self._free[s])
                    for dev, host in writeback:
                        host.copy_(dev, non_blocking=True)
                        self.stats.d2h_bytes += dev.numel() * dev.element_size()
        else:
            for dev, host in writeback:
                host.copy_(dev)
                self.stats.d2h_bytes += dev.numel() * dev.element_size()
        self._held[s] = False

    def wait_copies(self) -> None:
        """Host waits until every copy issued so far (H2D and write-backs) has finished, e.g. before
        reading host KV buffers for a snapshot. One event on the copy stream, not a device sync."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
            ev.synchronize()
        for f in list(self._reads.values()):
            f.result()

    def close(self) -> None:
        """Stop the disk reader thread (slots stay allocated until the streamer is dropped)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None


def _timing_event(enabled: bool, stream) -> object | None:
    if not enabled:
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev
