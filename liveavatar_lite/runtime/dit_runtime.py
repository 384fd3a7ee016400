"""The DiT runtime: an artifact's weights placed by a `Plan`, run unit by unit with streaming.

Loading builds `WanS2VDiT` on the meta device, swaps every quantized Linear for a `QuantLinear`
(module replacement), and binds each stored tensor to a zero-copy view of its unit's buffer:
resident units are bound once to a device buffer; streamed units are bound to a streamer slot
for the duration of their forward and unbound (back to meta) after it. KV caches come from
`kv_offload.KVOffload`, placed per the plan.

    rt = DiTRuntime.from_artifact("art/", plan, device="cuda")
    text = rt.embed_text(t5_states)
    rt.prefill_sink(ref_latents, motion_latents, text)
    flow = rt.denoise(step, latents, t, frame0, audio, text, sink_offset)   # [16, F, h, w]
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..artifact.format import Manifest, TensorEntry, read_manifest, read_unit
from ..config import DiTConfig
from ..errors import ArtifactError
from .fused_units import FusedUnits, compile_wanted
from .kv_offload import KVOffload
from .pinned import host_buffer
from .plan import Plan
from .plan_inputs import WEIGHT_CHUNK_BYTES, kv_specs
from .qlinear import QuantLinear, part_attr, swap_linears
from .streamer import DiskSource, PinnedSource, UnitStreamer

if TYPE_CHECKING:  # annotations only: the model is imported when a runtime is built
    from ..model.dit import DiTContext

log = logging.getLogger(__name__)


@dataclass
class UnitData:
    """One weight unit: its tensors (names, qtypes, offsets into the buffer) and where its bytes are.

    Exactly one of `host` (the unit's ONE contiguous host buffer) and `read_into` (fills a uint8
    buffer from disk) is set.
    """

    name: str
    layer: int | None
    nbytes: int
    tensors: tuple[TensorEntry, ...]
    host: Tensor | None = None
    read_into: Callable[[Tensor], None] | None = None

    def load(self) -> Tensor:
        """The bytes in host memory (reads from disk if needed)."""
        if self.host is not None:
            return self.host
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        assert self.read_into is not None  # exactly one of host / read_into is set
        self.read_into(buf)
        return buf


def artifact_units(directory: str | Path, manifest: Manifest, plan: Plan, pin: bool) -> list[UnitData]:
    """The DiT units of an artifact; streamed-from-host units are read now into exact-size (pinned)
    host buffers, disk units stay on disk, resident units are read when they are moved to the device."""
    placement = {u.name: u.placement for u in plan.units}
    held = set(plan_layers(plan))
    # A layer-split pipeline rank's plan places its range of layers AND sizes its KV for that many;
    # a plan that merely lacks a unit (stale, or broken) still fails below.
    layer_plan = len(held) < manifest.dit.num_layers and kv_layers(manifest.dit, plan) == len(held)
    out = []
    for u in manifest.units:
        if u.kind not in ("dit_block", "dit_resident"):
            continue
        where = placement.get(u.name)
        if where is None and layer_plan and u.kind == "dit_block" and u.block_index not in held:
            continue  # a layer-split pipeline rank: another rank holds this layer
        if where is None:
            raise ArtifactError(f"the plan does not place unit {u.name}; re-run `liveavatar-lite plan` for this artifact")
        reader = partial(_read_into, directory, u.name, manifest, set())
        host = None
        # verified (xxh3) as read: host units now, disk/resident units on their first read
        if where == "host":  # exact size, page-locked in place (torch's pinned allocator rounds up to 2^k)
            host = read_unit(directory, u, manifest=manifest, out=host_buffer(u.data_nbytes, pin=pin), verify=True)[0]
        out.append(UnitData(u.name, u.block_index if u.kind == "dit_block" else None, u.data_nbytes, u.tensors,
                            host=host, read_into=None if host is not None else reader))
    return out


def plan_layers(plan: Plan) -> tuple[int, ...]:
    """The layers a plan places, in order: all of them, or a layer-split pipeline rank's contiguous
    range (`runtime/stage_plan.py`). ValueError for a plan with a gap."""
    layers = tuple(sorted(u.layer for u in plan.units if u.layer is not None))
    if layers and layers != tuple(range(layers[0], layers[-1] + 1)):
        raise ValueError(f"the plan places layers {list(layers)}: a runtime runs one contiguous range")
    return layers


def kv_layers(cfg: DiTConfig, plan: Plan) -> int:
    """How many layers the plan's sink cache is sized for (all of them, or a layer rank's range)."""
    sink = next(k for k in plan.kv if k.step is None)
    spec = next(k for k in kv_specs(cfg, plan.size) if k.step is None)
    return sink.nbytes // spec.layer_bytes(sink.dtype)


def _read_into(directory: str | Path, name: str, manifest: Manifest, verified: set[str], out: Tensor) -> None:
    """Read unit `name` into `out`; its checksum is checked on the first read (later reads of a
    disk-streamed unit skip the hash: it was verified before first use)."""
    read_unit(directory, name, manifest=manifest, out=out, verify=name not in verified)
    verified.add(name)


@dataclass(frozen=True)
class _Slot:
    """Where one stored tensor goes: module attribute, and its bytes inside the unit buffer."""

    module: nn.Module
    attr: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    cast: torch.dtype | None  # passthrough tensors not stored in the compute dtype (rare)
    placeholder: Tensor  # meta tensor bound while the unit is not loaded


class _Binder:
    """Points a module tree's parameters/buffers at views of a unit buffer (no copies). The module
    lookups are resolved once per unit, so a bind is one view + one setattr per stored tensor."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype) -> None:
        self.model, self.compute_dtype = model, compute_dtype
        self._slots: dict[str, list[_Slot]] = {}

    def _resolve(self, unit: UnitData) -> list[_Slot]:
        slots = self._slots.get(unit.name)
        if slots is not None:
            return slots
        slots = []
        for e in unit.tensors:
            path, _, attr = e.name.rpartition(".")
            module = self.model.get_submodule(path)
            if e.qtype.is_quantized:
                if not isinstance(module, QuantLinear):
                    raise ArtifactError(f"{e.name} is stored {e.qtype.value} but {path} is not a quantized linear")
                for p in e.parts:
                    slots.append(_Slot(module, part_attr(p.role), p.offset, p.nbytes, p.torch_dtype, p.shape, None,
                                       torch.empty(p.shape, dtype=p.torch_dtype, device="meta")))
            else:
                p = e.part("data")
                cast = self.compute_dtype if p.torch_dtype.is_floating_point and p.torch_dtype != self.compute_dtype else None
                slots.append(_Slot(module, attr, p.offset, p.nbytes, p.torch_dtype, tuple(e.logical_shape), cast,
                                   torch.empty(e.logical_shape, dtype=cast or p.torch_dtype, device="meta")))
        self._slots[unit.name] = slots
        return slots

    def bind(self, unit: UnitData, buf: Tensor) -> None:
        for s in self._resolve(unit):
            t = buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)  # uint8 bytes -> typed view
            if s.cast is not None:
                t = t.to(s.cast)  # one small copy per bind (fp32 passthrough)
            _set_tensor(s.module, s.attr, t)

    def unbind(self, unit: UnitData) -> None:
        """Point the unit's tensors back at meta, so a stale slot can never be read by mistake."""
        for s in self._resolve(unit):
            _set_tensor(s.module, s.attr, s.placeholder)


