"""Reading the user's inputs: the driving audio (16 kHz mono float32) and the reference image.

Audio: any format libsndfile reads (wav, flac, ogg/vorbis, mp3, aiff, ...), channels averaged to
mono (as librosa does), resampled to 16 kHz with band-limited windowed-sinc interpolation: our own
small version of the method torchaudio.functional.resample uses, with a Kaiser window (64 zero
crossings, roll-off 0.96, beta 10), tuned to sit close to the soxr_hq filter upstream's librosa
uses; the remaining difference is measured in docs/conditioning.md. 16 kHz input passes untouched.

Image: upstream's preprocessing. The size key (`--size "704*384"`) is only a pixel-area budget; the
output H x W keeps the image's aspect as closely as multiples of 64 allow (`generation_size`), then
the image is resized so its short side is min(H, W) (PIL bilinear) and center-cropped to H x W. As
upstream, when the snapped size is relatively wider (or taller) than the image, the crop pads the
missing columns (rows) with black. Pixels are scaled to [-1, 1].

    wave = load_audio("speech.flac")            # np.float32 [N] at 16 kHz
    img = load_image("face.jpg", "704*384")     # torch.float32 [3, H, W] in [-1, 1]
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError, first_line

SAMPLE_RATE = 16000
# --size keys upstream accepts; each stands for a maximum pixel area (h * w of the key).
SIZE_KEYS = (
    "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
    "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256",
)
_SNAP = 64  # both output dims are multiples of 64 (FramePack's 4x level floors anything else)
_SILENCE_PEAK = 1e-5  # -100 dBFS: a file whose every sample is below this carries no speech


# ----------------------------------------------------------------------------------------- audio

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
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    n_out = math.ceil(len(wave) * up / down)
    n_blocks = math.ceil(n_out / up)
    right = max(0, n_blocks * down + taps - down - (len(wave) + pad))
    x = F.pad(x[None, None], (pad, right))  # [1, 1, pad + N + right]
    # conv1d correlates: y[q, i] = sum_k kernel[i, k] * x_pad[q*down + k], x_pad[q*down + k] = x[j]
    y = F.conv1d(x, kernel.float()[:, None, :], stride=down)  # [1, up, n_blocks]
    y = y[0].transpose(0, 1).reshape(-1)[:n_out]  # [n_blocks * up] -> interleaved by phase
    return y.numpy().astype(np.float32, copy=False)


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz: np.ndarray [N].

    Raises UserError (one line) for a missing, unreadable, empty, non-finite or silent file.

        wave = load_audio("speech.wav")
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio file {path} does not exist")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        msg = first_line(e)
        raise UserError(f"cannot read audio {path}: {msg} (supported: wav, flac, ogg, mp3, aiff)") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise UserError(f"audio {path} is empty (0 samples)")
    wave = data.mean(axis=1)  # [N]: channels averaged, as librosa.load(mono=True)
    if not np.isfinite(wave).all():
        raise UserError(f"audio {path} contains NaN or infinite samples")
    if float(np.abs(wave).max()) < _SILENCE_PEAK:
        raise UserError(f"audio {path} is silent (every sample is below -100 dBFS)")
    return resample(wave, int(sr), SAMPLE_RATE)


# ----------------------------------------------------------------------------------------- image

def max_area_for_size(size_key: str) -> int:
    """Pixel budget of a --size key: "704*384" -> 270336.  Raises UserError for unknown keys."""
    if size_key not in SIZE_KEYS:
        raise UserError(f"unknown size {size_key!r}; choose one of: {', '.join(SIZE_KEYS)}")
    a, b = (int(v) for v in size_key.split("*"))
    return a * b


def generation_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """Output (H, W) for an image: the largest scale whose size, rounded UP to multiples of 64, fits.

    Scales are tried from the no-padding scale sqrt(max_area / area) down in 100 equal steps to the
    scale at which a full 63-pixel round-up on both sides still fits (from a*s^2 + d*(h+w)*s + d^2 =
    max_area with d = 63, solved as upstream does); small images are tried from 1.0 down to 0.1.
    If nothing fits, the aspect-preserving size floored to multiples of 64 is used.

        generation_size(400, 720, 704 * 384)  # (384, 704)
    """
    if height * width <= max_area:
        hi_scale, lo_scale = 1.0, 0.1
    else:
        d = _SNAP - 1
        a, b, c = height * width, d * (height + width), d * d - max_area
        lo_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)  # upstream's bound (note the 2ac)
        hi_scale = math.sqrt(max_area / (height * width))
    for step in range(100):
        scale = hi_scale - (hi_scale - lo_scale) * step / 100
        h = _round_up(int(height * scale), _SNAP)
        w = _round_up(int(width * scale), _SNAP)
        if h * w <= max_area:
            return h, w
    aspect = width / height
    w = int((max_area * aspect) ** 0.5 // _SNAP * _SNAP)
    h = int((max_area / aspect) ** 0.5 // _SNAP * _SNAP)
    if w >= width or h >= height:
        w, h = width // _SNAP * _SNAP, height // _SNAP * _SNAP
    return h, w


def _round_up(v: int, m: int) -> int:
    return v + (m - v % m) % m


def resize_and_crop(img: "PIL.Image.Image", height: int, width: int) -> "PIL.Image.Image":  # noqa: F821
    """Short side -> min(height, width) (bilinear, aspect kept), then a centered height x width crop,
    padding with black where the resized image is smaller than the crop (upstream's transforms)."""
    from PIL import Image

    target = min(height, width)
    iw, ih = img.size
    short, long = (iw, ih) if iw <= ih else (ih, iw)
    if short != target:
        new_long = int(target * long / short)
        size = (target, new_long) if iw <= ih else (new_long, target)  # PIL sizes are (w, h)
        img = img.resize(size, Image.BILINEAR)
        iw, ih = img.size
    if width > iw or height > ih:
        # pad symmetrically (extra pixel right/bottom) up to at least the crop size
        left, top = max(0, (width - iw) // 2), max(0, (height - ih) // 2)
        canvas = Image.new(img.mode, (max(iw, width), max(ih, height)), 0)
        canvas.paste(img, (left, top))
        img = canvas
        iw, ih = img.size
    top = int(round((ih - height) / 2.0))  # Python round: half to even, as torchvision
    left = int(round((iw - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def read_rgb(path: str | Path) -> "PIL.Image.Image":  # noqa: F821
    """Decode an image file fully as RGB; UserError (one line) for a missing or undecodable file.

        img = read_rgb("face.jpg")  # PIL image, size (W, H)
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # decodes fully here, so truncated files fail inside the try
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        msg = first_line(e)
        raise UserError(f"cannot read image {path}: {msg}") from None


def load_image(path: str | Path, size_key: str) -> torch.Tensor:
    """Reference image -> float32 [3, H, W] in [-1, 1], sized for `size_key` as upstream does.

    Raises UserError for a missing or undecodable file, an unknown size key, or an aspect ratio so
    extreme that no multiple-of-64 size fits the budget.

        ref = load_image("face.png", "704*384")  # a 16:9 image gives [3, 384, 704]
    """
    max_area = max_area_for_size(size_key)
    img = read_rgb(path)
    w0, h0 = img.size
    h, w = generation_size(h0, w0, max_area)
    if h < _SNAP or w < _SNAP:
        raise UserError(
            f"image {path} ({w0}x{h0}) cannot be sized for {size_key}: its aspect ratio is too extreme "
            f"for {_SNAP}-pixel multiples within {max_area} pixels"
        )
    img = resize_and_crop(img, h, w)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3] uint8
    return arr.permute(2, 0, 1).float().div(255) * 2 - 1  # [3, H, W] in [-1, 1]
