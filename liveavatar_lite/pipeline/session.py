"""Talk sessions: speech streamed in, the avatar streamed out, on a loaded Pipeline (docs/talk.md).

    with pipe.session("me.jpg", "a person talking", idle="listen") as sess:
        threading.Thread(target=tts_to, args=(sess,)).start()  # sess.feed(pcm, 24000) ...; sess.end()
        for block in sess:                                     # a SessionBlock as soon as it renders
            play(block.frames, block.audio)                    # uint8 [n, H, W, 3], float32 16 kHz

A session is one unbounded video: clip after clip, block after block, as a render continues its
clips (the same sink, rings, motion frames and seeded noise), with the speech of successive
utterances laid on it as it arrives. The blocks render in the thread that iterates (`next_block`
or `for block in sess`), one at a time; `feed`, `end`, `interrupt` and `close` may come from any
thread and never wait for a block to render (`close` waits for the one in flight).

The timeline, block by block (12 video frames, 0.48 s; the session's first block shows 9, as a
render's first block):

* Utterance blocks. The speech fed since the previous `end()`/`interrupt()` is an utterance. Its
  block k (its video frames 12k .. 12k + 11) renders as soon as its speech plus the lookahead has
  arrived (`samples_needed`: (12k + 12) / 25 s + lookahead_s from the utterance's start), or once
  the utterance has ended. After `end()` the utterance renders as many blocks as a render of its
  speech would (whole clips, the end padded with silence features as a render pads it).
* Its features: a block rendered before `end()` gets the streaming features of the speech up to
  its lookahead (conditioning/streaming_features.py: a function of that speech only, not of how
  it was chunked or when it came); a block rendered after `end()` gets the whole utterance's
  features exactly as `render` computes them. So feeding a whole file and calling `end()` before
  the first block renders gives exactly the frames of `Pipeline.render`/`stream` for the same
  photo, speech, prompt, size and seed (tests/test_session.py).
* Idle blocks (utterance None), when no utterance block can render: with idle="listen" silence
  blocks (the silence features a render pads with) paced at real time: one renders only when
  playback has reached the start of the last block rendered (never more than one block ahead
  of the wall clock); idle="pause" renders nothing until speech arrives. An utterance whose
  first block is waiting for its lookahead does not stop idle blocks; one that has started
  rendering and runs dry (speech slower than real time) waits for its speech, without idling.
* Playback clock: a player that starts with the session's first block and stalls whenever a
  block is late; it only paces idle blocks (speech blocks render as soon as they can).
* `interrupt()` (barge-in) drops every utterance's speech not yet rendered (a block rendering at
  that moment is still returned); the next `feed` starts a new utterance, on the same video.
* `latency_s` of an utterance block: from the arrival (the `feed` call) of the last speech sample
  the block waited for (its lookahead included; `end()` when it waited for the end) to its frames
  being ready. Telemetry gets one `block` line per block (pipeline/telemetry.py); `stats()` the
  running figures.

A session holds its Pipeline from `session()` to `close()`: a render or stream meanwhile is refused
(Pipeline._claim). The models stay loaded; the session keeps wav2vec2 on the compute device while
open. An utterance shorter than 0.1 s (render's minimum) renders nothing.
"""
from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..conditioning.audio_features import extract_audio_features
from ..conditioning.speech import MAX_KERNEL, SAMPLE_RATE, StreamResampler, kernel_size
from ..conditioning.streaming_features import (
    StreamingWindow,
    samples_needed,
    streaming_block_features,
    utterance_frames,
)
from ..config import SampleConfig
from ..errors import UserError, first_line
from .request import StreamBlock

log = logging.getLogger(__name__)

IDLE_MODES = ("listen", "pause")
MIN_RATE, MAX_RATE = 8000, 192000  # Hz: telephone speech .. studio audio; anything else is a caller's bug
MAX_UTTERANCE_S = 600.0  # the longest utterance kept (its speech is held until its last block renders)
MIN_UTTERANCE_S = 0.1  # as render's MIN_SPEECH_SECONDS: shorter speech gives wav2vec2 too little


@dataclass(frozen=True)
class SessionBlock(StreamBlock):
    """One block of a talk session: a `StreamBlock` (frames, their span of the session's timeline and
    the speech played over it) plus `utterance` (its index in the session, None for an idle block),
    `latency_s` (seconds from the arrival of the last speech sample it waited for to its frames
    being ready; None for idle blocks) and `features` ("streaming", "exact" or "silence": how its
    audio features were computed)."""

    utterance: int | None = None
    latency_s: float | None = None
    features: str = "silence"


