"""The driving speech: any audio file -> float32 mono at 16 kHz, the rate wav2vec2 expects.

Audio: any format libsndfile reads (wav, flac, ogg/vorbis, mp3, aiff, ...), or PyAV for the rest
(m4a/aac, opus, webm; `liveavatar_lite.audiofile` decodes without resampling), channels averaged to
mono (as librosa does), resampled to 16 kHz with band-limited windowed-sinc interpolation: our own
small version of the method torchaudio.functional.resample uses, with a Kaiser window (64 zero
crossings, roll-off 0.96, beta 10), tuned to sit close to the soxr_hq filter upstream's librosa
uses; the remaining difference is measured in docs/conditioning.md. 16 kHz input passes untouched.

    wave = load_audio("speech.flac")            # np.float32 [N] at 16 kHz
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

SAMPLE_RATE = 16000
_SILENCE_PEAK = 1e-5  # -100 dBFS: a file whose every sample is below this carries no speech
MAX_SPEECH_SECONDS = 4 * 3600.0  # the longest speech decoded at all (a service passes its own, smaller limit)
# The resampler's kernel has (up * taps) entries for a rate ratio up/down in lowest terms: 0.13 M for
# 44.1 kHz, but 0.7 G (5.6 GB) for a 44101 Hz file. Rates whose kernel would pass this are refused.
MAX_KERNEL = 4_000_000


class SpeechTooLong(UserError):
    """The speech is longer than the caller accepts (found from the header, or while decoding)."""


def kernel_size(sr_in: int, sr_out: int = SAMPLE_RATE, zero_crossings: int = 64, rolloff: float = 0.96) -> int:
    """Entries of `resample`'s kernel from sr_in to sr_out (0 when the rates are equal).

    kernel_size(44100)  # 129440
    """
    if sr_in == sr_out:
        return 0
    g = math.gcd(sr_in, sr_out)
    down, up = sr_in // g, sr_out // g
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    return up * (down + 2 * math.ceil(zero_crossings / (2 * cutoff)))


def resample(wave: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, *, zero_crossings: int = 64,
             rolloff: float = 0.96, beta: float = 10.0) -> np.ndarray:
    """Band-limited resampling of a mono float signal by the exact rational ratio sr_out / sr_in.

    Output sample m sits at input time t = m * sr_in / sr_out and is sum_j x[j] * h(t - j), with h a
    low-pass sinc (cut-off rolloff * min(sr_in, sr_out) / 2) under a Kaiser window (beta 10, about
    100 dB stop-band) spanning `zero_crossings` lobes each side. With the ratio reduced to up/down,
    each output phase i in [0, up) has one fixed kernel, so the whole resampling is one strided
    conv1d with `up` output channels.

        y = resample(x, 44100, 16000)  # len(y) == ceil(len(x) * 16000 / 44100)
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return wave.astype(np.float32, copy=False)
    kernel, up, down, pad = _resample_kernel(sr_in, sr_out, zero_crossings, rolloff, beta)
    taps = kernel.shape[1]
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    n_out = math.ceil(len(wave) * up / down)
    n_blocks = math.ceil(n_out / up)
    right = max(0, n_blocks * down + taps - down - (len(wave) + pad))
    x = F.pad(x[None, None], (pad, right))  # [1, 1, pad + N + right]
    # conv1d correlates: y[q, i] = sum_k kernel[i, k] * x_pad[q*down + k], x_pad[q*down + k] = x[j]
    y = F.conv1d(x, kernel[:, None, :], stride=down)  # [1, up, n_blocks]
    y = y[0].transpose(0, 1).reshape(-1)[:n_out]  # [n_blocks * up] -> interleaved by phase
    return y.numpy().astype(np.float32, copy=False)


def _resample_kernel(sr_in: int, sr_out: int, zero_crossings: int = 64, rolloff: float = 0.96,
                     beta: float = 10.0) -> tuple[torch.Tensor, int, int, int]:
    """(kernel float32 [up, taps], up, down, pad) of `resample` from sr_in to sr_out (rates unequal):
    one output phase per row; each output block of `up` samples reads `taps` = down + 2 * pad inputs."""
    g = math.gcd(sr_in, sr_out)
    down, up = sr_in // g, sr_out // g
    cutoff = 0.5 * rolloff * min(1.0, up / down)  # cycles per input sample
    half_width = zero_crossings / (2 * cutoff)  # window half-length in input samples
    pad = math.ceil(half_width)
    taps = down + 2 * pad  # kernel span: one block of `down` inputs plus the window on each side
    # tau[i, k] = t - j for phase i and tap k (block-relative input index k - pad)
    phase_t = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # [up, 1]
    tau = phase_t + pad - torch.arange(taps, dtype=torch.float64)[None, :]  # [up, taps]
    inside = (1 - (tau / half_width) ** 2).clamp(min=0)
    i0_beta = torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    window = torch.special.i0(beta * inside.sqrt()) / i0_beta
    window = torch.where(tau.abs() <= half_width, window, 0.0)
    kernel = 2 * cutoff * torch.sinc(2 * cutoff * tau) * window  # [up, taps]
    return kernel.float(), up, down, pad


