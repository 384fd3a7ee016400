"""`eval`'s output: the report as JSON (infinite PSNR is the string "inf") and as a text table.

    print(format_table(report))     # one row per candidate, then per-clip rows
    json.dumps(to_json(report))     # what --json prints and report.json holds
"""
from __future__ import annotations

import math
from typing import Any


def to_json(obj: Any) -> Any:
    """Plain JSON types: floats rounded to 6 significant digits, inf as "inf", nan as None."""
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(f"{obj:.6g}")
    return obj


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def _gb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


COLUMNS = (  # header, key in "overall" (or speed), format
    ("latent relL2", "latent_rel_l2", ".4g"),
    ("PSNR dB", "psnr_db", ".2f"),
    ("min PSNR", "psnr_min_db", ".2f"),
    ("SSIM", "ssim", ".4f"),
    ("min SSIM", "ssim_min", ".4f"),
    ("flicker", "flicker_ratio", ".3f"),
    ("lip-sync", "lipsync", ".3f"),
    ("face SSIM min", "face_ssim_min", ".4f"),
    ("colour shift max", "colour_shift_max", ".2f"),
)


def format_table(report: dict[str, Any], per_clip: bool = True) -> str:
    """The summary table (one row per candidate; rank 1 = closest to the reference) and per-clip rows."""
    ref = report["reference"]
    inp = report["inputs"]
    s = ref["speed"]
    lines = [f"input: {inp['width']}x{inp['height']}, {inp['clips']} clips, {inp['frames']} frames, seed {inp['seed']}",
             f"reference {ref['setting']}: load {s['load_s']:.1f} s, {s['s_per_clip']:.2f} s/clip, "
             f"peak host {_gb(s['peak_host_bytes'])} GB, peak VRAM {_gb(s['peak_vram_bytes'])} GB, "
             f"lip-sync {_num(ref['lipsync'], '.3f')}", ""]
    head = ["rank", "candidate"] + [c[0] for c in COLUMNS] + ["s/clip", "speed x ref", "peak host GB", "peak VRAM GB"]
    rows = []
    for c in report["candidates"]:
        o, sp = c["overall"], c["speed"]
        rows.append([str(c.get("rank", "")), c["label"]] + [_num(o[k], f) for _, k, f in COLUMNS]
                    + [_num(sp["s_per_clip"], ".2f"), _num(sp["speed_vs_reference"], ".2f"),
                       _gb(sp["peak_host_bytes"]), _gb(sp["peak_vram_bytes"])])
    lines += _align(head, rows)
    if per_clip:
        for c in report["candidates"]:
            lines += ["", f"per clip, {c['label']}:"]
            clip_head = ["clip", "t (s)"] + [h for h, k, _ in COLUMNS if k not in ("face_ssim_min", "colour_shift_max")] \
                + ["face SSIM", "colour shift"]
            clip_rows = []
            for r in c["clips"]:
                clip_rows.append([str(r["clip"]), f"{r['t0_s']:.2f}-{r['t1_s']:.2f}"]
                                 + [_num(r[k], f) for _, k, f in COLUMNS if k not in ("face_ssim_min", "colour_shift_max")]
                                 + [_num(r["face_ssim"], ".4f"), _num(r["colour_shift"], ".2f")])
            lines += _align(clip_head, clip_rows)
    files = [v for c in report["candidates"] for v in c.get("files", {}).values()] + list(report.get("files", {}).values())
    if files:
        lines += [""] + [f"wrote {f}" for f in files]
    return "\n".join(lines)


def _align(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return ["  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
            for r in [head, *rows]]
