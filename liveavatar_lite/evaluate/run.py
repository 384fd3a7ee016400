"""`eval`: render one input under a reference setting and each candidate, one loaded at a time, and compare.

    job = EvalJob(reference=parse_setting("la-bf16"), candidates=(parse_setting("la-int4"),),
                  image=Path("me.jpg"), audio=Path("hi.wav"), prompt="a person talking", out=Path("eval/"))
    report = evaluate(job)      # dict: inputs, reference, candidates (per clip + overall), files

The reference renders first; its frames and latents go to a work dir on disk clip by clip (one
704*384 frame is 0.8 MB: about 1.2 GB per minute of video, removed at the end), with what the
reference alone needs (flicker energy, mouth motion, drift) computed on the way. Then each
candidate renders, and each of its clips is compared with the reference's as soon as it is
decoded: nothing but one clip of each is in memory, so a 10-minute render is measured in bounded
memory. Only the model calls are timed (prompt and photo are encoded into their caches before
the clock starts). Between settings the previous one is dropped (its memory
returned) before the next loads, and the peak memory counters are reset, so each setting's speed
and peak memory are its own. With `out`, report.json and drift.png are rewritten after each
candidate (atomically: a crash keeps every finished candidate), and each candidate gets a contact
sheet and a side-by-side mp4 in its own folder.
"""
from __future__ import annotations

import gc
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import metrics as M
from .settings import EvalSetting

log = logging.getLogger(__name__)

SHEET_FRAMES = 6  # frames on the contact sheet, evenly spaced over the video


@dataclass(frozen=True)
class EvalJob:
    """One comparison: the reference, the candidates, the input they all render, where to write."""

    reference: EvalSetting
    candidates: tuple[EvalSetting, ...]
    image: Path
    audio: Path
    prompt: str
    size: str = "704*384"
    num_clip: int | None = None
    seed: int = 42
    out: Path | None = None  # None: numbers only, no pictures
    vram_gb: float | None = None  # defaults for settings that do not give vram= / ram= / profile=
    ram_gb: float | None = None
    device_profile: str | None = None
    cache_dir: Path | None = None
    progress: bool = True


# `backends(index, setting, options)` -> a loaded-on-demand Backend (0 = the reference); tests wrap the real one
BackendFactory = Callable[[int, EvalSetting, Any], Any]


def _open_artifact(index: int, setting: EvalSetting, options: Any) -> Any:
    from ..pipeline.render import ArtifactBackend

    return ArtifactBackend.open(options)


def _options(job: EvalJob, setting: EvalSetting) -> Any:
    from ..pipeline.request import PipelineOptions

    defaults = {"vram_gb": job.vram_gb, "ram_gb": job.ram_gb, "device_profile": job.device_profile,
                "cache_dir": job.cache_dir, "progress": job.progress}
    return PipelineOptions(artifact=setting.artifact, **setting.options(defaults))


def check_out_dir(out: Path) -> None:
    """UserError unless `out` is (or can be made) a writable directory."""
    import os

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the report, sheets and videos")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


# ------------------------------------------------------------------------------------ one render

@dataclass
class RenderStats:
    """Speed and peak memory of one setting's render."""

    load_s: float = 0.0
    render_s: float = 0.0  # model calls only: build (conditioning) + denoise + decode
    first_frame_s: float | None = None
    peak_host_bytes: int | None = None
    peak_vram_bytes: int | None = None

    def as_dict(self, clips: int, frames: int, fps: int) -> dict[str, Any]:
        return {"load_s": round(self.load_s, 3), "render_s": round(self.render_s, 3),
                "s_per_clip": round(self.render_s / max(clips, 1), 3),
                "first_frame_s": None if self.first_frame_s is None else round(self.first_frame_s, 3),
                "realtime_factor": round(frames / fps / self.render_s, 4) if self.render_s > 0 else None,
                "peak_host_bytes": self.peak_host_bytes, "peak_vram_bytes": self.peak_vram_bytes}


