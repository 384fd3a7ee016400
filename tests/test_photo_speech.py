"""Inputs: audio reading/resampling and reference-image sizing, including bad files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors import safe_open

from liveavatar_lite.conditioning.photo import (
    SIZE_KEYS,
    generation_size,
    load_image,
    max_area_for_size,
)
from liveavatar_lite.conditioning.speech import load_audio, resample
from liveavatar_lite.errors import UserError

GOLDEN = Path(__file__).parent / "golden" / "cond"


# ----------------------------------------------------------------------------------------- image

def test_sizes_match_upstream_table() -> None:
    cases = json.loads((GOLDEN / "image_sizes.json").read_text())["cases"]
    assert len(cases) > 100
    for c in cases:
        w, h = c["image_wh"]
        assert list(generation_size(h, w, max_area_for_size(c["size"]))) == c["out_hw"], c


@pytest.mark.parametrize(
    ("wh", "size", "hw"),
    [((720, 400), "704*384", (384, 704)), ((720, 400), "720*400", (384, 704)),
     ((720, 400), "688*368", (384, 640)), ((400, 720), "704*384", (704, 384)),
     ((1000, 1000), "704*384", (512, 512))],
)
def test_documented_examples(tmp_path: Path, wh: tuple[int, int], size: str, hw: tuple[int, int]) -> None:
    p = tmp_path / "img.jpg"
    Image.new("RGB", wh, (200, 100, 50)).save(p)
    img = load_image(p, size)
    assert img.shape == (3, *hw) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1


def _pattern(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 7 + yy * 13) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("wh", [(45, 30), (90, 50)])
def test_pixels_match_upstream_transforms(tmp_path: Path, wh: tuple[int, int]) -> None:
    with safe_open(str(GOLDEN / "image_pixels.safetensors"), "pt") as f:
        ref = f.get_tensor(f"img_{wh[0]}x{wh[1]}").float() / 255 * 2 - 1
    p = tmp_path / "pattern.png"
    Image.fromarray(_pattern(*wh)).save(p)
    got = load_image(p, "384*256")
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-6


def test_black_padding_when_image_is_narrower_than_snapped_size(tmp_path: Path) -> None:
    p = tmp_path / "white.png"
    Image.new("RGB", (720, 400), (255, 255, 255)).save(p)
    img = load_image(p, "704*384")  # short side 400 -> 384, long side 691 < 704: 6 + 7 black columns
    assert (img[:, :, :6] == -1).all() and (img[:, :, -7:] == -1).all()
    assert (img[:, :, 6:-7] == 1).all()


def test_rgba_and_grayscale_are_converted(tmp_path: Path) -> None:
    for mode in ("RGBA", "L", "P"):
        p = tmp_path / f"img_{mode}.png"
        Image.new(mode, (100, 80)).save(p)
        assert load_image(p, "384*256").shape[0] == 3


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png", "704*384")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(UserError, match="cannot read image"):
        load_image(junk, "704*384")
    good = tmp_path / "good.jpg"
    Image.fromarray(_pattern(200, 150)).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(UserError, match="cannot read image"):
        load_image(truncated, "704*384")
    with pytest.raises(UserError, match="unknown size"):
        load_image(good, "700*400")
    line = tmp_path / "line.png"
    Image.new("RGB", (5000, 1)).save(line)
    with pytest.raises(UserError, match="aspect ratio"):
        load_image(line, "704*384")


def test_size_keys() -> None:
    assert max_area_for_size("704*384") == 270336
    assert len(SIZE_KEYS) == 12


# ----------------------------------------------------------------------------------------- audio

def _tone(sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)


def test_16k_mono_passes_through_exactly(tmp_path: Path) -> None:
    x = _tone(16000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and np.array_equal(x, y)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_reproduces_band_limited_tone(tmp_path: Path, sr: int) -> None:
    x = _tone(sr)
    sf.write(tmp_path / "a.wav", np.stack([x, 0.5 * x], 1), sr, subtype="FLOAT")  # stereo
    y = load_audio(tmp_path / "a.wav")
    assert len(y) == math.ceil(len(x) * 16000 / sr)
    t = np.arange(len(y)) / 16000
    truth = 0.75 * (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t))
    inner = slice(400, len(y) - 400)  # the file edges are zero-padded, as in any resampler
    assert np.abs(y[inner] - truth[inner]).max() < 5e-6  # measured 4.7e-7 (44.1 kHz)


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        resample(np.zeros(10, np.float32), 0, 16000)


@pytest.mark.parametrize(("fmt", "ext"), [("FLAC", "flac"), ("OGG", "ogg")])
def test_compressed_formats(tmp_path: Path, fmt: str, ext: str) -> None:
    x = _tone(16000)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 16000, format=fmt)
    y = load_audio(p)
    assert len(y) == len(x) and np.abs(y).max() > 0.3


def test_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(UserError, match="cannot read audio"):
        load_audio(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(UserError, match="empty"):
        load_audio(empty)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(UserError, match="silent"):
        load_audio(silent)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(UserError, match="NaN"):
        load_audio(nan)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="cannot read audio"):
        load_audio(text)
