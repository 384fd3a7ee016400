"""Talk sessions on the HTTP side: the one session slot, and the WebSocket that bridges a client to the worker.

    POST /v1/sessions                multipart image|avatar, prompt [, size, seed, idle] -> {"id", "stream"}
    GET  /v1/sessions/{id}           its state: waiting (for the worker) | open | ended, and why it ended
    WS   /v1/sessions/{id}/stream?token=T&rate=16000&format=f32

One session at a time per worker: a second POST while one is waiting or open gets 429 with
Retry-After. A created session takes the worker as soon as its running task ends (queued jobs wait
for the session); it must be connected to within `idle_s`, and it ends after `idle_s` without a
message from the client, when the client closes it or goes away, or when the worker dies. Each end
is one log line; the worker then takes jobs again.

The WebSocket (docs/serve.md, "Talk mode"):
  client -> server  binary: PCM, mono, little-endian float32 (format=f32) or int16 (format=s16) at
                    `rate` Hz, any length up to the message limit; text: {"type": "end"} (the
                    utterance is complete), {"type": "interrupt"} (barge-in), {"type": "close"}
  server -> client  text {"type": "waiting"} while the worker finishes a job; {"type": "ready"} when
                    speech may flow; {"type": "media", "mime", ...} then binary: the init segment;
                    per block binary (one mp4 fragment) then text {"type": "block", "latency_s", ...};
                    at the end text {"type": "ended", "reason"} or {"type": "error", "error": "one line"},
                    then the close (1000, or 1008 / 1003 / 1009 / 1011 / 1013 with an error).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ServeConfig
from .layout import StateDir
from .session_link import CONTROL, JSON, MEDIA, PCM, LinkError, pack, read_frame_async
from .tasks import SessionTask
from .uploads import ApiError

log = logging.getLogger(__name__)

IDLE_MODES = ("listen", "pause")
PCM_FORMATS = {"f32": 4, "s16": 2}
MIN_RATE, MAX_RATE = 8000, 48000
OUTCOMES = ("closed", "disconnected", "idle", "error", "worker_died", "expired", "cancelled")
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


@dataclass
class SessionSlot:
    """One session, from its POST to its end (fields change under the broker's lock)."""

    id: str
    image: Path
    prompt: str
    size: str
    seed: int
    idle: str
    socket: Path
    keep: Path | None
    created: float = field(default_factory=time.monotonic)
    state: str = "waiting"  # waiting (for the worker) | open (the worker listens) | ended
    submitted: bool = False
    connected: bool = False
    close_requested: bool = False
    reason: str | None = None
    opened: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    own_image: bool = True  # the photo is the session's copy (removed at its end), not an avatar's blob


class SessionBroker:
    """The single session slot, shared by the API (any thread) and the dispatcher thread."""

    def __init__(self, config: ServeConfig, layout: StateDir, wake: threading.Event,
                 on_end: Callable[[SessionSlot], None] = lambda slot: None) -> None:
        self.config, self.layout, self.wake, self.on_end = config, layout, wake, on_end
        self.root = layout.root / "sessions"
        self._lock = threading.Lock()
        self.current: SessionSlot | None = None
        self._socket_dir: Path | None = None

    def start(self) -> None:
        """At server start: whatever an earlier run left under state/sessions is gone (sessions do not survive)."""
        if self.root.exists() and not self.config.sessions.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """At server stop: the private socket dir (if one was made) goes."""
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def socket_path(self, session_id: str) -> Path:
        path = self.root / f"{session_id}.sock"
        if len(str(path.resolve())) <= MAX_SOCKET_PATH:
            return path
        if self._socket_dir is None:  # a deep state dir: the sockets live in a private temp dir (0700)
            self._socket_dir = Path(tempfile.mkdtemp(prefix="liveavatar-sessions-"))
        return self._socket_dir / f"{session_id[:16]}.sock"

    def check_free(self) -> None:
        """ApiError 429 while another session is waiting or open (one session at a time per worker)."""
        if self.current is not None and self.current.state != "ended":
            raise ApiError(429, "another talk session holds the worker (one at a time); try again when it ends",
                           {"Retry-After": str(max(1, round(self.config.sessions.idle_s / 4)))})

    def create(self, make: Callable[[str], SessionSlot]) -> SessionSlot:
        """A new session from `make(id)`, or ApiError 429 while another one is waiting or open."""
        with self._lock:
            self.check_free()
            slot = make(uuid.uuid4().hex)
            self.current = slot
        log.info("session %s created (waiting for the worker)", slot.id)
        self.wake.set()
        return slot

    def get(self, session_id: str) -> SessionSlot | None:
        slot = self.current
        return slot if slot is not None and slot.id == session_id else None

    # ---- the dispatcher's side --------------------------------------------------------------------

    def take(self) -> SessionTask | None:
        """The session waiting for the free worker (marked submitted), else None."""
        with self._lock:
            slot = self.current
            if slot is None or slot.state != "waiting" or slot.submitted or slot.close_requested:
                return None
            slot.submitted = True
        policy = self.config.sessions
        return SessionTask(id=slot.id, image=str(slot.image), prompt=slot.prompt, size=slot.size, seed=slot.seed,
                           idle=slot.idle, socket=str(slot.socket), keep=str(slot.keep) if slot.keep else None,
                           max_backlog_s=policy.max_backlog_s)

    def holds_worker(self) -> bool:
        """True while a session is waiting for the worker or holds it: no job may start."""
        slot = self.current
        return slot is not None and slot.state != "ended" and not slot.close_requested

    def opened(self, session_id: str) -> None:
        slot = self.get(session_id)
        if slot is not None and slot.state == "waiting":
            slot.state = "open"
            slot.opened.set()

    def to_cancel(self) -> str | None:
        """The id of a submitted session whose close was requested (the dispatcher cancels it in the worker)."""
        slot = self.current
        return slot.id if slot is not None and slot.submitted and slot.close_requested and slot.state != "ended" \
            else None

    def expire(self) -> None:
        """A session nobody connected to within idle_s ends."""
        slot = self.current
        if (slot is not None and slot.state != "ended" and not slot.connected and not slot.close_requested
                and time.monotonic() - slot.created > self.config.sessions.idle_s):
            self.close(slot.id, "expired", f"no client connected within {self.config.sessions.idle_s:g} s")

    def close(self, session_id: str, outcome: str, detail: str | None = None) -> None:
        """Ask the session to end (any thread); a session not yet in the worker ends now."""
        with self._lock:
            slot = self.get(session_id)
            if slot is None or slot.state == "ended" or slot.close_requested:
                return
            slot.close_requested = True
            slot.reason = outcome if detail is None else f"{outcome}: {detail}"
            submitted = slot.submitted
        if not submitted:
            self.ended(session_id, None)
        self.wake.set()

    def ended(self, session_id: str, worker_reason: str | None) -> None:
        """The session is over (its task ended in the worker, or it never got there): one log line."""
        with self._lock:
            slot = self.get(session_id)
            if slot is None or slot.state == "ended":
                return
            slot.state = "ended"
            if slot.reason is None or worker_reason and worker_reason.startswith("worker_died"):
                slot.reason = worker_reason or "closed"
        slot.opened.set()  # a WebSocket still waiting for the worker stops waiting
        slot.ended.set()
        if slot.own_image:
            slot.image.unlink(missing_ok=True)
        slot.socket.unlink(missing_ok=True)
        log.info("session %s ended: %s (%.1f s)", slot.id, slot.reason, time.monotonic() - slot.created)
        self.on_end(slot)

    def view(self, slot: SessionSlot) -> dict[str, Any]:
        return {"id": slot.id, "state": slot.state, "size": slot.size, "seed": slot.seed, "idle": slot.idle,
                "reason": slot.reason, "stream": f"/v1/sessions/{slot.id}/stream"}


# ---- the WebSocket bridge ---------------------------------------------------------------------------


class _Closing(Exception):
    """End the WebSocket: `message` goes to the client as one line (an error unless code is 1000)."""

    def __init__(self, code: int, outcome: str, message: str | None = None) -> None:
        super().__init__(message or outcome)
        self.code, self.outcome, self.message = code, outcome, message


def check_token(token: str | None, websocket: Any) -> bool:
    """A browser cannot set headers on a WebSocket: the token comes as ?token=, or as a bearer header."""
    if token is None:
        return True
    given = websocket.query_params.get("token")
    if given is None:
        scheme, _, rest = websocket.headers.get("authorization", "").partition(" ")
        given = rest.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode(), token.encode())


