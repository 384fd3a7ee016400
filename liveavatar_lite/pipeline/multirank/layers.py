"""The layer split (`--split layers`): each DiT rank holds a contiguous range of the layers for all
four steps, and items (block, step) flow through the ranks in wavefront order.

Rank r holds layers [a, b) (`RankRole.layers`, balanced by `runtime.stage_plan`), its layers'
slice of every step ring and of the sink, and the resident unit (each rank computes the per-call
conditioning of its layers: time modulation, audio tokens). One item (block b, step s):

    rank 0       the block's latents (clip noise at step 0, else what the last rank sent back)
                 -> embeddings -> its layers -> hidden state [1, tokens, dim] + latents to rank 1
    rank r       its layers on the hidden state -> rank r+1
    last rank    its layers -> head -> Euler step: the latents of (b, s+1) go back to rank 0,
                 or, after step 3, the block goes to the decoder (this rank, or the spare one)

(b, s) needs (b, s-1) (its input) and (b-1, s) (the ring s that block b-1 wrote), so rank 0
issues the items diagonal by diagonal (`wavefront`): once the pipeline has filled, as many items
are in flight as there are ranks. Only rank 0 knows the order; the others take the items as
they come. Messages are one fixed-size buffer each, sent with isend (a ring of ranks that all
send at once cannot deadlock) and received one ahead (the transfer overlaps the compute).

Same frames as one process: every rank draws the four sink offsets of each block from the
generator seeded from `seed`, in block order (as `CausalGenerator` does), the head draws the clip
noise from `seed + clip`, and each rank computes the conditioning from the same latents with the
same calls; the hidden state and the latents travel as raw bytes.

Checkpoints: rank 0 decides at the start of each clip whether the clip before is checkpointed
(the `--checkpoint-interval` rule). If so, the wave is cut there: every item of the blocks up to
that clip's last comes before any item of the next clip, so after the clip's last item (its last
block at step 3, which carries the flag) every rank's rings and sink are exactly the ones one
process has after that clip. Each DiT-only rank writes its companion before it passes that item
on; the coordinator commits once it holds the block (as in the step split, stage.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ...errors import UserError
from .comm import BlockHeader, BlockLink, ItemReceiver, ItemSender, broadcast
from .stage import CheckpointClock, DiTStage, RankContext, StageSetup, StageStart, begin, write_companion

log = logging.getLogger(__name__)


def wavefront(first: int, end: int, steps: int, cut: Callable[[int], bool]) -> Iterator[tuple[int, int]]:
    """(block, step) items of blocks [first, end) in wavefront order: diagonal d = block + step, in
    each the newest block first ((d, 0), (d-1, 1), ...). `cut(b)` is asked once before block b
    (b > the wave's first) starts; True ends the wave there: every item of the blocks before b
    comes first, then a new wave starts at b.

        list(wavefront(0, 2, 2, lambda b: False))  # [(0, 0), (1, 0), (0, 1), (1, 1)]
    """
    start = first
    while start < end:
        stop, d = end, start
        while True:
            items = [(d - s, s) for s in range(steps) if start <= d - s < stop]
            if not items:
                break
            for b, s in items:
                if s == 0 and b > start and cut(b):
                    stop = b  # later items of this diagonal are older blocks: they still run
                    continue
                yield b, s
            d += 1
        start = stop


class LayerStage:
    """One rank's layers for every step, fed item by item (the math of `CausalGenerator.next_block`,
    split at the rank's layers)."""

    def __init__(self, ctx: RankContext, runtime: Any, setup: StageSetup) -> None:
        from ..generator import SINK_SEED_SALT
        from ..render import _OnDevice
        from ..scheduler import FlowSchedule

        assert ctx.role.layers is not None
        self.ctx, self.runtime = ctx, runtime
        self.sample = s = ctx.request.sample
        self.schedule = FlowSchedule.create(s.num_steps, s.shift, s.num_train_timesteps)
        self.seed = ctx.request.seed
        self.dit = _OnDevice(runtime.dit, ctx.device)
        a, b = ctx.role.layers
        self.first, self.last = a == 0, b == runtime.cfg.num_layers
        dt, dev = self.dit.compute_dtype, ctx.device
        with torch.no_grad():
            self.text = self.dit.embed_text(setup.text.to(dev))
        self.ref_latents = setup.ref_latents.to(dev).to(dt)
        self.motion_latents = setup.motion_latents.to(dev).to(dt)
        self.audio = setup.audio
        self.num_clips = setup.num_clips
        _, _, h, w = setup.ref_latents.shape
        self.hw = (h, w)
        self.tokens_per_frame = (h // 2) * (w // 2)
        self.sink_rng = torch.Generator().manual_seed(self.seed ^ SINK_SEED_SALT)
        self.next_block_index = 0  # the next block (counted over clips) to start
        self.drawn = 0  # blocks whose sink offsets have been drawn
        self.offsets: dict[int, list[int]] = {}
        self.sink_ready = False
        self._noise: dict[int, Tensor] = {}

    # ---- position (stage.begin and the coordinator check it) ----------------------------

    @property
    def clip(self) -> int:
        return self.next_block_index // self.sample.blocks_per_clip

    @property
    def block(self) -> int:
        return self.next_block_index % self.sample.blocks_per_clip

    @property
    def total_blocks(self) -> int:
        return self.num_clips * self.sample.blocks_per_clip

    # ---- the work of one item -----------------------------------------------------------

    def _offset(self, g: int, step: int) -> int:
        """The sink offset of (block g, step): all four of a block drawn together, blocks in order."""
        lo, hi = self.sample.sink_offset_range
        while self.drawn <= g:
            self.offsets[self.drawn] = [int(torch.randint(lo, hi + 1, (1,), generator=self.sink_rng))
                                        for _ in range(self.sample.num_steps)]
            self.drawn += 1
        return self.offsets[g][step]

    def noise(self, g: int) -> Tensor:
        """Block g's slice of its clip's noise (the head rank: step 0's input)."""
        clip, blk = divmod(g, self.sample.blocks_per_clip)
        if clip not in self._noise:
            gen = torch.Generator().manual_seed(self.seed + clip)
            h, w = self.hw
            self._noise = {clip: torch.randn(16, self.sample.latent_frames_per_clip, h, w,
                                             generator=gen).to(self.dit.compute_dtype)}
        fpb = self.sample.frames_per_block
        return self._noise[clip][:, blk * fpb: (blk + 1) * fpb]

    @torch.no_grad()
    def prefill(self, x_in: Tensor | None) -> Tensor:
        """The sink prefill over this rank's layers; returns the hidden state for the next rank."""
        x, c = self.dit.prepare_sink(self.ref_latents, self.motion_latents, self.text, self.sample.frames_per_block)
        if x_in is not None:
            x = x_in.to(self.ctx.device)
        x = self.runtime.prefill_units(x, c)
        self.sink_ready = True
        return x

    @torch.no_grad()
    def run_item(self, g: int, step: int, x_in: Tensor | None, latents: Tensor) -> tuple[Tensor | None, Tensor]:
        """Item (block g, step) on this rank's layers: (hidden state for the next rank, latents);
        on the last rank (None, the latents after the Euler step)."""
        s = self.sample
        clip, blk = divmod(g, s.blocks_per_clip)
        offset = self._offset(g, step)
        fpb, px = s.frames_per_block, s.video_frames_per_block
        frame0 = clip * s.latent_frames_per_clip + blk * fpb
        a0 = clip * s.infer_frames + blk * px
        audio = self.audio[..., a0: a0 + px].to(self.dit.compute_dtype)
        t = self.schedule.timesteps[step]
        x, c = self.dit.prepare_block(latents, t, frame0, audio, self.text, offset)  # every rank: its conditioning
        if x_in is not None:
            x = x_in.to(self.ctx.device)
        x = self.runtime.denoise_units(step, frame0 * self.tokens_per_frame, x, c)
        if step == s.num_steps - 1:
            self.offsets.pop(g, None)
        if not self.last:
            return x, latents
        flow = self.dit.finish(x, c)  # on the host
        return None, self.schedule.step(step, flow, latents.to(flow.device))

    # ---- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """At a cut clip boundary: position, the sink-offset stream, this rank's caches."""
        return {"layers": list(self.ctx.role.layers), "next_block": self.next_block_index, "drawn": self.drawn,
                "sink_ready": self.sink_ready, "seed": self.seed, "sink_rng": self.sink_rng.get_state(),
                "caches": self.runtime.kv_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layers") != list(self.ctx.role.layers):
            raise UserError(f"cannot resume: rank {self.ctx.rank}'s checkpoint holds layers {state.get('layers')}, "
                            f"this rank runs {list(self.ctx.role.layers)}; resume with the same --ranks and --split")
        if state["seed"] != self.seed:
            raise ValueError(f"resume state was made with seed {state['seed']}, not {self.seed}")
        self.next_block_index, self.drawn = int(state["next_block"]), int(state["drawn"])
        self.sink_ready = bool(state["sink_ready"])
        self.sink_rng.set_state(state["sink_rng"])
        self.offsets = {}
        self.runtime.load_kv_state(state["caches"])


class LayerLoop:
    """A layer rank's links and its part of the loop. The coordinator (when it is the last DiT rank)
    pulls finished blocks with `recv()`, as it would from a BlockLink."""

    def __init__(self, ctx: RankContext, stage: LayerStage, clock: CheckpointClock | None = None) -> None:
        self.ctx, self.stage, self.clock, self.r = ctx, stage, clock, ctx.rank
        self.last_dit = max(r.rank for r in ctx.roles if r.steps)
        s, dt = stage.sample, stage.dit.compute_dtype
        hidden = ((1, s.frames_per_block * stage.tokens_per_frame, stage.runtime.cfg.dim), dt)
        lat = ((16, s.frames_per_block, *stage.hw), dt)
        self.item_parts, self.back_parts = (hidden, lat), (lat,)
        self.to_next = ItemSender(self.r + 1, self.item_parts) if self.r < self.last_dit else None
        self.back_out = ItemSender(0, self.back_parts) if self.r == self.last_dit else None
        last_sends_block = self.r == self.last_dit and not ctx.role.decodes  # a spare rank decodes
        self.to_decoder = BlockLink(None, ctx.coordinator, lat[0]) if last_sends_block else None
        self.receiver: ItemReceiver | None = None

    @property
    def blocks_left(self) -> int:
        return self.stage.total_blocks - self.stage.next_block_index

    def _prefill(self) -> None:
        """The sink prefill, rank 0 to the last DiT rank (whose output is not used); none on resume."""
        import torch.distributed as dist

        from .comm import _guarded

        st = self.stage
        if st.sink_ready:
            return
        x_in = None
        if not st.first:
            like, _ = st.dit.prepare_sink(st.ref_latents, st.motion_latents, st.text, st.sample.frames_per_block)
            buf = torch.empty(like.numel() * like.element_size(), dtype=torch.uint8)
            _guarded(f"waiting for rank {self.r - 1}", lambda: dist.recv(buf, self.r - 1))
            x_in = buf.view(like.dtype).view(like.shape)
        x = st.prefill(x_in)
        if self.r < self.last_dit:
            raw = x.detach().cpu().contiguous().view(-1).view(torch.uint8)
            _guarded(f"sending to rank {self.r + 1}", lambda: dist.send(raw, self.r + 1))

    def _item_done(self, g: int, step: int, flag: bool) -> None:
        """After an item: at the last item of a clip the rank's position moves on, and on a clip the
        head cut for a checkpoint a DiT-only rank writes its companion (before passing the item on)."""
        s = self.stage.sample
        if step == s.num_steps - 1 and (g + 1) % s.blocks_per_clip == 0:
            self.stage.next_block_index = g + 1
            if flag and self.r != self.ctx.coordinator:
                write_companion(self.ctx, self.stage, g // s.blocks_per_clip)

    def run_head(self) -> None:
        """Rank 0: issue every item in wavefront order, cutting the wave at checkpointed clips."""
        st, s = self.stage, self.stage.sample
        self._prefill()
        back = ItemReceiver(self.last_dit, self.back_parts, self.blocks_left * (s.num_steps - 1))
        due: set[int] = set()

        def cut(b: int) -> bool:  # asked once, before block b's first item
            if b % s.blocks_per_clip or self.clock is None:
                return False
            clip = b // s.blocks_per_clip - 1
            if self.clock.due(clip):
                due.add(clip)
                return True
            return False

        assert self.to_next is not None
        for g, step in wavefront(st.next_block_index, st.total_blocks, s.num_steps, cut):
            if step == 0:
                latents = st.noise(g)
            else:
                header, (latents,) = back.recv()  # sync point: the last rank's Euler step of (g, step - 1)
                if header[:2] != (g, step):
                    raise RuntimeError(f"rank {self.last_dit} sent block {header[0]} step {header[1]}, "
                                       f"expected {g}/{step}")
            x, latents = st.run_item(g, step, None, latents)
            flag = step == s.num_steps - 1 and g // s.blocks_per_clip in due and (g + 1) % s.blocks_per_clip == 0
            self._item_done(g, step, flag)
            self.to_next.send((g, step, int(flag)), x, latents)  # type: ignore[arg-type]
        self.to_next.flush()  # sync point: rank 1 has every item before this rank moves on

    def _next_from_prev(self) -> tuple[int, int, bool, Tensor | None, Tensor]:
        """Ranks after the head: the next item from rank-1 through this rank's layers."""
        if self.receiver is None:
            self._prefill()
            self.receiver = ItemReceiver(self.r - 1, self.item_parts, self.blocks_left * self.stage.sample.num_steps)
        header, (x_in, latents) = self.receiver.recv()  # sync point: rank-1's item
        g, step, flag = header[0], header[1], bool(header[2])
        x, latents = self.stage.run_item(g, step, x_in, latents)
        self._item_done(g, step, flag)
        return g, step, flag, x, latents

    def run_middle(self) -> None:
        """A rank between the head and the last DiT rank: take, run, pass on."""
        assert self.to_next is not None
        for _ in range(self.blocks_left * self.stage.sample.num_steps):
            g, step, flag, x, latents = self._next_from_prev()
            self.to_next.send((g, step, int(flag)), x, latents)  # type: ignore[arg-type]
        self.to_next.flush()

    def recv(self) -> tuple[BlockHeader, Tensor]:
        """The last DiT rank: run items until a block has had its last step (the latents of earlier
        steps go back to rank 0); the coordinator reads its blocks here as from a BlockLink."""
        s = self.stage.sample
        assert self.back_out is not None
        while True:
            g, step, flag, _, latents = self._next_from_prev()
            if step < s.num_steps - 1:
                self.back_out.send((g, step + 1), latents)
                continue
            if g + 1 >= self.stage.total_blocks:
                self.back_out.flush()  # the last block: rank 0 has had everything
            clip, blk = divmod(g, s.blocks_per_clip)
            return BlockHeader(clip, blk, flag), latents

    def run_last(self) -> None:
        """The last DiT rank when a spare rank decodes: every block on to it."""
        assert self.to_decoder is not None
        for _ in range(self.blocks_left):
            header, latents = self.recv()
            self.to_decoder.send(header, latents)


def start_layer_stage(ctx: RankContext, dit_stage: DiTStage, setup: StageSetup) -> LayerStage:
    """This rank's LayerStage over the runtime the DiTStage loaded."""
    return LayerStage(ctx, dit_stage.runtime, setup)


def run_layer_rank(ctx: RankContext, dit_stage: DiTStage) -> None:
    """A DiT-only rank of the layer split: set-up, start (or resume), then its part of the items."""
    setup: StageSetup | None = broadcast(None, src=ctx.coordinator)
    if setup is None:
        log.info("rank %d: nothing left to render", ctx.rank)
        return
    stage = start_layer_stage(ctx, dit_stage, setup)
    start: StageStart = broadcast(None, src=ctx.coordinator)
    begin(ctx, stage, start, ctx.rank)
    head = ctx.rank == 0
    clock = CheckpointClock(ctx.request.checkpoint_interval_s, stage.num_clips) if head else None
    loop = LayerLoop(ctx, stage, clock)
    if head:
        loop.run_head()
    elif ctx.rank == loop.last_dit:
        loop.run_last()
    else:
        loop.run_middle()