class _Utterance:
    """One utterance's speech at 16 kHz as it arrives, with the arrival time of each piece."""

    def __init__(self, index: int, rate: int) -> None:
        self.index, self.rate = index, rate
        self.resampler = StreamResampler(rate)
        self._buf = np.zeros(SAMPLE_RATE, np.float32)
        self.n = 0  # samples (16 kHz) arrived
        self._counts: list[int] = []  # samples available after each arrival
        self._times: list[float] = []  # the arrival's monotonic time
        self.ended_at: float | None = None
        self.blocks_done = 0
        self.first_frame: int | None = None  # the session's output frame where its first block starts
        self.features: Any = None  # the whole utterance's features, once ended and first needed

    def append(self, y: np.ndarray, now: float) -> None:
        if len(y) == 0:
            return
        if self.n + len(y) > len(self._buf):  # grow by doubling: the old array stays valid for readers
            grown = np.zeros(max(2 * len(self._buf), self.n + len(y)), np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : self.n + len(y)] = y
        self.n += len(y)
        self._counts.append(self.n)
        self._times.append(now)

    @property
    def wave(self) -> np.ndarray:
        """The speech so far (a view: later arrivals never change it)."""
        return self._buf[: self.n]

    def arrival(self, samples: int) -> float | None:
        """When the first `samples` samples had all arrived (None if they have not)."""
        i = bisect.bisect_left(self._counts, samples)
        return self._times[i] if i < len(self._times) else None


@dataclass(frozen=True)
class _Work:
    """The next block to render, decided under the session's lock."""

    kind: str  # "streaming" | "exact" | "silence"
    utt: _Utterance | None = None
    k: int = 0  # the utterance's block index
    wave: np.ndarray | None = None
    ready_since: float | None = None  # when the last speech it waited for arrived


