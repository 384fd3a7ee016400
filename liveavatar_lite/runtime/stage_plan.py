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

The layer split (`--split layers`, second half of this file) gives each DiT rank a contiguous
range of the layers for every step instead, balanced with the plan's per-layer costs;
`plan_split` plans either split, or both (`auto`) and keeps the faster, saying why.

    choice = plan_split(inp, Budget(vram_bytes=24e9, ram_bytes=128e9), get_profile("rtx4090"), 4, "auto")
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import SampleConfig
from ..errors import BudgetError, UserError
from .costs import block_handoff_bytes, decode_seconds_per_block, elementwise_bytes, embed_head_seconds, resolve_kernels
from .device_profiles import DeviceProfile
from .plan import Plan, decoder_parts, layer_compute_seconds, make_plan
from .plan_inputs import Budget, PlanInput

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
    layers: tuple[int, int] | None = None  # layer split: layers [first, end) for every step; None: all layers

    @property
    def label(self) -> str:
        """'steps 0-1', 'step 3 + decoder', 'layers 0-9', 'layers 30-39 + decoder', 'decoder'."""
        if not self.steps:
            return "decoder"
        if self.layers is not None:
            a, b = self.layers
            s = f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"
        else:
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
    decoder_arena_bytes: int = 0  # where it decodes: the ONNX decoder's arena cap (weights + working set + workspace)
    decode_latents_per_call: int = 0  # where it decodes: latents per decoder call (0: not planned)

    @property
    def seconds_per_clip(self) -> float:
        return self.dit_seconds_per_clip + self.decode_seconds_per_clip + self.handoff_seconds_per_clip

    def to_json(self) -> dict:
        return {"rank": self.role.rank, "steps": list(self.role.steps), "decodes": self.role.decodes,
                "layers": list(self.role.layers) if self.role.layers is not None else None,
                "role": self.role.label, "peak_vram_bytes": self.peak_vram_bytes,
                "vram_budget_bytes": self.vram_budget_bytes, "host_ram_bytes": self.host_ram_bytes,
                "dit_seconds_per_clip": self.dit_seconds_per_clip,
                "decode_seconds_per_clip": self.decode_seconds_per_clip,
                "handoff_seconds_per_clip": self.handoff_seconds_per_clip,
                "seconds_per_clip": self.seconds_per_clip, "decoder_arena_bytes": self.decoder_arena_bytes,
                "decode_latents_per_call": self.decode_latents_per_call,
                "plan": self.plan.to_json() if self.plan is not None else None}


def vae_decode_seconds_per_clip(inp: PlanInput, profile: DeviceProfile) -> float:
    """The streaming VAE decoder's seconds for one clip: the plan's per-block figure
    (`costs.decode_seconds_per_block`) x blocks per clip."""
    return decode_seconds_per_block(inp, profile) * inp.workload.blocks_per_clip


def plan_rank(inp: PlanInput, budget: Budget, profile: DeviceProfile, role: RankRole, world_size: int) -> RankPlan:
    """One rank's plan within `budget` (this rank's VRAM; host RAM already this rank's share).
    BudgetError names the rank."""
    decode_s = vae_decode_seconds_per_clip(inp, profile) if role.decodes else 0.0
    if role.layers is not None:  # every item (block, step) crosses this rank: hidden state in and out
        handoff_s = layer_handoff_seconds_per_clip(inp, profile, role, world_size, budget)
    else:
        hops = (role.rank > 0) + (not role.decodes)  # receives from rank-1 unless the head; sends unless it decodes
        hop_s = HANDOFF_LATENCY_S + block_handoff_bytes(inp) / (HANDOFF_GBPS * 1e9)
        handoff_s = hops * hop_s * inp.workload.blocks_per_clip if world_size > 1 else 0.0
    if role.steps:
        try:
            rank_inp = (layer_input(inp, role, budget, profile) if role.layers is not None
                        else stage_input(inp, role))
            plan = make_plan(rank_inp, stage_budget(budget, role), profile)
        except BudgetError as e:
            raise BudgetError(f"rank {role.rank} ({role.label}): {e}") from None
        if role.decodes and plan.decode_seconds_per_clip > 0:
            # the decoder shares this rank's GPU: what the DiT does not hide of it (the plan's rule,
            # costs.clip_with_decode); a plan input without the decoder's graph: all of it, serial
            decode_s = plan.decode_exposed_seconds_per_clip
        return RankPlan(role, plan, plan.peak_vram_bytes, int(budget.vram_bytes), plan.host_ram_bytes,
                        plan.predicted_seconds_per_clip, decode_s, handoff_s,
                        plan.decoder_arena_bytes if role.decodes else 0, plan.decode_latents_per_call)
    parts, per_call = decoder_parts(inp, budget)
    peak = int(budget.cuda_context_bytes + sum(parts.values()))
    if peak > budget.vram_bytes * (1 - budget.reserve_frac):
        raise BudgetError(f"rank {role.rank} (decoder): the VAE decoder needs {peak / 1e9:.1f} GB VRAM, more than "
                          f"{budget.vram_bytes / 1e9:.1f} GB; raise --vram or pass a smaller --size")
    return RankPlan(role, None, peak, int(budget.vram_bytes), int(budget.host_baseline_bytes), 0.0, decode_s,
                    handoff_s, int(sum(v for k, v in parts.items() if k != "vae_caches")), per_call)


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



