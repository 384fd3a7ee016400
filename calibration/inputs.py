"""The calibration set: a few prompts, synthesized speech-like clips and procedural portraits.

Nothing is downloaded. Clips are voiced "syllables" (a glottal pulse train at a drifting pitch
through three formant resonators, with a 4 Hz syllable envelope and short pauses); images are a
face-like ellipse with eyes and mouth on a gradient background. `build_conditioning` turns each
sample into the DiT's inputs with the checkpoint's own encoders (umT5 + tokenizer, wav2vec2, the
VAE) when they are present; for a DiT-only checkpoint it substitutes seeded Gaussian tensors of
the right shapes for the missing encoders (logged).

    samples = default_samples(2, seconds=2.0, height=128, width=128)
    inputs = build_conditioning(CheckpointDir(p), preset, samples, torch.float32)  # [GenerationInputs]
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from liveavatar_lite.artifact.checkpoint import (
    CheckpointDir,
    load_pth,
    materialize_strict,
)
from liveavatar_lite.config import ModelPreset, SampleConfig
from liveavatar_lite.pipeline.generator import GenerationInputs

log = logging.getLogger(__name__)

PROMPTS = (
    "A woman with short dark hair talks calmly to the camera in a bright office.",
    "An old man with a grey beard tells a story, smiling, warm evening light.",
    "A young presenter speaks energetically, gesturing, studio background.",
    "A cartoon fox character explains something, expressive face, flat colors.",
)
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration input: a prompt, a 16 kHz mono speech-like wave, a portrait [3, H, W] in [-1, 1]."""

    name: str
    prompt: str
    wave: np.ndarray
    image: torch.Tensor


def default_samples(n: int = 2, seconds: float = 2.0, height: int = 128, width: int = 128, seed: int = 0) -> list[CalibrationSample]:
    """`n` samples (prompts cycle through PROMPTS); the same arguments always give the same samples."""
    rng = np.random.default_rng(seed)
    return [
        CalibrationSample(f"sample{i}", PROMPTS[i % len(PROMPTS)], synth_speech(seconds, rng), portrait((height, width), rng))
        for i in range(n)
    ]


