"""What passes between the ranks of a pipeline, over torch.distributed (gloo).

Three kinds of traffic, all host tensors:

* the set-up (`broadcast`): the coordinator's conditioning (umT5 states, wav2vec2 features,
  ref / motion latents, clip count) to every rank once, then where to start (clip, checkpoint
  files);
* the block hand-off (`BlockLink`): per block, a 4-int64 header (clip, block, checkpoint flag,
  dtype) and the latents [16, 3, h, w] as raw bytes (0.4 MB bf16 at 704*384), rank r to r+1;
* a final barrier, so that no rank tears the group down while another still needs it.

The group is gloo on GPUs too: the latents are stepped on the host (the generator's scheduler
runs where the flow comes back, render._OnDevice), so there is nothing for NCCL to carry, and
gloo lets two ranks share one GPU (NCCL refuses that). A peer that dies closes its sockets; the
next call on this side raises `PeerLostError` at once (no hang), which the launcher reports as
a consequence, not the cause.

    link = BlockLink(prev=0, next=2, shape=(16, 3, 48, 88))
    header, latents = link.recv(); link.send(BlockHeader(0, 1, False), latents)
"""
from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ...errors import first_line

T = TypeVar("T")


class PeerLostError(RuntimeError):
    """Another rank went away (crashed, killed, or failed first): this rank cannot go on."""


def _guarded(what: str, fn: Callable[[], T]) -> T:
    """Run one collective / point-to-point call; a failure there means a peer is gone."""
    try:
        return fn()
    except RuntimeError as e:  # gloo: "Connection closed by peer", timeouts (DistBackendError)
        raise PeerLostError(f"{what}: {first_line(e)}") from None


