"""Audio conditioning: wav2vec2 hidden states -> per-video-frame features, as Live Avatar builds them.

Upstream (Wan `AudioEncoder` + LA `causal_s2v_pipeline.py`):
  1. 16 kHz mono waveform -> `Wav2Vec2Processor` (per-utterance zero mean / unit variance)
  2. `Wav2Vec2ForCTC(output_hidden_states=True)`: 25 hidden states (embedding output + 24 layers),
     each [T50, audio_dim] at 50 Hz (hop 320 samples)
  3. linear interpolation 50 -> 30 fps (`F.interpolate(mode="linear", align_corners=True)`, output
     length int(T50 / 50 * 30))
  4. `get_audio_embed_bucket_fps(fps=25, batch_frames=48, m=0)`: for each 25-fps video frame j the
     30-fps feature at round(j * 30 / 25), zero past the end of the audio, padded to whole clips of 48.

Our layout is [25, audio_dim, n_clips * 48] (layer, channel, video frame); upstream's is the same
tensor with a leading batch dim of 1 ([1, 25, audio_dim, n_clips * 48]).

Steps 3-4 are fused into one gather per video frame (`_video_frame_taps`, equal to upstream within
float rounding). Step 2 runs in overlapping windows for long audio (`AudioChunking`), so ten minutes
of speech never builds the O(T^2) attention of the whole file; audio up to 40 s is one window, i.e.
exactly upstream.

    feats = extract_audio_features(load_wav2vec(ckpt.wav2vec_dir), wave)  # [25, audio_dim, n_clips*48]
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UserError, first_line
from .speech import (
    SAMPLE_RATE,  # the rate load_audio delivers and wav2vec2 expects (16 kHz)
)

log = logging.getLogger(__name__)

FEATURE_FPS = 50  # wav2vec2 frames per second: 16000 / 320 (the conv strides' product)
RESAMPLED_FPS = 30  # upstream's `video_rate`: features are re-timed to 30 Hz before bucketing
VIDEO_FPS = 25
CLIP_FRAMES = 48

# wav2vec2-large-xlsr-53's conv front-end (kernel, stride) per layer; hop = prod(strides) = 320.
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def wav2vec_frame_count(num_samples: int, kernels: tuple[int, ...] = CONV_KERNEL,
                        strides: tuple[int, ...] = CONV_STRIDE) -> int:
    """Frames the conv front-end makes from `num_samples` (unpadded valid convs): ~num_samples / 320."""
    n = num_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def wav2vec_frame_receptive_field(kernels: tuple[int, ...] = CONV_KERNEL,
                                  strides: tuple[int, ...] = CONV_STRIDE) -> int:
    """Samples one 50 Hz frame depends on in the conv front-end (400 for wav2vec2)."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * jump
        jump *= s
    return field


def resampled_frame_count(frames_50: int) -> int:
    """Length after the 50 -> 30 fps re-timing, exactly as upstream: int(T / 50 * 30)."""
    return int(frames_50 / float(FEATURE_FPS) * RESAMPLED_FPS)


def num_clips_for_audio(num_samples: int, clip_frames: int = CLIP_FRAMES,
                        fps: int = VIDEO_FPS) -> int:
    """Clips upstream generates for this much 16 kHz audio: int(T30 / (48 * 30 / 25)) + 1.

    The "+ 1" means the last clip is always partly (or, at exact multiples, wholly) silence-padded.

        nr = num_clips_for_audio(len(wave))  # 10 s of audio -> 6 clips
    """
    return _clips_for_frames(resampled_frame_count(wav2vec_frame_count(num_samples)), clip_frames, fps)


def _clips_for_frames(t30: int, clip_frames: int, fps: int) -> int:
    """Upstream's clip count from the 30 Hz feature length: int(T30 / (clip_frames * 30 / fps)) + 1."""
    return int(t30 / (clip_frames * (RESAMPLED_FPS / fps))) + 1


@dataclass(frozen=True)
class AudioChunking:
    """How wav2vec2 runs on long audio: cores of `chunk_seconds`, each seen with `context_seconds`
    of real neighbouring audio on both sides (the context frames are computed and thrown away).

    Audio no longer than chunk + 2 * context runs in one pass, exactly as upstream. Longer audio is
    not bit-equal to upstream's single pass: the conv front-end (400-sample receptive field) and the
    conv position embedding (128 frames = 2.56 s wide in the real model) are exactly reproduced
    with 5 s of context, but self-attention only sees the window. Measured on the tiny random model
    (where attention is nearly uniform, a worst case) the difference is ~1.4e-3 of the feature range
    (docs/conditioning.md). Peak memory is set by the 40 s window, not the file length."""

    chunk_seconds: float = 30.0
    context_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.chunk_seconds <= 0 or self.context_seconds < 0:
            raise ValueError(f"bad chunking {self}: chunk must be > 0 and context >= 0")


