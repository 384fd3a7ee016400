"""The memory plan: place every weight unit and KV cache on gpu / host / disk within ONE budget.

A pure function of (unit byte sizes, KV shapes, workload at one size) + (VRAM, RAM, KV dtype) +
a device profile. It enumerates the few real choices (which KV caches live on the GPU, whether
the sink does, how many weight units stay resident) and keeps the fastest layout that fits,
predicting time with the same prefetch-one-ahead pipeline the streamer runs. `plan_inputs.py`
builds the `PlanInput` from an artifact manifest or from a config + format.

    plan = make_plan(inp, Budget(vram_bytes=24e9), get_profile("rtx4090")); plan.peak_vram_bytes
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

from ..errors import BudgetError, gb_pair
from .costs import (
    Kernels,
    audio_feature_seconds,
    clip_with_decode,
    decode_seconds_per_block,
    embed_head_seconds,
    layer_step_costs,
    resolve_kernels,
)
from .device_profiles import DeviceProfile
from .plan_inputs import (
    GB,  # noqa: F401 - re-exported: plan_cmd and the benchmarks import it from here
    KV_DTYPES,
    WEIGHT_CHUNK_BYTES,
    Budget,
    PlanInput,
    alternatives,
)


@dataclass(frozen=True)
class UnitPlacement:
    """Where one weight unit lives for the whole run."""

    name: str
    nbytes: int
    placement: str  # "gpu" (resident), "host" (pinned, streamed) or "disk" (read when streamed)
    layer: int | None


@dataclass(frozen=True)
class KVPlacement:
    """Where one KV cache (a step's ring or the sink) lives, and its size in `dtype`."""

    name: str
    step: int | None
    dtype: str
    nbytes: int
    placement: str  # "gpu" or "host"


@dataclass(frozen=True)
class Plan:
    """The chosen layout and what it costs. All sizes in bytes."""

    weight_format: str
    size: tuple[int, int]
    units: tuple[UnitPlacement, ...]
    kv: tuple[KVPlacement, ...]
    peak_vram_bytes: int
    host_ram_bytes: int
    h2d_bytes_per_clip: int
    predicted_seconds_per_clip: float
    vram_budget_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # what the peak is made of
    device_profile: str = ""
    host_breakdown: dict[str, int] = field(default_factory=dict)  # what host_ram_bytes is made of
    decode_latents_per_call: int = 0  # latents per ONNX decoder call (0: the decoder is not planned)
    seconds_breakdown: dict[str, float] = field(default_factory=dict)  # per clip: gemm, attention, elementwise, copy stalls
    kernels: str = ""  # how the units run, as priced: "fused graphs (compile on), attention flash"
    # The VAE decoder on this GPU, per clip: all its time, and what the DiT does not hide of it
    # (costs.clip_with_decode); 0 when the plan has no decoder on the device.
    decode_seconds_per_clip: float = 0.0
    decode_exposed_seconds_per_clip: float = 0.0
    # H2D bytes per clip at the profile's H2D rate: no layout of this plan's copies runs faster
    pcie_floor_seconds_per_clip: float = 0.0

    @property
    def clip_seconds(self) -> float:
        """Predicted wall seconds per clip: the DiT and the decoder time it does not hide."""
        return self.predicted_seconds_per_clip + self.decode_exposed_seconds_per_clip

    def to_json(self) -> dict:
        """A JSON-able dict (the `plan --json` output)."""
        d = asdict(self)
        d["size"] = f"{self.size[0]}*{self.size[1]}"
        return d

    @property
    def streamed_units(self) -> tuple[UnitPlacement, ...]:
        return tuple(u for u in self.units if u.placement != "gpu")

    @property
    def decoder_arena_bytes(self) -> int:
        """What the ONNX decoder's arena may hold (its `gpu_mem_limit`): weights + working set of one
        call + cuDNN workspace. The cache banks are not in it (the runtime allocates them)."""
        b = self.breakdown
        return int(b.get("vae_arena", 0) + b.get("vae_weights", 0) + b.get("vae_working_set", 0)
                   + b.get("vae_workspace", 0))

    @property
    def pinned_host_bytes(self) -> int:
        """Host bytes the runtime page-locks: streamed weights (or the disk staging buffers) + host KV."""
        return int(sum(v for k, v in self.host_breakdown.items() if k != "baseline"))


@dataclass(frozen=True)
class TalkPrediction:
    """One block of a talk session (pipeline/session.py) as the plan predicts it: from the arrival of
    the last speech sample the block waits for (its end + the lookahead) to its frames: wav2vec2 over
    the window, the DiT's 4 steps, the VAE decode (a session decodes each block before the next
    starts: nothing hides it). `realtime_factor`: seconds of video per second of rendering while
    speech keeps coming: one block per `interval_seconds` (a pipeline of ranks holds several blocks
    in flight: its slowest rank's time per block), else one block after another (the latency);
    below 1 the latency grows with every block."""

    block_video_seconds: float  # 12 frames at 25 fps
    lookahead_seconds: float
    features_seconds: float
    dit_seconds: float
    decode_seconds: float
    interval_seconds: float | None = None  # None: blocks rendered one after another

    @property
    def latency_seconds(self) -> float:
        return self.features_seconds + self.dit_seconds + self.decode_seconds

    @property
    def realtime_factor(self) -> float:
        per_block = self.latency_seconds if self.interval_seconds is None else self.interval_seconds
        return self.block_video_seconds / per_block if per_block > 0 else float("inf")

    def to_json(self) -> dict:
        return {**asdict(self), "latency_seconds": self.latency_seconds, "realtime_factor": self.realtime_factor}

    def describe(self) -> str:
        """One line: the latency, its parts, the real-time factor (labelled a prediction)."""
        per_block = self.block_video_seconds / self.realtime_factor
        pace = ("keeps up with speech" if self.realtime_factor >= 1
                else f"slower than speech: the latency grows by {per_block - self.block_video_seconds:.2f} s per block")
        return (f"talk        per-block latency {self.latency_seconds:.2f} s after its speech + "
                f"{self.lookahead_seconds:g} s lookahead arrive (features {self.features_seconds:.3f} + DiT "
                f"{self.dit_seconds:.2f} + decode {self.decode_seconds:.2f}), session real-time factor "
                f"{self.realtime_factor:.3f}: {pace} (predictions)")


def predict_talk(inp: PlanInput, profile: DeviceProfile, dit_seconds_per_clip: float, decode_seconds_per_clip: float,
                 window_seconds: float, lookahead_seconds: float,
                 interval_seconds_per_clip: float | None = None) -> TalkPrediction:
    """A talk session's block from a clip's predicted DiT and decode seconds (one GPU's plan, or the
    sum over a pipeline's ranks: a block crosses them all) and wav2vec2 over `window_seconds`;
    `interval_seconds_per_clip`: a pipeline's seconds per clip (its slowest rank), None for one GPU.

        predict_talk(inp, prof, plan.predicted_seconds_per_clip, plan.decode_seconds_per_clip, 4.88, 0.4)
    """
    blocks = inp.workload.blocks_per_clip
    s = inp.sample
    return TalkPrediction(block_video_seconds=s.block_seconds, lookahead_seconds=lookahead_seconds,
                          features_seconds=audio_feature_seconds(window_seconds, inp, profile),
                          dit_seconds=dit_seconds_per_clip / blocks, decode_seconds=decode_seconds_per_clip / blocks,
                          interval_seconds=None if interval_seconds_per_clip is None
                          else interval_seconds_per_clip / blocks)


# ---------------------------------------------------------------- the planner

@dataclass(frozen=True)
class _Layout:
    resident_layers: frozenset[int]  # layers whose weight unit stays on the GPU
    gpu_steps: frozenset[int]  # steps whose ring lives on the GPU
    sink_gpu: bool
    weights_on_disk: bool
    decode_latents: int = 0  # latents per decoder call (0: no decoder figures to choose from)


def make_plan(inp: PlanInput, budget: Budget, profile: DeviceProfile) -> Plan:
    """The fastest layout of `inp` that fits `budget`; BudgetError naming what would fit otherwise.

        plan = make_plan(inp, Budget(vram_bytes=24e9, kv_dtype="fp8"), get_profile("rtx4090"))
    """
    if budget.kv_dtype not in KV_DTYPES:
        raise BudgetError(f"unknown KV dtype {budget.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    kernels = resolve_kernels(budget.compile, budget.attention, profile)
    budget = replace(budget, compile="on" if kernels.fused else "off", attention=kernels.attention)
    best = _best_layout(inp, budget, profile)
    if best is None:
        raise BudgetError(_no_fit_message(inp, budget, profile))
    return _build(inp, budget, profile, best)


def min_vram_bytes(inp: PlanInput, budget: Budget) -> int:
    """The VRAM budget the leanest layout needs (everything streamed, every KV cache on the host,
    the smallest decoder calls)."""
    lean = _Layout(frozenset(), frozenset(), False, False, min(_decode_options(inp, budget)))
    return math.ceil(_peak(inp, budget, lean)[0] / (1 - budget.reserve_frac))


def _decode_options(inp: PlanInput, budget: Budget) -> tuple[int, ...]:
    """Latents per decoder call the plan may choose, largest first (0: the decoder is not planned)."""
    dec = inp.workload.decoder
    if dec is None or budget.vae_arena_bytes is not None or not dec.working_set_bytes:
        return (0,)
    sized = tuple(n for n, _ in dec.working_set_bytes)
    if budget.decode_latents is None:
        return sized
    if budget.decode_latents not in sized:
        raise BudgetError(f"decoder calls of {budget.decode_latents} latents are not sized; choose one of "
                          f"{', '.join(map(str, sized))}")
    return (budget.decode_latents,)


def _candidates(inp: PlanInput, budget: Budget) -> Iterator[_Layout]:
    """The layouts worth comparing: for each choice of GPU rings, sink placement, weight source
    (host or disk) and decoder call size, the one keeping the most weight units resident within the
    VRAM budget."""
    usable = budget.vram_bytes * (1 - budget.reserve_frac)
    steps = sorted({k.step for k in inp.kv if k.step is not None})
    has_sink = any(k.step is None for k in inp.kv)
    for decode in _decode_options(inp, budget):
        for n_gpu_steps in range(len(steps) + 1):
            # Which steps go on the GPU does not change bytes or time (all rings are equal); take the last ones.
            gpu_steps = frozenset(steps[len(steps) - n_gpu_steps:])
            for sink_gpu in ((False, True) if has_sink else (False,)):
                for on_disk in (False, True):
                    layout = _most_resident(inp, budget, usable, gpu_steps, sink_gpu, on_disk, decode)
                    if layout is not None:
                        yield layout


def _best_layout(inp: PlanInput, budget: Budget, profile: DeviceProfile) -> _Layout | None:
    """The fastest candidate that also fits the host RAM budget, or None."""
    best: tuple[tuple[float, int, int, float], _Layout] | None = None
    for layout in _candidates(inp, budget):
        if not _ram_fits(inp, budget, layout):
            continue
        seconds, h2d, _ = _predict(inp, budget, profile, layout)
        # fastest DiT first; among equally fast layouts (transfers hidden anyway) the larger decoder
        # calls (fewer, better-filled kernels; decode time is not predicted), then the one that moves
        # fewer bytes, then the smaller peak
        key = (round(seconds, 4), -layout.decode_latents, h2d, _peak(inp, budget, layout)[0])
        if best is None or key < best[0]:
            best = (key, layout)
    return best[1] if best else None


def _most_resident(inp: PlanInput, budget: Budget, usable: float, gpu_steps: frozenset[int], sink_gpu: bool,
                   on_disk: bool, decode: int) -> _Layout | None:
    """Keep as many weight units resident as fit, the streamed ones spread evenly among them."""
    layers = sorted(u.layer for u in inp.units if u.layer is not None)
    for n_resident in range(len(layers), -1, -1):
        streamed = _spread(layers, len(layers) - n_resident)
        if on_disk and not streamed:
            continue  # nothing to read from disk; the host layout covers this
        layout = _Layout(frozenset(layers) - streamed, gpu_steps, sink_gpu, on_disk, decode)
        if _peak(inp, budget, layout)[0] <= usable:
            return layout
    return None


def _spread(layers: list[int], k: int) -> frozenset[int]:
    """`k` of `layers` evenly interleaved (k=2 of 8 -> the 3rd and 7th), so that every streamed unit
    follows a resident one whose compute hides its copy."""
    if k <= 0:
        return frozenset()
    n = len(layers)
    return frozenset(layers[min(n - 1, int((j + 0.5) * n / k))] for j in range(k))


def _decoder_parts(inp: PlanInput, budget: Budget, lay: _Layout) -> dict[str, int]:
    """The ONNX decoder's device memory: from its graph's figures at the plan's size (weights, the
    working set of one call of `lay.decode_latents` latents, cuDNN workspace, both cache banks), or
    the budget's fixed arena figure."""
    dec = inp.workload.decoder
    if budget.vae_arena_bytes is not None or dec is None:
        return {"vae_arena": int(budget.vae_arena_bytes or 0), "vae_caches": inp.workload.vae_cache_bytes}
    working = dict(dec.working_set_bytes)
    return {"vae_weights": int(dec.weights_bytes), "vae_working_set": int(working[lay.decode_latents]),
            "vae_workspace": int(dec.workspace_bytes), "vae_caches": int(dec.caches_bytes)}


def decoder_parts(inp: PlanInput, budget: Budget) -> tuple[dict[str, int], int]:
    """The decoder's device memory alone (a pipeline rank that only decodes) at the smallest call
    size the budget allows, and that size (latents per call; 0 when the decoder is not planned)."""
    lay = _Layout(frozenset(), frozenset(), False, False, min(_decode_options(inp, budget)))
    return _decoder_parts(inp, budget, lay), lay.decode_latents


def _peak(inp: PlanInput, budget: Budget, lay: _Layout) -> tuple[float, dict[str, int]]:
    """Peak VRAM of a layout and its parts. Everything below is allocated once and kept."""
    dt = budget.kv_dtype
    streamed = [u for u in inp.units if u.layer is not None and u.layer not in lay.resident_layers]
    resident = [u for u in inp.units if u.layer is None or u.layer in lay.resident_layers]
    host_rings = [k for k in inp.kv if k.step is not None and k.step not in lay.gpu_steps]
    gpu_kv = [k for k in inp.kv if (k.step is None and lay.sink_gpu) or (k.step in lay.gpu_steps)]
    sink_host = [k for k in inp.kv if k.step is None and not lay.sink_gpu]
    parts = {
        "cuda_context": int(budget.cuda_context_bytes),
        **_decoder_parts(inp, budget, lay),
        "activations": inp.workload.activation_bytes,
        "text_kv": _text_kv_bytes(inp),  # kept per prompt, eager and fused (DiTRuntime._layer_text_kv)
        "resident_weights": sum(u.nbytes for u in resident),
        # two fixed slots, each as large as the largest streamed unit (ping-pong)
        "weight_slots": 2 * max((u.nbytes for u in streamed), default=0),
        "gpu_kv": sum(k.nbytes(dt) for k in gpu_kv),
        # two slots for one layer of a host ring, two for one layer of the host sink
        "kv_slots": 2 * max((k.layer_bytes(dt) for k in host_rings), default=0)
        + 2 * max((k.layer_bytes(dt) for k in sink_host), default=0),
    }
    return float(sum(parts.values())), parts


def _host_parts(inp: PlanInput, budget: Budget, lay: _Layout) -> dict[str, int]:
    """Host RAM of a layout: the baseline, and the buffers the runtime page-locks at their exact size
    (`pinned.host_buffer`: no power-of-two rounding as torch's pinned allocator does)."""
    dt = budget.kv_dtype
    streamed = [u.nbytes for u in inp.units if u.layer is not None and u.layer not in lay.resident_layers]
    kv = sum(k.nbytes(dt) for k in inp.kv
             if (k.step is None and not lay.sink_gpu) or (k.step is not None and k.step not in lay.gpu_steps))
    parts = {"baseline": int(budget.host_baseline_bytes), "pinned_kv": int(kv)}
    if lay.weights_on_disk:  # two pinned staging buffers, each as large as the largest unit read
        parts["staging"] = 2 * max(streamed, default=0)
    else:  # every streamed unit pinned
        parts["pinned_weights"] = sum(streamed)
    return parts


def _host_bytes(inp: PlanInput, budget: Budget, lay: _Layout) -> int:
    return int(sum(_host_parts(inp, budget, lay).values()))


def _ram_fits(inp: PlanInput, budget: Budget, lay: _Layout) -> bool:
    return budget.ram_bytes is None or _host_bytes(inp, budget, lay) <= budget.ram_bytes


def _text_kv_bytes(inp: PlanInput) -> int:
    """Device bytes of every layer's text K/V, kept per prompt (bf16), eager and fused."""
    if inp.dit is None:
        return 0
    return inp.dit.num_layers * 2 * inp.dit.text_len * inp.dit.dim * 2


def _kernels(budget: Budget, profile: DeviceProfile) -> Kernels:
    return resolve_kernels(budget.compile, budget.attention, profile)


def _predict(inp: PlanInput, budget: Budget, prof: DeviceProfile, lay: _Layout) -> tuple[float, int, dict[str, float]]:
    """(seconds per clip, H2D bytes per clip, seconds per clip by cause) of the unit loop.

    Compute of a layer = GEMM FLOPs at the format's effective rate + attention FLOPs + its non-matmul
    bytes at the device's memory bandwidth (unfused elementwise kernels: casts, modulation, RoPE,
    quantize/dequantize). Copies (the streamer's real pipeline, with weights and KV on separate copy
    streams sharing one H2D link):

    * the KV of layer k (host ring and sink layers) is copied while layer k-1 computes, after the
      write-back of layer k-1's new rows (same KV stream, FIFO); a weight copy in flight delays it
      by at most one piece (`WEIGHT_CHUNK_BYTES`) and otherwise yields the link to it;
    * a streamed weight unit is copied from the moment the previous streamed unit is acquired, in
      whatever link time the KV copies leave; what is not there when its layer starts is a stall.

    One block is simulated after a warm-up block (the pipeline is cyclic: the first units of a step
    are fetched during the last ones of the previous step).
    """
    wl, dt = inp.workload, budget.kv_dtype
    unit_by_layer = {u.layer: u for u in inp.units if u.layer is not None}
    layers = sorted(unit_by_layer)
    n = len(layers)
    costs = layer_step_costs(inp, prof, _kernels(budget, prof), dt)  # runtime/costs.py: each term's source
    gemm = [c.gemm for c in costs]
    attn = [c.attention for c in costs]
    ew = [c.elementwise for c in costs]
    compute = [c.seconds for c in costs]
    embed_head = embed_head_seconds(inp, prof)  # resident prologue + head, once per call
    h2d, d2h = prof.h2d_gbps * 1e9, prof.d2h_gbps * 1e9
    sink = [k for k in inp.kv if k.step is None]
    new_kv = wl.new_kv_layer_bytes_bf16 if dt == "bf16" else wl.new_kv_layer_bytes_bf16 // 2
    streamed = [i for i in range(n) if layers[i] not in lay.resident_layers]
    # <= 2 streamed units stay in the two slots after their first copy: no weight traffic per step
    weight_traffic = len(streamed) > 2
    w_bytes = [unit_by_layer[layers[i]].nbytes if weight_traffic and i in streamed else 0 for i in range(n)]
    disk = 1.0 / (prof.disk_gbps * 1e9) if lay.weights_on_disk else 0.0

    def kv_copy(step: int, i: int) -> tuple[int, int]:
        """(H2D bytes, write-back bytes) of layer i's KV at `step`."""
        ring_host = [k for k in inp.kv if k.step == step and step not in lay.gpu_steps]
        kv = sum(k.layer_bytes(dt) for k in ring_host) + (0 if lay.sink_gpu else sum(k.layer_bytes(dt) for k in sink))
        return kv, (new_kv if ring_host else 0)

    stall_kv = stall_w = 0.0
    total_h2d = 0
    w_left = 0.0  # seconds of link time the weight unit in flight still needs
    prev_compute = compute[-1]
    wb_two_back = wb_one_back = 0.0  # write-back seconds of layers k-2 and k-1
    steps = _planned_steps(inp)  # a pipeline rank runs only its own steps
    for block in range(2):  # block 0 warms the pipeline up; block 1 is measured
        for step in steps:
            for i in range(n):
                kv, wb = kv_copy(step, i)
                # KV stream (FIFO): layer k's copy goes into the slot layer k-2 used, after layer k-2's
                # write-back of its new rows; a weight piece already on the link is finished first
                kv_s = kv / h2d + wb_two_back + (min(WEIGHT_CHUNK_BYTES / h2d, w_left) if kv and w_left > 0 else 0.0)
                s_kv = max(0.0, kv_s - prev_compute)
                w_left = max(0.0, w_left - max(0.0, prev_compute - kv_s))  # the rest of the window: weights
                s_w = 0.0
                if w_bytes[i]:
                    s_w = w_left  # the link now serves only this unit until it is complete
                    nxt = streamed[(streamed.index(i) + 1) % len(streamed)]
                    w_left = w_bytes[nxt] / h2d + w_bytes[nxt] * disk  # prefetch of the next streamed unit
                if block == 1:
                    stall_kv += s_kv
                    stall_w += s_w
                    total_h2d += kv + w_bytes[i]
                prev_compute = compute[i]
                wb_two_back, wb_one_back = wb_one_back, wb / d2h
    blocks = wl.blocks_per_clip
    parts = {"gemm": sum(gemm) * len(steps) * blocks, "attention": sum(attn) * len(steps) * blocks,
             "elementwise": sum(ew) * len(steps) * blocks, "embed_head": embed_head * len(steps) * blocks,
             "kv_copy_stall": stall_kv * blocks, "weight_copy_stall": stall_w * blocks}
    return sum(parts.values()), total_h2d * blocks, parts


def _planned_steps(inp: PlanInput) -> list[int]:
    """The denoising steps this process runs: those whose ring the input places (a pipeline rank
    holds only its own, runtime/stage_plan.py), or all `workload.steps` when it places no ring."""
    return sorted({k.step for k in inp.kv if k.step is not None}) or list(range(inp.workload.steps))


def _build(inp: PlanInput, budget: Budget, prof: DeviceProfile, lay: _Layout) -> Plan:
    peak, parts = _peak(inp, budget, lay)
    seconds, h2d, by_cause = _predict(inp, budget, prof, lay)
    decode, exposed = _decode(inp, budget, prof, seconds, by_cause)
    host = _host_parts(inp, budget, lay)
    streamed_place = "disk" if lay.weights_on_disk else "host"
    units = tuple(
        UnitPlacement(u.name, u.nbytes, "gpu" if u.layer is None or u.layer in lay.resident_layers else streamed_place,
                      u.layer)
        for u in inp.units
    )
    kv = tuple(
        KVPlacement(k.name, k.step, budget.kv_dtype, k.nbytes(budget.kv_dtype),
                    "gpu" if (k.step is None and lay.sink_gpu) or k.step in lay.gpu_steps else "host")
        for k in inp.kv
    )
    return Plan(
        weight_format=inp.weight_format, size=inp.workload.size, units=units, kv=kv,
        peak_vram_bytes=int(peak), host_ram_bytes=int(sum(host.values())),
        h2d_bytes_per_clip=int(h2d), predicted_seconds_per_clip=seconds,
        vram_budget_bytes=int(budget.vram_bytes), breakdown=parts, device_profile=prof.name,
        host_breakdown=host, decode_latents_per_call=lay.decode_latents,
        seconds_breakdown={k: round(v, 4) for k, v in by_cause.items()},
        kernels=_kernels(budget, prof).label(), decode_seconds_per_clip=decode,
        decode_exposed_seconds_per_clip=exposed,
        pcie_floor_seconds_per_clip=h2d / (prof.h2d_gbps * 1e9) if prof.h2d_gbps > 0 else 0.0,
    )


def _decode(inp: PlanInput, budget: Budget, prof: DeviceProfile, dit_seconds: float,
            by_cause: dict[str, float]) -> tuple[float, float]:
    """(decoder seconds per clip, the part the DiT does not hide) when the decoder shares this
    device (the plan input has its graph's figures); (0, 0) otherwise."""
    if inp.workload.decoder is None:
        return 0.0, 0.0
    blocks = inp.workload.blocks_per_clip
    per_block = decode_seconds_per_block(inp, prof)
    stalls = by_cause.get("kv_copy_stall", 0.0) + by_cause.get("weight_copy_stall", 0.0)
    _, exposed = clip_with_decode(dit_seconds / blocks, (dit_seconds - stalls) / blocks, per_block, blocks,
                                  budget.overlap_decode)
    return per_block * blocks, exposed


def min_ram_bytes(inp: PlanInput, budget: Budget) -> int | None:
    """The least host RAM any layout that fits the VRAM budget needs (None: none fits the VRAM)."""
    return min((_host_bytes(inp, budget, lay) for lay in _candidates(inp, budget)), default=None)


def _no_fit_message(inp: PlanInput, budget: Budget, prof: DeviceProfile) -> str:
    need = min_vram_bytes(inp, budget)
    need_ram = min_ram_bytes(inp, budget) if need <= budget.vram_bytes else None
    # need rounded up, budget down, with enough decimals that the two never print alike
    need_vram_gb, have_vram_gb = gb_pair(need, budget.vram_bytes, decimals=1)
    need_ram_gb, have_ram_gb = gb_pair(need_ram or 0, budget.ram_bytes or 0, decimals=1)
    if need_ram is None:
        have_ram_gb = gb_pair(0, budget.ram_bytes or 0, decimals=1)[1]
    cpu = budget.vram_bytes >= 1e14  # a CPU run without --vram: no device budget to speak of
    have = ("" if cpu else f"{have_vram_gb} VRAM") + (
        f"{'' if cpu else ' + '}{have_ram_gb} RAM" if budget.ram_bytes is not None else "")
    why = (f"the host copies need {need_ram_gb} RAM" if need_ram is not None
           else f"the leanest layout needs {need_vram_gb} VRAM")
    head = (f"{inp.weight_format} weights at {inp.workload.size[0]}*{inp.workload.size[1]} with {budget.kv_dtype} KV "
            f"do not fit {have} ({why})")
    for label, alt_inp, alt_budget in alternatives(inp, budget):
        if _best_layout(alt_inp, alt_budget, prof) is not None:
            return f"{head}; smallest change that fits: {label}"
    if need_ram is not None:
        return f"{head}; nothing smaller fits either: raise --ram to at least {need_ram_gb.removesuffix(' GB')}"
    return f"{head}; nothing smaller fits either: raise --vram to at least {need_vram_gb.removesuffix(' GB')}"


# ---------------------------------------------------------------- per-layer costs (layer-split pipelines)

def layer_compute_seconds(inp: PlanInput, budget: Budget, prof: DeviceProfile) -> tuple[float, ...]:
    """Seconds of compute of each layer in one denoising call (one block-step) under the budget's
    kernels (compile mode, attention), nothing streamed: `_predict`'s own terms
    (`costs.layer_step_costs`). `runtime/stage_plan.py` balances a layer-split pipeline's ranks with it."""
    return tuple(c.seconds for c in layer_step_costs(inp, prof, _kernels(budget, prof), budget.kv_dtype))
