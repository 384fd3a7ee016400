"""The live channel of a talk session between the HTTP process and the worker: framed messages on a Unix socket.

The worker listens on the session's socket (state/sessions/<id>.sock, mode 0600) and the HTTP
process connects once a client's WebSocket is there. Every message is one frame: a kind byte, a
big-endian u32 length, the payload.

    HTTP -> worker   b"c" JSON control: {"type": "start", "rate": 16000, "format": "f32"} first, then
                         {"type": "end"} | {"type": "interrupt"} | {"type": "close"}
                     b"p" PCM: little-endian float32 or int16 mono samples at the start's rate
    worker -> HTTP   b"j" JSON: {"type": "ready"}, {"type": "media", "mime", "width", "height", "fps"},
                         {"type": "block", ...}, {"type": "error", "error"}, {"type": "ended", "reason"}
                     b"m" media: the init segment (after "media"), one fragment per block (after its
                         "block"), the stream's tail (before "ended")

    sock.sendall(pack(CONTROL, {"type": "end"}))
    kind, payload = read_frame(sock.makefile("rb"))           # None at end of file
"""
from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

CONTROL, PCM, JSON, MEDIA = b"c", b"p", b"j", b"m"
KINDS = (CONTROL, PCM, JSON, MEDIA)
_HEADER = struct.Struct(">cI")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # far above any fragment or PCM message the limits allow


class LinkError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def pack(kind: bytes, payload: bytes | dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else bytes(payload)
    return _HEADER.pack(kind, len(data)) + data


def _check(kind: bytes, size: int) -> None:
    if kind not in KINDS or size > MAX_FRAME_BYTES:
        raise LinkError(f"bad frame on the session link: kind {kind!r}, {size} bytes")


def read_frame(f: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next (kind, payload) from a blocking file; None at a clean end of file."""
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    kind, size = _HEADER.unpack(header)
    _check(kind, size)
    payload = f.read(size)
    if len(payload) < size:
        return None
    return kind, payload


async def read_frame_async(reader: Any) -> tuple[bytes, bytes] | None:
    """`read_frame` for an asyncio StreamReader."""
    import asyncio

    try:
        header = await reader.readexactly(_HEADER.size)
        kind, size = _HEADER.unpack(header)
        _check(kind, size)
        return kind, await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