def _reset_peaks() -> None:
    """Return freed memory, then start the peak counters afresh (host VmHWM, CUDA allocator)."""
    import ctypes
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas; give them back first
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass  # not permitted here: the host peak is then the process's peak so far
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()


def _read_peaks(stats: RenderStats) -> None:
    from ..pipeline.telemetry import host_rss_bytes, peak_vram_bytes

    stats.peak_host_bytes = host_rss_bytes()[1]
    stats.peak_vram_bytes = peak_vram_bytes(reset=False)


def _render_clips(backend: Any, inputs: Any, stats: RenderStats) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(clip, frames uint8 [n, H, W, 3], latents float32 [16, 3 * blocks, h, w]) in order; times
    the model calls only (what the caller does with a clip is not counted)."""
    from ..pipeline.generate import close_renderer

    sample = inputs.request.sample
    t0 = time.perf_counter()
    renderer = backend.build(inputs)  # conditioning, KV placement, decoder warm-up
    stats.render_s += time.perf_counter() - t0
    try:
        for clip in range(inputs.num_clips):
            frames, latents = [], []
            for block in range(renderer.blocks_per_clip):
                t0 = time.perf_counter()
                # generate's block loop (render.ArtifactRenderer): the decode overlapped as there; the
                # last block of a clip runs nothing ahead, so the caller's work below is never timed
                lat, f = renderer.block_output(clip, block)  # float32 [16, 3, h, w], uint8 [12, H, W, 3]
                stats.render_s += time.perf_counter() - t0
                if stats.first_frame_s is None:
                    stats.first_frame_s = stats.render_s
                if clip == 0 and block == 0:
                    f = f[sample.first_clip_drop:]  # as the video: the first 3 frames are dropped
                frames.append(f)
                latents.append(lat)
            yield clip, np.concatenate(frames), np.concatenate(latents, axis=1)
    finally:
        close_renderer(renderer)  # an error or a consumer that stopped: the DiT running ahead is joined


# ------------------------------------------------------------------------------------ per render

@dataclass
class SideStats:
    """What one render shows on its own: flicker energy and drift per clip, mouth motion per frame."""

    photo: np.ndarray  # uint8 [H, W, 3]: the framed reference photo
    face: M.Box
    mouth: M.Box
    device: str
    energy: list[tuple[float, int]] = field(default_factory=list)
    motion: list[np.ndarray] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    last: np.ndarray | None = None
    frames: int = 0

    def feed(self, clip: int, frames: np.ndarray, fps: int) -> None:
        self.energy.append(M.diff_energy(frames, self.last))
        self.motion.append(M.mouth_motion(frames, self.mouth, self.last))
        colour = M.colour_mean(frames)
        self.drift.append({
            "clip": clip, "t0_s": round(self.frames / fps, 3), "t1_s": round((self.frames + len(frames)) / fps, 3),
            "colour_mean": [round(float(c), 3) for c in colour],
            "colour_shift": round(float(np.linalg.norm(colour - M.colour_mean(self.photo[None]))), 4),
            "face_ssim": round(M.face_similarity(frames, self.photo, self.face, self.device), 5),
        })
        self.last = frames[-1].copy()
        self.frames += len(frames)

    def mouth_motion(self) -> np.ndarray:
        return np.concatenate(self.motion) if self.motion else np.zeros(0)


def _lipsync_by_clip(motion: np.ndarray, speech: np.ndarray, spans: list[tuple[int, int]]) -> list[float | None]:
    return [M.lipsync_proxy(motion[a:b], speech[a:b]) for a, b in spans]


# ------------------------------------------------------------------------------------ comparison

@dataclass
class _Totals:
    lat_diff: float = 0.0
    lat_ref: float = 0.0
    mse_sum: float = 0.0
    frames: int = 0
    psnr_min: float = math.inf
    ssim_sum: float = 0.0
    ssim_min: float = math.inf


def compare_clip(ref: np.ndarray, cand: np.ndarray, ref_lat: np.ndarray, cand_lat: np.ndarray,
                 device: str, totals: _Totals) -> dict[str, Any]:
    """The per-clip numbers of one candidate clip against the reference clip (and the running totals)."""
    if ref.shape != cand.shape:
        raise UserError(f"the candidate decoded frames of shape {cand.shape[1:]}, the reference {ref.shape[1:]}: "
                        "both must render the same size")
    mse = M.frame_mse(ref, cand)
    ssim = M.ssim_luma(ref, cand, device)
    diff, base = M.rel_l2_parts(ref_lat, cand_lat)
    totals.lat_diff += diff
    totals.lat_ref += base
    totals.mse_sum += float(mse.sum())
    totals.frames += len(mse)
    psnr_min = M.psnr_db(float(mse.max()))
    totals.psnr_min = min(totals.psnr_min, psnr_min)
    totals.ssim_sum += float(ssim.sum())
    totals.ssim_min = min(totals.ssim_min, float(ssim.min()))
    return {"latent_rel_l2": M.ratio_l2(diff, base), "psnr_db": M.psnr_db(float(mse.mean())),
            "psnr_min_db": psnr_min, "ssim": float(ssim.mean()), "ssim_min": float(ssim.min())}


class _ClipStore:
    """The reference's clips on disk (frames and latents as .npy), read back memory-mapped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, clip: int, frames: np.ndarray, latents: np.ndarray) -> None:
        np.save(self.root / f"frames_{clip:06d}.npy", frames)
        np.save(self.root / f"latents_{clip:06d}.npy", latents)

    def load(self, clip: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.load(self.root / f"frames_{clip:06d}.npy", mmap_mode="r"),
                np.load(self.root / f"latents_{clip:06d}.npy", mmap_mode="r"))


