"""Timestep pipelining over several ranks: who runs which denoising steps, and each rank's plan.

Live Avatar keeps one KV ring per denoising step ("timestep forcing"), so step s of block b needs
only the latents that step s-1 made for block b, ring s and the shared sink. A pipeline of D DiT
ranks therefore gives each rank a contiguous run of WHOLE steps (4 ranks: one each; 2 ranks: two
each; 3 ranks: 2 + 1 + 1) and the blocks flow through it: rank r denoises block b while rank r-1
denoises block b + 1. Nothing is sharded, so nothing is ever unsharded.

The VAE decoder runs on the last rank: a spare one when there are num_steps + 1 ranks, otherwise
the last DiT rank (which gets the fewest steps). Each rank plans its own memory within its own
VRAM budget: every weight unit (each rank runs all 40 layers for its steps), ONLY its own rings,
the sink (each rank prefills its own copy) and, only where it decodes, the VAE arena and caches.
The throughput is one clip per slowest-stage time.

    roles = rank_roles(4)      # (RankRole(0, (0,), False), ..., RankRole(3, (3,), True))
    plans = plan_ranks(inp, Budget(vram_bytes=24e9, ram_bytes=128e9), get_profile("rtx4090"), roles)
    pred = predict_pipeline(plans, inp)   # pred.fps, pred.realtime_factor, pred.slowest_rank
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import PRESETS, SampleConfig, preset_for_dit
from ..errors import BudgetError, UserError
from .device_profiles import DeviceProfile
from .plan import Plan, make_plan, vae_arena_estimate
from .plan_inputs import Budget, PlanInput

# Streaming VAE decode cost per output pixel: 9.13 TFLOP per latent frame (4 video frames) at
# 384x704 (LIVEAVATAR.md §3, counted with meta-device hooks; 688*368 gives the same per pixel).
VAE_DECODE_FLOP_PER_PIXEL = 9.13e12 / 4 / (704 * 384)
# The block hand-off (0.4 MB of bf16 latents between two processes of one box) is modelled as a
# loopback copy at this rate plus a fixed latency. Assumptions, not measurements (no GPU was lent).
HANDOFF_GBPS = 2.0
HANDOFF_LATENCY_S = 2e-4


@dataclass(frozen=True)
class RankRole:
    """What one rank of a pipeline does: its denoising steps (none: decode only) and whether it
    decodes (the decoding rank is the coordinator: it writes the video, journal and checkpoints)."""

    rank: int
    steps: tuple[int, ...]
    decodes: bool

    @property
    def label(self) -> str:
        """'steps 0-1', 'step 3 + decoder', 'decoder'."""
        if not self.steps:
            return "decoder"
        s = f"step {self.steps[0]}" if len(self.steps) == 1 else f"steps {self.steps[0]}-{self.steps[-1]}"
        return s + (" + decoder" if self.decodes else "")


def split_steps(num_steps: int, parts: int) -> tuple[tuple[int, ...], ...]:
    """`num_steps` steps as `parts` contiguous runs, the larger runs first (4, 3 -> (0, 1), (2,), (3,)).

    split_steps(4, 2)  # ((0, 1), (2, 3))
    """
    if not 1 <= parts <= num_steps:
        raise ValueError(f"cannot split {num_steps} steps into {parts} stages")
    base, extra = divmod(num_steps, parts)
    out, start = [], 0
    for p in range(parts):
        n = base + (1 if p < extra else 0)
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


def rank_roles(world_size: int, num_steps: int = 4) -> tuple[RankRole, ...]:
    """The roles of a `world_size`-rank pipeline: min(world_size, num_steps) DiT ranks holding
    whole steps; with num_steps + 1 ranks the last one only decodes, otherwise the last DiT rank
    also decodes. UserError for other sizes.

    rank_roles(5)[-1]  # RankRole(rank=4, steps=(), decodes=True)
    """
    if not 1 <= world_size <= num_steps + 1:
        raise UserError(f"--ranks {world_size}: choose 1 to {num_steps + 1} (each DiT rank runs whole denoising "
                        f"steps, {num_steps} in all; rank {num_steps + 1} would only decode)")
    dit = min(world_size, num_steps)
    roles = [RankRole(r, steps, decodes=r == world_size - 1) for r, steps in enumerate(split_steps(num_steps, dit))]
    if world_size > dit:
        roles.append(RankRole(dit, (), decodes=True))
    return tuple(roles)


def stage_input(inp: PlanInput, role: RankRole) -> PlanInput:
    """The planner's input for one DiT rank: its own rings and the sink only; the VAE decoder's
    caches only where it decodes."""
    kv = tuple(k for k in inp.kv if k.step is None or k.step in role.steps)
    workload = inp.workload if role.decodes else replace(inp.workload, vae_cache_bytes=0)
    return replace(inp, kv=kv, workload=workload)


def stage_budget(budget: Budget, role: RankRole) -> Budget:
    """One rank's budget: no VAE arena where it does not decode."""
    return budget if role.decodes else replace(budget, vae_arena_bytes=0)