@dataclass(frozen=True)
class Wav2VecEncoder:
    """A loaded wav2vec2 CTC model and its feature extractor (per-utterance normalisation)."""

    model: Any  # transformers Wav2Vec2ForCTC, eval mode
    feature_extractor: Any  # transformers Wav2Vec2FeatureExtractor

    @property
    def conv_geometry(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        cfg = self.model.config
        return tuple(cfg.conv_kernel), tuple(cfg.conv_stride)


def load_wav2vec(model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Wav2VecEncoder:
    """Load `<ckpt>/wav2vec2-large-xlsr-53-english` (model + preprocessor) for feature extraction.

        enc = load_wav2vec(ckpt.wav2vec_dir, device="cuda")
    """
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"wav2vec2 folder {model_dir} does not exist")
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(model_dir))
        model = Wav2Vec2ForCTC.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
        msg = first_line(e)
        raise CheckpointError(f"cannot load wav2vec2 from {model_dir}: {msg}") from None
    return Wav2VecEncoder(model=model.to(device=device, dtype=dtype).eval(), feature_extractor=extractor)


def normalize_waveform(encoder: Wav2VecEncoder, wave: np.ndarray) -> np.ndarray:
    """The processor's per-utterance normalisation over the WHOLE file (never per chunk): [N] float32."""
    values = encoder.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values
    return np.asarray(values[0], dtype=np.float32)


def _chunk_plan(frames: int, chunking: AudioChunking) -> list[tuple[int, int, int, int]]:
    """(window_start, window_end, core_start, core_end) in 50 Hz frames, cores tiling [0, frames)."""
    core = max(1, int(round(chunking.chunk_seconds * FEATURE_FPS)))
    ctx = int(round(chunking.context_seconds * FEATURE_FPS))
    if frames <= core + 2 * ctx:
        return [(0, frames, 0, frames)]
    plan = []
    for a in range(0, frames, core):
        b = min(a + core, frames)
        # at least one frame of right context: a blend that straddles b reads frame b from this window
        plan.append((max(0, a - ctx), min(frames, b + max(ctx, 1)), a, b))
    return plan


@torch.no_grad()
def _hidden_states_window(encoder: Wav2VecEncoder, values: np.ndarray, w0: int, w1: int) -> torch.Tensor:
    """Hidden states of 50 Hz frames [w0, w1) from the normalised wave: [layers, w1 - w0, dim] fp32 CPU.

    Frame k covers samples [320 k, 320 k + 400), so a window starting at sample 320 * w0 yields
    global frames w0, w0+1, ... with identical conv front-end outputs.
    """
    kernels, strides = encoder.conv_geometry
    hop = math.prod(strides)
    receptive = wav2vec_frame_receptive_field(kernels, strides)
    s0, s1 = w0 * hop, min(len(values), (w1 - 1) * hop + receptive)
    model = encoder.model
    param = next(model.parameters())
    x = torch.from_numpy(values[s0:s1])[None].to(device=param.device, dtype=param.dtype)  # [1, samples]
    out = model.wav2vec2(x, output_hidden_states=True)
    h = torch.stack([t[0] for t in out.hidden_states])  # [layers, frames_in_window, dim]
    if h.shape[1] < w1 - w0:
        raise RuntimeError(f"wav2vec2 window gave {h.shape[1]} frames, expected {w1 - w0}")
    return h[:, : w1 - w0].float().cpu()


@dataclass(frozen=True)
class _FrameTaps:
    """Per output video frame: which two 50 Hz frames to blend and how (zeros where `valid` is False)."""

    lo: np.ndarray  # [n_out] int64
    hi: np.ndarray  # [n_out] int64
    lam: np.ndarray  # [n_out] float32, weight of `hi`
    valid: np.ndarray  # [n_out] bool


