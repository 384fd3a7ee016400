"""What one render asks for and what it gets back, and the two interfaces the clip loop drives.

`GenerateRequest` is built once at the edge (CLI flags, later an HTTP request); `RenderInputs` is
the request after validation (photo framed, speech decoded, clip count known); a `Backend` turns
RenderInputs into a `ClipRenderer`, which yields decoded frames block by block. `render.py` holds
the artifact backend; tests pass fakes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import SampleConfig


@dataclass(frozen=True)
class GenerateRequest:
    """Everything one render needs, built once from the CLI flags."""

    artifact: Path
    image: Path
    audio: Path
    prompt: str
    out: Path
    size: str = "704*384"
    num_clip: int | None = None  # None: until the audio ends
    seed: int = 42
    vram_gb: float | None = None  # None: the GPU's free memory
    ram_gb: float | None = None  # None: this machine's physical RAM
    kv_dtype: str = "bf16"  # KV cache storage: bf16 | fp8 | int8 (8-bit halves the biggest memory user)
    device_profile: str | None = None  # None: the GPU's named profile if known, else a probe (as `plan`)
    compile_units: bool = False  # fuse each DiT unit's elementwise work with torch.compile (CUDA only)
    resume: bool = False
    telemetry: Path | None = None
    cache_dir: Path | None = None  # prompt-embedding cache; None: prompt_cache.default_cache_dir()
    # Seconds between resume checkpoints (0: after every clip). A checkpoint holds every KV cache
    # (about 40 GB at 14B and 704*384), so writing one per clip would dominate the render time.
    checkpoint_interval_s: float = 600.0
    progress: bool = True
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class GenerateResult:
    """What a render wrote: the mp4, its size and length, and how many clips a resume skipped."""

    out: Path
    clips: int
    frames: int
    height: int
    width: int
    resumed_clips: int
    seconds: float


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

    request: GenerateRequest
    reference: np.ndarray  # float32 [3, H, W] in [-1, 1]: the photo, resized and cropped
    height: int
    width: int
    num_clips: int
    wave: np.ndarray  # float32 [n] at 16 kHz mono: the speech the audio features are computed from


class Backend(Protocol):
    """Where renderers come from: the artifact (default) or a test fake."""

    def identity(self) -> str: ...

    def build(self, inputs: RenderInputs) -> ClipRenderer: ...
