"""The picture metrics of `eval`: plain functions over uint8 frames [T, H, W, 3] and float latents.

    mse = frame_mse(ref, cand)                  # per frame, in 8-bit levels squared
    psnr_db(float(mse.mean()))                  # inf for identical frames
    ssim_luma(ref, cand)                        # per frame, on luma (torchmetrics, Gaussian 11x11)
    rel_l2(ref_latents, cand_latents)           # ||c - r|| / ||r||
    lipsync_proxy(mouth_motion(frames, box), envelope_motion(wave, len(frames)))

The face box comes from how the photo is framed (conditioning/photo.py: the photo is resized and
center-cropped, so the subject of a portrait stays centred horizontally): `face_box` is a fixed
fraction of the framed picture and `mouth_box` the lower middle of it. docs/eval.md has the
definitions and which values are visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, as video codecs measure


# ------------------------------------------------------------------------------- reference vs candidate

def frame_mse(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Mean squared error per frame over all pixels and channels, float64 [T] (8-bit levels squared)."""
    d = ref.astype(np.float32) - cand.astype(np.float32)
    return (d * d).reshape(len(d), -1).mean(axis=1, dtype=np.float64)


def psnr_db(mse: float) -> float:
    """PSNR of a mean squared error in 8-bit levels: 10 log10(255^2 / mse); inf when mse is 0."""
    return math.inf if mse <= 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def luma(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB -> float32 [T, H, W] luma in 0..255."""
    return frames.astype(np.float32) @ LUMA


def ssim_luma(ref: np.ndarray, cand: np.ndarray, device: str = "cpu") -> np.ndarray:
    """SSIM per frame on luma (torchmetrics' Gaussian-window SSIM, data range 255), float64 [T].

    1.0 for identical frames. `device` "cuda" moves the frames there first (a 704*384 frame took
    0.46 s on the shared 2-core dev VM).
    """
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = []
    for i in range(0, len(ref), 16):  # 16 frames at a time: bounded working memory
        r = torch.from_numpy(luma(ref[i:i + 16]))[:, None].to(device)
        c = torch.from_numpy(luma(cand[i:i + 16]))[:, None].to(device)
        s = structural_similarity_index_measure(c, r, data_range=255.0, reduction="none")
        out.append(s.double().cpu().numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def rel_l2_parts(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(sum of squared differences, sum of squared reference values): rel L2 = sqrt(a / b), summable."""
    r = ref.astype(np.float64)
    d = cand.astype(np.float64) - r
    return float((d * d).sum()), float((r * r).sum())


def rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """||cand - ref|| / ||ref|| (0 for identical tensors)."""
    return ratio_l2(*rel_l2_parts(ref, cand))


def ratio_l2(diff_sq: float, ref_sq: float) -> float:
    if diff_sq == 0:
        return 0.0
    return math.inf if ref_sq == 0 else math.sqrt(diff_sq / ref_sq)


def diff_energy(frames: np.ndarray, previous: np.ndarray | None = None) -> tuple[float, int]:
    """(sum over consecutive frame pairs of the mean squared frame difference, number of pairs).

    `previous`: the frame before frames[0] (the last of the previous clip), so clip seams count.
    Flicker of a candidate = its energy / the reference's energy over the same pairs.
    """
    f = frames.astype(np.float32)
    if previous is not None:
        f = np.concatenate([previous.astype(np.float32)[None], f])
    if len(f) < 2:
        return 0.0, 0
    d = f[1:] - f[:-1]
    return float((d * d).reshape(len(d), -1).mean(axis=1, dtype=np.float64).sum()), len(d)


def flicker_ratio(cand_energy: float, ref_energy: float) -> float:
    """Candidate's frame-difference energy / the reference's: 1 = as steady, > 1 = more flicker."""
    if cand_energy == ref_energy:
        return 1.0
    return math.inf if ref_energy == 0 else cand_energy / ref_energy


# ------------------------------------------------------------------------------- face and mouth

@dataclass(frozen=True)
class Box:
    """A pixel box [y0, y1) x [x0, x1) of a frame."""

    y0: int
    y1: int
    x0: int
    x1: int

    def crop(self, frames: np.ndarray) -> np.ndarray:
        return frames[..., self.y0:self.y1, self.x0:self.x1, :]


def face_box(height: int, width: int) -> Box:
    """Where the face is in a frame framed as conditioning/photo.py frames the photo.

    The photo is resized and center-cropped, so a portrait's face stays centred horizontally and in
    the upper-middle vertically: a square of 0.55 * the short side, centred at (W/2, 0.42 H).
    face_box(384, 704)  # Box(y0=56, y1=267, x0=246, x1=458)
    """
    side = 0.55 * min(height, width)
    cx, cy = width / 2, 0.42 * height
    y0, y1 = max(0, round(cy - side / 2)), min(height, round(cy + side / 2))
    x0, x1 = max(0, round(cx - side / 2)), min(width, round(cx + side / 2))
    return Box(y0, y1, x0, x1)


def mouth_box(height: int, width: int) -> Box:
    """The lower middle of `face_box`: rows 65-95 % and the middle 50 % of its columns.

    mouth_box(64, 64)  # Box(y0=32, y1=42, x0=23, x1=41); never under 2 x 2 pixels
    """
    f = face_box(height, width)
    h, w = f.y1 - f.y0, f.x1 - f.x0
    y0, y1 = f.y0 + round(0.65 * h), f.y0 + round(0.95 * h)
    x0, x1 = f.x0 + round(0.25 * w), f.x0 + round(0.75 * w)
    return Box(y0, max(y1, y0 + 2), x0, max(x1, x0 + 2))


# ------------------------------------------------------------------------------- lip-sync proxy

def mouth_motion(frames: np.ndarray, box: Box, previous: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute luma change in the mouth box between consecutive frames, float64 [T] (frame t
    against t-1; frame 0 against `previous`, or 0 without one)."""
    y = luma(box.crop(frames))
    prev = luma(box.crop(previous[None]))[0] if previous is not None else y[0]
    d = np.abs(np.diff(np.concatenate([prev[None], y]), axis=0))
    return d.reshape(len(d), -1).mean(axis=1, dtype=np.float64)


def speech_envelope(wave: np.ndarray, num_frames: int, rate: int = 16000, fps: int = 25) -> np.ndarray:
    """RMS of the speech under each video frame, float64 [num_frames] (zeros past its end)."""
    spf = rate // fps  # 640 samples per frame
    w = np.zeros(num_frames * spf, np.float64)
    have = np.asarray(wave[: len(w)], np.float64)
    w[: len(have)] = have
    return np.sqrt((w.reshape(num_frames, spf) ** 2).mean(axis=1))


def envelope_motion(envelope: np.ndarray) -> np.ndarray:
    """How much the speech envelope changes at each frame, |e_t - e_{t-1}| (0 for frame 0): what a
    mouth that opens with the voice does."""
    return np.abs(np.diff(envelope, prepend=envelope[:1]))


def _smooth(x: np.ndarray) -> np.ndarray:
    """A 3-frame moving average (edges repeat): the mouth lags the voice by a frame or so."""
    if len(x) < 3:
        return x
    p = np.concatenate([x[:1], x, x[-1:]])
    return (p[:-2] + p[1:-1] + p[2:]) / 3.0


def lipsync_proxy(motion: np.ndarray, speech_motion: np.ndarray) -> float | None:
    """Pearson correlation of mouth motion with the speech envelope's motion, both 3-frame smoothed:
    near 1 for a mouth that moves as the voice does, near 0 for one that ignores it. None when
    either series is constant (a frozen mouth or silence) or shorter than 4 frames."""
    n = min(len(motion), len(speech_motion))
    if n < 4:
        return None
    a, b = _smooth(np.asarray(motion[:n], np.float64)), _smooth(np.asarray(speech_motion[:n], np.float64))
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den <= 1e-12 * max(1.0, float(np.abs(a).max() + np.abs(b).max())):
        return None
    return float((a * b).sum() / den)


# ------------------------------------------------------------------------------- drift

def colour_mean(frames: np.ndarray) -> np.ndarray:
    """Mean R, G, B over all frames and pixels, float64 [3] in 0..255."""
    return frames.reshape(-1, 3).mean(axis=0, dtype=np.float64)


def face_similarity(frames: np.ndarray, photo: np.ndarray, box: Box, device: str = "cpu") -> float:
    """Mean SSIM (luma) of the face box of each frame against the face box of the framed photo."""
    crops = box.crop(frames)
    ref = np.broadcast_to(box.crop(photo[None]), crops.shape)
    return float(ssim_luma(ref, crops, device).mean())


def photo_uint8(reference: np.ndarray) -> np.ndarray:
    """The framed photo as `load_reference` gives it (float32 [3, H, W] in [-1, 1]) -> uint8 [H, W, 3]."""
    return np.clip(np.rint((reference.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