async def bridge(websocket: Any, broker: SessionBroker, session_id: str, token: str | None, metrics: Any) -> None:
    """Serve one WebSocket of `session_id` until the session ends; never raises."""
    from starlette.websockets import WebSocketDisconnect

    await websocket.accept()
    slot = None
    try:
        if not check_token(token, websocket):
            raise _Closing(1008, "error", "missing or wrong token (connect with ?token=TOKEN)")
        slot = broker.get(session_id)
        if slot is None or slot.state == "ended":
            slot = None
            raise _Closing(1008, "error", f"no open session {session_id[:40]!r} (create one: POST /v1/sessions)")
        if slot.connected:
            other, slot = slot, None
            raise _Closing(1008, "error", f"session {other.id} already has a client")
        slot.connected = True
        rate, fmt = _stream_format(websocket.query_params)
        await _run(websocket, broker, slot, rate, fmt, metrics)
        raise _Closing(1000, slot.reason or "closed")
    except _Closing as e:
        if slot is not None:
            broker.close(slot.id, e.outcome, e.message if e.code != 1000 else None)
        try:
            if e.code == 1000:
                await websocket.send_text(json.dumps({"type": "ended", "reason": e.outcome}))
            else:
                await websocket.send_text(json.dumps({"type": "error", "error": " ".join(str(e).split())}))
            await websocket.close(e.code)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
    except WebSocketDisconnect:
        if slot is not None:
            broker.close(slot.id, "disconnected")
    except Exception as e:  # noqa: BLE001 - our bug: the session ends, the server goes on
        log.exception("session %s: the WebSocket failed", session_id[:40])
        if slot is not None:
            broker.close(slot.id, "error", f"internal error: {type(e).__name__}")
        try:
            await websocket.send_text(json.dumps({"type": "error", "error": f"internal error: {type(e).__name__}"}))
            await websocket.close(1011)
        except Exception:  # noqa: BLE001
            pass


