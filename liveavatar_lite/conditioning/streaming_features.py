"""wav2vec2 features of speech that is still arriving: a sliding window with a fixed lookahead.

`extract_audio_features` (audio_features.py) needs the whole file: it normalises the wave over all
of it, lets attention see up to 40 s, and re-times the 50 Hz states with a scale that depends on
the file's length. A talk session (pipeline/session.py) renders a block as soon as its speech has
arrived, so a block's features must come from the speech so far. This module computes them:

* `samples_needed(f1, window)`: speech samples (from the utterance's start) that video frames
  [.., f1) wait for: their end plus `window.lookahead_s`.
* `streaming_block_features(encoder, wave, f0, f1, window)`: the features of video frames [f0, f1)
  from exactly the first `samples_needed(f1)` samples of `wave`, never more (so they do not depend
  on how the speech was chunked or when it arrived):
    - normalised with the mean and variance of those samples (the whole file's in the batch path);
    - wav2vec2 over a window from `window.context_s` before the block to the end of the lookahead
      (attention and the conv position embedding see that much context and lookahead);
    - re-timed 50 -> 30 -> 25 fps with the nominal scale 5/3 (the batch path's scale
      (T50 - 1) / (T30 - 1) depends on the file's final length, unknown while it streams; the two
      differ by at most ~2.3 wav2vec2 frames (46 ms) at the very end of a file, ~0 at its start).
* `utterance_frames(n)`: video frames an utterance of n samples renders, padded to whole clips
  exactly as a render pads the end of its speech (`num_clips_for_audio` clips of 48 frames).

Once an utterance has ended, a session uses the batch path on the whole utterance instead
(`extract_audio_features`): bit-identical to a render of the same speech. How far the streaming
features are from those is measured in BENCHMARKS.md (Issue 27) and docs/talk.md.

    need = samples_needed(12, StreamingWindow())            # samples the first block waits for
    feats = streaming_block_features(encoder, wave, 0, 12, StreamingWindow())  # [25, dim, 12]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .audio_features import (
    CLIP_FRAMES,
    FEATURE_FPS,
    RESAMPLED_FPS,
    VIDEO_FPS,
    Wav2VecEncoder,
    _hidden_states_window,
    num_clips_for_audio,
    wav2vec_frame_count,
)
from .speech import SAMPLE_RATE

MIN_LOOKAHEAD_S = 0.1  # the re-timing of a block's last frame reads ~2 wav2vec2 frames (40 ms) past it


@dataclass(frozen=True)
class StreamingWindow:
    """What a streaming block's features see: `lookahead_s` of speech past the block's end (every
    block waits for it: the latency floor) and `context_s` before the block's start."""

    lookahead_s: float = 0.4
    context_s: float = 4.0

    def __post_init__(self) -> None:
        if not (MIN_LOOKAHEAD_S <= self.lookahead_s <= 10.0) or not (0.0 <= self.context_s <= 60.0):
            raise ValueError(f"bad streaming window {self}: lookahead must be in [{MIN_LOOKAHEAD_S}, 10] s "
                             "and context in [0, 60] s")


def samples_needed(f1: int, window: StreamingWindow, fps: int = VIDEO_FPS) -> int:
    """Speech samples (16 kHz, from the utterance's start) that video frames up to f1 wait for.

    samples_needed(12, StreamingWindow(lookahead_s=0.4))  # 12/25 s + 0.4 s = 14080
    """
    return math.ceil(f1 * SAMPLE_RATE / fps + window.lookahead_s * SAMPLE_RATE - 1e-6)


def utterance_frames(num_samples: int, clip_frames: int = CLIP_FRAMES) -> int:
    """Video frames an utterance of `num_samples` (16 kHz) renders: whole clips, as a render pads its end."""
    return num_clips_for_audio(num_samples, clip_frames) * clip_frames


def _nominal_taps(f0: int, f1: int, fps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, lam) for video frames [f0, f1): i30 = round(j * 30 / fps) as the batch path, then the
    50 Hz position i30 * 50 / 30 exactly (a rational: lo = floor, lam = the fraction)."""
    j = np.arange(f0, f1, dtype=np.int64)
    i30 = (2 * j * RESAMPLED_FPS + fps) // (2 * fps)
    num = i30 * FEATURE_FPS  # position * RESAMPLED_FPS
    lo = num // RESAMPLED_FPS
    lam = ((num % RESAMPLED_FPS) / RESAMPLED_FPS).astype(np.float32)
    return lo, lo + 1, lam


@torch.no_grad()
def streaming_block_features(encoder: Wav2VecEncoder, wave: np.ndarray, f0: int, f1: int,
                             window: StreamingWindow, *, fps: int = VIDEO_FPS,
                             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Features of video frames [f0, f1) of an utterance from its first `samples_needed(f1)` samples.

    `wave`: float32 [n] at 16 kHz from the utterance's start, n >= samples_needed(f1, window) (the
    samples past that are ignored). Returns [layers, audio_dim, f1 - f0] in `out_dtype`.

        feats = streaming_block_features(enc, wave, 12, 24, StreamingWindow())
    """
    need = samples_needed(f1, window, fps)
    if len(wave) < need:
        raise ValueError(f"frames up to {f1} need {need} samples of speech, have {len(wave)}")
    x = np.asarray(wave[:need], dtype=np.float32)
    kernels, strides = encoder.conv_geometry
    hop = math.prod(strides)
    frames_50 = wav2vec_frame_count(need, kernels, strides)
    lo, hi, lam = _nominal_taps(f0, f1, fps)
    if int(hi.max()) >= frames_50:  # cannot happen with lookahead >= MIN_LOOKAHEAD_S
        raise RuntimeError(f"frame {f1 - 1} reads wav2vec2 frame {int(hi.max())} of {frames_50}")
    w0 = max(0, int(lo.min()) - int(round(window.context_s * FEATURE_FPS)))
    w1 = frames_50  # every frame the prefix gives: the lookahead past the block
    # the normalisation the processor applies to a whole file, over the samples so far
    mean, std = x.mean(), np.sqrt(x.var() + 1e-7)
    values = (x[w0 * hop:] - mean) / std  # the window's samples: frame w0 starts at sample w0 * hop
    h = _hidden_states_window(encoder, values, 0, w1 - w0)  # [layers, w1 - w0, dim]
    lo_t, hi_t = torch.from_numpy(lo - w0), torch.from_numpy(hi - w0)
    lam_t = torch.from_numpy(lam)
    blended = h[:, lo_t] * (1 - lam_t)[None, :, None] + h[:, hi_t] * lam_t[None, :, None]  # [layers, n, dim]
    return blended.transpose(1, 2).to(out_dtype).contiguous()