# ------------------------------------------------------------------------------------ the job

def validate(job: EvalJob) -> Any:
    """Everything checkable before the first render: inputs, out dir, every artifact and setting.

    Returns the validated RenderInputs. A typo in the last candidate fails now, not after an hour.
    """
    from ..pipeline.generate import prepare_inputs
    from ..pipeline.render import ArtifactBackend
    from ..pipeline.request import RenderRequest
    from ..runtime.device_profiles import get_profile

    if not job.candidates:
        raise UserError("nothing to compare: give --candidate, --candidates or --kv")
    if job.out is not None:
        check_out_dir(job.out)
    request = RenderRequest(image=job.image, audio=job.audio, prompt=job.prompt, size=job.size,
                            num_clip=job.num_clip, seed=job.seed, progress=job.progress)
    inputs = prepare_inputs(request)
    for setting in (job.reference, *job.candidates):
        if not setting.artifact.is_dir():
            raise UserError(f"{setting.spec}: no artifact directory {setting.artifact}")
        options = _options(job, setting)
        if options.device_profile is not None:
            get_profile(options.device_profile)  # an unknown name fails now, not at this setting's load
        ArtifactBackend.open(options)  # manifest, components, checksums of the small files
    return inputs


def _slug(index: int, setting: EvalSetting) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in setting.label)
    return f"{index:02d}-{safe}"