def synth_speech(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced, syllabic signal with speech-like spectrum and rhythm, peak 0.5."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)  # Hz, slow intonation
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)  # glottal pulse train
    out = np.zeros(n)
    for formant in (500 + 300 * rng.random(), 1400 + 600 * rng.random(), 2500 + 400 * rng.random()):
        r = math.exp(-math.pi * 120 / SAMPLE_RATE)  # 120 Hz bandwidth resonator
        a1, a2 = 2 * r * math.cos(2 * math.pi * formant / SAMPLE_RATE), -r * r
        y = np.zeros(n)
        y1 = y2 = 0.0
        for i in range(n):  # 2-pole IIR, kept explicit: no scipy dependency
            y0 = pulses[i] + a1 * y1 + a2 * y2
            y[i], y2, y1 = y0, y1, y0
        out += y
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))  # 4 syllables per second
    pause = (np.sin(2 * np.pi * 0.45 * t + rng.random() * 6) > -0.8).astype(np.float64)
    out = out * syllables * pause + 0.003 * rng.standard_normal(n)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def portrait(hw: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """[3, H, W] in [-1, 1]: gradient background, skin-toned ellipse, dark eyes and mouth."""
    h, w = hw
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    bg = torch.tensor(rng.random(3), dtype=torch.float32)[:, None, None] * (0.5 + 0.5 * y)  # [3, H, W]
    face = ((x / 0.45) ** 2 + ((y + 0.05) / 0.6) ** 2) < 1
    skin = torch.tensor([0.85, 0.65, 0.5]) * (0.8 + 0.4 * float(rng.random()))
    img = torch.where(face, skin[:, None, None], bg)
    eyes = (((x.abs() - 0.18) / 0.07) ** 2 + ((y + 0.15) / 0.05) ** 2) < 1
    mouth = ((x / 0.16) ** 2 + ((y - 0.3) / 0.04) ** 2) < 1
    img = torch.where(eyes | mouth, torch.full((3, 1, 1), 0.1), img)
    return (img * 2 - 1).clamp(-1, 1)


def build_conditioning(ck: CheckpointDir, preset: ModelPreset, samples: Sequence[CalibrationSample],
                       dtype: torch.dtype) -> list[GenerationInputs]:
    """GenerationInputs per sample, from the checkpoint's encoders (Gaussian stand-ins where absent)."""
    cfg, sample_cfg = preset.dit, SampleConfig()
    g = torch.Generator().manual_seed(0)
    text_fn = _text_encoder(ck, preset)
    audio_fn = _audio_encoder(ck)
    vae = _vae(ck, preset)
    out = []
    with torch.no_grad():
        for s in samples:
            h, w = s.image.shape[1] // 8, s.image.shape[2] // 8
            text = text_fn(s.prompt) if text_fn else torch.randn(16, cfg.text_dim, generator=g)
            frames = max(1, math.ceil(len(s.wave) / SAMPLE_RATE * sample_cfg.fps / sample_cfg.infer_frames)) * sample_cfg.infer_frames
            audio = audio_fn(s.wave) if audio_fn else torch.randn(cfg.audio_layers, cfg.audio_dim, frames, generator=g)
            if vae is not None:
                ref = vae.encode(s.image[None, :, None])[0]  # [16, 1, h, w]
                history = s.image[None, :, None].expand(1, 3, sample_cfg.motion_frames, *s.image.shape[1:])
                motion = vae.encode(history.contiguous())[0]  # [16, 19, h, w]: the ref image repeated, as upstream
            else:
                ref = torch.randn(16, 1, h, w, generator=g)
                motion = torch.randn(16, sample_cfg.motion_latent_frames, h, w, generator=g)
            out.append(GenerationInputs(text.to(dtype), audio.to(dtype), ref.to(dtype), motion.to(dtype)))
    return out


def _text_encoder(ck: CheckpointDir, preset: ModelPreset):  # type: ignore[no-untyped-def]
    if not (ck.t5_path.exists() and ck.tokenizer_dir.is_dir()):
        log.warning("no umT5 encoder/tokenizer in %s: calibration uses Gaussian text states", ck.path)
        return None
    from liveavatar_lite.conditioning.text_tokenizer import load_tokenizer, tokenize
    from liveavatar_lite.model.t5 import UMT5Encoder

    with torch.device("meta"):
        enc = UMT5Encoder(preset.t5)
    materialize_strict(enc, load_pth(ck.t5_path), source=str(ck.t5_path))
    enc.eval()
    tok = load_tokenizer(ck.tokenizer_dir)

    def encode(prompt: str) -> torch.Tensor:
        ids, mask = tokenize(tok, prompt, text_len=preset.t5.text_len)
        states = enc(ids, mask)  # [1, text_len, dim]
        return states[0, : int(mask.sum())].float()  # [L, dim]

    return encode


def _audio_encoder(ck: CheckpointDir):  # type: ignore[no-untyped-def]
    if not ck.wav2vec_dir.is_dir():
        log.warning("no wav2vec2 folder in %s: calibration uses Gaussian audio features", ck.path)
        return None
    from liveavatar_lite.conditioning.audio_features import (
        extract_audio_features,
        load_wav2vec,
    )

    enc = load_wav2vec(ck.wav2vec_dir)
    return lambda wave: extract_audio_features(enc, wave)  # [25, audio_dim, clips * 48]


def _vae(ck: CheckpointDir, preset: ModelPreset):  # type: ignore[no-untyped-def]
    if not ck.vae_path.exists():
        log.warning("no VAE in %s: calibration uses Gaussian reference/motion latents", ck.path)
        return None
    from liveavatar_lite.model.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(preset.vae)
    return materialize_strict(vae, load_pth(ck.vae_path), source=str(ck.vae_path), dtype=torch.float32).eval()
