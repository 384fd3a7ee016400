"""Live Avatar's causal streaming generation as a resumable state machine (latents out).

The algorithm (LIVEAVATAR.md §1.4, upstream `causal_s2v_pipeline.generate`):

* Sink prefill (clip 0, and clip 1 again with online decode): ref latent + FramePack motion tokens
  through every unit at t=0; only the per-layer sink K/V are kept.
* Each clip is 12 latent frames = 4 blocks of 3. Its noise is `randn(16, 12, h, w)` from a
  generator seeded `seed + clip`. Each block is denoised with 4 Euler flow-matching steps; step i
  reads and writes only ring cache i ("timestep forcing"). Rings roll across clips.
* Every denoising call puts the ref (sink) frame at RoPE frame `frame0 + d` (once past frame
  30 - d), with d in [4, 30] drawn per call. Upstream draws d from Python's global `random`; here a
  `torch.Generator` seeded from `seed` draws it, so a seed gives one video.
* Online decode (optional `refresher`): after clip 0 its first latent frame becomes the new ref and
  `refresher(clip0_latents)` returns new motion latents; the sink is prefilled again at clip 1.

The per-unit work goes through a `UnitRunner` (prefill / denoise over all streaming units and the
caches it owns). `LocalRunner` runs an in-memory `WanS2VDiT` with `kv_cache` caches; the runtime
plugs in its block-streaming runner and reuses this state machine unchanged.

    gen = CausalGenerator(dit, inputs, seed=42)
    for out in gen: save(out.latents)           # BlockOutput per 3-latent-frame block
    snap = gen.state_dict(); gen.load_state_dict(snap)   # --resume
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..config import DiTConfig, SampleConfig
from ..errors import UserError
from ..model.dit import DiTContext, WanS2VDiT
from ..runtime.kv_cache import RingKVCache, SinkKVCache, layer_kv
from .scheduler import FlowSchedule

log = logging.getLogger(__name__)

SINK_SEED_SALT = 0x5EED_51C  # keeps the sink-offset stream apart from the clip-noise streams


class UnitRunner(Protocol):
    """Runs every streaming unit of one forward and owns the KV caches."""

    def prefill_sink(self, x: Tensor, ctx: DiTContext) -> None:
        """Sink prefill: all units in sink mode; fills the sink cache (output discarded)."""

    def denoise(self, step: int, start_token: int, x: Tensor, ctx: DiTContext) -> Tensor:
        """All units with ring `step`, the block starting at absolute token `start_token`."""

    def cache_state(self) -> dict[str, Any]: ...

    def load_cache_state(self, state: dict[str, Any]) -> None: ...


class LocalRunner:
    """UnitRunner for an in-memory WanS2VDiT with plain `kv_cache` rings (one per step) and sink."""

    def __init__(self, dit: WanS2VDiT, num_steps: int, ring_tokens: int, cache_dtype: torch.dtype) -> None:
        cfg = dit.cfg
        self.dit = dit
        self.sink = SinkKVCache(cfg.num_layers, dtype=cache_dtype)
        self.rings = [
            RingKVCache(cfg.num_layers, ring_tokens, cfg.num_heads, cfg.head_dim, cache_dtype, dit.compute_device)
            for _ in range(num_steps)
        ]

    def prefill_sink(self, x: Tensor, ctx: DiTContext) -> None:
        for i in range(self.dit.cfg.num_layers):
            x = self.dit.forward_unit(i, x, ctx, layer_kv(None, self.sink, i))

    def denoise(self, step: int, start_token: int, x: Tensor, ctx: DiTContext) -> Tensor:
        ring = self.rings[step]
        ring.begin(start_token, x.shape[1])
        for i in range(self.dit.cfg.num_layers):
            x = self.dit.forward_unit(i, x, ctx, layer_kv(ring, self.sink, i))
        return x

    def cache_state(self) -> dict[str, Any]:
        return {"sink": self.sink.state_dict(), "rings": [r.state_dict() for r in self.rings]}

    def load_cache_state(self, state: dict[str, Any]) -> None:
        self.sink.load_state_dict(state["sink"])
        for ring, s in zip(self.rings, state["rings"]):
            ring.load_state_dict(s)


@dataclass(frozen=True)
class GenerationInputs:
    """Tensors the DiT consumes.

    text [L, text_dim] umT5 states (L <= text_len); audio [layers, audio_dim, frames] per-video-frame
    wav2vec2 features (25 fps), zero-padded to whole clips; ref_latents [16, 1, h, w];
    motion_latents [16, T, h, w] (the last 19 are used; LA: the ref image repeated 73x, encoded).
    """

    text: Tensor
    audio: Tensor
    ref_latents: Tensor
    motion_latents: Tensor


@dataclass(frozen=True)
class BlockOutput:
    """One denoised block: latents [16, 3, h, w] of clip `clip`, block `block` within it."""

    clip: int
    block: int
    latents: Tensor
    clip_done: bool


# refresher(clip0_latents [16, 12, h, w]) -> new motion latents [16, T, h, w] (decode + re-encode)
MotionRefresher = Callable[[Tensor], Tensor]


class VideoVAE(Protocol):
    """What VaeMotionRefresher needs (liveavatar_lite.model.vae.WanVAE has it)."""

    def encode(self, video: Tensor) -> Tensor: ...  # [1, 3, T, H, W] in [-1, 1] -> [1, 16, T', h, w]

    def decode(self, z: Tensor) -> Tensor: ...  # [1, 16, T', h, w] -> [1, 3, 1 + 4(T'-1), H, W]


class VaeMotionRefresher:
    """Upstream's online decode of clip 0, as a MotionRefresher.

    Decodes [motion latents, clip-0 latents] in one go, keeps the clip's last `infer_frames` frames
    minus the first `drop` (45 frames), slides them into the pixel history (initially the ref frame
    repeated 5 x 73 = 365 times) and re-encodes that history into the new motion latents. The
    decoded clip frames are kept in `frames` [3, 45, H, W] for the caller's video.

        refresher = VaeMotionRefresher(vae, motion_latents, ref_pixels)   # ref_pixels [3, H, W]
    """

    def __init__(
        self,
        vae: VideoVAE,
        motion_latents: Tensor,
        ref_pixels: Tensor,
        motion_frames: int = 73,
        repeat: int = 5,
        infer_frames: int = 48,
        drop: int = 3,
    ) -> None:
        self.vae = vae
        self.motion_latents = motion_latents
        self.history = ref_pixels[:, None].expand(-1, motion_frames * repeat, -1, -1)  # [3, 365, H, W]
        self.infer_frames = infer_frames
        self.drop = drop
        self.frames: Tensor | None = None

    def __call__(self, clip_latents: Tensor) -> Tensor:
        # .to(tensor) matches dtype AND device: the clip's latents live on the CPU, the VAE may not
        z = torch.cat([self.motion_latents, clip_latents.to(self.motion_latents)], dim=1)  # [16, T, h, w]
        image = self.vae.decode(z.unsqueeze(0))[0]  # [3, 1 + 4(T-1), H, W]
        image = image[:, -self.infer_frames :][:, self.drop :]  # [3, 45, H, W]
        keep = min(self.history.shape[1], image.shape[1])
        self.history = torch.cat([self.history[:, keep:], image[:, -keep:].to(self.history)], dim=1)
        self.frames = image
        self.motion_latents = self.vae.encode(self.history.unsqueeze(0))[0]  # [16, T', h, w]
        return self.motion_latents


def _check_inputs(inputs: GenerationInputs, cfg: DiTConfig) -> None:
    """One clear ValueError for mis-shaped inputs (instead of a shape error deep in the model)."""
    want = {
        "text": (2, {1: cfg.text_dim}),
        "audio": (3, {0: cfg.audio_layers, 1: cfg.audio_dim}),
        "ref_latents": (4, {0: cfg.in_dim, 1: 1}),
        "motion_latents": (4, {0: cfg.in_dim}),
    }
    for name, (ndim, dims) in want.items():
        t = getattr(inputs, name)
        if t.dim() != ndim or any(t.shape[d] != n for d, n in dims.items()):
            expect = ", ".join(f"dim {d} = {n}" for d, n in dims.items())
            raise ValueError(f"{name} has shape {list(t.shape)}; expected {ndim} dims with {expect}")
    h, w = inputs.ref_latents.shape[-2:]
    if inputs.motion_latents.shape[-2:] != (h, w):
        raise ValueError(f"motion latents are {list(inputs.motion_latents.shape[-2:])}, ref latents {[h, w]}")
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even (patch 2x2)")


class CausalGenerator:
    """Block-by-block Live Avatar generation; iterate it, or call `next_block()` until `done`."""

    def __init__(
        self,
        dit: WanS2VDiT,
        inputs: GenerationInputs,
        seed: int,
        sample: SampleConfig | None = None,
        num_clips: int | None = None,
        sink_offset: int | None = None,
        refresher: MotionRefresher | None = None,
        runner: UnitRunner | None = None,
        cache_dtype: torch.dtype | None = None,
        noise_for_clip: Callable[[int], Tensor] | None = None,
        steps: Sequence[int] | None = None,
        unbounded: bool = False,
    ) -> None:
        """noise_for_clip(clip) -> [16, 12, h, w] replaces the seeded noise (tests and parity runs).

        steps: the denoising steps this generator runs (default all): a pipeline stage
        (pipeline/multirank) runs only its own and gets each block's latents from the stage before.
        unbounded: clips never run out and every `next_block` brings its block's audio features (a
        talk session, pipeline/session.py: the speech arrives while the video renders).
        """
        self.dit = dit
        self.noise_for_clip = noise_for_clip
        self.sample = sample or SampleConfig()
        s = self.sample
        self.schedule = FlowSchedule.create(s.num_steps, s.shift, s.num_train_timesteps)
        self.seed = seed
        self.sink_offset = sink_offset
        self.refresher = refresher
        self.steps = tuple(range(s.num_steps)) if steps is None else tuple(steps)
        if refresher is not None and len(self.steps) != s.num_steps:
            raise ValueError("online decode (refresher) needs every step in one generator")
        _check_inputs(inputs, dit.cfg)
        _, _, h, w = inputs.ref_latents.shape
        self.hw = (h, w)
        self.tokens_per_frame = (h // 2) * (w // 2)
        self.frames_per_clip = s.latent_frames_per_clip  # 12
        self.video_frames_per_latent = 4
        frames_per_clip_px = s.infer_frames
        available = inputs.audio.shape[-1] // frames_per_clip_px
        if available < 1:
            raise ValueError(f"audio has {inputs.audio.shape[-1]} frames, fewer than one clip ({frames_per_clip_px})")
        self.num_clips = available if num_clips is None else min(num_clips, available)
        self.unbounded = unbounded
        self.audio = inputs.audio
        with torch.no_grad():
            self.text = dit.embed_text(inputs.text)  # [1, text_len, dim], once per prompt
        dt = dit.compute_dtype
        self.ref_latents = inputs.ref_latents.to(dt)
        self.motion_latents = inputs.motion_latents.to(dt)
        ring_tokens = self.frames_per_clip * self.tokens_per_frame
        self.runner = runner or LocalRunner(dit, s.num_steps, ring_tokens, cache_dtype or dt)
        self.sink_rng = torch.Generator().manual_seed(seed ^ SINK_SEED_SALT)
        self.clip = 0
        self.block = 0
        self.sink_ready = False
        self.clip_output: Tensor | None = None
        self._noise: Tensor | None = None

    # ---- public ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self.unbounded and self.clip >= self.num_clips

    @property
    def total_blocks(self) -> int:
        return self.num_clips * self.sample.blocks_per_clip

    def __iter__(self) -> Iterator[BlockOutput]:
        while not self.done:
            yield self.next_block()

    def generate_all(self) -> Tensor:
        """Every clip's latents: [16, num_clips * 12, h, w]."""
        outs = [o.latents for o in self]
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def next_block(self, latents: Tensor | None = None, audio: Tensor | None = None) -> BlockOutput:
        """Denoise the next block (prefilling the sink first when due).

        latents: the block's input [16, 3, h, w] when this generator does not run step 0 (the
        previous pipeline stage's output); default: the block's slice of the clip noise.
        audio: the block's features [layers, audio_dim, 12] (required when `unbounded`); default:
        the block's slice of `inputs.audio`.
        """
        if self.done:
            raise StopIteration
        s = self.sample
        fpb = s.frames_per_block
        if self.block == 0:
            self._begin_clip()
        if not self.sink_ready:
            x, ctx = self.dit.prepare_sink(self.ref_latents, self.motion_latents, self.text, fpb)
            self.runner.prefill_sink(x, ctx)
            self.sink_ready = True

        frame0 = self.clip * self.frames_per_clip + self.block * fpb  # absolute latent frame
        px = fpb * self.video_frames_per_latent  # video frames per block (12)
        if audio is None:
            if self.unbounded:
                raise ValueError("an unbounded generator needs each block's audio features")
            a0 = self.clip * s.infer_frames + self.block * px
            audio = self.audio[..., a0 : a0 + px]
        elif tuple(audio.shape) != (*self.audio.shape[:2], px):
            raise ValueError(f"block audio has shape {list(audio.shape)}; expected {[*self.audio.shape[:2], px]}")
        audio = audio.to(self.dit.compute_dtype)
        if latents is None:
            latents = self._noise[:, self.block * fpb : (self.block + 1) * fpb]
        for i, t in enumerate(self.schedule.timesteps):
            # One draw per (block, step), also for steps another stage runs: every stage of a
            # pipeline then sees the sink-offset stream of a single generator.
            sink_offset = self._draw_sink_offset()
            if i not in self.steps:
                continue
            x, ctx = self.dit.prepare_block(latents, t, frame0, audio, self.text, sink_offset)
            x = self.runner.denoise(i, frame0 * self.tokens_per_frame, x, ctx)
            flow = self.dit.finish(x, ctx)
            latents = self.schedule.step(i, flow, latents.to(flow.device))  # steps where flow lives

        self.clip_output[:, self.block * fpb : (self.block + 1) * fpb] = latents
        out = BlockOutput(self.clip, self.block, latents, self.block == s.blocks_per_clip - 1)
        self.block += 1
        if out.clip_done:
            self._end_clip()
        return out

    # ---- clip boundaries ------------------------------------------------------------------

    def _begin_clip(self) -> None:
        h, w = self.hw
        if self.noise_for_clip is not None:
            noise = self.noise_for_clip(self.clip)
        else:  # upstream draws randn(16, 12, h, w) on the GPU from a generator seeded seed + clip
            g = torch.Generator().manual_seed(self.seed + self.clip)
            noise = torch.randn(16, self.frames_per_clip, h, w, generator=g)
        self._noise = noise.to(self.dit.compute_dtype)
        self.clip_output = torch.zeros_like(self._noise)

    def _end_clip(self) -> None:
        if self.clip == 0 and self.refresher is not None:
            # online decode: the first generated latent frame becomes the sink, motion is refreshed
            self.ref_latents = self.clip_output[:, 0:1].clone()
            self.motion_latents = self.refresher(self.clip_output).to(self.dit.compute_dtype)
            self.sink_ready = False
            log.debug("online decode: sink and motion latents refreshed after clip 0")
        self.clip += 1
        self.block = 0

    def _draw_sink_offset(self) -> int:
        if self.sink_offset is not None:
            return self.sink_offset
        lo, hi = self.sample.sink_offset_range
        return int(torch.randint(lo, hi + 1, (1,), generator=self.sink_rng))

    # ---- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue from the next block (tensors on CPU-compatible devices)."""
        return {
            "clip": self.clip,
            "block": self.block,
            "sink_ready": self.sink_ready,
            "seed": self.seed,
            "ref_latents": self.ref_latents,
            "motion_latents": self.motion_latents,
            "clip_output": self.clip_output,
            "sink_rng": self.sink_rng.get_state(),
            "caches": self.runner.cache_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:  # a pipeline's checkpoint (pipeline/multirank): its parts live in several files
            raise UserError(f"cannot resume: this render was checkpointed by --ranks {state['ranks']['world_size']}; "
                            "resume it with the same --ranks")
        if state["seed"] != self.seed:
            raise ValueError(f"resume state was made with seed {state['seed']}, not {self.seed}")
        self.clip, self.block = int(state["clip"]), int(state["block"])
        self.sink_ready = bool(state["sink_ready"])
        self.ref_latents = state["ref_latents"]
        self.motion_latents = state["motion_latents"]
        self.sink_rng.set_state(state["sink_rng"])
        self.runner.load_cache_state(state["caches"])
        if self.block > 0:  # mid-clip: the clip's noise is a function of seed + clip
            self._begin_clip()
            self.clip_output = state["clip_output"].clone()