def _video_frame_taps(frames_50: int, n_clips: int, clip_frames: int, fps: int) -> _FrameTaps:
    """Compose upstream's two steps into one gather per 25-fps video frame j:

    bucket: i30 = round(j * 30 / fps) (j / fps seconds at 30 Hz; never a .5 tie for fps=25),
            zero when i30 >= T30;
    interp: F.interpolate(linear, align_corners=True) from T50 to T30 samples position
            p = i30 * (T50 - 1) / (T30 - 1); blend frames floor(p) and floor(p) + 1 (clamped).
    """
    t30 = resampled_frame_count(frames_50)
    n_out = n_clips * clip_frames
    j = np.arange(n_out, dtype=np.int64)
    # round(j * 30 / fps) in exact integer arithmetic (= floor(x + 0.5))
    i30 = (2 * j * RESAMPLED_FPS + fps) // (2 * fps)
    valid = i30 < t30
    # PyTorch computes the align_corners scale and the source position in fp32 for fp32 inputs
    scale = np.float32(frames_50 - 1) / np.float32(t30 - 1) if t30 > 1 else np.float32(0.0)
    pos = np.where(valid, i30, 0).astype(np.float32) * scale
    lo = np.floor(pos).astype(np.int64)
    lam = (pos - lo.astype(np.float32)).astype(np.float32)
    hi = np.minimum(lo + 1, frames_50 - 1)
    return _FrameTaps(lo=lo, hi=hi, lam=lam, valid=valid)


def extract_audio_features(
    encoder: Wav2VecEncoder,
    wave: np.ndarray,
    *,
    chunking: AudioChunking = AudioChunking(),
    clip_frames: int = CLIP_FRAMES,
    fps: int = VIDEO_FPS,
    out_dtype: torch.dtype = torch.float32,
    num_clips: int | None = None,
) -> torch.Tensor:
    """Per-video-frame features of a 16 kHz mono wave: [layers (25), audio_dim, n_clips * clip_frames].

    `num_clips` (the clips a render will make, e.g. --num-clip) limits the work to those clips'
    frames: the wave is still normalised as a whole and every window keeps its real context, so the
    result equals the first num_clips * clip_frames frames of the full computation.

    Frame j holds the 25 wav2vec2 hidden states at time j / fps (via the 30 Hz re-timing above);
    frames past the end of the audio are zero up to whole clips; n_clips = num_clips_for_audio(len(wave)).
    Memory: the output is 25 * audio_dim * 4 bytes per video frame (1.5 GB for 10 min at width 1024 in
    fp32; pass out_dtype=torch.bfloat16 to halve it); the model only ever sees one chunk window.

        feats = extract_audio_features(load_wav2vec(ckpt.wav2vec_dir), load_audio("speech.wav"))
    """
    from tqdm import tqdm

    kernels, strides = encoder.conv_geometry
    frames_50 = wav2vec_frame_count(len(wave), kernels, strides)
    if resampled_frame_count(frames_50) < 1:
        min_ms = 1000 * (wav2vec_frame_receptive_field(kernels, strides) + math.prod(strides)) / SAMPLE_RATE
        raise UserError(f"audio is too short ({len(wave)} samples); need at least {min_ms:.0f} ms")
    values = normalize_waveform(encoder, wave)
    n_clips = _clips_for_frames(resampled_frame_count(frames_50), clip_frames, fps)
    if num_clips is not None:
        n_clips = max(1, min(n_clips, num_clips))
    taps = _video_frame_taps(frames_50, n_clips, clip_frames, fps)
    needed = int(taps.hi[taps.valid].max()) + 1 if taps.valid.any() else 0  # 50 Hz frames read

    cfg = encoder.model.config
    layers = cfg.num_hidden_layers + 1
    out = torch.zeros(layers, cfg.hidden_size, n_clips * clip_frames, dtype=out_dtype)
    plan = [c for c in _chunk_plan(frames_50, chunking) if c[2] < needed]  # cores the clips read
    log.info("wav2vec2: %d frames at 50 Hz in %d chunk(s) -> %d clips", frames_50, len(plan), n_clips)
    for w0, w1, a, b in tqdm(plan, desc="audio features", unit="chunk", disable=len(plan) == 1):
        h = _hidden_states_window(encoder, values, w0, w1)  # [layers, w1 - w0, dim]
        sel = np.nonzero(taps.valid & (taps.lo >= a) & (taps.lo < b))[0]
        if len(sel) == 0:
            continue
        lo = torch.from_numpy(taps.lo[sel] - w0)
        hi = torch.from_numpy(taps.hi[sel] - w0)
        lam = torch.from_numpy(taps.lam[sel])  # [n_sel]
        # PyTorch's linear blend: (1 - lam) * x[lo] + lam * x[hi]; [layers, n_sel, dim]
        blended = h[:, lo] * (1 - lam)[None, :, None] + h[:, hi] * lam[None, :, None]
        out[:, :, torch.from_numpy(sel)] = blended.transpose(1, 2).to(out_dtype)  # [layers, dim, n_sel]
    return out