@dataclass(frozen=True)
class WorkBound:
    """What no split of one clip's work over identical cards can beat: all of it, spread perfectly.

    `work_seconds_per_clip`: the compute of one clip on one card of the profile with nothing
    streamed and nothing copied (every layer for every step of every block, the prologue and head
    of every call, the VAE decode). N cards take at least work / N per clip, so the real-time factor
    is at most N x play / work, whatever the split (steps, layers, or the decoder itself divided);
    `cards_for_real_time` is the fewest cards for which that bound reaches 1.0.
    """

    work_seconds_per_clip: float
    play_seconds_per_clip: float

    def realtime_factor(self, cards: int) -> float:
        return cards * self.play_seconds_per_clip / self.work_seconds_per_clip

    @property
    def cards_for_real_time(self) -> int:
        return max(1, math.ceil(self.work_seconds_per_clip / self.play_seconds_per_clip - 1e-9))


def work_bound(inp: PlanInput, budget: Budget, profile: DeviceProfile) -> WorkBound:
    """The perfect-balance bound of `inp`'s work under the budget's kernels (see `WorkBound`)."""
    sample = inp.sample
    calls = sample.num_steps * sample.blocks_per_clip  # denoising calls per clip
    dit = (sum(layer_compute_seconds(inp, budget, profile)) + embed_head_seconds(inp, profile)) * calls
    return WorkBound(dit + vae_decode_seconds_per_clip(inp, profile), sample.infer_frames / sample.fps)


# ------------------------------------------------------------------------------ the layer split
#
# Rank r holds a contiguous range of the layers (the resident unit on every rank: each needs the
# per-call conditioning of its layers, the time modulation and audio tokens) and its layers' slice
# of all four step rings and of the sink. Items (block b, step s) flow rank 0 -> ... -> last: each
# rank runs its layers on the hidden state [1, tokens, dim] and passes it on; the last DiT rank runs
# the head and the Euler step and sends the latents of (b, s + 1) back to rank 0. (b, s) needs
# (b, s - 1) and (b - 1, s), so in wavefront order (`pipeline/multirank/layers.py`) as many items are
# in flight as there are ranks, and every rank is busy after the fill.

SPLITS = ("auto", "steps", "layers")
# The sender's D2H copy of the hidden state and the receiver's H2D copy are on the critical path; the
# transfer between the processes (HANDOFF_GBPS, an assumption) runs while the receiver computes the
# item before (it posts the receive one item ahead), so it costs throughput only where it is longer.


def hidden_bytes(inp: PlanInput, itemsize: int = 2) -> int:
    """Bytes of one item's hidden state between two layer ranks ([1, block tokens, dim], bf16)."""
    assert inp.dit is not None, "a layer split needs the model's config"
    return inp.workload.block_tokens * inp.dit.dim * itemsize


def layer_handoff_seconds_per_clip(inp: PlanInput, profile: DeviceProfile, role: RankRole, world_size: int,
                                   budget: Budget) -> float:
    """A layer rank's hand-off time per clip: per item, the hidden state in (unless the first rank)
    and out (unless the last DiT rank), and the latents that go round (the last rank sends them back)."""
    if world_size <= 1:
        return 0.0
    x = hidden_bytes(inp)
    items = inp.workload.steps * inp.workload.blocks_per_clip
    transfer = HANDOFF_LATENCY_S + x / (HANDOFF_GBPS * 1e9)
    per_item = 0.0
    first, last = role.layers[0] == 0, role.layers[1] == len(inp.workload.linear_flops)  # type: ignore[index]
    if not first:  # receive: the copy to the device; the transfer only where it outlasts the item before
        per_item += x / (profile.h2d_gbps * 1e9)
    if not last:  # send: the copy to the host (the transfer itself runs in the background)
        per_item += x / (profile.d2h_gbps * 1e9)
    latents = HANDOFF_LATENCY_S + block_handoff_bytes(inp) / (HANDOFF_GBPS * 1e9)
    # the transfer runs while this rank computes the item before: it costs throughput only beyond that
    exposed = 0.0 if first else max(0.0, transfer - sum(_layer_range_costs(inp, profile, role, budget)))
    return items * (per_item + latents + exposed)


