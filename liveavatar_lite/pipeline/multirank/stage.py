"""One rank's DiT stage: its plan, its runtime, its step-subset generator and its checkpoints.

Every DiT rank (the coordinator too, when it also denoises) builds the same things the
single-process backend builds, restricted to its steps: a plan with ONLY its rings + the sink
(`runtime.stage_plan`), a `DiTRuntime` from it, and a `CausalGenerator(steps=...)` that draws
the sink offsets of every step (so each rank sees the single-process RNG stream) but runs only
its own. A DiT-only rank then loops over the blocks (`run_dit_rank`):

    receive (header, latents) from rank-1   (the head rank: the clip noise instead)
    denoise its steps
    at a clip end that the head marked: write its checkpoint companion (durable) ...
    ... then send (header, latents) to rank+1

Because every rank writes its companion BEFORE it passes the clip's last block on, the
coordinator holds every companion of clip c once it has that block: it then commits the state
of clip c (journal, `workdir.RenderWorkDir`), so a committed checkpoint always has all its parts,
taken at the same clip boundary on every rank.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import UserError
from ...fileio import durable_replace
from ...runtime.stage_plan import RankPlan, RankRole, plan_rank, rank_budget
from ..request import PipelineOptions, RenderRequest
from ..workdir import RenderWorkDir
from .comm import BlockHeader, BlockLink, broadcast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the pipeline and what it was asked to render."""

    rank: int
    roles: tuple[RankRole, ...]
    options: PipelineOptions
    request: RenderRequest
    device: torch.device
    gpu_share: int = 1  # ranks on this rank's GPU; a default VRAM budget is split between them

    @property
    def role(self) -> RankRole:
        return self.roles[self.rank]

    @property
    def world_size(self) -> int:
        return len(self.roles)

    @property
    def coordinator(self) -> int:
        """The rank that decodes, writes the video and commits checkpoints (the last one)."""
        return len(self.roles) - 1


@dataclass(frozen=True)
class StageSetup:
    """The coordinator's conditioning, broadcast once (host tensors); see GenerationInputs."""

    text: Tensor
    audio: Tensor
    ref_latents: Tensor
    motion_latents: Tensor
    num_clips: int


@dataclass(frozen=True)
class StageStart:
    """Where to start: `clip`, and on resume each DiT-only rank's checkpoint companion."""

    clip: int
    companions: dict[int, str] | None = None


def plan_for_rank(ctx: RankContext, backend: Any, size: tuple[int, int]) -> RankPlan:
    """This rank's plan within its own --vram (default: its GPU's free memory / ranks sharing it)
    and its share of the host RAM. BudgetError (naming the rank) when it cannot fit."""
    from ...runtime.device_profiles import probe_profile
    from ...runtime.plan import Budget
    from ...runtime.plan_inputs import manifest_unit_sizes, plan_input
    from ..render import _physical_ram_bytes

    m, opts = backend.manifest, ctx.options
    inp = plan_input(m.dit, size, m.quant.format, unit_sizes=manifest_unit_sizes(m))
    if opts.vram_gb is not None:
        vram = opts.vram_gb * 1e9
    elif ctx.device.type == "cuda":
        vram = float(torch.cuda.mem_get_info(ctx.device)[0]) / ctx.gpu_share
    else:
        vram = 1e15  # CPU: "device" memory is host memory; no separate budget
    ram = opts.ram_gb * 1e9 if opts.ram_gb else _physical_ram_bytes()
    budget = Budget(vram_bytes=vram, ram_bytes=ram, kv_dtype=backend.kv_dtype)
    profile = probe_profile(str(ctx.device), seconds=0.3 if ctx.device.type == "cpu" else 2.0)
    plan = plan_rank(inp, rank_budget(budget, ctx.world_size), profile, ctx.role, ctx.world_size)
    log.info("rank %d (%s): peak VRAM %.2f GB, predicted %.1f s per clip", ctx.rank, ctx.role.label,
             plan.peak_vram_bytes / 1e9, plan.seconds_per_clip)
    return plan


class DiTStage:
    """A rank's DiT: the runtime of its plan (loaded by the artifact backend, as for one process)
    and, once the set-up arrives, its generator."""

    def __init__(self, ctx: RankContext, backend: Any, plan: RankPlan) -> None:
        assert plan.plan is not None
        self.ctx, self.backend = ctx, backend
        backend.device = ctx.device  # this rank's GPU (cuda:i), or the CPU
        self.runtime = backend._runtime_for(plan.plan)
        self.generator: Any = None

    def start(self, setup: StageSetup) -> Any:
        """The CausalGenerator of this rank's steps over the broadcast conditioning."""
        from ..generator import CausalGenerator, GenerationInputs
        from ..render import _OnDevice, _RuntimeRunner

        dev, req = self.ctx.device, self.ctx.request
        inputs = GenerationInputs(text=setup.text.to(dev), audio=setup.audio,
                                  ref_latents=setup.ref_latents.to(dev), motion_latents=setup.motion_latents.to(dev))
        self.generator = CausalGenerator(_OnDevice(self.runtime.dit, dev), inputs, seed=req.seed, sample=req.sample,
                                         num_clips=setup.num_clips, runner=_RuntimeRunner(self.runtime),
                                         steps=self.ctx.role.steps)
        return self.generator


