"""Live output: an HLS playlist that grows by one MPEG-TS segment (h264 + aac) per finished clip.

While a render runs, `DIR/index.m3u8` lists every clip finished so far (`#EXT-X-PLAYLIST-TYPE:EVENT`),
so a browser (hls.js, Safari) or `ffplay DIR/index.m3u8` plays the video before the render ends;
`#EXT-X-ENDLIST` is appended when the last clip is in. Each segment stream-copies the clip's h264
packets (the same bytes the final mp4 gets, no re-encode) and encodes that clip's span of the speech
as aac. Timestamps continue across segments (clip k starts at its first frame's time), so players
see one timeline. Segments and the playlist are written temp + rename: a reader never sees half a file.

    live = HlsWriter.open(Path("live"), VideoSpec(384, 704), Path("speech.wav"), done=[])
    live.add_clip(0, Path("clip_00000.mp4"), first_frame=0, frames=45)
    live.finish()
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_line
from ..fileio import durable_replace, lock_dir, write_bytes_atomic
from .video import AAC_RATE, VideoSpec, audio_frames, audio_layout, copy_video

log = logging.getLogger(__name__)

PLAYLIST = "index.m3u8"
_SEGMENT = "seg_{:05d}.ts"
OWNED = ".liveavatar-live.json"  # the names this tool wrote in a live dir: the only ones it replaces or deletes


def check_live_dir(directory: Path) -> None:
    """UserError unless `directory` can be a render's live output: a directory (or nothing yet) whose
    playlist and segments, if any, this tool wrote (a user's own `seg_*.ts` is never replaced)."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--live {directory} is a file; pass a directory for the HLS playlist")
    if not directory.is_dir():
        return
    owned = _owned(directory)
    foreign = sorted(p.name for p in [*directory.glob("seg_*.ts"), directory / PLAYLIST]
                     if p.exists() and p.name not in owned)
    if foreign:
        raise UserError(f"--live {directory} already holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                        "which this tool did not write; pass an empty or new directory")


def _owned(directory: Path) -> set[str]:
    """The names an earlier render recorded writing in `directory` (empty without a readable record)."""
    try:
        names = json.loads((directory / OWNED).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and (n == PLAYLIST or (n.startswith("seg_") and n.endswith(".ts")))
            and "/" not in n}


@dataclass(frozen=True)
class LiveSegment:
    """One playlist entry: segment file name, the frames it holds and where they start in the video."""

    name: str
    first_frame: int
    frames: int


class HlsWriter:
    """Writes the segments and the playlist of one render's live output (see the module docstring)."""

    def __init__(self, directory: Path, spec: VideoSpec, audio: Path, layout: str) -> None:
        self.directory, self.spec, self.audio, self.layout = directory, spec, audio, layout
        self.segments: list[LiveSegment] = []
        self.finished = False
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, directory: Path, spec: VideoSpec, audio: Path, done: Sequence[tuple[Path, int]]) -> HlsWriter:
        """Start (or, on resume, rebuild) the live output; `done` = (segment mp4, frames) of finished clips.

        Files the directory holds from another render are replaced; finished clips get their live
        segment again (a stream copy, cheap), so a resumed render's playlist starts complete.
        """
        check_live_dir(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --live directory {directory}: {first_line(e)}") from None
        # held until finish() or close(): one render per live dir
        fd = lock_dir(directory, f"another render is writing its live output to {directory}; give each render "
                                 "its own --live directory")
        try:
            check_live_dir(directory)  # again, under the lock
            for name in _owned(directory):
                (directory / name).unlink(missing_ok=True)  # only what an earlier render recorded writing
            live = cls(directory, spec, audio, audio_layout(audio))
            live._lock_fd = fd
            live._record()
            first = 0
            for index, (segment, frames) in enumerate(done):
                live.add_clip(index, segment, first, frames)
                first += frames
        except BaseException:
            os.close(fd)
            raise
        return live

    def close(self) -> None:
        """Release the live dir's lock (idempotent; finish() does it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the process's end releases it anyway
            pass

    def _record(self, extra: str | None = None) -> None:
        """Rewrite the record of what this writer has written (before it writes `extra`)."""
        names = [PLAYLIST, *(s.name for s in self.segments), *([extra] if extra else [])]
        write_bytes_atomic(self.directory / OWNED, json.dumps({"files": names}).encode(),
                           tmp=self.directory / f"{OWNED}.tmp")

    @property
    def playlist(self) -> Path:
        return self.directory / PLAYLIST

    @property
    def frames(self) -> int:
        """Frames listed in the playlist so far."""
        return sum(s.frames for s in self.segments)

    def add_clip(self, index: int, segment: Path, first_frame: int, frames: int) -> None:
        """Append clip `index` (its finished video-only mp4 `segment`) to the live output."""
        if index != len(self.segments) or first_frame != self.frames:
            raise ValueError(f"live clip {index} at frame {first_frame}, expected {len(self.segments)} at {self.frames}")
        name = _SEGMENT.format(index)
        tmp = self.directory / f".{name}.tmp"
        self._record(name)
        try:
            self._write_segment(segment, tmp, first_frame, frames)
            durable_replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.segments.append(LiveSegment(name, first_frame, frames))
        self._write_playlist()

    def finish(self) -> None:
        """Mark the playlist complete (`#EXT-X-ENDLIST`): players stop polling for more."""
        self.finished = True
        self._write_playlist()
        self.close()

    # ---- files ------------------------------------------------------------------------------------

    def _write_segment(self, segment: Path, tmp: Path, first_frame: int, frames: int) -> None:
        """MPEG-TS: the clip's h264 packets shifted to its place in the video, and its span of speech."""
        import av

        fps = self.spec.fps
        start_s, end_s = first_frame / fps, (first_frame + frames) / fps
        with av.open(str(tmp), mode="w", format="mpegts") as out, av.open(str(segment)) as src:
            # h264 stream copy (the TS muxer converts to annex B itself), shifted to the clip's place
            vstream = out.add_stream_from_template(src.streams.video[0])
            astream = out.add_stream("aac", rate=AAC_RATE, layout=self.layout)
            astream.bit_rate = 128_000
            copy_video(src, out, vstream, start_s)
            for frame in audio_frames(self.audio, start_s, end_s, self.layout):
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)

    def _write_playlist(self) -> None:
        fps = self.spec.fps
        target = max((math.ceil(s.frames / fps) for s in self.segments), default=2)
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:0",
                 "#EXT-X-PLAYLIST-TYPE:EVENT"]
        for s in self.segments:
            lines += [f"#EXTINF:{s.frames / fps:.3f},", s.name]
        if self.finished:
            lines.append("#EXT-X-ENDLIST")
        write_bytes_atomic(self.playlist, ("\n".join(lines) + "\n").encode(),
                           tmp=self.directory / f".{PLAYLIST}.tmp")
        log.debug("live playlist: %d segments, %d frames", len(self.segments), self.frames)


def read_playlist(path: Path) -> tuple[list[tuple[str, float]], bool]:
    """([(segment name, seconds)], ended) of an HLS media playlist (for tests and `inspect`-style checks).

    read_playlist(Path("live/index.m3u8"))  # ([("seg_00000.ts", 1.8), ...], True)
    """
    entries: list[tuple[str, float]] = []
    ended, duration = False, None
    for line in path.read_text().splitlines():
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:"):].split(",")[0])
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line and not line.startswith("#"):
            if duration is None:
                raise ValueError(f"{path}: segment {line} has no #EXTINF")
            entries.append((line, duration))
            duration = None
    return entries, ended