def _layer_range_costs(inp: PlanInput, profile: DeviceProfile, role: RankRole, budget: Budget) -> tuple[float, ...]:
    a, b = role.layers  # type: ignore[misc]
    return layer_compute_seconds(inp, budget, profile)[a:b]


def layer_input(inp: PlanInput, role: RankRole, budget: Budget, profile: DeviceProfile) -> PlanInput:
    """The planner's input for one layer rank: the resident unit and its layers' units, its layers'
    slice of every ring and of the sink, its layers' work (non-matmul bytes of the budget's kernels,
    `costs.elementwise_bytes`); the VAE decoder only where it decodes."""
    assert role.layers is not None
    kv_dtype = budget.kv_dtype
    kernels = resolve_kernels(budget.compile, budget.attention, profile)
    a, b = role.layers
    units = tuple(u for u in inp.units if u.layer is None or a <= u.layer < b)
    kv = tuple(replace(k, layers=b - a) for k in inp.kv)
    wl = inp.workload
    elem = tuple(elementwise_bytes(inp, kv_dtype, kernels, profile))[a:b]  # per global layer, then sliced
    workload = replace(wl, linear_flops=wl.linear_flops[a:b], attn_flops=wl.attn_flops[a:b],
                       elementwise_bytes=((kv_dtype, elem),),
                       vae_cache_bytes=wl.vae_cache_bytes if role.decodes else 0)
    return replace(inp, units=units, kv=kv, workload=workload)


