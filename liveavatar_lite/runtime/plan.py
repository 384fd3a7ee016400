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
from dataclasses import asdict, dataclass, field

from ..artifact.format import read_manifest
from ..errors import BudgetError, gb_pair
from .device_profiles import DeviceProfile
from .plan_inputs import (
    GB,  # noqa: F401 - re-exported: plan_cmd and the benchmarks import it from here
    KV_DTYPES,
    Budget,
    PlanInput,
    alternatives,
    manifest_unit_sizes,
    plan_input,
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

    def to_json(self) -> dict:
        """A JSON-able dict (the `plan --json` output)."""
        d = asdict(self)
        d["size"] = f"{self.size[0]}*{self.size[1]}"
        return d

    @property
    def streamed_units(self) -> tuple[UnitPlacement, ...]:
        return tuple(u for u in self.units if u.placement != "gpu")


def vae_arena_estimate(size: tuple[int, int]) -> int:
    """ORT arena for the streaming VAE decoder at `size`: a few dozen full-resolution fp16 96-channel
    feature maps alive at once (one latent frame -> 4 pixel frames plus the causal caches)."""
    w, h = size
    return int(64 * w * h * 96)


# ---------------------------------------------------------------- the planner

@dataclass(frozen=True)
class _Layout:
    resident_layers: frozenset[int]  # layers whose weight unit stays on the GPU
    gpu_steps: frozenset[int]  # steps whose ring lives on the GPU
    sink_gpu: bool
    weights_on_disk: bool


def make_plan(inp: PlanInput, budget: Budget, profile: DeviceProfile) -> Plan:
    """The fastest layout of `inp` that fits `budget`; BudgetError naming what would fit otherwise.

        plan = make_plan(inp, Budget(vram_bytes=24e9, kv_dtype="fp8"), get_profile("rtx4090"))
    """
    if budget.kv_dtype not in KV_DTYPES:
        raise BudgetError(f"unknown KV dtype {budget.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    best = _best_layout(inp, budget, profile)
    if best is None:
        raise BudgetError(_no_fit_message(inp, budget, profile))
    return _build(inp, budget, profile, best)


def min_vram_bytes(inp: PlanInput, budget: Budget) -> int:
    """The VRAM budget the leanest layout needs (everything streamed, every KV cache on the host)."""
    lean = _Layout(frozenset(), frozenset(), False, False)
    return math.ceil(_peak(inp, budget, lean)[0] / (1 - budget.reserve_frac))


def _candidates(inp: PlanInput, budget: Budget) -> Iterator[_Layout]:
    """The layouts worth comparing: for each choice of GPU rings, sink placement and weight source
    (host or disk), the one keeping the most weight units resident within the VRAM budget."""
    usable = budget.vram_bytes * (1 - budget.reserve_frac)
    steps = sorted({k.step for k in inp.kv if k.step is not None})
    has_sink = any(k.step is None for k in inp.kv)
    for n_gpu_steps in range(len(steps) + 1):
        # Which steps go on the GPU does not change bytes or time (all rings are equal); take the last ones.
        gpu_steps = frozenset(steps[len(steps) - n_gpu_steps:])
        for sink_gpu in ((False, True) if has_sink else (False,)):
            for on_disk in (False, True):
                layout = _most_resident(inp, budget, usable, gpu_steps, sink_gpu, on_disk)
                if layout is not None:
                    yield layout


def _best_layout(inp: PlanInput, budget: Budget, profile: DeviceProfile) -> _Layout | None:
    """The fastest candidate that also fits the host RAM budget, or None."""
    best: tuple[tuple[float, int, float], _Layout] | None = None
    for layout in _candidates(inp, budget):
        if not _ram_fits(inp, budget, layout):
            continue
        seconds, h2d = _predict(inp, budget, profile, layout)
        # fastest first; among equally fast layouts (transfers hidden anyway) the one that
        # moves fewer bytes, then the smaller peak
        key = (round(seconds, 4), h2d, _peak(inp, budget, layout)[0])
        if best is None or key < best[0]:
            best = (key, layout)
    return best[1] if best else None


def _most_resident(inp: PlanInput, budget: Budget, usable: float, gpu_steps: frozenset[int], sink_gpu: bool,
                   on_disk: bool) -> _Layout | None:
    """Keep as many weight units resident as fit, the streamed ones spread evenly among them."""
    layers = sorted(u.layer for u in inp.units if u.layer is not None)
    for n_resident in range(len(layers), -1, -1):
        streamed = _spread(layers, len(layers) - n_resident)
        if on_disk and not streamed:
            continue  # nothing to read from disk; the host layout covers this
        layout = _Layout(frozenset(layers) - streamed, gpu_steps, sink_gpu, on_disk)
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


def _peak(inp: PlanInput, budget: Budget, lay: _Layout) -> tuple[float, dict[str, int]]:
    """Peak VRAM of a layout and its parts. Everything below is allocated once and kept."""
    dt = budget.kv_dtype
    size = inp.workload.size
    vae = budget.vae_arena_bytes if budget.vae_arena_bytes is not None else vae_arena_estimate(size)
    streamed = [u for u in inp.units if u.layer is not None and u.layer not in lay.resident_layers]
    resident = [u for u in inp.units if u.layer is None or u.layer in lay.resident_layers]
    host_rings = [k for k in inp.kv if k.step is not None and k.step not in lay.gpu_steps]
    gpu_kv = [k for k in inp.kv if (k.step is None and lay.sink_gpu) or (k.step in lay.gpu_steps)]
    sink_host = [k for k in inp.kv if k.step is None and not lay.sink_gpu]
    parts = {
        "cuda_context": int(budget.cuda_context_bytes),
        "vae_arena": int(vae),
        "vae_caches": inp.workload.vae_cache_bytes,
        "activations": inp.workload.activation_bytes,
        "resident_weights": sum(u.nbytes for u in resident),
        # two fixed slots, each as large as the largest streamed unit (ping-pong)
        "weight_slots": 2 * max((u.nbytes for u in streamed), default=0),
        "gpu_kv": sum(k.nbytes(dt) for k in gpu_kv),
        # two slots for one layer of a host ring, two for one layer of the host sink
        "kv_slots": 2 * max((k.layer_bytes(dt) for k in host_rings), default=0)
        + 2 * max((k.layer_bytes(dt) for k in sink_host), default=0),
    }
    return float(sum(parts.values())), parts


def _host_bytes(inp: PlanInput, budget: Budget, lay: _Layout) -> int:
    dt = budget.kv_dtype
    streamed = [u.nbytes for u in inp.units if u.layer is not None and u.layer not in lay.resident_layers]
    # disk: two pinned staging buffers; host: every streamed unit pinned
    weights = 2 * max(streamed, default=0) if lay.weights_on_disk else sum(streamed)
    kv = sum(k.nbytes(dt) for k in inp.kv
             if (k.step is None and not lay.sink_gpu) or (k.step is not None and k.step not in lay.gpu_steps))
    return int(budget.host_baseline_bytes + weights + kv)


def _ram_fits(inp: PlanInput, budget: Budget, lay: _Layout) -> bool:
    return budget.ram_bytes is None or _host_bytes(inp, budget, lay) <= budget.ram_bytes


def _predict(inp: PlanInput, budget: Budget, prof: DeviceProfile, lay: _Layout) -> tuple[float, int]:
    """(seconds per clip, H2D bytes per clip) of the prefetch-one-ahead pipeline.

    Unit i's copy overlaps unit i-1's compute (cyclically: the first unit of a step is prefetched
    during the last unit of the previous step), so unit i waits max(0, copy_i - compute_{i-1}).
    """
    wl, dt = inp.workload, budget.kv_dtype
    unit_by_layer = {u.layer: u for u in inp.units if u.layer is not None}
    layers = sorted(unit_by_layer)
    lin_rate = prof.linear_tops(inp.weight_format) * 1e12
    attn_rate = prof.attention_tflops() * 1e12
    compute = [wl.linear_flops[i] / lin_rate + wl.attn_flops[i] / attn_rate for i in range(len(layers))]
    sink = [k for k in inp.kv if k.step is None]
    new_kv = wl.new_kv_layer_bytes_bf16 if dt == "bf16" else wl.new_kv_layer_bytes_bf16 // 2
    total_s, total_h2d = 0.0, 0
    for step in _planned_steps(inp):
        ring_on_host = [k for k in inp.kv if k.step == step and step not in lay.gpu_steps]
        copy = []
        for layer in layers:
            w = 0 if layer in lay.resident_layers else unit_by_layer[layer].nbytes
            kv = sum(k.layer_bytes(dt) for k in ring_on_host)
            kv += 0 if lay.sink_gpu else sum(k.layer_bytes(dt) for k in sink)
            # H2D of this unit, then (same copy stream, so serial) the write-back of this block's new K/V
            seconds = (w + kv) / (prof.h2d_gbps * 1e9)
            if ring_on_host:
                seconds += new_kv / (prof.d2h_gbps * 1e9)
            if w and lay.weights_on_disk:
                seconds += w / (prof.disk_gbps * 1e9)
            copy.append(seconds)
            total_h2d += w + kv
        n = len(layers)
        total_s += sum(compute[i] + max(0.0, copy[i] - compute[i - 1]) for i in range(n))
    return total_s * wl.blocks_per_clip, total_h2d * wl.blocks_per_clip


def _planned_steps(inp: PlanInput) -> list[int]:
    """The denoising steps this process runs: those whose ring the input places (a pipeline rank
    holds only its own, runtime/stage_plan.py), or all `workload.steps` when it places no ring."""
    return sorted({k.step for k in inp.kv if k.step is not None}) or list(range(inp.workload.steps))


def _build(inp: PlanInput, budget: Budget, prof: DeviceProfile, lay: _Layout) -> Plan:
    peak, parts = _peak(inp, budget, lay)
    seconds, h2d = _predict(inp, budget, prof, lay)
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
        peak_vram_bytes=int(peak), host_ram_bytes=_host_bytes(inp, budget, lay),
        h2d_bytes_per_clip=int(h2d), predicted_seconds_per_clip=seconds,
        vram_budget_bytes=int(budget.vram_bytes), breakdown=parts, device_profile=prof.name,
    )


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
    have = f"{have_vram_gb} VRAM" + (f" + {have_ram_gb} RAM" if budget.ram_bytes is not None else "")
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


def plan_for_artifact(directory, size: tuple[int, int], budget: Budget, profile) -> Plan:
    """The plan of an artifact directory (what `generate` and `plan ARTIFACT` use).

        plan = plan_for_artifact("art", (704, 384), Budget(vram_bytes=24e9, kv_dtype="fp8"), get_profile("rtx4090"))
    """
    m = read_manifest(directory)
    inp = plan_input(m.dit, size, m.quant.format, unit_sizes=manifest_unit_sizes(m))
    return make_plan(inp, budget, profile)