class Session:
    """A talk session on a loaded Pipeline; made by `Pipeline.session` (see the module docstring)."""

    def __init__(self, renderer: Any, encoder: Any, *, feature_dtype: Any, silence: Any, sample: SampleConfig,
                 idle: str, window: StreamingWindow, telemetry: Any, release: Callable[[], None],
                 max_utterance_s: float = MAX_UTTERANCE_S, width: int = 0, height: int = 0) -> None:
        self.width, self.height, self.fps = width, height, sample.fps  # the frames' size, known up front
        self._renderer, self._encoder = renderer, encoder
        self._dtype, self._silence = feature_dtype, silence  # silence: zero features of one block
        self._sample, self.idle, self.window = sample, idle, window
        self._telemetry, self._release = telemetry, release
        self._tel_lock = threading.Lock()  # telemetry lines come from the iterating and the interrupting thread
        self._max_samples = int(max_utterance_s * SAMPLE_RATE)
        self._cond = threading.Condition()  # guards everything below; feeds notify it
        self._turn = threading.Lock()  # one block renders at a time, whoever iterates
        self._utts: deque[_Utterance] = deque()  # utterances not fully rendered, oldest first
        self._feeding: _Utterance | None = None  # the utterance feed() appends to (not ended)
        self._next_utt = 0
        self._closed = False
        self._released = False
        self._rendering = False
        self._failed: str | None = None  # why a block failed to render (the session is then unusable)
        # the video so far
        self._clip, self._block, self._first = 0, 0, 0
        self._anchor: float | None = None  # playback clock: monotonic time at which media time 0 plays
        self._latencies: list[float] = []
        self._counts = {"blocks": 0, "speech_blocks": 0, "idle_blocks": 0}
        self._px = sample.video_frames_per_block  # 12

    # ---- input (any thread) ---------------------------------------------------------------

    def feed(self, samples: np.ndarray, rate: int) -> None:
        """Append speech: mono float32 in [-1, 1] (or int16) at `rate` Hz, any length; any thread.
        Starts a new utterance after `end()` or `interrupt()`. Bad input: UserError, nothing changed."""
        x = _checked_samples(samples)
        rate = _checked_rate(rate)
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise UserError("this talk session is closed; start a new one with Pipeline.session()")
            u = self._feeding
            if u is not None and u.rate != rate:
                raise UserError(f"the speech rate changed from {u.rate} to {rate} Hz within an utterance; "
                                "call end() before feeding at another rate")
            have = u.n if u is not None else 0
            if have + math.ceil(len(x) * SAMPLE_RATE / rate) + 1 > self._max_samples:
                raise UserError(f"an utterance may last at most {self._max_samples / SAMPLE_RATE:g} s; "
                                "call end() between utterances")
            if len(x) == 0:
                return
            if u is None:
                u = self._feeding = _Utterance(self._next_utt, rate)
                self._next_utt += 1
                self._utts.append(u)
            u.append(u.resampler.push(x), now)
            self._cond.notify_all()

    def end(self) -> None:
        """The utterance being fed is complete: its remaining blocks render (the end padded as a
        render pads it). No utterance being fed: nothing happens."""
        with self._cond:
            if self._closed:
                raise UserError("this talk session is closed; start a new one with Pipeline.session()")
            u, self._feeding = self._feeding, None
            if u is not None:
                u.append(u.resampler.flush(), time.monotonic())
                u.ended_at = time.monotonic()
                self._cond.notify_all()

    def interrupt(self) -> None:
        """Barge-in: drop all speech not yet rendered (every pending utterance); the video goes on
        (idle blocks or a pause), and the next `feed` starts a new utterance."""
        with self._cond:
            if self._closed:
                raise UserError("this talk session is closed; start a new one with Pipeline.session()")
            dropped = [u.index for u in self._utts]
            self._utts.clear()
            self._feeding = None
            self._cond.notify_all()
        if self._telemetry is not None and dropped:
            with self._tel_lock:
                self._telemetry.event("interrupt", utterances=dropped)

    def close(self) -> None:
        """End the session: iteration stops, the block in flight (if any) is awaited and dropped,
        the Pipeline is free again. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._rendering:  # sync point: the block another thread renders finishes first
                self._cond.wait()
            if self._released:
                return
            self._released = True
        try:
            close = getattr(self._renderer, "close", None)
            if close is not None:
                close()
            if self._telemetry is not None:
                with self._tel_lock:
                    self._telemetry.event("session_summary", **self.stats())
                    self._telemetry.close()
        finally:
            self._release()

    # ---- output (the iterating thread) ----------------------------------------------------

    def __iter__(self) -> Iterator[SessionBlock]:
        return self

    def __next__(self) -> SessionBlock:
        block = self.next_block(None)
        if block is None:
            raise StopIteration
        return block

    def next_block(self, timeout: float | None = None) -> SessionBlock | None:
        """The next block, rendered in this thread as soon as it may be; None if nothing became
        ready within `timeout` seconds (None: wait as long as it takes) or the session is closed.
        A block whose render has begun is returned even when that passes the timeout."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not math.isfinite(timeout)):
            raise UserError(f"timeout must be a number of seconds or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        # one block renders at a time: another thread iterating holds the turn (bounded by the timeout)
        if not self._turn.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            return None
        try:
            while True:
                with self._cond:
                    if self._closed:
                        return None
                    if self._failed is not None:
                        raise UserError(f"this talk session failed ({self._failed}); close it and start a new one")
                    now = time.monotonic()
                    work, until = self._next_work(now)
                    if work is None:
                        limits = [t for t in (until, deadline) if t is not None]
                        if deadline is not None and now >= deadline:
                            return None
                        self._cond.wait(max(0.0, min(limits) - now) if limits else None)
                        continue
                    self._rendering = True
                try:
                    block = self._render(work)
                except BaseException as e:  # the models' state is mid-block: no later block can be right
                    self._failed = first_line(e) or type(e).__name__
                    raise
                finally:
                    with self._cond:
                        self._rendering = False
                        self._cond.notify_all()
                with self._cond:
                    return None if self._closed else block
        finally:
            self._turn.release()

    def _next_work(self, now: float) -> tuple[_Work | None, float | None]:
        """What to render now, or (None, when to look again: None = at the next feed/end/close)."""
        while self._utts:
            u = self._utts[0]
            if u.ended_at is not None:
                total = utterance_frames(u.n) // self._px if u.n >= MIN_UTTERANCE_S * SAMPLE_RATE else 0
                if u.blocks_done >= total:
                    self._utts.popleft()  # fully rendered (or too short to render)
                    continue
                need = samples_needed((u.blocks_done + 1) * self._px, self.window)
                since = u.arrival(need) if need <= u.n else u.ended_at
                return _Work("exact", u, u.blocks_done, u.wave, since), None
            need = samples_needed((u.blocks_done + 1) * self._px, self.window)
            if u.n >= need:
                return _Work("streaming", u, u.blocks_done, u.wave, u.arrival(need)), None
            if u.blocks_done > 0 or self.idle == "pause":
                return None, None  # an utterance under way waits for its speech
            break  # its first block waits for the lookahead: the avatar may listen meanwhile
        if self.idle == "pause":
            return None, None
        due = now if self._anchor is None else self._anchor + (self._first - self._px) / self._sample.fps
        return (_Work("silence"), None) if now >= due else (None, due)

    def _render(self, work: _Work) -> SessionBlock:
        """Features, then the block through the renderer; the timeline and telemetry advance."""
        t0 = time.perf_counter()
        u, px, fps = work.utt, self._px, self._sample.fps
        f0, f1 = work.k * px, (work.k + 1) * px
        if work.kind == "exact":
            if u.features is None:  # the whole utterance, exactly as a render computes it
                u.features = extract_audio_features(self._encoder, u.wave, out_dtype=self._dtype)
            feats = u.features[..., f0:f1]
        elif work.kind == "streaming":
            feats = streaming_block_features(self._encoder, work.wave, f0, f1, self.window, fps=fps,
                                             out_dtype=self._dtype)
        else:
            feats = self._silence
        frames = self._renderer.block_frames(self._clip, self._block, audio=feats)  # uint8 [12, H, W, 3]
        if self._clip == 0 and self._block == 0:
            frames = frames[self._sample.first_clip_drop:]  # as a render, the video's first 3 frames go
        ready = time.monotonic()
        n, first = int(frames.shape[0]), self._first
        spf = SAMPLE_RATE // fps  # speech samples per video frame (640)
        audio = np.zeros(n * spf, np.float32)
        latency = None
        if u is not None:
            if u.first_frame is None:
                u.first_frame = first
            a0 = (first - u.first_frame) * spf
            have = work.wave[a0 : a0 + n * spf]
            audio[: len(have)] = have
            latency = max(0.0, ready - work.ready_since) if work.ready_since is not None else None
        block = SessionBlock(self._clip, self._block, frames, first, fps, audio, first / fps, (first + n) / fps,
                             utterance=None if u is None else u.index, latency_s=latency, features=work.kind)
        with self._cond:
            if u is not None:
                u.blocks_done += 1
            self._first += n
            self._block += 1
            if self._block == self._renderer.blocks_per_clip:
                self._clip, self._block = self._clip + 1, 0
            start = first / fps  # playback: a late block stalls the player, which restarts with it
            if self._anchor is None or self._anchor + start < ready:
                self._anchor = ready - start
            self._counts["blocks"] += 1
            self._counts["speech_blocks" if u is not None else "idle_blocks"] += 1
            if latency is not None:
                self._latencies.append(latency)
        if self._telemetry is not None:
            with self._tel_lock:  # (interrupt() may write from another thread)
                self._telemetry.block_done(block.clip, block.block, n, time.perf_counter() - t0,
                                           utterance=block.utterance, latency_s=latency, features=work.kind)
        return block

    # ---- state ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Plain running figures (what a service exports): block counts, utterances started, and the
        per-block latency of utterance blocks (last, mean, p50, p95, max; None before the first)."""
        with self._cond:
            lat = sorted(self._latencies)
            last = self._latencies[-1] if self._latencies else None
            out: dict[str, Any] = {**self._counts, "utterances": self._next_utt, "latency_last_s": last}
        out.update(latency_stats(lat))
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def latency_stats(latencies: list[float]) -> dict[str, float | None]:
    """mean, p50, p95 and max of per-block latencies (seconds; None when there are none)."""
    if not latencies:
        return {"latency_mean_s": None, "latency_p50_s": None, "latency_p95_s": None, "latency_max_s": None}
    a = np.sort(np.asarray(latencies, dtype=np.float64))
    return {"latency_mean_s": round(float(a.mean()), 4), "latency_p50_s": round(float(np.percentile(a, 50)), 4),
            "latency_p95_s": round(float(np.percentile(a, 95)), 4), "latency_max_s": round(float(a[-1]), 4)}


def _checked_samples(samples: Any) -> np.ndarray:
    """Mono float32 [n] in [-1, 1] from `samples` (float32 [n] / [n, 1], or int16); UserError otherwise."""
    if not isinstance(samples, np.ndarray):
        raise UserError(f"feed() takes a numpy array of samples, not {type(samples).__name__}")
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1:
        raise UserError(f"feed() takes mono speech, a 1-D array; got shape {list(samples.shape)} "
                        "(mix the channels down first)")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype != np.float32:
        raise UserError(f"feed() takes float32 samples in [-1, 1] or int16, not {samples.dtype}")
    if not np.isfinite(samples).all():
        raise UserError("feed() got NaN or infinite samples")
    if len(samples) and float(np.abs(samples).max()) > 1.0:
        raise UserError("feed() takes float32 samples in [-1, 1]; these exceed it (scale or clip them)")
    return np.ascontiguousarray(samples)


def _checked_rate(rate: Any) -> int:
    """An integer rate in [MIN_RATE, MAX_RATE] the resampler can take; UserError otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer):
        raise UserError(f"the sample rate must be an integer number of Hz, got {rate!r}")
    rate = int(rate)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UserError(f"the sample rate must be {MIN_RATE} to {MAX_RATE} Hz, got {rate}")
    if kernel_size(rate) > MAX_KERNEL:
        raise UserError(f"unusual sample rate {rate} Hz; feed a common one (16000, 22050, 24000, 44100, 48000)")
    return rate