def _set_tensor(module: nn.Module, attr: str, t: Tensor) -> None:
    """Replace a registered parameter or buffer in place. The registries are written directly (as
    accelerate's set_module_tensor_to_device does): nn.Module.__setattr__'s generic checks cost
    ~20 us per call, which adds up to milliseconds per streamed unit."""
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = t
    else:
        raise ArtifactError(f"{type(module).__name__} has no parameter or buffer {attr!r}")


class WeightStreamer:
    """The weight side of the unit loop: resident units are bound once; streamed ones go through a
    `UnitStreamer` (two slots) and are bound only between `open(i)` and `close(i)`."""

    def __init__(self, units: Sequence[UnitData], binder: _Binder, device: torch.device,
                 copy_stream: object | None, timing: bool) -> None:
        self.binder, self.device = binder, device
        self.resident_bufs: list[Tensor] = []
        streamed = sorted(units, key=lambda u: -1 if u.layer is None else u.layer)
        self.by_layer: dict[int, UnitData] = {}
        sources: list[PinnedSource | DiskSource] = []
        for u in streamed:
            if u.layer is None:
                raise ArtifactError(f"unit {u.name} must be resident")
            self.by_layer[u.layer] = u
            sources.append(PinnedSource(u.host) if u.host is not None else DiskSource(u.nbytes, u.read_into))  # type: ignore[arg-type]
        self.order = [u.layer for u in streamed]  # streamed layers in execution order
        # copied in pieces of WEIGHT_CHUNK_BYTES (the engine still runs queued pieces in order: streamer.py)
        self.streamer = UnitStreamer(sources, device, copy_stream=copy_stream, timing=timing,
                                     chunk_bytes=WEIGHT_CHUNK_BYTES) if sources else None

    def make_resident(self, unit: UnitData, buf: Tensor) -> None:
        dev = buf.to(self.device, copy=True)  # ONE copy per resident unit, kept for the whole run
        self.resident_bufs.append(dev)
        self.binder.bind(unit, dev)

    def open(self, i: int) -> None:
        if i not in self.by_layer:
            return
        k = self.order.index(i)
        buf = self.streamer.acquire(k)  # sync point inside: compute waits for unit i's copy only
        # Prefetch the next streamed unit (cyclically: the first unit of the next step follows the
        # last one) into the other slot, so its copy overlaps this unit's compute.
        self.streamer.prefetch((k + 1) % len(self.order))
        self.binder.bind(self.by_layer[i], buf)

    def close(self, i: int) -> None:
        if i not in self.by_layer:
            return
        self.binder.unbind(self.by_layer[i])
        self.streamer.release(self.order.index(i))  # sync point inside: the slot frees when these kernels finish


