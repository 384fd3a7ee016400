"""The worker side of a talk session: speech from the link into `Pipeline.session`, its blocks out as mp4 fragments.

The worker runs one `SessionTask` as it runs a render: nothing else starts until it returns. It
listens on the task's Unix socket, says `SessionOpened`, and waits (CONNECT_TIMEOUT_S at most) for
the HTTP process to connect (session_link.py has the frames). Then two threads:

- the link reader: PCM frames go to `session.feed` as they arrive, `end` / `interrupt` to the
  session, `close` or the link's end of file stop the session;
- this thread: each block the session yields is encoded (decode/fmp4.py: one fragment per block,
  the first preceded by the init segment) and written to the link with its metadata, among which
  its latency: the session's (last speech sample in -> block out) plus the encoding.

Memory stays bounded: a client that sends speech faster than the avatar renders it is stopped
once `max_backlog_s` of speech waits (the session's own queue never grows past that); a link the
HTTP side does not read blocks this thread's writes (the HTTP side drops a client that stops
reading, which closes the link).

    frames = run_session(pipeline, task, cancel, emit)   # the session's frame count, once it ended
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, first_line
from .session_link import CONTROL, JSON, MEDIA, PCM, LinkError, pack, read_frame
from .tasks import SessionOpened, SessionTask

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # the HTTP side connects within this of SessionOpened, or the session ends
POLL_S = 0.25  # how often a waiting loop looks at the cancel flag


class _Link:
    """The connected socket: framed writes from two threads, and whether it still works."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, kind: bytes, payload: bytes | dict[str, Any]) -> bool:
        if self.broken:
            return False
        try:
            with self._lock:
                self.conn.sendall(pack(kind, payload))
            return True
        except OSError:
            self.broken = True
            return False


class _Keep:
    """What `serve --keep-sessions` keeps of a session: its frames, speech and block boundaries, as rendered."""

    def __init__(self, root: str | None) -> None:
        self.root = Path(root) if root else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def block(self, frames: np.ndarray, audio: np.ndarray, meta: dict[str, Any]) -> None:
        if self.root is None:
            return
        with open(self.root / "frames.u8", "ab") as f:
            f.write(np.ascontiguousarray(frames, np.uint8).tobytes())
        with open(self.root / "audio.f32", "ab") as f:
            f.write(np.ascontiguousarray(audio, "<f4").tobytes())
        self.note({**meta, "shape": list(frames.shape), "samples": int(audio.size)})

    def note(self, meta: dict[str, Any]) -> None:
        if self.root is not None:
            with open(self.root / "blocks.jsonl", "a") as f:
                f.write(json.dumps(meta) + "\n")


