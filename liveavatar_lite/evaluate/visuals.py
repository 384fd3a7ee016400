"""The pictures of `eval`: contact sheet, drift plot (PIL only) and the side-by-side mp4 (decode/video.py).

    contact_sheet(ref_frames, cand_frames, [0, 27, ...], 25, Path("sheet.png"), "bf16", "int4")
    drift_plot([("bf16 (reference)", ref_clips), ("int4", cand_clips)], Path("drift.png"))
    video = SideBySide(work, 384, 704); video.append(ref, cand); video.finish(Path("hi.wav"), Path("sbs.mp4"))

Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIFF_GAIN = 4  # the heat map shows |candidate - reference| x 4 (a difference of 64 levels is full scale)
TILE_MIN = 128  # small frames are enlarged (nearest) to at least this many pixels on the short side
COLOURS = [(0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _save_png(img: Any, path: Path) -> None:
    from ..fileio import durable_replace

    tmp = path.with_name(path.name + ".tmp")
    try:
        img.save(tmp, format="PNG")
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def heat(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """|cand - ref| (mean over channels) x DIFF_GAIN as a black-red-yellow-white heat map, uint8 [H, W, 3]."""
    d = np.abs(cand.astype(np.float32) - ref.astype(np.float32)).mean(axis=-1) * DIFF_GAIN / 255.0
    d = np.clip(d, 0.0, 1.0)
    r = np.clip(d * 3.0, 0, 1)
    g = np.clip(d * 3.0 - 1.0, 0, 1)
    b = np.clip(d * 3.0 - 2.0, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def contact_sheet(ref: list[np.ndarray], cand: list[np.ndarray], indices: list[int], fps: int, path: Path,
                  ref_label: str, cand_label: str) -> None:
    """Reference row, candidate row, difference heat map row; one column per chosen frame."""
    from PIL import Image, ImageDraw

    h, w = ref[0].shape[:2]
    scale = max(1, -(-TILE_MIN // min(h, w)))
    th, tw = h * scale, w * scale
    left, top, pad = 150, 22, 4
    rows = [("reference", ref_label), ("candidate", cand_label), (f"|diff| x{DIFF_GAIN}", "")]
    sheet = Image.new("RGB", (left + len(ref) * (tw + pad), top + len(rows) * (th + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, k in enumerate(indices):
        x = left + c * (tw + pad)
        draw.text((x + 2, 4), f"frame {k}  t={k / fps:.2f} s", fill=(0, 0, 0))
        tiles = (ref[c], cand[c], heat(ref[c], cand[c]))
        for r, tile in enumerate(tiles):
            img = Image.fromarray(np.ascontiguousarray(tile)).resize((tw, th), Image.NEAREST)
            sheet.paste(img, (x, top + r * (th + pad)))
    for r, (name, label) in enumerate(rows):
        y = top + r * (th + pad) + th // 2 - 8
        draw.text((4, y), name, fill=(0, 0, 0))
        draw.text((4, y + 12), label[:24], fill=(80, 80, 80))
    _save_png(sheet, path)


def drift_plot(sides: list[tuple[str, list[dict[str, Any]]]], path: Path, width: int = 900) -> None:
    """Two panels over time (clip centres): face SSIM to the photo, colour shift from the photo.
    One line per render (`sides`: (label, per-clip dicts with t0_s, t1_s, face_ssim, colour_shift))."""
    from PIL import Image, ImageDraw

    panels = [("face similarity to the photo (SSIM, luma)", "face_ssim"),
              ("colour shift from the photo (RGB distance, 8-bit levels)", "colour_shift")]
    ph, left, right, gap = 220, 70, 20, 40
    legend_h = 16 * len(sides) + 16
    img = Image.new("RGB", (width, gap + len(panels) * (ph + gap) + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    t_max = max((c["t1_s"] for _, clips in sides for c in clips), default=1.0) or 1.0
    for p, (title, key) in enumerate(panels):
        y0 = gap + p * (ph + gap)
        x0, x1, y1 = left, width - right, y0 + ph
        values = [c[key] for _, clips in sides for c in clips]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
        draw.text((x0, y0 - 16), title, fill=(0, 0, 0))
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        for j in range(5):  # y ticks
            v = lo + (hi - lo) * j / 4
            y = y1 - (y1 - y0) * j / 4
            draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
            draw.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
        for j in range(6):  # x ticks (seconds)
            t = t_max * j / 5
            x = x0 + (x1 - x0) * j / 5
            draw.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
            draw.text((x - 10, y1 + 6), f"{t:.1f}s", fill=(0, 0, 0))
        for s, (_, clips) in enumerate(sides):
            colour = COLOURS[s % len(COLOURS)]
            pts = [(x0 + (x1 - x0) * (c["t0_s"] + c["t1_s"]) / 2 / t_max,
                    y1 - (y1 - y0) * (c[key] - lo) / (hi - lo)) for c in clips]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    y = gap + len(panels) * (ph + gap) - 10
    for s, (label, _) in enumerate(sides):
        colour = COLOURS[s % len(COLOURS)]
        draw.line((left, y + 6, left + 30, y + 6), fill=colour, width=3)
        draw.text((left + 36, y), label, fill=(0, 0, 0))
        y += 16
    _save_png(img, path)


class SideBySide:
    """Reference | candidate, frame by frame, into one h264 segment; `finish` muxes it with the speech."""

    def __init__(self, work: Path, height: int, width: int) -> None:
        from ..decode.video import ClipSegmentWriter, VideoSpec

        work.mkdir(parents=True, exist_ok=True)
        self.spec = VideoSpec(height=height, width=2 * width)
        self.segment = work / "side_by_side.video.mp4"
        self.writer = ClipSegmentWriter(0, self.segment, self.segment, self.spec)

    def append(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self.writer.append(np.concatenate([ref, cand], axis=2))

    def finish(self, audio: Path, out: Path) -> None:
        from ..decode.video import mux_segments

        self.writer.close()
        mux_segments([self.segment], audio, out, self.spec)
        self.segment.unlink(missing_ok=True)

    def abort(self) -> None:
        self.writer.abort()
