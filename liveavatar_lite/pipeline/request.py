"""What a Pipeline is loaded with, what one render asks for and gets back, and the renderer interfaces.

`PipelineOptions` (load time: the artifact, memory budgets, KV storage) and `RenderRequest` (per
render: photo, speech, prompt, size, seed, where to write) are built once at the edge (CLI flags, an
HTTP request, `Pipeline.render`'s keywords). `RenderInputs` is a request after validation (photo
framed, speech decoded, clip count known); a `Backend` turns RenderInputs into a `ClipRenderer`,
which yields decoded frames block by block. `render.py` holds the artifact backend; tests pass fakes.

    options = PipelineOptions(artifact=Path("art"), vram_gb=24, kv_dtype="fp8")
    request = RenderRequest(image=Path("me.jpg"), audio=Path("hi.wav"), prompt="a person talking",
                            out=Path("out.mp4"))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import SampleConfig


@dataclass(frozen=True)
class PipelineOptions:
    """What a Pipeline loads once: the artifact and the memory budget it is planned for."""

    artifact: Path
    vram_gb: float | None = None  # None: the GPU's free memory
    ram_gb: float | None = None  # None: this machine's physical RAM
    kv_dtype: str = "bf16"  # KV cache storage: bf16 | fp8 | int8 (8-bit halves the biggest memory user)
    device_profile: str | None = None  # None: the GPU's named profile if known, else a probe (as `plan`)
    compile_units: str = "auto"  # DiT units as fused torch.compile graphs: auto (CUDA: on) | on | off
    attention: str = "auto"  # auto | sdpa | flash | cudnn | efficient | math | sage (runtime/attention.py)
    overlap_decode: bool = True  # decode block b while the DiT computes block b+1 (same frames; render.py)
    cache_dir: Path | None = None  # prompt and photo latent caches; None: caches.default_cache_dir()
    progress: bool = True  # progress bars / phase lines on stderr


@dataclass(frozen=True)
class RenderRequest:
    """One render: the inputs, the size and seed, and where (and how safely) to write it.

    `out` None means no file (`Pipeline.stream`). `live` names a directory that receives an HLS
    playlist (`index.m3u8`) and one segment per finished clip while the render runs.
    """

    image: Path
    audio: Path
    prompt: str
    out: Path | None = None
    size: str = "704*384"
    num_clip: int | None = None  # None: until the audio ends
    seed: int = 42
    resume: bool = False
    telemetry: Path | None = None
    live: Path | None = None
    # Seconds between resume checkpoints (0: after every clip). A checkpoint holds every KV cache
    # (about 40 GB at 14B and 704*384), so writing one per clip would dominate the render time.
    checkpoint_interval_s: float = 600.0
    progress: bool = True
    sample: SampleConfig = field(default_factory=SampleConfig)
    overwrite: bool = True  # False: an existing `out` is refused before any work (`generate` without --overwrite)


@dataclass(frozen=True)
class RenderResult:
    """What a render wrote: the mp4, its size and length, timings, and how many clips a resume skipped.

    `first_frame_seconds`: from the call to the first decoded frame (None when a resume had every
    clip already). `realtime_factor`: seconds of video rendered per second of wall time.
    """

    out: Path
    clips: int
    frames: int
    height: int
    width: int
    resumed_clips: int
    seconds: float
    first_frame_seconds: float | None = None
    realtime_factor: float | None = None
    live_playlist: Path | None = None


@dataclass(frozen=True)
class StreamBlock:
    """One decoded block as `Pipeline.stream` yields it, with the speech it plays over.

    frames: uint8 [n, H, W, 3] RGB (n = 12, or 9 for the video's first block); `first_frame` is the
    index of frames[0] in the whole video; `audio_start_s` / `audio_end_s` bound its span at `fps`,
    and `audio` holds that span of the speech (float32, 16 kHz mono; zeros past the end of the file).
    """

    clip: int
    block: int
    frames: np.ndarray
    first_frame: int
    fps: int
    audio: np.ndarray
    audio_start_s: float
    audio_end_s: float


class ClipRenderer(Protocol):
    """The model side of a render: yields decoded frames block by block and can save/restore itself.

    `block_frames(clip, block)` returns uint8 [12, H, W, 3] (RGB) for every block; the caller drops
    the first clip's first `first_clip_drop` frames. `state()` must capture everything the next
    block depends on (KV caches, decoder cache, RNG), so that `load_state(state())` on a freshly
    built renderer continues bit-identically.
    """

    blocks_per_clip: int

    def block_frames(self, clip: int, block: int) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def copy_wait_seconds(self) -> float: ...


@dataclass(frozen=True)
class RenderInputs:
    """The validated inputs a renderer is built from."""

    request: RenderRequest
    reference: np.ndarray  # float32 [3, H, W] in [-1, 1]: the photo, resized and cropped
    height: int
    width: int
    num_clips: int
    wave: np.ndarray  # float32 [n] at 16 kHz mono: the speech the audio features are computed from


class Backend(Protocol):
    """Where renderers come from: the loaded artifact (default) or a test fake.

    `identity()` names what the frames depend on besides the request (the artifact's manifest and
    the KV storage dtype): a resume refuses a work dir rendered by another identity.
    """

    def identity(self) -> str: ...

    def build(self, inputs: RenderInputs) -> ClipRenderer: ...