def block_link(ctx: RankContext, setup: StageSetup) -> BlockLink:
    """The hand-off of `ctx.rank`: blocks of latents [16, 3, h, w], from rank-1 (none for the
    head), to rank+1 (none for the coordinator)."""
    c, _, h, w = setup.ref_latents.shape
    prev = ctx.rank - 1 if ctx.rank > 0 else None
    nxt = ctx.rank + 1 if ctx.rank < ctx.coordinator else None
    return BlockLink(prev, nxt, (c, ctx.request.sample.frames_per_block, h, w))


def load_generator_state(generator: Any, path: Path) -> None:
    """Load a checkpoint (a companion, or the coordinator's own part) into `generator`."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    restore_generator(generator, state)


def restore_generator(generator: Any, state: dict[str, Any]) -> None:
    # Memory-mapped tensors are cloned (the generator keeps its small tensors by reference);
    # the caches are copied into place by the runner.
    state = {k: v.clone() if isinstance(v, Tensor) and k != "caches" else v for k, v in state.items()}
    generator.load_state_dict(state)


def write_companion(ctx: RankContext, generator: Any, clip: int) -> Path:
    """This rank's state after clip `clip`, made durable before the clip's last block moves on."""
    final = RenderWorkDir.rank_state_path(ctx.request.out, clip, ctx.rank)
    tmp = final.with_name(final.name + ".tmp")
    torch.save(generator.state_dict(), tmp)
    durable_replace(tmp, final)
    return final


class CheckpointClock:
    """The head rank's checkpoint decision: the clip loop's rule (generate._render_clips), taken
    where the clip ends first, so that every rank snapshots the same clip boundary."""

    def __init__(self, interval_s: float, num_clips: int) -> None:
        self.interval_s, self.num_clips = interval_s, num_clips
        self.last = time.monotonic()

    def due(self, clip: int) -> bool:
        """Checkpoint after `clip`? Never after the last clip (nothing follows it)."""
        due = clip < self.num_clips - 1 and (self.interval_s <= 0 or time.monotonic() - self.last >= self.interval_s)
        if due:
            self.last = time.monotonic()
        return due


def begin(ctx: RankContext, generator: Any, start: StageStart, companion_of: int) -> None:
    """Apply the start message: load rank `companion_of`'s companion on resume; check the position."""
    if start.companions is not None:
        load_generator_state(generator, Path(start.companions[companion_of]))
    if (generator.clip, generator.block) != (start.clip, 0):
        raise UserError(f"cannot resume: rank {ctx.rank}'s checkpoint is at clip {generator.clip} block "
                        f"{generator.block}, the render continues at clip {start.clip}; run without --resume")


def prepare_dit_rank(ctx: RankContext) -> DiTStage:
    """A DiT-only rank's work before the set-up arrives: check the artifact, frame the photo
    (for the size), plan, load the runtime. Runs while the coordinator encodes the conditioning."""
    from ...conditioning.photo import load_reference
    from ..render import ArtifactBackend

    req = ctx.request
    backend = ArtifactBackend.open(replace(ctx.options, progress=False))  # the coordinator reports progress
    height, width = load_reference(req.image, req.size).shape[1:]
    return DiTStage(ctx, backend, plan_for_rank(ctx, backend, (int(width), int(height))))


def run_dit_rank(ctx: RankContext, stage: DiTStage) -> None:
    """A DiT-only rank: set-up, start, then every block through its steps until the last clip."""
    setup: StageSetup | None = broadcast(None, src=ctx.coordinator)
    if setup is None:
        log.info("rank %d: nothing left to render", ctx.rank)
        return
    gen = stage.start(setup)
    link = block_link(ctx, setup)
    start: StageStart = broadcast(None, src=ctx.coordinator)
    begin(ctx, gen, start, ctx.rank)
    head = link.prev is None
    clock = CheckpointClock(ctx.request.checkpoint_interval_s, gen.num_clips)
    while not gen.done:
        if head:
            latents, checkpoint = None, False
        else:
            header, latents = link.recv()
            if (header.clip, header.block) != (gen.clip, gen.block):
                raise RuntimeError(f"rank {ctx.rank} got clip {header.clip} block {header.block}, "
                                   f"expected {gen.clip}/{gen.block}")
            checkpoint = header.checkpoint
        out = gen.next_block(latents)
        if out.clip_done:
            checkpoint = clock.due(out.clip) if head else checkpoint
            if checkpoint:
                write_companion(ctx, gen, out.clip)
        link.send(BlockHeader(out.clip, out.block, checkpoint and out.clip_done), out.latents)
        log.debug("rank %d: clip %d block %d done", ctx.rank, out.clip, out.block)
