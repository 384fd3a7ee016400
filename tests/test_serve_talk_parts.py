"""Talk mode's parts without a server: the fragmented-mp4 muxer, and the worker's session loop over its
Unix socket against a small stand-in with `Pipeline.session`'s interface (the real one runs in
tests/test_serve_talk.py).

- decode/fmp4.py: init + one fragment per block decodes (FFmpeg's demuxer) to every frame, each
  fragment's video starts with a keyframe, the speech comes out aligned, the bytes are a function
  of the blocks (a fresh muxer gives the same bytes), bad frames are refused;
- serve/session_worker.py: PCM and control frames reach the session (feed / end / interrupt), its
  blocks come back as "block" metadata + fragments after the init segment, close ends it with the
  stream's tail and "ended", a client far ahead of the renderer gets one error line.
"""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from liveavatar_lite.decode.fmp4 import AUDIO_RATE, FragmentMuxer, FragmentSpec  # noqa: E402
from liveavatar_lite.serve.session_link import CONTROL, JSON, MEDIA, PCM, pack, read_frame  # noqa: E402
from liveavatar_lite.serve.tasks import SessionOpened, SessionTask  # noqa: E402

H, W, FPS = 64, 48, 25
BLOCKS = (9, 12, 12, 12)  # a video's first block has 9 frames, the others 12


