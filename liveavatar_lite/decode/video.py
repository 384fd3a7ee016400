"""Crash-safe mp4 output: h264 clip segments written as frames arrive, muxed with the speech (aac).

An mp4 cannot be appended to after a crash (its index is written on close), so a render writes one
video-only h264 segment per clip (`ClipSegmentWriter`, frames appended as soon as they are decoded,
so memory does not grow with video length). When every clip is done, `mux_segments` stream-copies
the segments (no re-encode) into `OUT.tmp` together with the audio encoded as aac, and renames
`OUT.tmp` to `OUT`: nothing that looks like a finished video exists before the render is complete.
Where the segments live between crashes is `pipeline/workdir.py`'s job.

    seg = ClipSegmentWriter(0, Path("clip.mp4.part"), Path("clip.mp4"), VideoSpec(height=384, width=704))
    seg.append(frames_uint8_thwc); seg.close()
    mux_segments([Path("clip.mp4")], Path("speech.wav"), Path("out.mp4"), VideoSpec(384, 704))
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import durable_replace

log = logging.getLogger(__name__)

AAC_RATE = 48000  # aac frames are 1024 samples: 21 ms at 48 kHz, well under one 40 ms video frame
_H264_CANDIDATES = ("libx264", "h264", "libopenh264", "h264_nvenc")


@dataclass(frozen=True)
class VideoSpec:
    """What every segment of one render is encoded with (identical settings keep segments joinable)."""

    height: int
    width: int
    fps: int = 25
    crf: int = 18
    preset: str = "medium"
    threads: int = 4  # fixed, so the bitstream does not depend on the machine's core count


def h264_encoder_name() -> str:
    """The h264 encoder PyAV's FFmpeg offers here, preferring libx264.

    h264_encoder_name()  # 'libx264'
    """
    import av

    for name in _H264_CANDIDATES:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - PyAV raises several types for "unknown codec"
            continue
        return name
    raise UserError("this PyAV build has no h264 encoder (install PyAV wheels from PyPI, which bundle libx264)")


class ClipSegmentWriter:
    """One clip's frames -> a video-only h264 mp4 written under a temporary name.

    seg = ClipSegmentWriter(path, spec); seg.append(frames); seg.close()  # then the owner renames
    """

    def __init__(self, index: int, path: Path, final_path: Path, spec: VideoSpec) -> None:
        import av

        self.index, self.path, self.final_path, self.spec = index, path, final_path, spec
        self.frames = 0
        self._container = av.open(str(path), mode="w", format="mp4")
        stream = self._container.add_stream(h264_encoder_name(), rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        # No B-frames: every segment's decode order equals display order, so segments concatenate
        # by shifting timestamps alone.
        stream.options = {"crf": str(spec.crf), "preset": spec.preset, "bf": "0", "threads": str(spec.threads)}
        self._stream = stream

    def append(self, frames: np.ndarray) -> None:
        """Encode frames uint8 [T, H, W, 3] (RGB) and write their packets now."""
        import av

        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.spec.height, self.spec.width, 3):
            raise ValueError(f"frames must be uint8 [T, {self.spec.height}, {self.spec.width}, 3], got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        self.frames += int(frames.shape[0])

    def close(self) -> None:
        """Flush the encoder and finish the file (the owner then renames it into place)."""
        for packet in self._stream.encode():  # flush the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()

    def abort(self) -> None:
        """Drop the unfinished segment (error path)."""
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - best effort on an error path; the file is deleted next
            pass
        self.path.unlink(missing_ok=True)


def _read_audio_blocks(path: Path, block: int, start_s: float = 0.0) -> tuple[int, int, Iterator[np.ndarray]]:
    """(sample_rate, channels, blocks of float32 [n, channels]) streamed from an audio file from `start_s`
    (decoded by libsndfile, or PyAV for m4a/aac, opus, ...: `liveavatar_lite.audiofile`)."""
    from ..audiofile import open_audio

    src = open_audio(path, "audio file")
    return src.rate, src.channels, src.blocks(block, start_s=start_s)


def audio_frames(path: Path, start_s: float, end_s: float, layout: str) -> Iterator[object]:
    """The speech from `start_s` to `end_s` as 48 kHz av.AudioFrames, zero-padded past its end.

    Timestamps are absolute (sample `round(start_s * 48000)` first), so spans written into separate
    files line up on one timeline. The whole video is the span (0, frames / fps).
    """
    import av

    rate, channels, blocks = _read_audio_blocks(path, block=1 << 16, start_s=start_s)
    keep_in = math.ceil((end_s - start_s) * rate)  # source samples needed
    first = round(start_s * AAC_RATE)
    keep_out = round(end_s * AAC_RATE) - first  # samples the aac stream must carry
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=AAC_RATE)
    out_count = 0
    pts = first

    def source() -> Iterator[np.ndarray]:
        taken = 0
        for data in blocks:
            data = data[: keep_in - taken]
            if data.shape[1] > 2 or (layout == "mono" and data.shape[1] != 1):
                data = data.mean(axis=1, keepdims=True)  # [n, 1]: downmix what aac stereo cannot carry
            if layout == "stereo" and data.shape[1] == 1:
                data = np.repeat(data, 2, axis=1)  # [n, 2]
            taken += len(data)
            if len(data):
                yield data
            if taken >= keep_in:
                return
        if taken < keep_in:  # the video outlasts the speech: pad with silence
            yield np.zeros((keep_in - taken, 2 if layout == "stereo" else 1), np.float32)

    def resampled() -> Iterator[np.ndarray]:
        for data in source():
            # packed float: [1, n * channels], samples interleaved as in the [n, channels] array
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data).reshape(1, -1), format="flt", layout=layout)
            frame.sample_rate = rate
            for out in resampler.resample(frame):
                yield out.to_ndarray()  # fltp: [channels, n]
        for out in resampler.resample(None):
            yield out.to_ndarray()

    for planes in resampled():
        planes = planes[:, : keep_out - out_count]
        if planes.shape[1]:
            yield _make_frame(planes, layout, pts)
            pts += planes.shape[1]
            out_count += planes.shape[1]
    if out_count < keep_out:
        yield _make_frame(np.zeros((2 if layout == "stereo" else 1, keep_out - out_count), np.float32), layout, pts)


def copy_video(src: Any, out: Any, vstream: Any, start_s: float) -> None:
    """Mux every packet of `src`'s video stream into `vstream` of `out` (a stream copy, no re-encode),
    shifted to start at `start_s`: segment timestamps start at 0."""
    sstream = src.streams.video[0]
    offset = round(start_s / sstream.time_base)
    for packet in src.demux(sstream):
        if packet.dts is None:  # the demuxer's end-of-stream marker
            continue
        packet.pts += offset
        packet.dts += offset
        packet.stream = vstream
        out.mux(packet)


def audio_layout(path: Path) -> str:
    """The aac channel layout for a speech file: "stereo" for 2+ channels, else "mono"."""
    from ..audiofile import open_audio

    return "stereo" if open_audio(path, "audio file").channels >= 2 else "mono"


def _make_frame(planes: np.ndarray, layout: str, pts: int) -> object:
    """An aac-rate av.AudioFrame from float32 planes [channels, n], starting at sample `pts`."""
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, dtype=np.float32), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = AAC_RATE, pts
    return frame


def mux_segments(segments: list[Path], audio: Path, out: Path, spec: VideoSpec, audio_bitrate: int = 192_000) -> int:
    """Join clip segments (stream copy) with `audio` as aac into `out`, atomically; returns the frame count.

    The audio is cut or padded with silence to the video's length, so both durations agree within
    one aac frame (21 ms). Writes `out.tmp` and renames it only when complete.

    n = mux_segments([Path("clip_00000.mp4")], Path("speech.wav"), Path("out.mp4"), VideoSpec(384, 704))
    """
    import av

    if not segments:
        raise ValueError("no segments to mux")
    counts = []
    for seg in segments:
        with av.open(str(seg)) as c:
            counts.append(c.streams.video[0].frames)
    total = sum(counts)
    layout = audio_layout(audio)
    tmp = out.with_name(out.name + ".tmp")
    try:
        _mux(segments, counts, audio, tmp, spec, layout, audio_bitrate, total)
        durable_replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def _mux(segments: list[Path], counts: list[int], audio: Path, tmp: Path, spec: VideoSpec,
         layout: str, bitrate: int, total: int) -> None:
    """Write the muxed mp4 to `tmp`: video packets copied with shifted timestamps, aac interleaved."""
    import av

    with av.open(str(tmp), mode="w", format="mp4") as out:
        with av.open(str(segments[0])) as first:
            vstream = out.add_stream_from_template(first.streams.video[0])
        astream = out.add_stream("aac", rate=AAC_RATE, layout=layout)
        astream.bit_rate = bitrate
        frames_in = audio_frames(audio, 0.0, total / spec.fps, layout)
        pending = None
        frames_written = 0
        for seg, count in zip(segments, counts):
            with av.open(str(seg)) as src:
                copy_video(src, out, vstream, frames_written / spec.fps)
            frames_written += count
            # Interleave: audio up to the end of this segment, so the muxer never buffers a whole track.
            limit = round(frames_written / spec.fps * AAC_RATE)
            while True:
                frame = pending if pending is not None else next(frames_in, None)
                pending = None
                if frame is None:
                    break
                if frame.pts >= limit and frames_written < total:
                    pending = frame
                    break
                for packet in astream.encode(frame):
                    out.mux(packet)
        for packet in astream.encode(None):
            out.mux(packet)