def _stream_format(query: Any) -> tuple[int, str]:
    fmt = query.get("format", "f32")
    if fmt not in PCM_FORMATS:
        raise _Closing(1003, "error", f"format must be f32 or s16 (little-endian PCM), got {fmt[:20]!r}")
    try:
        rate = int(query.get("rate", "16000"))
    except ValueError:
        raise _Closing(1003, "error", f"rate must be an integer in Hz, got {query.get('rate')[:20]!r}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise _Closing(1003, "error", f"rate must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}")
    return rate, fmt


async def _run(websocket: Any, broker: SessionBroker, slot: SessionSlot, rate: int, fmt: str, metrics: Any) -> None:
    """Wait for the worker, connect to its socket, and pump both ways until one side ends."""
    policy = broker.config.sessions
    if not slot.opened.is_set():
        await websocket.send_text(json.dumps({"type": "waiting"}))
        while not slot.opened.is_set():  # the worker finishes its running task first
            await asyncio.sleep(0.1)
    if slot.state == "ended":
        raise _Closing(1011 if (slot.reason or "").startswith("worker") else 1000, "closed",
                       f"the session ended before it started: {slot.reason}")
    try:
        reader, writer = await asyncio.open_unix_connection(str(slot.socket))
    except OSError as e:
        raise _Closing(1011, "worker_died", f"cannot reach the session's worker: {e.strerror or e}") from None
    sent_file = open(slot.keep / "sent.bin", "ab") if slot.keep is not None else None  # noqa: SIM115
    try:
        writer.write(pack(CONTROL, {"type": "start", "rate": rate, "format": fmt}))
        await writer.drain()
        inbound = asyncio.ensure_future(_client_to_worker(websocket, writer, policy, PCM_FORMATS[fmt]))
        outbound = asyncio.ensure_future(_worker_to_client(websocket, reader, policy, metrics, sent_file))
        done, pending = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
        if inbound in done and inbound.exception() is None and outbound not in done:
            # the client asked to close: the worker sends the stream's tail and "ended"
            try:
                await asyncio.wait_for(asyncio.shield(outbound), policy.send_timeout_s)
            except asyncio.TimeoutError:
                pass
        for task in (inbound, outbound):
            if not task.done():
                task.cancel()
        for task in (outbound, inbound):  # the worker's word first: it knows why the session ended
            try:
                error = task.exception() if task.done() and not task.cancelled() else None
            except asyncio.CancelledError:
                error = None
            if error is not None:
                raise error
    finally:
        writer.close()
        if sent_file is not None:
            sent_file.close()


