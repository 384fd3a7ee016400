"""Read any speech file as float32 blocks at its own rate: libsndfile first, PyAV (FFmpeg) when it cannot.

libsndfile (soundfile) reads wav, flac, ogg/vorbis, mp3 and aiff; m4a/aac, opus, webm and the audio
of video files go through PyAV's bundled FFmpeg. Either way the samples come back at the file's own
rate: resampling is the caller's business (the wav2vec2 path uses conditioning/speech.py's resampler,
the mp4's aac track its encoder's input conversion), so no second resampler hides in here.

    audio = open_audio(Path("speech.m4a"))          # UserError (one line) if unreadable
    audio.rate, audio.channels                      # 44100, 2
    for block in audio.blocks(1 << 16): ...         # float32 [n, channels], in order
    data = read_audio(Path("speech.m4a")).data      # float32 [N, channels], all of it
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError, first_line
from .fileio import require_file

SUPPORTED = "wav, flac, ogg, mp3, aiff, m4a/aac, opus, webm"
# What a speech file's header may claim, checked before any sample is decoded: an absurd rate or
# channel count in a 100 KB file must not become gigabytes of decoded or resampled samples.
MIN_RATE, MAX_RATE = 4000, 192_000
MAX_CHANNELS = 8


@dataclass(frozen=True)
class AudioSource:
    """An opened audio file: its rate and channel count, and a way to stream its samples."""

    path: Path
    rate: int
    channels: int
    backend: str  # "soundfile" | "pyav"
    frames: int | None = None  # samples per channel as the header states (None: not stated)

    @property
    def seconds(self) -> float | None:
        """The duration the header states (None when it states none)."""
        return None if self.frames is None else self.frames / self.rate

    def blocks(self, block: int = 1 << 16, start_s: float = 0.0) -> Iterator[np.ndarray]:
        """float32 [n, channels] blocks from sample floor(start_s * rate) on (n <= block for soundfile;
        one decoded frame each for PyAV); nothing when `start_s` is past the end."""
        start = math.floor(start_s * self.rate)
        try:
            if self.backend == "soundfile":
                yield from _sf_blocks(self.path, block, start)
            else:
                yield from _av_blocks(self.path, start)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - both libraries raise their own error types mid-file
            raise UserError(f"cannot read audio {self.path}: {first_line(e)}") from None


@dataclass(frozen=True)
class DecodedAudio:
    data: np.ndarray  # float32 [N, channels]
    rate: int


def open_audio(path: str | Path, what: str = "audio file") -> AudioSource:
    """Probe `path` with soundfile, then PyAV; UserError naming the file when neither can read it."""
    path = require_file(path, what)
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return _checked(AudioSource(path, int(info.samplerate), int(info.channels), "soundfile", int(info.frames)))
    except UserError:
        raise
    except Exception as sf_error:  # noqa: BLE001 - libsndfile: LibsndfileError/RuntimeError/TypeError
        reason = first_line(sf_error)
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UserError(f"cannot read audio {path}: the file has no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            channels = int(stream.codec_context.channels or 0)
            frames = None
            if stream.duration is not None and stream.time_base is not None:
                frames = math.ceil(float(stream.duration * stream.time_base) * rate)
            elif container.duration is not None:
                frames = math.ceil(container.duration / 1e6 * rate)  # (av.time_base: microseconds)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - PyAV raises InvalidDataError etc.; report libsndfile's reason
        raise UserError(f"cannot read audio {path}: {reason} (supported: {SUPPORTED})") from None
    if rate <= 0 or channels <= 0:
        raise UserError(f"cannot read audio {path}: no sample rate or channel count in its audio stream")
    return _checked(AudioSource(path, rate, channels, "pyav", frames))


def _checked(src: AudioSource) -> AudioSource:
    """`src` if its header's rate and channel count are ones a speech file has; else UserError."""
    if not MIN_RATE <= src.rate <= MAX_RATE:
        raise UserError(f"audio {src.path} has a sample rate of {src.rate} Hz; speech from {MIN_RATE} to "
                        f"{MAX_RATE} Hz is accepted (convert it: ffmpeg -i IN -ar 16000 OUT.wav)")
    if src.channels > MAX_CHANNELS:
        raise UserError(f"audio {src.path} has {src.channels} channels; at most {MAX_CHANNELS} are accepted")
    return src


def read_audio(path: str | Path, what: str = "audio file") -> DecodedAudio:
    """The whole file: float32 [N, channels] at its own rate (UserError if unreadable)."""
    src = open_audio(path, what)
    parts = list(src.blocks())
    data = np.concatenate(parts, axis=0) if parts else np.zeros((0, src.channels), np.float32)
    return DecodedAudio(data, src.rate)


def _sf_blocks(path: Path, block: int, start: int) -> Iterator[np.ndarray]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        if start >= f.frames:
            return
        f.seek(start)
        while True:
            data = f.read(block, dtype="float32", always_2d=True)  # [n, channels]
            if not len(data):
                return
            yield data


_INT_SCALE = {"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def _frame_samples(frame: Any) -> np.ndarray:
    """One decoded av.AudioFrame as float32 [n, channels], converted (not resampled) from its format."""
    arr = frame.to_ndarray()
    fmt = frame.format.name.rstrip("p")  # "fltp" -> "flt", "s16p" -> "s16"
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        arr = arr.T  # [channels, n] -> [n, channels]
    else:
        arr = arr.reshape(-1, channels)  # packed: [1, n * channels], samples interleaved
    if fmt == "u8":
        return (arr.astype(np.float32) - 128.0) / 128.0
    if fmt in _INT_SCALE:
        return (arr.astype(np.float64) / _INT_SCALE[fmt]).astype(np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _av_blocks(path: Path, start: int) -> Iterator[np.ndarray]:
    """Decoded from the beginning (compressed streams seek to packets, not samples), skipping `start` samples."""
    import av

    skipped = 0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            samples = _frame_samples(frame)
            if skipped < start:
                drop = min(start - skipped, len(samples))
                samples, skipped = samples[drop:], skipped + drop
            if len(samples):
                yield samples
