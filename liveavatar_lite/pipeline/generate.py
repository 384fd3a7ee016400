"""The clip loop of one render: validated inputs -> renderer blocks -> h264 segments (+ live HLS) -> mp4.

Per clip, per block: the renderer denoises 3 latent frames and decodes them into 12 frames, which go
straight into the clip's h264 segment (decode/video.py) and, once the clip is done, into the live
playlist (decode/hls.py). After each clip its segment is made durable; every `checkpoint_interval_s`
(0: every clip) so is the full generation state (KV caches, decoder cache, RNG, counters). A resume
continues from the newest checkpoint and produces the same frames as an uninterrupted run. The final
mp4 (with the speech as aac) is muxed to `OUT.tmp` and renamed only when complete.

`iter_blocks` is the same loop without files, for `Pipeline.stream`. The model side sits behind the
`Backend`/`ClipRenderer` protocols (request.py); `render.ArtifactBackend` is the real one.

    inputs = prepare_inputs(request)                       # UserError for bad input, before any work
    result = render_to_file(backend, request, inputs)      # RenderResult
"""
from __future__ import annotations

import hashlib
import math
import os
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.format import file_sha256
from ..conditioning.photo import load_reference
from ..errors import BudgetError, UserError
from .request import (
    Backend,
    ClipRenderer,
    RenderInputs,
    RenderRequest,
    RenderResult,
    StreamBlock,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ inputs

def num_clips_for(num_samples: int, num_clip: int | None) -> int:
    """Upstream's clip count for 16 kHz speech (int(30-fps frames / 57.6) + 1), capped by --num-clip.

    num_clips_for(3 * 16000, None)  # 2
    """
    from ..conditioning.audio_features import num_clips_for_audio

    available = num_clips_for_audio(num_samples)
    return available if num_clip is None else min(num_clip, available)


def check_output(out: Path, live: Path | None = None, telemetry: Path | None = None) -> None:
    """UserError unless `out` can be the render's mp4, `live` its HLS directory and `telemetry` a file
    (a directory, FIFO or device, a parent that is a file, a read-only place: all refused before any work)."""
    from .workdir import check_output_path

    check_output_path(out)
    if live is not None:
        check_live(out, live)
    if telemetry is not None:
        check_output_path(telemetry, "--telemetry", suffix=None)


SEED_MAX = 2**63 - 1  # as the CLI's --seed (commands/flags.py): clip c is seeded seed + c
MIN_SPEECH_SECONDS = 0.1  # shorter speech gives wav2vec2 too few samples for one feature frame


def check_numbers(request: RenderRequest) -> None:
    """UserError unless seed, num_clip and every other field have what the CLI's flags accept
    (the Python API passes anything: a None prompt, an int size, a string resume; checked before any file)."""
    for name in ("prompt", "size"):
        if not isinstance(getattr(request, name), str):
            raise UserError(f"{name} must be a string, got {type(getattr(request, name)).__name__} "
                            f"{getattr(request, name)!r:.60}")
    for name in ("image", "audio", "out", "live", "telemetry"):
        if not isinstance(getattr(request, name, None), Path if name in ("image", "audio") else (Path, type(None))):
            raise UserError(f"{name} must be a path (str or os.PathLike), got {getattr(request, name)!r:.60}")
    if not isinstance(request.resume, bool):
        raise UserError(f"resume must be True or False, got {request.resume!r:.60}")
    interval = request.checkpoint_interval_s
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
        raise UserError(f"checkpoint_interval_s must be a number of seconds >= 0, got {interval!r:.60}")
    seed, num_clip = request.seed, request.num_clip
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed must be an integer from 0 to 2^63-1, got {seed!r}")
    if num_clip is not None and (not isinstance(num_clip, int) or isinstance(num_clip, bool) or num_clip < 1):
        raise UserError(f"num_clip must be a positive integer (or None: until the speech ends), got {num_clip!r}")


def check_live(out: Path, live: Path) -> None:
    """UserError unless `live` can be the HLS directory of a render to `out` (before any model loads):
    not `out` itself, not inside its work dir, not under a file, writable, no files of someone else."""
    from ..decode.hls import check_live_dir
    from .workdir import RenderWorkDir, check_output_path

    where, work = live.resolve(), RenderWorkDir.path_for(out).resolve()
    if where == out.resolve():
        raise UserError(f"--live {live} is the --out file; pass a directory for the HLS playlist")
    if where == work or work in where.parents:
        raise UserError(f"--live {live} is inside the render's work dir {work}, which is deleted when it ends")
    for d in (where, *where.parents):  # ... or another render's (deleted when that one ends or resumes)
        if RenderWorkDir.is_work_dir_name(d.name):
            raise UserError(f"--live {live} is inside {d}, another render's work dir, which is deleted when it ends")
    if live.is_symlink() and not live.exists():
        raise UserError(f"--live {live} is a symbolic link to nothing ({os.readlink(live)}); remove it or "
                        "pass a directory")
    check_live_dir(live)
    check_output_path(live / PLAYLIST_NAME, "--live", suffix=None)  # a parent that is a file, read-only, ...


PLAYLIST_NAME = "index.m3u8"


def prepare_inputs(request: RenderRequest, max_audio_seconds: float | None = None) -> RenderInputs:
    """The photo framed for the size, the speech at 16 kHz and the clip count; UserError for bad input.

    Everything is checked before any folder or work dir is made (docs/errors.md); speech longer
    than `max_audio_seconds` raises speech.SpeechTooLong, found from its header when it says.
    prepare_inputs(request).num_clips  # 3 for 4.7 s of speech
    """
    from ..conditioning import speech
    from ..conditioning.text_tokenizer import check_prompt
    from ..fileio import require_file

    check_numbers(request)
    if request.out is not None:
        check_output(request.out, request.live, request.telemetry)
        if not request.overwrite and request.out.exists():
            raise UserError(f"--out {request.out} exists; pass --overwrite to replace it, or choose another --out")
    check_prompt(request.prompt)
    require_file(request.image, "--image")  # a FIFO or device is refused, never opened (it would block)
    require_file(request.audio, "--audio")
    reference = load_reference(request.image, request.size)  # float32 [3, H, W]
    height, width = int(reference.shape[1]), int(reference.shape[2])
    wave = speech.load_audio(request.audio, max_audio_seconds)  # float32 [n] at 16 kHz; UserError if unusable
    if len(wave) < MIN_SPEECH_SECONDS * request.sample.audio_rate:
        raise UserError(f"audio {request.audio} is {len(wave) / request.sample.audio_rate * 1000:.0f} ms long; "
                        f"at least {MIN_SPEECH_SECONDS * 1000:.0f} ms of speech is needed")
    num_clips = num_clips_for(len(wave), request.num_clip)
    log.info("%dx%d, %.2f s of speech -> %d clips", width, height, len(wave) / request.sample.audio_rate, num_clips)
    return RenderInputs(request, reference, height, width, num_clips, wave)


def job_key(request: RenderRequest, identity: str, digest: Any = file_sha256) -> str:
    """What makes two renders produce the same frames: inputs' bytes, prompt, size, seed, backend identity.

    job_key(request, backend.identity())  # sha256 hex; a resume refuses a work dir with another key
    (`digest(path)` gives a file's sha256 hex; a caller keying many jobs passes a cache)
    """
    h = hashlib.sha256()
    for part in (identity, request.prompt, request.size, str(request.seed)):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    for path in (request.image, request.audio):
        h.update(bytes.fromhex(digest(path)))
    return h.hexdigest()


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, or ONNX Runtime's allocation failure (a plain RuntimeException there):
    what generate and eval turn into a BudgetError (exit 3) with advice."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return "out of memory" in text.lower() or "Failed to allocate memory" in text


def close_renderer(renderer: Any) -> None:
    """Join what a renderer runs ahead (render.ArtifactRenderer's overlapped DiT) when its caller
    stops before a clip's end: an error, a cancel, a consumer that stops early."""
    close = getattr(renderer, "close", None)
    if close is not None:
        close()


# ------------------------------------------------------------------------------------------ blocks

def iter_blocks(backend: Backend, inputs: RenderInputs) -> Iterator[StreamBlock]:
    """Every decoded block of the video in order, with its span of the speech (no files written)."""
    sample = inputs.request.sample
    renderer = backend.build(inputs)
    first = 0
    spf = sample.audio_rate / sample.fps  # speech samples per video frame (640)
    try:
        for clip in range(inputs.num_clips):
            for block in range(renderer.blocks_per_clip):
                frames = renderer.block_frames(clip, block)  # uint8 [12, H, W, 3]
                if clip == 0 and block == 0:
                    frames = frames[sample.first_clip_drop:]  # upstream drops the very first 3 frames
                n = int(frames.shape[0])
                a0, a1 = round(first * spf), round((first + n) * spf)
                audio = np.zeros(a1 - a0, np.float32)
                have = inputs.wave[a0:a1]
                audio[: len(have)] = have
                yield StreamBlock(clip, block, frames, first, sample.fps, audio, first / sample.fps,
                                  (first + n) / sample.fps)
                first += n
    finally:
        close_renderer(renderer)  # a consumer that stops early: the DiT computed ahead is joined


# ------------------------------------------------------------------------------------------ files

class _Clock:
    """Wall time since the render began, and when its first frame appeared (a telemetry event)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_frame: float | None = None
        self.telemetry: Any = None

    def frame(self) -> None:
        if self.first_frame is None:
            self.first_frame = time.perf_counter() - self.started
            if self.telemetry is not None:
                self.telemetry.event("first_frame", seconds=round(self.first_frame, 4))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def render_to_file(backend: Backend, request: RenderRequest, inputs: RenderInputs | None = None) -> RenderResult:
    """Render `request` to its mp4 (resuming if asked), with live HLS output if `request.live` is set.

    Bad input raises UserError before any heavy work; a crash leaves only the work dir, which
    `resume=True` continues from.

    render_to_file(backend, request).frames  # 141 for 3 clips (45 + 48 + 48)
    """
    from .telemetry import Telemetry
    from .workdir import RenderWorkDir

    clock = _Clock()
    if request.out is None:
        raise UserError("render needs an output path (use stream() to get frames without a file)")
    inputs = inputs or prepare_inputs(request)
    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)

    work = RenderWorkDir.open(out, job_key(request, backend.identity()), request.resume)  # locked until done
    try:
        if work.clips_done < inputs.num_clips:
            work.rewind_to_state()  # segments after the newest checkpoint are rendered again
        resumed = work.clips_done
        telemetry = Telemetry.open(request.telemetry, append=resumed > 0)
        clock.telemetry = telemetry
        try:
            frames, rendered, live = _render(request, backend, work, inputs, telemetry, clock)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            advice = backend.oom_advice() if hasattr(backend, "oom_advice") else "pass a smaller --vram or --size"
            raise BudgetError(f"out of memory after {work.clips_done} finished clips; {advice}") from None
        finally:
            telemetry.close()
        work.remove()
    finally:
        work.unlock()  # a failed render keeps its files for --resume; the next run may lock them
    seconds = clock.seconds
    return RenderResult(out, inputs.num_clips, frames, inputs.height, inputs.width, resumed, seconds,
                        first_frame_seconds=clock.first_frame,
                        realtime_factor=_realtime_factor(rendered, request.sample.fps, seconds),
                        live_playlist=live.playlist if live is not None else None)


def _realtime_factor(frames: int, fps: int, seconds: float) -> float | None:
    """Seconds of video rendered per second of wall time (None when nothing was rendered)."""
    return frames / fps / seconds if frames > 0 and seconds > 0 else None


def _render(request: RenderRequest, backend: Backend, work: Any, inputs: RenderInputs, telemetry: Any,
            clock: _Clock) -> tuple[int, int, Any]:
    """Build the renderer (resuming its state), render the missing clips, mux.

    Returns (frames in the mp4, frames rendered by this call, the live writer or None)."""
    from ..decode.hls import HlsWriter
    from ..decode.video import VideoSpec, mux_segments

    resumed, frames_before = work.clips_done, work.frames_done
    spec = VideoSpec(height=inputs.height, width=inputs.width, fps=request.sample.fps)
    live = None
    if request.live is not None:
        done = list(zip(work.segment_paths(), work.segment_frame_counts()))
        live = HlsWriter.open(request.live, spec, request.audio, done)
    try:
        if resumed < inputs.num_clips:  # (a render killed while muxing has every clip already)
            renderer = backend.build(inputs)
            if hasattr(renderer, "layout"):  # what this render streams, where its KV lives
                telemetry.event("layout", **renderer.layout())
            if work.state_path is not None:
                work.restore(renderer)  # mmap'ed, weights_only; one line if the state file is damaged
                telemetry.event("resume", clips_done=resumed, frames_done=work.frames_done)
            _render_clips(renderer, work, spec, inputs, telemetry, clock, live)
        frames = mux_segments(work.segment_paths()[: inputs.num_clips], request.audio, request.out, spec)
        if live is not None:
            live.finish()
    except BaseException:
        if live is not None:
            live.close()  # the live dir's lock goes with the failed render (its files stay for a resume)
        raise
    rendered = frames - frames_before
    rtf = _realtime_factor(rendered, request.sample.fps, clock.seconds)
    telemetry.summary(out=str(request.out), resumed_clips=resumed, height=inputs.height, width=inputs.width,
                      first_frame_seconds=round(clock.first_frame, 4) if clock.first_frame is not None else None,
                      realtime_factor=round(rtf, 4) if rtf is not None else None)
    return frames, rendered, live


def _render_clips(renderer: ClipRenderer, work: Any, spec: Any, inputs: RenderInputs, telemetry: Any,
                  clock: _Clock, live: Any) -> None:
    """Clips work.clips_done .. num_clips-1: blocks -> segment, then commit segment + state (+ live)."""
    import sys

    import torch
    from tqdm import tqdm

    from .ledger import clip_fields, clip_mark

    sample, show = inputs.request.sample, inputs.request.progress
    interval = inputs.request.checkpoint_interval_s
    last_checkpoint = time.monotonic()
    clips = tqdm(total=inputs.num_clips, initial=work.clips_done, unit="clip", desc="clips", disable=not show)
    try:
        for clip in range(work.clips_done, inputs.num_clips):
            t0, wait0, mark = time.perf_counter(), renderer.copy_wait_seconds(), clip_mark(renderer)
            first_frame = work.frames_done
            segment = work.begin_clip(clip, spec)
            try:
                # the nested bar moves the cursor up when it closes: only on a terminal, never into a log
                blocks = tqdm(range(renderer.blocks_per_clip), unit="block", desc=f"clip {clip}", leave=False,
                              disable=not show or not sys.stderr.isatty())
                for block in blocks:
                    frames = renderer.block_frames(clip, block)  # uint8 [12, H, W, 3]
                    if clip == 0 and block == 0:
                        frames = frames[sample.first_clip_drop:]  # upstream drops the very first 3 frames
                    segment.append(frames)
                    clock.frame()
                # Checkpoint when due, never after the last clip (nothing follows it).
                due = clip < inputs.num_clips - 1 and (interval <= 0 or time.monotonic() - last_checkpoint >= interval)
                if hasattr(renderer, "checkpoint_due"):  # a pipeline of ranks decides at its head (multirank)
                    due = renderer.checkpoint_due(clip)
                t_ckpt = time.perf_counter()
                work.commit_clip(segment, (lambda f: torch.save(renderer.state(), f)) if due else None)
                if due:
                    last_checkpoint = time.monotonic()
            except BaseException:
                segment.abort()
                raise
            checkpoint_s = round(time.perf_counter() - t_ckpt, 4) if due else None
            if live is not None:
                live.add_clip(clip, segment.final_path, first_frame, segment.frames)
            seconds = time.perf_counter() - t0
            telemetry.clip_done(clip, segment.frames, seconds, renderer.copy_wait_seconds() - wait0,
                                checkpoint_seconds=checkpoint_s, **clip_fields(renderer, mark, seconds))
            clips.update(1)
    finally:
        close_renderer(renderer)  # stopped mid-clip (error, cancel): the DiT computed ahead is joined
        clips.close()