def run_session(pipeline: Any, task: SessionTask, cancel: threading.Event, emit: Callable[[Any], None],
                connect_timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """Hold the session until the client closes it, the link ends, or `cancel`; its frame count."""
    path = Path(task.socket)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.settimeout(POLL_S)
        emit(SessionOpened(task.id))
        conn = _accept(listener, cancel, connect_timeout_s)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    if conn is None:
        log.info("session %s: the HTTP side did not connect; ended", task.id)
        return 0
    with conn:
        return _Session(pipeline, task, cancel, _Link(conn)).run()


def _accept(listener: socket.socket, cancel: threading.Event, timeout_s: float) -> socket.socket | None:
    deadline = time.monotonic() + timeout_s
    while not cancel.is_set() and time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        return conn
    return None


class _Session:
    def __init__(self, pipeline: Any, task: SessionTask, cancel: threading.Event, link: _Link) -> None:
        self.pipeline, self.task, self.cancel, self.link = pipeline, task, cancel, link
        self.stop = threading.Event()
        self.closed_by_client = False
        self.reason = "closed"
        self.error: str | None = None
        self.keep = _Keep(task.keep)
        self.fed_s = 0.0  # speech received (seconds)
        self.rendered_s = 0.0  # speech the avatar has said (seconds of speech blocks yielded)
        self._backlog_lock = threading.Lock()

    def run(self) -> int:
        from ..decode.fmp4 import FragmentMuxer, FragmentSpec

        start = read_frame(self.link.conn.makefile("rb", buffering=0))  # the start frame, before any PCM
        if start is None or start[0] != CONTROL:
            return 0
        head = json.loads(start[1])
        rate, fmt = int(head["rate"]), head["format"]
        try:
            session = self.pipeline.session(Path(self.task.image), self.task.prompt, size=self.task.size,
                                            seed=self.task.seed, idle=self.task.idle)
        except UserError as e:
            self.link.send(JSON, {"type": "error", "error": first_line(e)})
            raise
        self.link.send(JSON, {"type": "ready"})
        reader = threading.Thread(target=self._read, args=(session, rate, fmt), name="session-link", daemon=True)
        reader.start()
        muxer = None
        frames = blocks = 0
        try:
            while not (self.stop.is_set() or self.cancel.is_set() or self.link.broken):
                block = session.next_block(timeout=POLL_S)
                if block is None:
                    continue
                out_at = time.monotonic()
                if muxer is None:  # the size is the block's: the session framed the photo
                    n, h, w, _ = block.frames.shape
                    muxer = FragmentMuxer(FragmentSpec(width=w, height=h, fps=int(block.fps)))
                    self.link.send(JSON, {"type": "media", "mime": muxer.mime, "width": w, "height": h,
                                          "fps": int(block.fps)})
                    self.link.send(MEDIA, muxer.init_segment())
                audio = np.asarray(block.audio, np.float32).reshape(-1)
                fragment = muxer.block(block.frames, audio)
                if block.utterance is not None:
                    with self._backlog_lock:
                        self.rendered_s += len(block.frames) / float(block.fps)
                latency = None if block.latency_s is None else block.latency_s + (time.monotonic() - out_at)
                meta = {"type": "block", "index": blocks, "frames": int(len(block.frames)),
                        "first_frame": int(block.first_frame), "utterance": block.utterance,
                        "latency_s": None if latency is None else round(latency, 4),
                        "render_latency_s": None if block.latency_s is None else round(block.latency_s, 4),
                        "bytes": len(fragment),
                        "sent_at": time.monotonic()}
                self.keep.block(block.frames, audio, meta)
                self.link.send(JSON, meta)
                self.link.send(MEDIA, fragment)
                frames += len(block.frames)
                blocks += 1
        finally:
            session.close()
        if self.cancel.is_set():
            self.reason = "cancelled"
        if self.error is not None:
            self.link.send(JSON, {"type": "error", "error": self.error})
        elif self.closed_by_client:
            tail = muxer.flush() if muxer is not None else b""
            if tail:
                self.keep.note({"type": "flush", "bytes": len(tail)})
                self.link.send(MEDIA, tail)
        self.link.send(JSON, {"type": "ended", "reason": self.reason, "frames": frames, "blocks": blocks})
        try:
            self.link.conn.shutdown(socket.SHUT_RDWR)  # what was sent still goes; the reader sees its end
        except OSError:
            pass
        reader.join(timeout=5)
        return frames

    def _read(self, session: Any, rate: int, fmt: str) -> None:
        """The link reader: speech and control into the session until close or end of file."""
        dtype = "<f4" if fmt == "f32" else "<i2"
        f = self.link.conn.makefile("rb", buffering=0)
        try:
            while not self.stop.is_set():
                frame = read_frame(f)
                if frame is None:
                    self.reason = "disconnected"
                    break
                kind, payload = frame
                if kind == PCM:
                    samples = np.frombuffer(payload, dtype)
                    if samples.size == 0:
                        continue
                    with self._backlog_lock:
                        self.fed_s += samples.size / rate
                        backlog = self.fed_s - self.rendered_s
                    if backlog > self.task.max_backlog_s:
                        self.error = (f"the speech arrives faster than the avatar says it: {backlog:.0f} s wait "
                                      f"(at most {self.task.max_backlog_s:g} s); send it in real time")
                        self.reason = "backlog"
                        break
                    if self.stop.is_set():
                        break
                    session.feed(samples, rate)
                elif kind == CONTROL:
                    kind_ = json.loads(payload).get("type")
                    if kind_ == "end":
                        session.end()
                    elif kind_ == "interrupt":
                        session.interrupt()
                        with self._backlog_lock:  # the rest of the utterance is dropped: nothing waits
                            self.rendered_s = self.fed_s
                    elif kind_ == "close":
                        self.closed_by_client = True
                        self.reason = "closed"
                        break
        except UserError as e:  # the session refused the speech (its rate, its length): said to the client
            self.error, self.reason = first_line(e), "error"
        except (OSError, LinkError, ValueError) as e:
            self.reason = f"link error: {first_line(e)}"
        finally:
            self.stop.set()
