"""The reference photo: upstream's framing for a --size, and its VAE encode as a constant video.

The size (`--size "704*384"`, one of upstream's keys or a custom W*H) is only a pixel-area budget;
the output H x W keeps the image's aspect as closely as multiples of 64 allow (`generation_size`),
then the image is resized so its short side is min(H, W) (PIL bilinear) and center-cropped to
H x W. As upstream, when the snapped size is relatively wider (or taller) than the image, the crop
pads the missing columns (rows) with black. Pixels are scaled to [-1, 1].

    ref = load_reference(Path("face.jpg"), "704*384")   # np.float32 [3, 384, 704] for a 16:9 photo
    latents = encode_constant_video(vae, frame, 365)     # the photo as upstream's motion video
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, first_line
from ..fileio import require_file

# --size keys upstream accepts; each stands for a maximum pixel area (h * w of the key).
SIZE_KEYS = (
    "720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704",
    "1024*704", "704*1024", "720*400", "704*384", "688*368", "384*256",
)
SNAP = 64  # both output dims are multiples of 64 (FramePack's 4x level floors anything else)
MIN_AREA = SNAP * SNAP
MAX_AREA = 1280 * 720  # the largest size upstream offers
# What a photo may be: the formats cameras and phones write, decoded by Pillow itself. Anything else
# (EPS/PDF hand the file to Ghostscript, TIFF/ICO/... carry decoders nobody needs here) is refused
# before a decoder runs (a phone's multi-picture JPEG opens through JPEG as Pillow's MPO).
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# The largest photo decoded: 40 MP (an 8000x5000 camera frame) is 120 MB as RGB. Checked from the
# header (Pillow opens lazily), before a pixel is decoded: a 12000x12000 PNG of a few KB is refused
# in microseconds instead of costing a gigabyte.
MAX_PHOTO_PIXELS = 40_000_000


def parse_size(text: str) -> int:
    """The maximum pixel area a --size string allows: one of upstream's keys or a custom "A*B".

    Custom sizes (e.g. "128*128" for the tiny test model) follow the same rule as upstream's keys.
    parse_size("704*384")  # 270336
    """
    parts = text.lower().replace("x", "*").split("*")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--size {text!r} is not of the form WIDTH*HEIGHT, e.g. 704*384 "
                        f"(upstream sizes: {', '.join(SIZE_KEYS)})") from None
    area = a * b
    if a <= 0 or b <= 0 or area < MIN_AREA:
        raise UserError(f"--size {text!r} is too small: the area must be at least {SNAP}*{SNAP}")
    if area > MAX_AREA:
        raise UserError(f"--size {text!r} is larger than the largest supported size 1280*720")
    return area


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
        d = SNAP - 1
        a, b, c = height * width, d * (height + width), d * d - max_area
        lo_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)  # upstream's bound (note the 2ac)
        hi_scale = math.sqrt(max_area / (height * width))
    for step in range(100):
        scale = hi_scale - (hi_scale - lo_scale) * step / 100
        h = _round_up(int(height * scale), SNAP)
        w = _round_up(int(width * scale), SNAP)
        if h * w <= max_area:
            return h, w
    aspect = width / height
    w = int((max_area * aspect) ** 0.5 // SNAP * SNAP)
    h = int((max_area / aspect) ** 0.5 // SNAP * SNAP)
    if w >= width or h >= height:
        w, h = width // SNAP * SNAP, height // SNAP * SNAP
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

    path = require_file(path, "image file")  # a FIFO or device is refused, not opened (it would block)
    try:
        with Image.open(path, formats=PHOTO_FORMATS) as im:  # header only: nothing is decoded yet
            w, h = im.size
            if w * h > MAX_PHOTO_PIXELS:
                raise UserError(f"image {path} is {w}x{h} pixels; photos up to {MAX_PHOTO_PIXELS / 1e6:g} "
                                "megapixels are accepted (scale it down)")
            if im.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grey (PNG): Pillow's convert clips it
                grey = np.asarray(im).astype(np.uint32) >> 8  # to 255 (a white photo); keep the top 8 bits
                return Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")  # decodes fully here, so truncated files fail inside the try
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {path}: not a photo in a supported format "
                        f"({', '.join(PHOTO_FORMATS)})") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        msg = first_line(e)
        raise UserError(f"cannot read image {path}: {msg}") from None


def load_image(path: str | Path, size_key: str) -> torch.Tensor:
    """`load_reference` restricted to upstream's size keys, as a torch.float32 [3, H, W] in [-1, 1].

        ref = load_image("face.png", "704*384")  # a 16:9 image gives [3, 384, 704]
    """
    max_area_for_size(size_key)  # UserError for a key upstream does not offer
    return torch.from_numpy(load_reference(Path(path), size_key))


def load_reference(path: Path, size: str) -> np.ndarray:
    """The photo framed as upstream does for --size: float32 [3, H, W] in [-1, 1].

    The aspect ratio is kept with both sides multiples of 64 and H*W <= the size's area; the short
    side is resized to min(H, W) and the rest center-cropped (black-padded where too narrow).
    load_reference(Path("face.jpg"), "704*384").shape  # (3, 384, 704) for a 16:9 photo
    """
    area = parse_size(size)
    img = read_rgb(path)  # UserError (one line) for a missing or undecodable file
    height, width = generation_size(img.size[1], img.size[0], area)
    if height < SNAP or width < SNAP:
        raise UserError(f"--size {size}: the photo's aspect ratio ({img.size[0]}x{img.size[1]}) leaves no "
                        f"side of at least {SNAP} pixels; crop the photo or pick a larger size")
    rgb = np.asarray(resize_and_crop(img, height, width), dtype=np.float32)  # [H, W, 3] in 0..255
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)) / 255.0 * 2.0 - 1.0  # [3, H, W] in [-1, 1]


def encode_constant_video(vae: Any, frame: Any, num_frames: int) -> Any:
    """`vae.encode` of `frame` [1, 3, 1, H, W] repeated `num_frames` times, computed exactly but cheaply.

    The encoder steps over chunks of 1, 4, 4, ... frames with causal caches. With a constant input,
    once a chunk leaves the caches bit-identical to the previous chunk's, every later chunk repeats
    the same output (same input, same state): the rest are copies, not approximations.
    encode_constant_video(vae, photo, 365).shape  # [1, 16, 92, H/8, W/8]
    """
    n_chunks = 1 + (num_frames - 1) // 4  # chunks of 1, then 4 (a partial tail is ignored, as upstream)
    outs, caches = [], None
    for i in range(n_chunks):
        chunk = frame if i == 0 else frame.expand(-1, -1, 4, -1, -1)  # [1, 3, 1 or 4, H, W], a view
        y, new_caches = vae.encoder.step(chunk, i == 0, caches)
        outs.append(y)
        if i >= 2 and all(torch.equal(a, b) for a, b in zip(caches, new_caches)):
            outs.extend([y] * (n_chunks - 1 - i))  # fixed point reached: the remaining outputs repeat
            break
        caches = new_caches
    mu = vae.conv1(torch.cat(outs, dim=2))[:, : vae.cfg.z_dim]  # [1, z, n_chunks, h, w]
    return vae.normalize_latents(mu)