async def _client_to_worker(websocket: Any, writer: Any, policy: Any, sample_bytes: int) -> None:
    """PCM and control from the client to the worker; returns when the client closes the session."""
    from starlette.websockets import WebSocketDisconnect

    while True:
        try:
            message = await asyncio.wait_for(websocket.receive(), policy.idle_s)
        except asyncio.TimeoutError:
            raise _Closing(1000, "idle", f"no message for {policy.idle_s:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            if len(data) > policy.max_message_bytes:
                raise _Closing(1009, "error", f"a PCM message of {len(data)} bytes is over the limit of "
                                              f"{policy.max_message_bytes} bytes; send shorter chunks")
            if len(data) % sample_bytes:
                raise _Closing(1003, "error", f"a PCM message of {len(data)} bytes is not whole {sample_bytes}-byte "
                                              "samples (mono, little-endian)")
            if sample_bytes == 4:
                samples = np.frombuffer(data, "<f4")
                if not np.isfinite(samples).all():
                    raise _Closing(1003, "error", "the PCM holds NaN or infinite samples")
                if samples.size and np.abs(samples).max() > 1.0:
                    raise _Closing(1003, "error", "float32 PCM must lie in [-1, 1] (scale or clip it)")
            writer.write(pack(PCM, data))
        elif text is not None:
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            kind = doc.get("type") if isinstance(doc, dict) else None
            if kind not in ("end", "interrupt", "close"):
                raise _Closing(1003, "error", 'a text message must be {"type": "end" | "interrupt" | "close"}, '
                                              f"got {text[:60]!r}")
            writer.write(pack(CONTROL, {"type": kind}))
            if kind == "close":
                await writer.drain()
                return
        await writer.drain()  # the worker reads as it feeds: a flood waits here, not in memory


async def _worker_to_client(websocket: Any, reader: Any, policy: Any, metrics: Any, sent_file: Any) -> None:
    """Media and metadata from the worker to the client, until the worker says the session ended."""
    pending_block: dict | None = None
    while True:
        try:
            frame = await read_frame_async(reader)
        except (LinkError, OSError) as e:
            raise _Closing(1011, "worker_died", f"the session's worker link failed: {e}") from None
        if frame is None:
            raise _Closing(1011, "worker_died", "the session's worker stopped (it is being restarted)")
        kind, payload = frame
        if kind == MEDIA:
            await _send(websocket.send_bytes(payload), policy)
            if sent_file is not None:
                sent_file.write(payload)
                sent_file.flush()
            if pending_block is not None:  # the block's metadata follows its fragment
                block, pending_block = pending_block, None
                sent_at = block.pop("sent_at", None)
                if block.get("latency_s") is not None and sent_at is not None:
                    block["latency_s"] = round(block["latency_s"] + (time.monotonic() - sent_at), 4)
                    metrics.session_block(block["latency_s"])
                await _send(websocket.send_text(json.dumps(block)), policy)
            continue
        doc = json.loads(payload)
        if doc.get("type") == "block":
            pending_block = doc
        elif doc.get("type") == "error":
            raise _Closing(1013 if "faster" in doc.get("error", "") else 1011, "error", doc["error"])
        elif doc.get("type") == "ended":
            raise _Closing(1000, doc.get("reason", "closed"))
        else:
            await _send(websocket.send_text(json.dumps(doc)), policy)


async def _send(call: Any, policy: Any) -> None:
    try:
        await asyncio.wait_for(call, policy.send_timeout_s)
    except asyncio.TimeoutError:
        raise _Closing(1008, "error", f"the client did not take the stream for {policy.send_timeout_s:g} s") from None


# ---- POST /v1/sessions --------------------------------------------------------------------------------

SESSION_FIELDS = {"image": "file", "avatar": "text", "prompt": "text", "size": "text", "seed": "text", "idle": "text"}


def create_session(service: Any, broker: SessionBroker, form: Any) -> SessionSlot:
    """Validate a session's photo (or avatar), prompt, size, seed and idle mode; take the slot (429 if held)."""
    from ..conditioning.photo import load_reference
    from .service import MAX_SEED, _int_field, _prompt, _user_errors

    service.check_accepting()
    config = service.config
    prompt = _prompt(form.text.get("prompt"), config.limits.max_prompt_chars)
    seed = _int_field(form.text, "seed", 42, 0, MAX_SEED)
    idle = (form.text.get("idle") or "listen").strip()
    if idle not in IDLE_MODES:
        raise ApiError(400, f"field 'idle' must be listen or pause, got {idle[:40]!r}")
    broker.check_free()  # before any decoding
    avatar = service._avatar_for(form)
    size = form.text.get("size") or (avatar.size if avatar else config.size)
    image = form.files.get("image") or service.blobs.path(avatar.image)
    _user_errors(lambda: load_reference(image, size), {image: "the uploaded image"})

    def make(session_id: str) -> SessionSlot:
        keep = broker.root / session_id if config.sessions.keep else None
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        if avatar is None:
            photo = broker.root / f"{session_id}.photo"
            shutil.move(str(form.files.pop("image")), photo)
        else:
            photo = service.blobs.path(avatar.image)
        return SessionSlot(id=session_id, image=photo, prompt=prompt, size=size, seed=seed, idle=idle,
                           socket=broker.socket_path(session_id), keep=keep, own_image=avatar is None)

    return broker.create(make)