class DiTRuntime:
    """A loaded DiT + placed KV caches; runs sink prefills and denoising steps.

    rope_fp64: rotate q/k in float64 as upstream (None: only when computing in fp32, where the CPU
    reference runs match upstream bit for bit; in bf16 on a GPU, complex64 RoPE differs from it far
    below bf16's rounding (tests/test_runtime.py), and fp64 runs at 1/64 rate on consumer GPUs).
    compile_units: "auto" (compiled on CUDA, eager elsewhere), "on" or "off" (True / False: on / off):
    run the units as fused graphs (`fused_units.py`: RoPE in real fp32, static-shape KV views).
    The text K/V of every layer are computed once per prompt and kept (`text_kv_bytes`).
    """

    def __init__(self, cfg: DiTConfig, units: Sequence[UnitData], plan: Plan, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto", timing: bool = False,
                 rope_fp64: bool | None = None, compile_units: str | bool = "auto") -> None:
        from ..model.dit import WanS2VDiT

        self.cfg, self.plan, self.device = cfg, plan, torch.device(device)
        compiled = compile_wanted(compile_units, self.device)
        with torch.device("meta"):
            self.dit = WanS2VDiT(cfg, rope_fp64=compute_dtype == torch.float32 if rope_fp64 is None else rope_fp64,
                                 rope_real=compiled)
        # One set of compiled graphs serves every unit: the modules are arguments, their (re-bound)
        # parameters are graph inputs, so streaming a unit never triggers a recompile.
        self.fused = FusedUnits() if compiled else None
        self._text: Tensor | None = None  # the prompt embedding the kept text K/V belong to
        self._text_version = -1
        self._text_kv: dict[int, tuple[Tensor, Tensor]] = {}
        specs = {e.name[: -len(".weight")]: (e.qtype, e.group_size)
                 for u in units for e in u.tensors if e.qtype.is_quantized and e.name.endswith(".weight")}
        swap_linears(self.dit, specs, kernel=kernel, bias_dtype=compute_dtype)
        self.dit.eval()
        # The layers this runtime runs: all of them, or a layer-split pipeline rank's range (the
        # others stay on meta, never bound; its KV caches hold only these layers).
        self.layers = plan_layers(plan) or tuple(range(cfg.num_layers))
        absent = set(range(cfg.num_layers)) - set(self.layers)
        _check_coverage(self.dit, units, absent)
        # Two copy streams: a weight prefetch that waits for its slot's release never holds up a KV
        # copy (on one stream it would). Copies the engine already holds still run in queue order.
        cuda = self.device.type == "cuda"
        weight_stream = torch.cuda.Stream(device=self.device) if cuda else None
        kv_stream = torch.cuda.Stream(device=self.device) if cuda else None
        binder = _Binder(self.dit, compute_dtype)
        placement = {u.name: u.placement for u in plan.units}
        resident = [u for u in units if placement.get(u.name, "gpu") == "gpu"]
        streamed = [u for u in units if placement.get(u.name, "gpu") != "gpu"]
        self.weights = WeightStreamer(streamed, binder, self.device, weight_stream, timing)
        for u in resident:
            self.weights.make_resident(u, u.load())
        _check_materialized(self.dit, set(self.weights.by_layer) | absent)

        self.compute_dtype, self._kv_stream, self._timing = compute_dtype, kv_stream, timing
        self._kv_layout: tuple | None = None
        self.place_kv(plan)

    def same_weight_layout(self, plan: Plan) -> bool:
        """Whether `plan` places every weight unit as this runtime's plan does (the weights can stay)."""
        return {u.name: u.placement for u in plan.units} == {u.name: u.placement for u in self.plan.units}

    def place_kv(self, plan: Plan) -> None:
        """KV caches for `plan` (same weight layout): kept when tokens, dtype and placement are unchanged.

        A kept cache holds the previous render's rows, which are never read: every ring is written
        before it is attended to (`kv_cache.ring_window`) and the sink prefill rewrites the sink.
        """
        if not self.same_weight_layout(plan):
            raise ValueError("place_kv: the plan places the weights differently; build a new runtime")
        specs_kv = kv_specs(self.cfg, plan.size)  # 4 rings, then the sink
        # A pipeline rank's plan places only its own steps' rings: the others are None (not held).
        held = {k.step: k.placement == "gpu" for k in plan.kv if k.step is not None}
        ring_gpu = tuple(held.get(k.step) for k in specs_kv if k.step is not None)
        sink_gpu = next(k.placement == "gpu" for k in plan.kv if k.step is None)
        kv_dtype = plan.kv[0].dtype
        layout = (specs_kv[0].tokens, specs_kv[-1].tokens, kv_dtype, ring_gpu, sink_gpu)
        self.plan = plan
        if layout == self._kv_layout:
            return
        if self._kv_layout is not None:
            del self.kv  # the old caches go first, so both never coexist in memory
        self.kv = KVOffload.build(self.cfg, layout[0], layout[1], kv_dtype, list(ring_gpu), sink_gpu, self.device,
                                  compute_dtype=self.compute_dtype, copy_stream=self._kv_stream, timing=self._timing,
                                  num_layers=len(self.layers))
        self._kv_layout = layout

    @classmethod
    def from_artifact(cls, directory: str | Path, plan: Plan, device: torch.device | str = "cuda",
                      kernel: str = "auto", timing: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                      compile_units: str | bool = "auto") -> DiTRuntime:
        """Load an artifact's DiT per `plan` (from `plan.make_plan` over this artifact's manifest)."""
        m = read_manifest(directory)
        pin = torch.device(device).type == "cuda"
        return cls(m.dit, artifact_units(directory, m, plan, pin), plan, device, compute_dtype=compute_dtype,
                   kernel=kernel, timing=timing, compile_units=compile_units)

    # ---- the unit loop ---------------------------------------------------------------------------

    def _run_units(self, x: Tensor, ctx: DiTContext, step: int | None) -> Tensor:
        """All units in order: prefetch i+1, compute i, release i (comments mark the sync points)."""
        from ..model.dit import unit_forward

        first = self.layers[0]  # the KV caches index this runtime's layers from 0
        for i in self.layers:
            self.weights.open(i)  # streamed: waits for unit i's copy, starts the next unit's copy, binds
            lkv = self.kv.open_layer(step, i - first, static=self.fused is not None)  # same for layer i's KV on the host
            block, inject = self.dit.unit_modules(i)
            text_kv = self._layer_text_kv(i, block, ctx.text)
            if self.fused is None:
                x = unit_forward(block, inject, x, ctx, lkv, text_kv)  # == dit.forward_unit(i, ...)
            else:
                x = self.fused.block(block, x, ctx, lkv, text_kv)
                if inject is not None and not ctx.is_sink:
                    x = self.fused.inject(inject, x, ctx)
            self.kv.close_layer(step, i - first)  # host caches: copy back only this block's new K/V rows
            self.weights.close(i)  # the slot frees once the kernels queued above have finished
        return x

    def _layer_text_kv(self, i: int, block: nn.Module, text: Tensor) -> tuple[Tensor, Tensor]:
        """Layer i's text cross-attention K/V, computed on its first call with this prompt embedding
        (while unit i's weights are bound) and kept: the prompt is fixed for a render. A new `text`
        tensor (another prompt) drops them all; the kept reference keeps its identity unambiguous."""
        if text is not self._text or text._version != self._text_version:
            self._text, self._text_version, self._text_kv = text, text._version, {}
        kv = self._text_kv.get(i)
        if kv is None:
            kv = self._text_kv[i] = block.cross_attn.context_kv(text)  # type: ignore[union-attr, operator]
        return kv

    def text_kv_bytes(self) -> int:
        """Device bytes of the kept text K/V (all layers: 2 x text_len x dim each, compute dtype)."""
        return sum(t.numel() * t.element_size() for kv in self._text_kv.values() for t in kv)

    @torch.no_grad()
    def prefill_units(self, x: Tensor, ctx: DiTContext) -> Tensor:
        """Sink prefill over prepared inputs (`dit.prepare_sink`): fills the sink KV cache. Returns the
        hidden state after this runtime's layers (a layer-split pipeline rank passes it on)."""
        return self._run_units(x, ctx, step=None)

    @torch.no_grad()
    def denoise_units(self, step: int, start_token: int, x: Tensor, ctx: DiTContext) -> Tensor:
        """All units of step `step` over prepared inputs (`dit.prepare_block`); the block starts at
        absolute token `start_token` (its ring position). Returns x for `dit.finish`."""
        self.kv.ring(step).begin(start_token, x.shape[1])
        return self._run_units(x, ctx, step)

    @torch.no_grad()
    def embed_text(self, text_states: Tensor) -> Tensor:
        """umT5 states [L, text_dim] -> [1, text_len, dim] (resident weights)."""
        return self.dit.embed_text(text_states.to(self.device))

    @torch.no_grad()
    def prefill_sink(self, ref_latents: Tensor, motion_latents: Tensor, text: Tensor) -> None:
        """Fill the sink KV cache from the reference and FramePack motion latents."""
        x, ctx = self.dit.prepare_sink(ref_latents.to(self.device), motion_latents.to(self.device), text)
        self.prefill_units(x, ctx)

    @torch.no_grad()
    def denoise(self, step: int, latents: Tensor, t: float | Tensor, frame0: int, audio: Tensor, text: Tensor,
                sink_offset: int) -> Tensor:
        """One denoising call of step `step` on a block: latents [16, F, h, w] -> flow [16, F, h, w]."""
        x, ctx = self.dit.prepare_block(latents.to(self.device), t, frame0, audio.to(self.device), text, sink_offset)
        tokens_per_frame = x.shape[1] // latents.shape[1]  # x [1, F * h/2 * w/2, dim]
        x = self.denoise_units(step, frame0 * tokens_per_frame, x, ctx)
        return self.dit.finish(x, ctx)

    # ---- observability / resume ------------------------------------------------------------------

    def streamers(self) -> list[UnitStreamer]:
        return ([self.weights.streamer] if self.weights.streamer else []) + self.kv.streamers()

    def copy_counters(self) -> dict[str, float]:
        """Running totals since load: seconds compute waited for weight / KV copies (CUDA: with
        timing=True, else 0; CPU: the copies themselves) and H2D bytes of weights / KV."""
        def total(streamers: list[UnitStreamer], attr: str) -> float:
            for st in streamers:
                st.stats.collect()
            return sum(getattr(st.stats, attr) for st in streamers)

        w = [self.weights.streamer] if self.weights.streamer else []
        kv = self.kv.streamers()
        return {"copy_wait_weights_s": total(w, "wait_seconds"), "copy_wait_kv_s": total(kv, "wait_seconds"),
                "h2d_weights_bytes": total(w, "h2d_bytes"), "h2d_kv_bytes": total(kv, "h2d_bytes"),
                "d2h_kv_bytes": total(kv, "d2h_bytes")}

    def copy_wait_seconds(self) -> float:
        """Compute-stream time spent waiting on copies so far, weights and KV together."""
        c = self.copy_counters()
        return c["copy_wait_weights_s"] + c["copy_wait_kv_s"]

    def layout(self) -> dict[str, object]:
        """The layout this runtime runs: what the plan placed where (telemetry's `layout` line)."""
        p = self.plan
        streamed = [u for u in p.units if u.placement != "gpu"]
        return {"units_streamed": [u.name for u in streamed],
                "units_streamed_from": sorted({u.placement for u in streamed}),
                "units_resident": sum(1 for u in p.units if u.placement == "gpu"),
                "kv_placement": {k.name: k.placement for k in p.kv}, "kv_dtype": p.kv[0].dtype if p.kv else None,
                "predicted_h2d_bytes_per_clip": p.h2d_bytes_per_clip,
                "predicted_seconds_per_clip": round(p.predicted_seconds_per_clip, 3)}

    def device_bytes(self) -> dict[str, int]:
        """What this runtime allocated on its device, by the plan's names (measured, exact)."""
        st = self.weights.streamer
        return {"resident_weights": sum(b.numel() for b in self.weights.resident_bufs),
                "weight_slots": st.device_bytes if st else 0, **self.kv.device_bytes()}

    def host_bytes(self) -> dict[str, int]:
        """Host buffers this runtime holds, by the plan's names (measured, exact)."""
        st = self.weights.streamer
        pinned_weights = sum(u.host.numel() for u in self.weights.by_layer.values() if u.host is not None)
        out = {"pinned_kv": self.kv.host_bytes()}
        if st is not None and st.staging_bytes:
            out["staging"] = st.staging_bytes
        if pinned_weights:
            out["pinned_weights"] = pinned_weights
        return out

    def kv_state(self) -> dict[str, object]:
        return self.kv.state_dict()

    def load_kv_state(self, state: dict[str, object]) -> None:
        self.kv.load_state_dict(state)