def split_layers(costs: Sequence[float], extra: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """`len(costs)` layers as `len(extra)` contiguous ranges, at least one layer each, that make the
    slowest rank fastest: rank r costs sum(costs[range]) + extra[r] (the decoder on its rank).
    Ties go to the earlier cut (deterministic: every rank computes the same split).

        split_layers([1.0] * 8, [0.0, 0.0, 0.0, 2.0])  # ((0, 3), (3, 6), (6, 8)... the decoder's rank gets fewer
    """
    n, parts = len(costs), len(extra)
    if not 1 <= parts <= n:
        raise UserError(f"cannot split {n} layers over {parts} ranks (one layer each at least)")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    # best[r][i]: the slowest of ranks 0..r-1 holding layers [0, i); cut[r][i]: where rank r-1 starts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for r in range(1, parts + 1):
        for i in range(r, n - (parts - r) + 1):
            for j in range(r - 1, i):
                v = max(best[r - 1][j], pre[i] - pre[j] + extra[r - 1])
                if v < best[r][i]:
                    best[r][i], cut[r][i] = v, j
    ranges, i = [], n
    for r in range(parts, 0, -1):
        j = cut[r][i]
        ranges.append((j, i))
        i = j
    return tuple(reversed(ranges))


def layer_roles(world_size: int, ranges: Sequence[tuple[int, int]], num_steps: int = 4) -> tuple[RankRole, ...]:
    """The roles of a layer split: one DiT rank per range (every step on its layers); with a spare
    rank (world_size = len(ranges) + 1) it only decodes, otherwise the last DiT rank also decodes."""
    steps = tuple(range(num_steps))
    dit = len(ranges)
    roles = [RankRole(r, steps, decodes=r == world_size - 1, layers=tuple(rg)) for r, rg in enumerate(ranges)]
    if world_size > dit:
        roles.append(RankRole(dit, (), decodes=True))
    return tuple(roles)  # type: ignore[arg-type]


def layer_dit_ranks(world_size: int, num_layers: int, num_steps: int = 4) -> int:
    """DiT ranks of a layer split of `world_size` ranks: all of them up to num_steps; with
    num_steps + 1 ranks the last one only decodes (as in the step split). UserError otherwise."""
    if not 1 <= world_size <= num_steps + 1:
        raise UserError(f"--ranks {world_size}: choose 1 to {num_steps + 1} (at most {num_steps} DiT ranks and a "
                        "decoding rank)")
    dit = min(world_size, num_steps)
    if dit > num_layers:
        raise UserError(f"--ranks {world_size} --split layers: the model has only {num_layers} layers")
    return dit


def layer_split_roles(inp: PlanInput, profile: DeviceProfile, world_size: int, budget: Budget
                      ) -> tuple[RankRole, ...]:
    """The layer ranges of a `world_size`-rank layer split, balanced with the plan's per-layer costs
    under the budget's kernels (KV dtype, compile mode, attention): the decoding rank's share
    includes the VAE decode, so it gets fewer layers (4 ranks), or the decoder gets its own rank
    (5 ranks). Deterministic for a given input, budget and profile."""
    n = len(inp.workload.linear_flops)
    dit = layer_dit_ranks(world_size, n, inp.workload.steps)
    items = inp.workload.steps * inp.workload.blocks_per_clip
    costs = [c * items for c in layer_compute_seconds(inp, budget, profile)]  # per clip
    decode = vae_decode_seconds_per_clip(inp, profile)
    extra = [0.0] * dit
    if world_size == dit:
        extra[-1] = decode
    return layer_roles(world_size, split_layers(costs, extra), inp.workload.steps)


def roles_for(split: str, inp: PlanInput, profile: DeviceProfile, world_size: int, budget: Budget
              ) -> tuple[RankRole, ...]:
    """The roles of `split` ("steps" or "layers") for `world_size` ranks (`budget`: the run's KV
    dtype and kernels, which price the layers)."""
    if split == "layers":
        return layer_split_roles(inp, profile, world_size, budget)
    return rank_roles(world_size, inp.workload.steps)


@dataclass(frozen=True)
class SplitChoice:
    """The split `plan_split` chose, its plans and throughput, and why (one line)."""

    split: str
    plans: tuple[RankPlan, ...]
    prediction: PipelinePrediction
    reason: str
    other: PipelinePrediction | None  # the split not chosen (None: it does not fit)


def plan_split(inp: PlanInput, budget: Budget, profile: DeviceProfile, world_size: int, split: str = "auto"
               ) -> SplitChoice:
    """Plan `world_size` ranks with `split`; "auto" plans both and keeps the higher predicted
    throughput (the step split, today's default, on a tie within 1 %). BudgetError when the asked
    split (or, for auto, neither) fits."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    tried: dict[str, tuple[tuple[RankPlan, ...], PipelinePrediction] | BudgetError] = {}
    for name in (("steps", "layers") if split == "auto" else (split,)):
        try:
            plans = plan_ranks(inp, budget, profile, roles_for(name, inp, profile, world_size, budget))
            tried[name] = (plans, predict_pipeline(plans, inp.sample))
        except BudgetError as e:
            if split != "auto":
                raise
            tried[name] = e
    ok = {k: v for k, v in tried.items() if not isinstance(v, BudgetError)}
    if not ok:
        raise tried["layers"]  # type: ignore[misc]
    if split != "auto":
        plans, pred = ok[split]
        return SplitChoice(split, plans, pred, f"--split {split} as asked", None)
    if len(ok) == 1:
        name = next(iter(ok))
        other = "layers" if name == "steps" else "steps"
        return SplitChoice(name, *ok[name], f"only the {name} split fits ({other}: {tried[other]})", None)
    (ps, st), (pl, ly) = ok["steps"], ok["layers"]
    if ly.fps > st.fps * 1.01:
        return SplitChoice("layers", pl, ly, _why("layers", pl, ly, "steps", ps, st), st)
    return SplitChoice("steps", ps, st, _why("steps", ps, st, "layers", pl, ly), ly)


def _why(win: str, wp: Sequence[RankPlan], w: PipelinePrediction, lose: str, lp: Sequence[RankPlan],
         loser: PipelinePrediction) -> str:
    """One line: both predictions and what makes the loser's slowest rank slower."""
    head = (f"the {win[:-1]} split predicts {w.realtime_factor:.2f}x real time, the {lose[:-1]} split "
            f"{loser.realtime_factor:.2f}x")
    slow = lp[loser.slowest_rank]
    stall = sum(v for k, v in slow.plan.seconds_breakdown.items() if k.endswith("_stall")) if slow.plan else 0.0
    causes = []
    if stall > 0.005:
        causes.append(f"waits {stall:.2f} s per clip for PCIe copies")
    if slow.plan is not None and slow.plan.streamed_units:
        causes.append(f"streams {len(slow.plan.streamed_units)} weight units")
    host_kv = [k.name for k in slow.plan.kv if k.placement == "host"] if slow.plan else []
    if host_kv:
        causes.append(f"keeps {', '.join(host_kv)} on the host")
    if slow.decode_seconds_per_clip > 0:
        causes.append(f"also decodes ({slow.decode_seconds_per_clip:.2f} s per clip)")
    if slow.handoff_seconds_per_clip > 0.01:
        causes.append(f"spends {slow.handoff_seconds_per_clip:.2f} s per clip on hand-offs")
    if not causes:
        causes.append("has more work")
    return f"{head}: its slowest rank ({slow.role.label}, {slow.seconds_per_clip:.2f} s per clip) " + ", ".join(causes)
