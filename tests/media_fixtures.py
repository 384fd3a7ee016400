"""Synthetic media for the video and generate tests: a speech-like recording, a photo, decoded frames.

    write_speech(tmp_path / "s.wav", 4.7); write_photo(tmp_path / "p.png")
    frames = decoded_frames(Path("out.mp4"))  # uint8 [T, H, W, 3]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_speech(path: Path, seconds: float, rate: int = 22050, channels: int = 2, amp: float = 0.2) -> Path:
    """A voiced-speech stand-in: 140 Hz harmonics under a ~4 syllables/s envelope (amp=0: silence).

    write_speech(tmp_path / "s.wav", 4.7)  # 3 clips of video; stereo, 22.05 kHz
    """
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    source = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 2.1 * t), 0, None) ** 0.5
    wave = (amp * source * envelope).astype(np.float32)
    sf.write(str(path), np.stack([wave] * channels, axis=1), rate)  # [n, channels]
    return path


def write_photo(path: Path, width: int = 160, height: int = 120) -> Path:
    """A colour gradient with a disk in the middle (a face stand-in), in the format `path`'s suffix names.

    write_photo(tmp_path / "p.jpg", width=720, height=400)
    """
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    radius = min(width, height) / 3
    face = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < radius ** 2)[..., None] * np.array([60, 40, 20])
    gradient = np.stack([x % 216 + 40, y % 196 + 60, (x + y) // 2 % 226 + 30], axis=-1)  # [H, W, 3]
    Image.fromarray(np.clip(gradient + face, 0, 255).astype(np.uint8)).save(path)
    return path


def decoded_frames(path: Path) -> np.ndarray:
    """Every video frame of `path`, decoded: uint8 [T, H, W, 3] (RGB).

    decoded_frames(Path("out.mp4")).shape  # (141, 64, 64, 3)
    """
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