def init_group(rank: int, world_size: int, timeout_s: float) -> None:
    """Join the group (env:// rendezvous: MASTER_ADDR / MASTER_PORT, set by torchrun or our launcher).

    timeout_s bounds every wait on a peer that is alive but silent (a dead one is seen at once).
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, src: int) -> Any:
    """`obj` of rank `src` on every rank (pickled; host tensors only)."""
    import torch.distributed as dist

    box = [obj]
    _guarded(f"waiting for rank {src}", lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    _guarded("final barrier", dist.barrier)


@dataclass(frozen=True)
class BlockHeader:
    """Which block the latents belong to; `checkpoint`: the head rank decided that every rank
    checkpoints after this clip (set on the clip's last block only)."""

    clip: int
    block: int
    checkpoint: bool


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the header's dtype code indexes this


class BlockLink:
    """The point-to-point hand-off of one rank: receive from `prev`, send to `next` (None: none).
    Latents travel as raw bytes (bit-exact) in whatever compute dtype the sender has."""

    def __init__(self, prev: int | None, next: int | None, shape: tuple[int, ...]) -> None:
        self.prev, self.next, self.shape = prev, next, tuple(shape)

    def send(self, header: BlockHeader, latents: Tensor) -> None:
        import torch.distributed as dist

        assert self.next is not None
        if tuple(latents.shape) != self.shape or latents.dtype not in DTYPES:
            raise ValueError(f"block latents {list(latents.shape)} {latents.dtype}; the link carries "
                             f"{list(self.shape)} in one of {DTYPES}")
        code = DTYPES.index(latents.dtype)
        head = torch.tensor([header.clip, header.block, int(header.checkpoint), code], dtype=torch.int64)
        payload = latents.detach().cpu().contiguous().view(-1).view(torch.uint8)  # raw bytes: any dtype, bit-exact
        _guarded(f"sending to rank {self.next}", lambda: dist.send(head, self.next))
        _guarded(f"sending to rank {self.next}", lambda: dist.send(payload, self.next))

    def recv(self) -> tuple[BlockHeader, Tensor]:
        """The next block from `prev`: (header, latents [shape] in dtype, on the host)."""
        import torch.distributed as dist

        assert self.prev is not None
        head = torch.empty(4, dtype=torch.int64)
        _guarded(f"waiting for rank {self.prev}", lambda: dist.recv(head, self.prev))
        clip, block, flag, code = (int(x) for x in head)
        dtype = DTYPES[code]
        payload = torch.empty(math.prod(self.shape) * torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8)
        _guarded(f"waiting for rank {self.prev}", lambda: dist.recv(payload, self.prev))
        return BlockHeader(clip, block, bool(flag)), payload.view(dtype).view(self.shape)


# ------------------------------------------------------------------------------ the layer split's items

HEADER_INTS = 4  # (block, step, checkpoint flag, spare) as int64, ahead of the tensors' bytes


def _message_bytes(parts: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> int:
    return HEADER_INTS * 8 + sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in parts)


class ItemSender:
    """Messages of one fixed layout (a header of HEADER_INTS int64 + tensors of `parts`' shapes and
    dtypes, as raw bytes in ONE buffer) to rank `dst`, sent without blocking (isend): in a ring of
    ranks that all send at the same moment, nobody waits for a receiver that is itself sending.
    A buffer is kept until its send has completed; `flush()` waits for all of them."""

    def __init__(self, dst: int, parts: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> None:
        self.dst, self.parts = dst, parts
        self.nbytes = _message_bytes(parts)
        self._pending: list[tuple[Any, Tensor]] = []

    def send(self, header: tuple[int, ...], *tensors: Tensor) -> None:
        import torch.distributed as dist

        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        buf[: HEADER_INTS * 8].view(torch.int64).copy_(torch.tensor(list(header) + [0] * (HEADER_INTS - len(header))))
        off = HEADER_INTS * 8
        for t, (shape, dt) in zip(tensors, self.parts, strict=True):
            if tuple(t.shape) != shape or t.dtype != dt:
                raise ValueError(f"item tensor {list(t.shape)} {t.dtype}; the link carries {list(shape)} {dt}")
            raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)  # raw bytes: bit-exact
            buf[off: off + raw.numel()].copy_(raw)
            off += raw.numel()
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]
        work = _guarded(f"sending to rank {self.dst}", lambda: dist.isend(buf, self.dst))
        self._pending.append((work, buf))

    def flush(self) -> None:
        """Wait until every message sent has been received (before this rank leaves or blocks on another peer)."""
        for work, _ in self._pending:
            _guarded(f"sending to rank {self.dst}", work.wait)
        self._pending.clear()


class ItemReceiver:
    """The receiving end of an ItemSender: `count` messages from rank `src`. The receive of the next
    message is posted as soon as the current one is taken (irecv), so its transfer runs while this
    rank computes."""

    def __init__(self, src: int, parts: tuple[tuple[tuple[int, ...], torch.dtype], ...], count: int) -> None:
        self.src, self.parts, self.left = src, parts, count
        self.nbytes = _message_bytes(parts)
        self._posted: tuple[Any, Tensor] | None = None
        self._post()

    def _post(self) -> None:
        import torch.distributed as dist

        if self.left <= 0:
            return
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        work = _guarded(f"waiting for rank {self.src}", lambda: dist.irecv(buf, self.src))
        self._posted = (work, buf)

    def recv(self) -> tuple[tuple[int, ...], list[Tensor]]:
        """(header ints, tensors) of the next message (host tensors, views of a fresh buffer)."""
        if self._posted is None:
            raise RuntimeError(f"no more messages expected from rank {self.src}")
        work, buf = self._posted
        _guarded(f"waiting for rank {self.src}", work.wait)
        self._posted, self.left = None, self.left - 1
        self._post()  # the next message's transfer overlaps this one's compute
        header = tuple(int(v) for v in buf[: HEADER_INTS * 8].view(torch.int64))
        out, off = [], HEADER_INTS * 8
        for shape, dt in self.parts:
            n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            out.append(buf[off: off + n].view(dt).view(shape))
            off += n
        return header, out