class StreamResampler:
    """`resample` for speech that arrives in pieces (a talk session's microphone or TTS): `push(x)`
    returns the output samples whose whole kernel window of input has arrived, `flush()` the rest
    (the end padded with zeros exactly as `resample` pads it). The state is the input not yet
    consumed (at most one kernel span) and the next output block. Pieces of any length give the
    same samples as one `resample` of their concatenation (each output sample is the same dot
    product; tests/test_session_features.py bounds the difference). Equal rates pass through.

        rs = StreamResampler(48000); y = np.concatenate([rs.push(a), rs.push(b), rs.flush()])
    """

    def __init__(self, sr_in: int, sr_out: int = SAMPLE_RATE) -> None:
        if sr_in <= 0 or sr_out <= 0:
            raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
        self.sr_in, self.sr_out = sr_in, sr_out
        self.passthrough = sr_in == sr_out
        self._n_in = 0  # input samples pushed
        self._q = 0  # next output block (of `up` samples) to compute
        if not self.passthrough:
            self._kernel, self._up, self._down, pad = _resample_kernel(sr_in, sr_out)
            self._taps = self._kernel.shape[1]
            self._buf = np.zeros(pad, np.float32)  # the zero-padded input from sample q * down on

    def push(self, x: np.ndarray) -> np.ndarray:
        """Resampled output now computable after appending `x` (float32 [n]): float32 [m]."""
        x = np.asarray(x, dtype=np.float32)
        self._n_in += len(x)
        if self.passthrough:
            return x
        self._buf = np.concatenate([self._buf, x])
        ready = (len(self._buf) - self._taps) // self._down + 1 if len(self._buf) >= self._taps else 0
        return self._blocks(ready)

    def flush(self) -> np.ndarray:
        """The remaining output (the input's end zero-padded): after it, len(all output) equals
        len(resample(all input)). The resampler is spent afterwards."""
        if self.passthrough:
            return np.zeros(0, np.float32)
        n_out = math.ceil(self._n_in * self._up / self._down)
        remaining = math.ceil(n_out / self._up) - self._q
        if remaining <= 0:
            return np.zeros(0, np.float32)
        want = (remaining - 1) * self._down + self._taps
        if len(self._buf) < want:
            self._buf = np.concatenate([self._buf, np.zeros(want - len(self._buf), np.float32)])
        first = self._q * self._up
        y = self._blocks(remaining)
        return y[: n_out - first]

    def _blocks(self, count: int) -> np.ndarray:
        """Output blocks q .. q + count - 1 from the buffer, then drop the input they alone needed."""
        if count <= 0:
            return np.zeros(0, np.float32)
        seg = torch.from_numpy(np.ascontiguousarray(self._buf[: (count - 1) * self._down + self._taps]))
        y = F.conv1d(seg[None, None], self._kernel[:, None, :], stride=self._down)  # [1, up, count]
        self._buf = self._buf[count * self._down:]
        self._q += count
        return y[0].transpose(0, 1).reshape(-1).numpy().astype(np.float32, copy=False)


def load_audio(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz: np.ndarray [N].

    Decoded by libsndfile, or by PyAV for what it cannot read (m4a/aac, opus, ...): see
    `liveavatar_lite.audiofile`; either way resampled here, by `resample` only.
    Raises UserError (one line) for a missing, unreadable, empty, non-finite or silent file, and
    SpeechTooLong past `max_seconds` (default MAX_SPEECH_SECONDS). The rate, channel count and
    stated duration are checked from the header before decoding; the decode itself stops at the
    limit (a header may lie), mixing each block to mono as it comes: memory is bounded by the limit.

        wave = load_audio("speech.wav")
    """
    from ..audiofile import open_audio

    path = Path(path)
    limit = MAX_SPEECH_SECONDS if max_seconds is None else min(max_seconds, MAX_SPEECH_SECONDS)
    src = open_audio(path, "audio file")  # UserError for an unreadable file or an absurd rate / channels
    sr = src.rate
    if kernel_size(sr) > MAX_KERNEL:
        raise UserError(f"audio {path} has an unusual sample rate ({sr} Hz); convert it to a common one "
                        "(e.g. ffmpeg -i IN -ar 16000 OUT.wav)")
    if src.seconds is not None and src.seconds > limit:
        raise SpeechTooLong(f"the audio {path} is {src.seconds:.1f} s long; at most {limit:g} s are accepted")
    max_samples = math.floor(limit * sr) + sr  # a second of slack over what the header may have rounded
    parts, n = [], 0
    for block in src.blocks():  # float32 [n, channels]
        parts.append(block.mean(axis=1))  # channels averaged, as librosa.load(mono=True)
        n += len(parts[-1])
        if n > max_samples:
            raise SpeechTooLong(f"the audio {path} is longer than {limit:g} s, the most accepted")
    if n == 0:
        raise UserError(f"audio {path} is empty (0 samples)")
    wave = np.concatenate(parts).astype(np.float32, copy=False)  # [N]
    if not np.isfinite(wave).all():
        raise UserError(f"audio {path} contains NaN or infinite samples")
    if float(np.abs(wave).max()) < _SILENCE_PEAK:
        raise UserError(f"audio {path} is silent (every sample is below -100 dBFS)")
    return resample(wave, int(sr), SAMPLE_RATE)