@dataclass(frozen=True)
class RankPlan:
    """One rank's layout and predicted cost. `plan` is None on a decode-only rank."""

    role: RankRole
    plan: Plan | None
    peak_vram_bytes: int
    vram_budget_bytes: int
    host_ram_bytes: int
    dit_seconds_per_clip: float  # its steps x blocks_per_clip block forwards
    decode_seconds_per_clip: float  # the streaming VAE decode of one clip (0 where it does not decode)
    handoff_seconds_per_clip: float  # receiving and sending the blocks' latents

    @property
    def seconds_per_clip(self) -> float:
        return self.dit_seconds_per_clip + self.decode_seconds_per_clip + self.handoff_seconds_per_clip

    def to_json(self) -> dict:
        return {"rank": self.role.rank, "steps": list(self.role.steps), "decodes": self.role.decodes,
                "role": self.role.label, "peak_vram_bytes": self.peak_vram_bytes,
                "vram_budget_bytes": self.vram_budget_bytes, "host_ram_bytes": self.host_ram_bytes,
                "dit_seconds_per_clip": self.dit_seconds_per_clip,
                "decode_seconds_per_clip": self.decode_seconds_per_clip,
                "handoff_seconds_per_clip": self.handoff_seconds_per_clip,
                "seconds_per_clip": self.seconds_per_clip,
                "plan": self.plan.to_json() if self.plan is not None else None}


def vae_decode_seconds_per_clip(inp: PlanInput, profile: DeviceProfile) -> float:
    """Predicted streaming VAE decode time of one clip (infer_frames frames) from its FLOPs
    (the conv FLOPs scale with the square of the VAE's base width: 96 for Wan2.1's VAE)."""
    vae = preset_for_dit(inp.dit, default=PRESETS["14b"]).vae if inp.dit is not None else PRESETS["14b"].vae
    w, h = inp.workload.size
    flops = VAE_DECODE_FLOP_PER_PIXEL * (vae.dim / 96) ** 2 * w * h * inp.sample.infer_frames
    rate = profile.bf16_tflops * profile.gemm_efficiency * 1e12
    return flops / rate if rate > 0 else float("inf")


def block_latent_bytes(inp: PlanInput, itemsize: int = 2) -> int:
    """Bytes of one block's latents as they pass between ranks ([16, 3, H/8, W/8], bf16 on a GPU)."""
    w, h = inp.workload.size
    return 16 * inp.sample.frames_per_block * (h // 8) * (w // 8) * itemsize


def plan_rank(inp: PlanInput, budget: Budget, profile: DeviceProfile, role: RankRole, world_size: int) -> RankPlan:
    """One rank's plan within `budget` (this rank's VRAM; host RAM already this rank's share).
    BudgetError names the rank."""
    decode_s = vae_decode_seconds_per_clip(inp, profile) if role.decodes else 0.0
    hops = (role.rank > 0) + (not role.decodes)  # receives from rank-1 unless the head; sends unless it decodes
    hop_s = HANDOFF_LATENCY_S + block_latent_bytes(inp) / (HANDOFF_GBPS * 1e9)
    handoff_s = hops * hop_s * inp.workload.blocks_per_clip if world_size > 1 else 0.0
    if role.steps:
        try:
            plan = make_plan(stage_input(inp, role), stage_budget(budget, role), profile)
        except BudgetError as e:
            raise BudgetError(f"rank {role.rank} ({role.label}): {e}") from None
        return RankPlan(role, plan, plan.peak_vram_bytes, int(budget.vram_bytes), plan.host_ram_bytes,
                        plan.predicted_seconds_per_clip, decode_s, handoff_s)
    vae = budget.vae_arena_bytes if budget.vae_arena_bytes is not None else vae_arena_estimate(inp.workload.size)
    peak = int(budget.cuda_context_bytes + vae + inp.workload.vae_cache_bytes)
    if peak > budget.vram_bytes * (1 - budget.reserve_frac):
        raise BudgetError(f"rank {role.rank} (decoder): the VAE decoder needs {peak / 1e9:.1f} GB VRAM, more than "
                          f"{budget.vram_bytes / 1e9:.1f} GB; raise --vram or pass a smaller --size")
    return RankPlan(role, None, peak, int(budget.vram_bytes), int(budget.host_baseline_bytes), 0.0, decode_s,
                    handoff_s)


def rank_budget(budget: Budget, world_size: int) -> Budget:
    """A rank's share of one box: its own VRAM (each rank has a GPU, or a capped share of one), an
    equal share of the host RAM (all ranks pin their streamed weights and host KV in one RAM)."""
    ram = None if budget.ram_bytes is None else budget.ram_bytes / world_size
    return replace(budget, ram_bytes=ram)


def plan_ranks(inp: PlanInput, budget: Budget, profile: DeviceProfile,
               roles: Sequence[RankRole]) -> tuple[RankPlan, ...]:
    """Every rank's plan; `budget` is per rank for VRAM and for the whole box for RAM."""
    per_rank = rank_budget(budget, len(roles))
    return tuple(plan_rank(inp, per_rank, profile, role, len(roles)) for role in roles)


@dataclass(frozen=True)
class PipelinePrediction:
    """Steady-state throughput of a pipeline: one clip per slowest-stage time."""

    seconds_per_clip: float
    slowest_rank: int
    fps: float
    realtime_factor: float  # video seconds made per wall-clock second (>= 1: real time)
    first_clip_seconds: float  # the first clip also waits for the pipeline to fill

    def to_json(self) -> dict:
        return {"seconds_per_clip": self.seconds_per_clip, "slowest_rank": self.slowest_rank, "fps": self.fps,
                "realtime_factor": self.realtime_factor, "first_clip_seconds": self.first_clip_seconds}


def predict_pipeline(plans: Sequence[RankPlan], sample: SampleConfig) -> PipelinePrediction:
    """Throughput of the stages in `plans`: the slowest stage sets the clip rate.

    The first clip also pays the fill: its first block crosses every other stage once.
    """
    slow = max(plans, key=lambda p: p.seconds_per_clip)
    per_clip = slow.seconds_per_clip
    fill = sum(p.seconds_per_clip for p in plans if p is not slow) / sample.blocks_per_clip
    fps = sample.infer_frames / per_clip if per_clip > 0 else float("inf")
    return PipelinePrediction(per_clip, slow.role.rank, fps, fps / sample.fps, per_clip + fill)
