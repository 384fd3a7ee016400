"""Receiving a multipart upload: only known fields, files spooled to state/tmp, every limit enforced.

`receive_form` turns the request's multipart body into a `ReceivedForm` (text fields + temp files)
or raises `ApiError` with a one-line reason. The temp files are the caller's to `cleanup()`
(the API does it in a `finally`), so a rejected request leaves nothing behind.

    form = await receive_form(request, JOB_FIELDS, tmp_dir, limits)
    try: ... form.files["image"] ... finally: form.cleanup()
"""
from __future__ import annotations

import asyncio
import codecs
import errno
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .config import Limits

JOB_FIELDS = {"image": "file", "audio": "file", "avatar": "text", "prompt": "text", "size": "text", "seed": "text",
              "num_clip": "text"}
AVATAR_FIELDS = {"image": "file", "size": "text", "prompt": "text"}
_CHUNK = 1 << 20
# Control characters in a text field (C0 but tab/newline/CR, DEL, C1): refused for every field of
# every endpoint, as a render refuses them in a prompt (conditioning/text_tokenizer.check_prompt).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


DRAIN_BYTES = 64 * 1024 * 1024  # what we read and drop after refusing a body, so the client sees the error
DRAIN_S = 5.0


async def drain(receive: Any, max_bytes: int = DRAIN_BYTES, timeout: float = DRAIN_S) -> None:
    """Read and drop what the client still sends of a body we refused (up to a budget and a time).

    A server that answers early and closes while the client still sends makes the kernel reset the
    connection, and the client then loses the answer ("connection reset") instead of reading our
    one-line error. Draining a bounded amount first ("lingering close") avoids that.
    """

    async def read() -> None:
        left = max_bytes
        while left > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        pass


class ApiError(Exception):
    """An HTTP error with one clear line for the client: {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class ReceivedForm:
    """The text fields and the uploaded files (temp paths) of one request."""

    text: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def cleanup(self) -> None:
        for path in self.files.values():
            path.unlink(missing_ok=True)


async def receive_form(request: Request, allowed: dict[str, str], tmp_dir: Path, limits: Limits) -> ReceivedForm:
    """Parse and spool the body within `limits.request_timeout_s`; ApiError for anything off."""
    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith("multipart/form-data"):
        raise ApiError(415, f"send the fields as multipart/form-data (got {kind[:60] or 'no content type'!r})")
    boundary = _boundary(kind)
    received = ReceivedForm()
    tail = _Tail(request.receive)
    request = Request(request.scope, tail)  # the same body, its last bytes kept to check the closing delimiter
    try:
        await asyncio.wait_for(_receive(request, allowed, tmp_dir, limits, received), limits.request_timeout_s)
        if not tail.ends_with(b"--" + boundary + b"--"):
            raise ApiError(400, "the multipart body ends without its closing boundary (truncated upload?)")
    except asyncio.TimeoutError:
        received.cleanup()
        await drain(request.receive)
        raise ApiError(408, f"the upload took longer than {limits.request_timeout_s:g} s") from None
    except BaseException:
        received.cleanup()
        raise
    return received


def _boundary(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header (400 without one)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1", "replace")
    raise ApiError(400, "the multipart/form-data content type has no boundary")


class _Tail:
    """An ASGI `receive` that passes messages through and keeps the last bytes of the body."""

    KEEP = 2048

    def __init__(self, receive: Any) -> None:
        self.receive, self.tail = receive, b""

    async def __call__(self) -> dict:
        message = await self.receive()
        if message["type"] == "http.request":
            self.tail = (self.tail + message.get("body", b""))[-self.KEEP:]
        return message

    def ends_with(self, delimiter: bytes) -> bool:
        """Whether the closing `delimiter` is among the body's last bytes (a short epilogue may follow it;
        the boundary never occurs inside a part, so a body cut short cannot hold it)."""
        return delimiter in self.tail


class _Utf8FieldsParser(MultiPartParser):
    """Starlette's multipart parser, refusing a text field whose bytes are not UTF-8 (Starlette reads
    such a field as Latin-1, silently: a garbled prompt). Each part's bytes pass through an
    incremental UTF-8 decoder as they arrive (nothing is kept; a file's first invalid byte ends its
    check); at a part's end, a text field that did not decode is refused. Only for a body in UTF-8,
    the default (a body that names another charset is decoded in it by Starlette)."""

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._utf8, self._utf8_ok = codecs.getincrementaldecoder("utf-8")(), True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        super().on_part_data(data, start, end)
        if self._utf8_ok:
            try:
                self._utf8.decode(data[start:end])
            except UnicodeDecodeError:
                self._utf8_ok = False

    def on_part_end(self) -> None:
        count = len(self.items)
        super().on_part_end()
        if self._utf8_ok:
            try:
                self._utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                self._utf8_ok = False
        if not self._utf8_ok and len(self.items) > count and isinstance(self.items[-1][1], str):
            raise MultiPartException(f"field {self.items[-1][0][:40]!r} is not UTF-8 text")


_OTHER_CHARSET = re.compile(r";\s*charset\s*=\s*\"?(?!utf-?8\b)", re.I)


async def _parse_form(request: Request, max_files: int, max_fields: int, max_part_size: int) -> Any:
    """The request's multipart fields (Starlette's FormData; the caller closes it); ApiError 400 when malformed."""
    cls = MultiPartParser if _OTHER_CHARSET.search(request.headers.get("content-type", "")) else _Utf8FieldsParser
    parser = cls(request.headers, request.stream(), max_files=max_files, max_fields=max_fields,
                 max_part_size=max_part_size)
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, str(e.message)) from None


async def _receive(request: Request, allowed: dict[str, str], tmp_dir: Path, limits: Limits,
                   received: ReceivedForm) -> None:
    files = sum(1 for k in allowed.values() if k == "file")
    form = await _parse_form(request, files, len(allowed), 4 * limits.max_prompt_chars + 1024)
    try:
        for name in form:
            if name not in allowed:
                raise ApiError(400, f"unknown field {name[:40]!r}; this endpoint takes {', '.join(sorted(allowed))}")
            values = form.getlist(name)
            if len(values) > 1:
                raise ApiError(400, f"field {name!r} is given {len(values)} times")
            value = values[0]
            if allowed[name] == "file":
                if not isinstance(value, UploadFile):
                    raise ApiError(400, f"field {name!r} must be a file upload")
                path = received.files[name] = tmp_dir / f"upload-{uuid.uuid4().hex}"  # registered first: cleaned up
                if await run_in_threadpool(_spool, value, path) == 0:
                    raise ApiError(400, f"the uploaded {name} is empty")
            else:
                if isinstance(value, UploadFile):
                    raise ApiError(400, f"field {name!r} must be text, not a file")
                bad = _CONTROL.search(value)
                if bad is not None:  # no field's value has any; whitespace rules (strip, int) would hide some
                    what = "a NUL character" if bad.group() == "\0" else f"a control character (U+{ord(bad.group()):04X})"
                    raise ApiError(400, f"field {name!r} contains {what} at character {bad.start()}")
                received.text[name] = value
    finally:
        await form.close()


def _spool(upload: UploadFile, path: Path) -> int:
    """Copy one uploaded file to `path`, a fresh temp name (the client's file name is never used); its size.

    A full state dir is a 507 with one line (the caller deletes the partial file), not a 500."""
    upload.file.seek(0)
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, _CHUNK)
            return out.tell()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, "the server's disk is full; try again later") from None
        raise
