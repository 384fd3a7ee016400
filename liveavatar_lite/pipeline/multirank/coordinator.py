"""The coordinator: the last rank, which decodes and runs the ordinary clip loop (`generate`).

It runs `generate.generate` unchanged with `PipelineBackend`: the same work dir, journal,
crash-safe segments, telemetry and mux as one process. Its renderer is an `ArtifactRenderer`
whose generator is a `PipelineGenerator`: each block comes from rank-1 (through this rank's own
steps when it is also the last DiT rank) and is decoded here.

Checkpoints (see stage.py): the head rank decides at each clip end whether every rank checkpoints
(the `--checkpoint-interval` rule) and marks the clip's last block; each DiT-only rank writes its
companion `state_NNNNN.pt.rankR` before passing that block on. The coordinator's clip loop asks
`checkpoint_due(clip)` instead of its own clock, and the state it commits holds the decoder, this
rank's own generator (if it denoises) and the names of the companions. `--resume` loads that
state, then tells every rank which companion to load and where to start.

    backend = PipelineBackend.for_rank(ctx); generate(request, backend=backend); backend.release()
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..generator import BlockOutput
from ..render import ArtifactBackend, ArtifactRenderer
from ..request import RenderInputs
from ..workdir import RenderWorkDir
from .comm import broadcast
from .stage import (
    DiTStage,
    RankContext,
    StageSetup,
    StageStart,
    block_link,
    plan_for_rank,
    restore_generator,
)

log = logging.getLogger(__name__)


class PipelineGenerator:
    """The coordinator's side of the pipeline, shaped like CausalGenerator for ArtifactRenderer:
    `next_block()` receives the next block (and runs this rank's steps on it, if any)."""

    def __init__(self, ctx: RankContext, own: Any, link: Any, num_clips: int, own_link: Any = None) -> None:
        # own_link: the layer split's loop of this rank, which yields finished blocks itself (layers.py)
        self.ctx, self.own, self.link, self.num_clips, self.own_link = ctx, own, link, num_clips, own_link
        self.clip = self.block = 0
        self.blocks_per_clip = ctx.request.sample.blocks_per_clip
        self._start: StageStart | None = None  # set by load_state_dict on resume
        self._started = False
        self._due: dict[int, bool] = {}

    def next_block(self) -> BlockOutput:
        if not self._started:  # every rank waits for this: fresh start, or resume from the checkpoint
            start = self._start or StageStart(clip=0)
            broadcast(start, src=self.ctx.rank)
            if self.own is not None and (self.own.clip, self.own.block) != (start.clip, 0):
                raise UserError(f"cannot resume: this rank's checkpoint is at clip {self.own.clip}, the render "
                                f"continues at clip {start.clip}; run without --resume")
            self.clip, self.block = start.clip, 0
            self._started = True
        header, latents = self.link.recv()
        if (header.clip, header.block) != (self.clip, self.block):
            raise RuntimeError(f"rank {self.ctx.rank - 1} sent clip {header.clip} block {header.block}, "
                               f"expected {self.clip}/{self.block}")
        if self.own is not None and self.link is not self.own_link:  # step split: this rank's own steps
            latents = self.own.next_block(latents).latents
        clip_done = self.block == self.blocks_per_clip - 1
        out = BlockOutput(self.clip, self.block, latents, clip_done)
        if clip_done:
            self._due[self.clip] = header.checkpoint
            self.clip, self.block = self.clip + 1, 0
        else:
            self.block += 1
        return out

    def checkpoint_due(self, clip: int) -> bool:
        """Did the head rank mark clip `clip` for a checkpoint (so every rank has written its part)?"""
        return self._due.pop(clip, False)

    # ---- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """After clip `self.clip - 1`: the roles, the companions' names, this rank's generator."""
        clip = self.clip - 1
        companions = {}
        for role in self.ctx.roles:
            if role.steps and role.rank != self.ctx.rank:
                path = RenderWorkDir.rank_state_path(self.ctx.request.out, clip, role.rank)
                if not path.exists():
                    raise RuntimeError(f"rank {role.rank} did not write its checkpoint {path.name}")
                companions[role.rank] = path.name
        ranks = {"world_size": self.ctx.world_size, "steps": [list(r.steps) for r in self.ctx.roles],
                 "layers": _layers(self.ctx), "clip": clip, "companions": companions}
        return {"ranks": ranks, "own": self.own.state_dict() if self.own is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks")
        if ranks is None:
            raise UserError("cannot resume: this render was checkpointed by a single process; resume it "
                            "without --ranks")
        if ranks["world_size"] != self.ctx.world_size or ranks["steps"] != [list(r.steps) for r in self.ctx.roles]:
            raise UserError(f"cannot resume: this render was checkpointed by --ranks {ranks['world_size']}; "
                            "resume it with the same --ranks")
        if ranks.get("layers") != _layers(self.ctx):
            split = "layers" if ranks.get("layers") else "steps"
            raise UserError(f"cannot resume: this render was checkpointed with --split {split} (layers "
                            f"{ranks.get('layers')}); resume it with the same --ranks, --split and size")
        root = RenderWorkDir.path_for(self.ctx.request.out)
        companions = {int(r): str(root / name) for r, name in ranks["companions"].items()}
        missing = [Path(p).name for p in companions.values() if not Path(p).exists()]
        if missing:
            raise UserError(f"cannot resume: {root} lacks {', '.join(missing)}; run without --resume")
        if self.own is not None:
            restore_generator(self.own, state["own"])
        self._start = StageStart(clip=int(ranks["clip"]) + 1, companions=companions)


def _layers(ctx: RankContext) -> list[list[int]] | None:
    """The layer split's ranges of the ranks (None: the step split), as a checkpoint records them."""
    if all(r.layers is None for r in ctx.roles):
        return None
    return [list(r.layers) if r.layers is not None else [] for r in ctx.roles]


class PipelineRenderer(ArtifactRenderer):
    """ArtifactRenderer over a PipelineGenerator: the decoder and its state as in one process."""

    def checkpoint_due(self, clip: int) -> bool:
        return self.generator.checkpoint_due(clip)

    def copy_wait_seconds(self) -> float:
        return self.runtime.copy_wait_seconds() if self.runtime is not None else 0.0

    # A rank that runs no steps (the decoder alone) has no DiT runtime: no kernels, copies or ledger
    # rows; the decoder's fields (and the overlap of its decode with the blocks received) it has.
    def layout(self) -> dict[str, Any]:
        if self.runtime is not None:
            return super().layout()  # this rank's DiT: its layout, attention and linear kernels
        return {"decode_latents_per_call": self.plan.decode_latents_per_call if self.plan is not None else None}

    def counters(self) -> dict[str, float]:
        decode = {"decode_s": self.decode_seconds, "decode_exposed_s": self.decode_exposed_seconds,
                  "decode_hidden_s": self.decode_seconds - self.decode_exposed_seconds}
        return {**(self.runtime.copy_counters() if self.runtime is not None else {}), **decode}

    def ledger(self, seconds: float | None, clip: dict[str, float]) -> dict[str, Any]:
        """The ledger of this rank's own DiT plan (`RankPlan.plan`); none on a decode-only rank."""
        from ..ledger import memory_ledger

        inner = getattr(self.plan, "plan", None)
        if inner is None or self.runtime is None:
            return {}
        return memory_ledger(inner, self.runtime, self.decoder, seconds, clip)


class PipelineBackend(ArtifactBackend):
    """The coordinator's backend: conditioning here, broadcast to every rank; this rank's steps
    (if any) and the decoder here."""

    ctx: RankContext

    @classmethod
    def for_rank(cls, ctx: RankContext) -> PipelineBackend:
        backend = cls.open(ctx.options)
        backend.ctx = ctx
        backend.device = ctx.device
        backend._built = False
        return backend

    def build(self, inputs: RenderInputs) -> PipelineRenderer:
        """Plan (fails fast), conditioning, broadcast it, this rank's stage, the decoder."""
        from ...decode.vae_onnx import OnnxVAEDecoder

        ctx, req = self.ctx, inputs.request
        plan = plan_for_rank(ctx, self, (inputs.width, inputs.height))
        text, audio, ref_latents, motion_latents = self.conditioning(inputs)  # as for one process
        setup = StageSetup(text=text.cpu(), audio=audio,
                           ref_latents=ref_latents.cpu(), motion_latents=motion_latents.cpu(),
                           num_clips=inputs.num_clips)
        broadcast(setup, src=ctx.rank)
        self._built = True
        own, runtime, own_link = None, None, None
        if ctx.role.steps:
            stage = DiTStage(ctx, self, plan)
            if ctx.role.layers is not None:  # the layer split: this rank holds the last layers and the head
                from .layers import LayerLoop, LayerStage

                own, runtime = LayerStage(ctx, stage.runtime, setup), stage.runtime
                own_link = LayerLoop(ctx, own)
            else:
                own, runtime = stage.start(setup), stage.runtime
        link = own_link if own_link is not None else block_link(ctx, setup)
        on_gpu = self.device.type == "cuda"
        # sized by this rank's plan: arena cap and latents per call from the decoder graph's shapes
        decoder = OnnxVAEDecoder(self.directory / self.manifest.paths["vae_onnx"],
                                 gpu_mem_limit=plan.decoder_arena_bytes if on_gpu else None,
                                 latents_per_call=plan.decode_latents_per_call or None,
                                 device_id=(self.device.index or 0) if on_gpu else 0)  # this rank's GPU
        decoder.decode(motion_latents[:, :7].float().cpu().numpy())  # warm-up, as render.ArtifactBackend
        generator = PipelineGenerator(ctx, own, link, inputs.num_clips, own_link=own_link)
        # overlap_decode as in one process: with it on, the next block is received (and this
        # rank's steps run) on the renderer's worker thread while this block decodes
        return PipelineRenderer(generator, decoder, runtime, req.sample.blocks_per_clip, plan,
                                overlap_decode=self.options.overlap_decode)

    def release(self) -> None:
        """After the clip loop: if it never built (every clip was already done), free the ranks
        waiting for the set-up."""
        if not self._built:
            broadcast(None, src=self.ctx.rank)


def run_coordinator(ctx: RankContext) -> Any:
    """The one-process `generate` with the pipeline backend; returns its RenderResult."""
    from ..pipeline import generate

    backend = PipelineBackend.for_rank(ctx)
    result = generate(ctx.request, backend=backend)
    backend.release()
    return result

