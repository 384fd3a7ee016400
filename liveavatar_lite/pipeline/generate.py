"""`generate`: photo + speech + prompt -> mp4, streamed clip by clip, resumable after a crash.

Per clip, per block: the DiT denoises 3 latent frames (via the runtime), the ONNX decoder turns
them into 12 frames at once, and the frames go straight into the clip's h264 segment (decode/video.py).
After each clip its segment is made durable; every `checkpoint_interval_s` (0: every clip) so is
the full generation state (KV caches, decoder cache, RNG, counters). `--resume` continues from
the newest checkpoint and produces the same frames as an uninterrupted run. The final mp4 (with
the speech as aac) is muxed to `OUT.tmp` and renamed only when complete.

Sections: input validation (clip count, job key) and the clip loop (`generate`). The model
side sits behind the `Backend` and `ClipRenderer` protocols; `render.ArtifactBackend` is the real
one (prompt cache + umT5, wav2vec2, VAE encode of the photo, the planned DiT runtime driving
`generator.CausalGenerator`, the ONNX streaming decoder), tests pass a fake.

    result = generate(GenerateRequest(artifact=Path("art"), image=Path("me.jpg"), audio=Path("hi.wav"),
                                      prompt="a person talking", out=Path("out.mp4")))
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np

from ..artifact.format import file_sha256
from ..conditioning.photo import load_reference
from ..errors import BudgetError, UserError
from .render import ArtifactBackend
from .request import (
    Backend,
    ClipRenderer,
    GenerateRequest,
    GenerateResult,
    RenderInputs,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ inputs

def num_clips_for(num_samples: int, num_clip: int | None) -> int:
    """Upstream's clip count for 16 kHz speech (int(30-fps frames / 57.6) + 1), capped by --num-clip.

    num_clips_for(3 * 16000, None)  # 2
    """
    from ..conditioning.audio_features import num_clips_for_audio

    available = num_clips_for_audio(num_samples)
    return available if num_clip is None else min(num_clip, available)


def job_key(request: GenerateRequest, artifact_id: str) -> str:
    """What makes two renders produce the same frames: inputs' bytes, prompt, size, seed, artifact.

    job_key(request, backend.identity())  # sha256 hex; a resume refuses a work dir with another key
    """
    h = hashlib.sha256()
    for part in (artifact_id, request.prompt, request.size, str(request.seed), request.kv_dtype):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    for path in (request.image, request.audio):
        h.update(bytes.fromhex(file_sha256(path)))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ rendering

def generate(request: GenerateRequest, backend: Backend | None = None) -> GenerateResult:
    """Render `request` to its mp4 (resuming if asked); returns what was written.

    Bad input raises UserError before any heavy work; a crash leaves only the work dir, which
    `resume=True` continues from. `backend` defaults to the request's artifact.

    generate(request).frames  # 141 for 3 clips (45 + 48 + 48)
    """
    from ..conditioning import speech
    from .telemetry import Telemetry
    from .workdir import RenderWorkDir

    started = time.perf_counter()
    out = request.out
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {out} must end in .mp4")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    if backend is None:
        backend = ArtifactBackend.open(request.artifact, vram_gb=request.vram_gb, ram_gb=request.ram_gb,
                                       kv_dtype=request.kv_dtype, device_profile=request.device_profile,
                                       compile_units=request.compile_units)
    reference = load_reference(request.image, request.size)
    height, width = reference.shape[1:]
    wave = speech.load_audio(request.audio)  # float32 [n] at 16 kHz; UserError if unusable
    seconds = len(wave) / request.sample.audio_rate
    num_clips = num_clips_for(len(wave), request.num_clip)
    log.info("%dx%d, %.2f s of speech -> %d clips", width, height, seconds, num_clips)

    work = RenderWorkDir.open(out, job_key(request, backend.identity()), request.resume)
    if work.clips_done < num_clips:
        work.rewind_to_state()  # segments after the newest checkpoint are rendered again
    resumed = work.clips_done
    telemetry = Telemetry.open(request.telemetry, append=resumed > 0)
    try:
        frames = _render(request, backend, work, _inputs_for(request, reference, num_clips, wave), telemetry)
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        advice = backend.oom_advice() if hasattr(backend, "oom_advice") else "pass a smaller --vram or --size"
        raise BudgetError(f"out of memory after {work.clips_done} finished clips; {advice}") from None
    finally:
        telemetry.close()
    work.remove()
    return GenerateResult(out, num_clips, frames, height, width, resumed, time.perf_counter() - started)


def _inputs_for(request: GenerateRequest, reference: np.ndarray, num_clips: int, wave: np.ndarray) -> RenderInputs:
    return RenderInputs(request, reference, int(reference.shape[1]), int(reference.shape[2]), num_clips, wave)


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, or ONNX Runtime's allocation failure (a plain RuntimeException there)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return "out of memory" in text.lower() or "Failed to allocate memory" in text


def _render(request: GenerateRequest, backend: Backend, work: Any, inputs: RenderInputs, telemetry: Any) -> int:
    """Build the renderer (resuming its state), render the missing clips, mux; returns the frame count."""
    from ..decode.video import VideoSpec, mux_segments

    resumed = work.clips_done
    spec = VideoSpec(height=inputs.height, width=inputs.width, fps=request.sample.fps)
    if resumed < inputs.num_clips:  # (a render killed while muxing has every clip already)
        renderer = backend.build(inputs)
        if hasattr(renderer, "layout"):  # what this render streams, where its KV lives
            telemetry.event("layout", **renderer.layout())
        if work.state_path is not None:
            import torch

            # mmap: the tens of GB of KV state are paged in while copied into the caches, never held twice
            renderer.load_state(torch.load(work.state_path, map_location="cpu", weights_only=True, mmap=True))
            telemetry.event("resume", clips_done=resumed, frames_done=work.frames_done)
        _render_clips(renderer, work, spec, inputs, telemetry)
    frames = mux_segments(work.segment_paths()[: inputs.num_clips], request.audio, request.out, spec)
    telemetry.summary(out=str(request.out), resumed_clips=resumed, height=inputs.height, width=inputs.width)
    return frames


def _render_clips(renderer: ClipRenderer, work: Any, spec: Any, inputs: RenderInputs, telemetry: Any) -> None:
    """Clips work.clips_done .. num_clips-1: blocks -> segment, then commit segment + state."""
    import torch
    from tqdm import tqdm

    from .ledger import clip_fields, clip_mark

    sample, show = inputs.request.sample, inputs.request.progress
    interval = inputs.request.checkpoint_interval_s
    last_checkpoint = time.monotonic()
    clips = tqdm(total=inputs.num_clips, initial=work.clips_done, unit="clip", desc="clips", disable=not show)
    for clip in range(work.clips_done, inputs.num_clips):
        t0, wait0, mark = time.perf_counter(), renderer.copy_wait_seconds(), clip_mark(renderer)
        segment = work.begin_clip(clip, spec)
        try:
            blocks = tqdm(range(renderer.blocks_per_clip), unit="block", desc=f"clip {clip}", leave=False,
                          disable=not show)
            for block in blocks:
                frames = renderer.block_frames(clip, block)  # uint8 [12, H, W, 3]
                if clip == 0 and block == 0:
                    frames = frames[sample.first_clip_drop:]  # upstream drops the very first 3 frames
                segment.append(frames)
            # Checkpoint when due, never after the last clip (nothing follows it).
            due = clip < inputs.num_clips - 1 and (interval <= 0 or time.monotonic() - last_checkpoint >= interval)
            t_ckpt = time.perf_counter()
            work.commit_clip(segment, (lambda path: torch.save(renderer.state(), path)) if due else None)
            if due:
                last_checkpoint = time.monotonic()
        except BaseException:
            segment.abort()
            raise
        seconds = time.perf_counter() - t0
        telemetry.clip_done(clip, segment.frames, seconds, renderer.copy_wait_seconds() - wait0,
                            checkpoint_seconds=round(time.perf_counter() - t_ckpt, 4) if due else None,
                            **clip_fields(renderer, mark, seconds))
        clips.update(1)
    clips.close()