def evaluate(job: EvalJob, backends: BackendFactory | None = None,
             on_candidate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Render the reference, then each candidate, and compare; returns the report (also report.json).

    `backends` builds each setting's Backend (default: the artifact's); `on_candidate` sees the report
    after each finished candidate (the CLI prints its row).
    """
    import torch

    from . import visuals
    from .report import to_json

    inputs = validate(job)
    backends = backends or _open_artifact
    sample = inputs.request.sample
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H, W = inputs.height, inputs.width
    photo = M.photo_uint8(inputs.reference)
    face, mouth = M.face_box(H, W), M.mouth_box(H, W)
    total_frames = inputs.num_clips * sample.infer_frames - sample.first_clip_drop
    speech = M.envelope_motion(M.speech_envelope(inputs.wave, total_frames, sample.audio_rate, sample.fps))
    sheet_idx = sorted({int(round(x)) for x in np.linspace(0, total_frames - 1, min(SHEET_FRAMES, total_frames))})

    work_parent = job.out if job.out is not None else None
    if job.out is not None:
        job.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".eval-work-", dir=work_parent))
    report: dict[str, Any] = {
        "inputs": {"image": str(job.image), "audio": str(job.audio), "prompt": job.prompt, "size": job.size,
                   "seed": job.seed, "clips": inputs.num_clips, "frames": total_frames, "width": W,
                   "height": H, "fps": sample.fps,
                   "face_box": [face.x0, face.y0, face.x1, face.y1], "mouth_box": [mouth.x0, mouth.y0, mouth.x1, mouth.y1]},
        "candidates": [],
        "files": {},
    }
    try:
        # ---- the reference: render once, keep its clips on disk
        store = _ClipStore(work / "reference")
        ref_side = SideStats(photo, face, mouth, device)
        ref_sheet: dict[int, np.ndarray] = {}
        spans: list[tuple[int, int]] = []
        stats = RenderStats()
        log.info("eval: rendering the reference %s", job.reference.spec)
        for clip, frames, latents in _render_setting(0, job.reference, job, inputs, backends, stats):
            store.save(clip, frames, latents)
            a = ref_side.frames
            spans.append((a, a + len(frames)))
            _pick(ref_sheet, sheet_idx, a, frames)
            ref_side.feed(clip, frames, sample.fps)
        ref_motion = ref_side.mouth_motion()
        report["reference"] = {
            "setting": job.reference.spec, "label": job.reference.label,
            "speed": stats.as_dict(inputs.num_clips, total_frames, sample.fps),
            "lipsync": M.lipsync_proxy(ref_motion, speech),
            "clips": [{**d, "lipsync": ls} for d, ls in zip(ref_side.drift, _lipsync_by_clip(ref_motion, speech, spans))],
        }
        ref_speed = stats.render_s

        # ---- each candidate: render, compare clip by clip against the stored reference
        for i, cand in enumerate(job.candidates, start=1):
            log.info("eval: rendering candidate %d/%d %s", i, len(job.candidates), cand.spec)
            side = SideStats(photo, face, mouth, device)
            totals, clips, sheet = _Totals(), [], {}
            cstats = RenderStats()
            folder = job.out / _slug(i, cand) if job.out is not None else None
            video = visuals.SideBySide(work / f"sbs_{i:02d}", H, W) if folder is not None else None
            try:
                for clip, frames, latents in _render_setting(i, cand, job, inputs, backends, cstats):
                    ref_frames, ref_lat = store.load(clip)
                    row = compare_clip(np.asarray(ref_frames), frames, np.asarray(ref_lat), latents, device, totals)
                    e_ref, e_cand = ref_side.energy[clip][0], M.diff_energy(frames, side.last)[0]
                    row["flicker_ratio"] = M.flicker_ratio(e_cand, e_ref)
                    _pick(sheet, sheet_idx, side.frames, frames)
                    side.feed(clip, frames, sample.fps)
                    if video is not None:
                        video.append(np.asarray(ref_frames), frames)
                    clips.append({"clip": clip, **row})
                if video is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    video.finish(job.audio, folder / "side_by_side.mp4")
                    video = None
            finally:
                if video is not None:
                    video.abort()
            motion = side.mouth_motion()
            per_clip_ls = _lipsync_by_clip(motion, speech, spans)
            for row, drift, ls in zip(clips, side.drift, per_clip_ls):
                row.update({k: drift[k] for k in ("t0_s", "t1_s", "colour_mean", "colour_shift", "face_ssim")})
                row["lipsync"] = ls
            lipsync = M.lipsync_proxy(motion, speech)
            ref_ls = report["reference"]["lipsync"]
            entry = {
                "setting": cand.spec, "label": cand.label,
                "overall": {
                    "latent_rel_l2": M.ratio_l2(totals.lat_diff, totals.lat_ref),
                    "psnr_db": M.psnr_db(totals.mse_sum / max(totals.frames, 1)),
                    "psnr_min_db": totals.psnr_min,
                    "ssim": totals.ssim_sum / max(totals.frames, 1),
                    "ssim_min": totals.ssim_min,
                    "flicker_ratio": M.flicker_ratio(sum(e for e, _ in side.energy), sum(e for e, _ in ref_side.energy)),
                    "lipsync": lipsync,
                    "lipsync_delta": None if lipsync is None or ref_ls is None else lipsync - ref_ls,
                    "colour_shift_max": max(d["colour_shift"] for d in side.drift),
                    "face_ssim_min": min(d["face_ssim"] for d in side.drift),
                },
                "speed": {**cstats.as_dict(inputs.num_clips, total_frames, sample.fps),
                          "speed_vs_reference": round(ref_speed / cstats.render_s, 4) if cstats.render_s > 0 else None},
                "clips": clips,
                "files": {},
            }
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                visuals.contact_sheet([ref_sheet[k] for k in sheet_idx], [sheet[k] for k in sheet_idx], sheet_idx,
                                      sample.fps, folder / "contact_sheet.png", job.reference.label, cand.label)
                entry["files"] = {"contact_sheet": str(folder / "contact_sheet.png"),
                                  "side_by_side": str(folder / "side_by_side.mp4")}
            report["candidates"].append(entry)
            _rank(report["candidates"])
            if job.out is not None:
                _write_outputs(job.out, report)
            if on_candidate is not None:
                on_candidate(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return to_json(report)


def _render_setting(index: int, setting: EvalSetting, job: EvalJob, inputs: Any, backends: BackendFactory,
                    stats: RenderStats) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Load one setting (after dropping the previous one), render its clips, read its peak memory.
    Running out of memory is a BudgetError (one line, exit 3), as in generate.

    The prompt and photo are encoded into their caches first, untimed and before the peak counters
    reset: a cache miss (umT5 loads) would otherwise count against whichever setting met it first.
    """
    from ..errors import BudgetError
    from ..pipeline.generate import is_out_of_memory

    backend = backends(index, setting, _options(job, setting))
    if hasattr(backend, "precompute"):
        backend.precompute(inputs.reference, job.prompt, inputs.request.sample.motion_frames)
    _reset_peaks()
    try:
        try:
            t0 = time.perf_counter()
            backend.load((inputs.width, inputs.height))
            stats.load_s = time.perf_counter() - t0
            yield from _render_clips(backend, inputs, stats)
        except Exception as e:  # as generate: running out of memory is the budget's fault (exit 3)
            if not is_out_of_memory(e):
                raise
            raise BudgetError(f"{setting.label}: out of memory; give it a smaller budget ({setting.spec}:vram=GB, "
                              "the rest then streams) or a smaller --size") from None
        _read_peaks(stats)
    finally:
        del backend  # one loaded at a time: the next setting loads after this one is gone
        gc.collect()


def _pick(into: dict[int, np.ndarray], wanted: list[int], first: int, frames: np.ndarray) -> None:
    for k in wanted:
        if first <= k < first + len(frames):
            into[k] = np.array(frames[k - first])


def _rank(candidates: list[dict[str, Any]]) -> None:
    """rank 1 = closest to the reference: highest PSNR, then lowest latent rel L2."""
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["overall"]["psnr_db"],
                                                          candidates[i]["overall"]["latent_rel_l2"]))
    for r, i in enumerate(order, start=1):
        candidates[i]["rank"] = r


def _write_outputs(out: Path, report: dict[str, Any]) -> None:
    from ..fileio import write_json_atomic
    from . import visuals
    from .report import to_json

    report["files"] = {"report": str(out / "report.json"), "drift_plot": str(out / "drift.png")}
    sides = [(report["reference"]["label"] + " (reference)", report["reference"]["clips"])]
    sides += [(c["label"], c["clips"]) for c in report["candidates"]]
    visuals.drift_plot(sides, out / "drift.png")
    write_json_atomic(out / "report.json", to_json(report))