def _blocks(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Smooth frames (a moving gradient: h264 keeps them close) and a 220 Hz tone, block by block."""
    out, first = [], 0
    y, x = np.mgrid[0:H, 0:W]
    for n in BLOCKS:
        t = np.arange(first, first + n)[:, None, None]
        frames = np.stack([(x * 4 + t * 3 + seed) % 256, (y * 3 + t * 5) % 256, np.broadcast_to(128 + t, (n, H, W))],
                          axis=-1).astype(np.uint8)
        s = np.arange(first * AUDIO_RATE // FPS, (first + n) * AUDIO_RATE // FPS)
        out.append((frames, (0.3 * np.sin(2 * np.pi * 220 * s / AUDIO_RATE)).astype(np.float32)))
        first += n
    return out


def _stream(blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[str, list[bytes]]:
    mux = FragmentMuxer(FragmentSpec(width=W, height=H, fps=FPS))
    parts = [mux.init_segment()] + [mux.block(f, a) for f, a in blocks] + [mux.flush()]
    return mux.mime, parts


def _decode(data: bytes) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    with av.open(io.BytesIO(data)) as c:
        video = [(f.to_ndarray(format="rgb24"), f.key_frame) for f in c.decode(video=0)]
    with av.open(io.BytesIO(data)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return np.stack([v for v, _ in video]), audio, [k for _, k in video]


def test_fragmented_mp4_decodes_block_by_block_and_repeats() -> None:
    blocks = _blocks()
    mime, parts = _stream(blocks)
    assert mime.startswith('video/mp4; codecs="avc1.') and mime.endswith(', mp4a.40.2"')
    assert parts[0][4:8] == b"ftyp" and all(p[4:8] == b"moof" for p in parts[1:] if p)
    frames, audio, keys = _decode(b"".join(parts))
    sent = np.concatenate([f for f, _ in blocks])
    assert frames.shape == sent.shape
    # every block starts with a keyframe (a fragment plays on its own), and only there
    starts = np.cumsum((0,) + BLOCKS[:-1])
    assert [i for i, k in enumerate(keys) if k] == list(starts)
    # h264 at crf 23 (4:2:0) on gradients: a few levels of error; the neighbour frame is further off
    error = np.abs(frames.astype(int) - sent).mean()
    assert error < 8.0 and np.abs(frames[1:].astype(int) - sent[:-1]).mean() > error, error
    # the speech: aligned with the video (the aac priming is dropped), all of it (the tail is flushed)
    tone = np.concatenate([a for _, a in blocks])
    assert len(tone) <= len(audio) < len(tone) + 1024
    lag = int(np.argmax(np.correlate(audio[2048:6048], tone[2048 - 64:6048 + 64], mode="valid"))) - 64
    assert abs(lag) <= 2, lag
    # each fragment decodes after the init segment alone: its block's frames
    for k, (block_frames, _) in enumerate(blocks):
        alone, _, alone_keys = _decode(parts[0] + parts[1 + k])
        assert len(alone) == len(block_frames) and alone_keys[0]
    # a deterministic function of the blocks: a fresh muxer writes the same bytes; other frames do not
    assert _stream(blocks)[1] == parts
    assert _stream(_blocks(seed=1))[1][1:] != parts[1:]


def test_fragmented_mp4_refuses_bad_frames() -> None:
    mux = FragmentMuxer(FragmentSpec(width=W, height=H))
    for bad in (np.zeros((3, H, W), np.uint8), np.zeros((3, H, W + 2, 3), np.uint8), np.zeros((3, H, W, 3), np.float32)):
        with pytest.raises(ValueError, match="frames must be uint8"):
            mux.block(bad, np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="even sides"):
        FragmentMuxer(FragmentSpec(width=W + 1, height=H))


# ---- the worker's session loop, against a stand-in ------------------------------------------------------


@dataclass
class _Block:
    frames: np.ndarray
    audio: np.ndarray
    fps: int
    first_frame: int
    utterance: int | None
    latency_s: float | None


class _StandInSession:
    """`Pipeline.session`'s interface: one 12-frame block per 0.48 s of speech fed (tests only)."""

    def __init__(self) -> None:
        self.fed: list[np.ndarray] = []
        self.calls: list[str] = []
        self._pending = 0
        self._utterance = 0
        self._frames = 0
        self._lock = threading.Lock()
        self.closed = False

    def feed(self, samples: np.ndarray, rate: int) -> None:
        assert rate == AUDIO_RATE
        with self._lock:
            self.fed.append(np.array(samples, np.float32))
            self._pending += len(samples)

    def end(self) -> None:
        self.calls.append("end")
        self._utterance += 1

    def interrupt(self) -> None:
        self.calls.append("interrupt")
        with self._lock:
            self._pending = 0

    def close(self) -> None:
        self.closed = True

    def next_block(self, timeout: float | None = None) -> _Block | None:
        with self._lock:
            if self._pending < 7680:
                ready = None
            else:
                self._pending -= 7680
                ready = self._frames
                self._frames += 12
        if ready is None:
            time.sleep(timeout or 0)
            return None
        frames = np.full((12, 32, 32, 3), ready % 256, np.uint8)
        return _Block(frames, np.zeros(7680, np.float32), 25, ready, self._utterance, 0.01)


class _StandInPipeline:
    def __init__(self) -> None:
        self.sessions: list[_StandInSession] = []

    def session(self, image: Path, prompt: str, *, size: str | None = None, seed: int = 42,
                idle: str = "listen") -> _StandInSession:
        self.sessions.append(_StandInSession())
        return self.sessions[-1]


def _start_worker_session(tmp_path: Path, connect_timeout_s: float = 10.0,
                          **task: object) -> tuple[_StandInPipeline, threading.Thread, list, dict]:
    from liveavatar_lite.serve.session_worker import run_session

    pipe = _StandInPipeline()
    spec = SessionTask(id="s" * 32, image=str(tmp_path / "p.png"), prompt="p", size="32*32", seed=1, idle="listen",
                       socket=str(tmp_path / "s.sock"), keep=str(tmp_path / "keep"), **task)  # type: ignore[arg-type]
    events: list = []
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("frames", run_session(
        pipe, spec, threading.Event(), events.append, connect_timeout_s)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(isinstance(e, SessionOpened) for e in events):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return pipe, thread, events, result


def _frames_until(f, kind: str) -> list[tuple[bytes, bytes]]:
    out = []
    while True:
        frame = read_frame(f)
        assert frame is not None, out
        out.append(frame)
        if frame[0] == JSON and json.loads(frame[1])["type"] == kind:
            return out


def test_worker_session_feeds_and_streams_blocks(tmp_path: Path) -> None:
    pipe, thread, _, result = _start_worker_session(tmp_path)
    with socket.socket(socket.AF_UNIX) as link:
        link.connect(str(tmp_path / "s.sock"))
        f = link.makefile("rb")
        link.sendall(pack(CONTROL, {"type": "start", "rate": AUDIO_RATE, "format": "s16"}))
        assert json.loads(_frames_until(f, "ready")[-1][1]) == {"type": "ready"}
        speech = (np.arange(7680 * 2) % 100 * 100).astype("<i2")
        link.sendall(pack(PCM, speech[:5000].tobytes()) + pack(PCM, speech[5000:].tobytes()))
        link.sendall(pack(CONTROL, {"type": "end"}))
        got = _frames_until(f, "block") + [read_frame(f)]  # media, init, block 0, fragment 0
        got += _frames_until(f, "block") + [read_frame(f)]
        link.sendall(pack(CONTROL, {"type": "interrupt"}) + pack(CONTROL, {"type": "close"}))
        got += _frames_until(f, "ended")
    thread.join(10)
    session = pipe.sessions[0]
    # int16 speech arrived as the samples sent, in order; the control reached the session
    assert np.array_equal(np.concatenate(session.fed), speech) and session.calls == ["end", "interrupt"]
    assert session.closed and result["frames"] == 24
    kinds = [(k, json.loads(p)["type"] if k == JSON else len(p)) for k, p in got]
    assert kinds[0] == (JSON, "media") and kinds[1][0] == MEDIA and got[1][1][4:8] == b"ftyp"
    blocks = [json.loads(p) for k, p in got if k == JSON and json.loads(p)["type"] == "block"]
    assert [b["first_frame"] for b in blocks] == [0, 12] and all(b["latency_s"] >= 0.01 for b in blocks)
    ended = json.loads(got[-1][1])
    assert ended["type"] == "ended" and ended["reason"] == "closed" and ended["blocks"] == 2
    # --keep-sessions: the frames, speech and block boundaries as rendered
    keep = tmp_path / "keep"
    assert (keep / "frames.u8").stat().st_size == 24 * 32 * 32 * 3
    assert len((keep / "blocks.jsonl").read_text().splitlines()) >= 2
    assert not (tmp_path / "s.sock").exists()


def test_worker_session_stops_a_client_far_ahead(tmp_path: Path) -> None:
    _, thread, _, _ = _start_worker_session(tmp_path, max_backlog_s=1.0)
    with socket.socket(socket.AF_UNIX) as link:
        link.connect(str(tmp_path / "s.sock"))
        f = link.makefile("rb")
        link.sendall(pack(CONTROL, {"type": "start", "rate": AUDIO_RATE, "format": "f32"}))
        _frames_until(f, "ready")
        link.sendall(pack(PCM, np.zeros(2 * AUDIO_RATE, "<f4").tobytes()))  # 2 s at once: 1 s is the cap
        got = _frames_until(f, "ended")
    thread.join(10)
    errors = [json.loads(p)["error"] for k, p in got if k == JSON and json.loads(p)["type"] == "error"]
    assert len(errors) == 1 and "faster than the avatar" in errors[0] and "\n" not in errors[0]
    assert json.loads(got[-1][1])["reason"] == "backlog"


def test_worker_session_ends_when_nobody_connects(tmp_path: Path) -> None:
    pipe, thread, _, result = _start_worker_session(tmp_path, connect_timeout_s=0.5)
    thread.join(10)
    assert result["frames"] == 0 and not pipe.sessions and not (tmp_path / "s.sock").exists()


def test_session_sockets_move_to_a_short_private_dir_under_a_deep_state_dir(tmp_path: Path) -> None:
    """A Unix socket's path holds 108 bytes: under a deep state dir the sockets go to a temp dir (0700)."""
    import shutil

    from liveavatar_lite.pipeline.request import PipelineOptions
    from liveavatar_lite.serve.config import ServeConfig
    from liveavatar_lite.serve.layout import StateDir
    from liveavatar_lite.serve.sessions import MAX_SOCKET_PATH, SessionBroker

    def broker(root: Path) -> SessionBroker:
        config = ServeConfig(pipeline=PipelineOptions(Path("art")), state_dir=root)
        return SessionBroker(config, StateDir(root), threading.Event())

    short = broker(Path("/tmp/s")).socket_path("a" * 32)  # (nothing is created for it)
    assert short.parent == Path("/tmp/s/sessions")
    deep = broker(tmp_path / ("d" * 60) / ("e" * 60))
    path = deep.socket_path("b" * 32)
    try:
        assert len(str(path)) <= MAX_SOCKET_PATH and path.parent.stat().st_mode & 0o777 == 0o700
        assert deep.socket_path("c" * 32).parent == path.parent  # one dir for the server's life
    finally:
        shutil.rmtree(path.parent)