def _check_coverage(model: nn.Module, units: Sequence[UnitData], absent: frozenset[int] | set[int] = frozenset()) -> None:
    """Every model tensor is stored exactly once in the units, and nothing else is (`absent`: layers
    another pipeline rank holds)."""
    from ..model.units import unit_of_key

    cfg = model.cfg  # type: ignore[attr-defined]
    want = {k for k in model.state_dict().keys() if unit_of_key(cfg, k) not in absent}
    got: set[str] = set()
    for u in units:
        for e in u.tensors:
            if e.name in got:
                raise ArtifactError(f"tensor {e.name} is stored twice")
            got.add(e.name)
    have = set()
    for name in want:  # QuantLinear buffers weight_<role> stand for "<path>.weight"
        path, _, attr = name.rpartition(".")
        have.add(f"{path}.weight" if attr.startswith("weight_") else name)
    if got != have:
        odd = sorted(have - got)[:1] or sorted(got - have)[:1]
        raise ArtifactError(f"artifact does not match the model (first odd tensor: {odd[0]})")


def _check_materialized(model: nn.Module, streamed_layers: set[int]) -> None:
    from ..model.units import unit_of_key

    cfg = model.cfg  # type: ignore[attr-defined]
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta and unit_of_key(cfg, name) not in streamed_layers:
            raise ArtifactError(f"{name} was not loaded")
