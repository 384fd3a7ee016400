"""KV caches placed by the plan: on the GPU or pinned on the host, stored bf16, fp8 or int8.

Same per-layer interface as `kv_cache.py` (ring: write / history, sink: write / read; `begin` on
the ring), so `WanS2VDiT.forward_unit` runs unchanged. Each (cache, layer) is ONE packed buffer
{k, v[, k_scale, v_scale]} (`streamer.pack_tensors` layout). Host-placed layers reach the GPU
through a `UnitStreamer` (two slots shared by all host rings, two for the sink); after a layer's
forward only the rows this block wrote go back to the host (`release(writeback=...)`).

8-bit storage: symmetric per (token, head) with an fp32 scale (absmax / 127 for int8, / 448 for
fp8 e4m3); `history()` / `read()` dequantize to the compute dtype. bf16 storage is exact with
respect to `kv_cache.RingKVCache` (both round to bf16).

    kv = KVOffload.build(cfg, ring_tokens, sink_tokens, kv_dtype="fp8", ring_gpu=[False]*4, sink_gpu=True,
                         device="cuda")
    lkv = kv.open_layer(step, i); x = dit.forward_unit(i, x, ctx, lkv); kv.close_layer(step, i)

Static views (`open_layer(..., static=True)`, for the compiled units of `fused_units.py`): no
Python int of the ring's position reaches the compiled graph, and the graph mutates no cache.
`write` quantizes the block's K/V and keeps them; `history()` returns ALL the ring's rows, the
block's new rows taken from the kept values through a tensor of row indices, with `valid_keys()`
masking the rows not written yet (None once the ring is full); the dequantization is an expression
that the compiler fuses with that selection and the concatenation feeding attention (no separate
pass over the ring). After the graph, `close_layer` stores the kept rows into the cache (eager,
only the block's rows: a compiled graph cannot write into the packed buffer's typed views).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..artifact.qtypes import FP8_MAX, INT8_QMAX
from ..config import DiTConfig
from ..model.kv import LayerKV
from .kv_cache import ring_window
from .pinned import host_buffer
from .streamer import PinnedSource, UnitStreamer, pack_tensors, unpack_views

STORE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}


def quantize_kv(x: Tensor, kv_dtype: str) -> tuple[Tensor, Tensor | None]:
    """x [1, n, heads, d] -> (stored [1, n, heads, d], fp32 scale [1, n, heads, 1] or None for bf16)."""
    if kv_dtype == "bf16":
        return x.to(torch.bfloat16), None
    xf = x.float()
    qmax = INT8_QMAX if kv_dtype == "int8" else FP8_MAX
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax  # [1, n, heads, 1]
    q = (xf / scale).clamp_(-qmax, qmax)
    q = torch.round(q).to(torch.int8) if kv_dtype == "int8" else q.to(torch.float8_e4m3fn)
    return q, scale


def dequantize_kv(q: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Inverse of quantize_kv, in `dtype` (bf16 storage: the stored tensor itself, no copy).

    fp32 math rounded once into `dtype`, as `(q.float() * scale).to(dtype)`, but the product is
    written straight in `dtype`: no fp32 result to write and read again (this runs over the whole
    ring, every layer and step: 12672 x 5120 values per cache at 14B). int8 is widened inside the
    multiply; fp8 has no type promotion, so it is widened first, to bf16 (exact: every e4m3 value
    is a bf16 value), half the bytes of an fp32 copy.
    """
    if scale is None:
        return q
    src = q if q.dtype == torch.int8 else q.to(torch.bfloat16)
    return torch.mul(src, scale, out=torch.empty(q.shape, dtype=dtype, device=q.device))


class LayerStore:
    """`layers` packed {k, v[, scales]} buffers of `tokens` rows, resident on `device` or pinned on
    the host and streamed by `streamer` (unit ids `first_unit + layer`)."""

    def __init__(self, layers: int, tokens: int, heads: int, head_dim: int, kv_dtype: str, on_device: bool,
                 device: torch.device) -> None:
        self.kv_dtype, self.on_device, self.device = kv_dtype, on_device, torch.device(device)
        dt = STORE_DTYPES[kv_dtype]
        shape = (1, tokens, heads, head_dim)
        tensors = {"k": torch.zeros(shape, dtype=dt), "v": torch.zeros(shape, dtype=dt)}
        if kv_dtype != "bf16":
            tensors |= {"k_scale": torch.zeros(*shape[:3], 1), "v_scale": torch.zeros(*shape[:3], 1)}
        template, self.layout = pack_tensors(tensors, pin=False)  # all zeros: only the layout is used
        self.layer_nbytes = template.numel()
        # ONE buffer for the whole cache, layers are views of it. On the host it is page-locked at its
        # exact size (`pinned.host_buffer`), and a checkpoint saves it as it is (`state()`).
        total = layers * self.layer_nbytes
        if on_device:
            self.storage = torch.zeros(total, dtype=torch.uint8, device=self.device)
        else:
            self.storage = host_buffer(total, pin=self.device.type == "cuda", zero=True)
        self.bufs = [self.storage[i * self.layer_nbytes:(i + 1) * self.layer_nbytes] for i in range(layers)]
        self.streamer: UnitStreamer | None = None
        self.first_unit = 0

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def host_views(self, i: int) -> dict[str, Tensor]:
        return unpack_views(self.bufs[i], self.layout)

    def open(self, i: int, next_unit: int | None) -> dict[str, Tensor]:
        """Typed views of layer i where compute can use them; prefetches `next_unit` meanwhile."""
        if self.on_device:
            return unpack_views(self.bufs[i], self.layout)
        assert self.streamer is not None
        buf = self.streamer.acquire(self.first_unit + i)  # sync point inside: waits for this layer's copy
        if next_unit is not None:
            self.streamer.prefetch(next_unit)  # the next host layer copies while this one computes
        return unpack_views(buf, self.layout)

    def close(self, i: int, views: dict[str, Tensor], rows: slice | None) -> None:
        """Done with layer i; a host layer copies `rows` (the ones this forward wrote) back."""
        if self.on_device:
            return
        assert self.streamer is not None
        host = self.host_views(i)
        wb = [(views[name][:, rows], host[name][:, rows]) for name in views] if rows is not None else []
        self.streamer.release(self.first_unit + i, writeback=wb)

    def state(self) -> list[Tensor]:
        """The layers' bytes for a checkpoint, WITHOUT a copy: views of the live cache (valid until the
        next forward). Saved right away, `torch.save` writes the cache's one buffer as it is, so a
        checkpoint costs no extra host RAM (a copy was 22.5-43.7 GB at 14B). A cache on the GPU is
        copied to the host by `torch.save` itself, buffer by buffer."""
        if self.streamer is not None:
            self.streamer.wait_copies()  # write-backs to these host buffers may still be in flight
        return list(self.bufs)

    def load_state(self, bufs: Sequence[Tensor]) -> None:
        if self.streamer is not None:
            # Sync point: a write-back still in flight would land on top of the restored bytes.
            self.streamer.wait_copies()
        for dst, src in zip(self.bufs, bufs, strict=True):
            dst.copy_(src)
        if self.streamer is not None:
            self.streamer.invalidate()  # slots may hold stale copies of the old host bytes


class OffloadRingLayer:
    """Ring layer view over one layer's views (kv_cache.RingLayer's interface)."""

    def __init__(self, ring: OffloadRing, views: dict[str, Tensor], dtype: torch.dtype) -> None:
        self._ring, self._views, self._dtype = ring, views, dtype

    def write(self, k: Tensor, v: Tensor) -> None:
        r = self._ring
        lo, n = r.write_slot, r.write_len
        if k.shape[1] != n:
            raise ValueError(f"ring.write got {k.shape[1]} tokens, begin() announced {n}")
        for name, x in (("k", k), ("v", v)):
            q, scale = quantize_kv(x, r.kv_dtype)
            self._views[name][:, lo:lo + n] = q
            if scale is not None:
                self._views[f"{name}_scale"][:, lo:lo + n] = scale

    def history(self) -> tuple[Tensor, Tensor]:
        a = self._ring.active
        out = []
        for name in ("k", "v"):
            scale = self._views.get(f"{name}_scale")
            out.append(dequantize_kv(self._views[name][:, :a], None if scale is None else scale[:, :a], self._dtype))
        return out[0], out[1]

    def valid_keys(self) -> None:
        return None  # history() is cut to the active rows


def _dequantize_expr(q: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`dequantize_kv` as one expression (the same values: fp32 product, rounded once to `dtype`),
    for compiled graphs, which fuse it into what reads it (no out= buffer: a separate pass)."""
    if scale is None:
        return q
    src = q if q.dtype == torch.int8 else q.to(torch.bfloat16)
    return (src * scale).to(dtype)


class StaticRingLayer:
    """Ring layer view for compiled units (see module docstring): rows chosen by tensors, the
    block's new rows kept by `write` and stored by `commit` after the graph."""

    def __init__(self, ring: OffloadRing, views: dict[str, Tensor], dtype: torch.dtype) -> None:
        self._ring, self._views, self._dtype = ring, views, dtype
        self._is_new, self._new_row, self._valid = ring.static_positions()
        self.pending: dict[str, tuple[Tensor, Tensor | None]] | None = None

    def write(self, k: Tensor, v: Tensor) -> None:
        if k.shape[1] != self._ring.write_len:
            raise ValueError(f"ring.write got {k.shape[1]} tokens, begin() announced {self._ring.write_len}")
        self.pending = {"k": quantize_kv(k, self._ring.kv_dtype), "v": quantize_kv(v, self._ring.kv_dtype)}

    def history(self) -> tuple[Tensor, Tensor]:
        assert self.pending is not None, "write() comes first"
        out = []
        for name in ("k", "v"):
            new = _dequantize_expr(*self.pending[name], self._dtype)  # [1, n, heads, d]
            old = _dequantize_expr(self._views[name], self._views.get(f"{name}_scale"), self._dtype)  # [1, cap, ...]
            # row r: the block's row r - write_slot where it lands, else the cached row
            out.append(torch.where(self._is_new, new.index_select(1, self._new_row), old))
        return out[0], out[1]

    def valid_keys(self) -> Tensor | None:
        return self._valid

    def commit(self) -> None:
        """Store the kept rows at the write slot (eager; once the graph has run)."""
        if self.pending is None:
            return
        lo, n = self._ring.write_slot, self._ring.write_len
        for name, (q, scale) in self.pending.items():
            self._views[name][:, lo:lo + n] = q
            if scale is not None:
                self._views[f"{name}_scale"][:, lo:lo + n] = scale
        self.pending = None


class OffloadSinkLayer:
    """Sink layer view (kv_cache.SinkLayer's interface); `length` rows are valid after the prefill."""

    def __init__(self, sink: OffloadSink, views: dict[str, Tensor], dtype: torch.dtype, static: bool = False) -> None:
        self._sink, self._views, self._dtype = sink, views, dtype
        self._static = static
        self.pending: dict[str, tuple[Tensor, Tensor | None]] | None = None
        self.written = False

    def write(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[1]
        if n > self._views["k"].shape[1]:
            raise ValueError(f"sink prefill has {n} tokens, the sink cache holds {self._views['k'].shape[1]}")
        self._sink.length = n
        if self._static:  # kept, stored by commit() after the compiled graph
            self.pending = {"k": quantize_kv(k, self._sink.kv_dtype), "v": quantize_kv(v, self._sink.kv_dtype)}
            self.written = True
            return
        for name, x in (("k", k), ("v", v)):
            q, scale = quantize_kv(x, self._sink.kv_dtype)
            self._views[name][:, :n] = q
            if scale is not None:
                self._views[f"{name}_scale"][:, :n] = scale
        self.written = True

    def read(self) -> tuple[Tensor, Tensor]:
        n = self._sink.length
        if n == 0:
            raise RuntimeError("sink cache is empty: run the sink prefill first")
        if self.pending is not None:  # the prefill reads what it just wrote (in a compiled graph)
            k, v = (_dequantize_expr(*self.pending[name], self._dtype) for name in ("k", "v"))
            return k, v
        out = []
        for name in ("k", "v"):
            scale = self._views.get(f"{name}_scale")
            dequantize = _dequantize_expr if self._static else dequantize_kv
            out.append(dequantize(self._views[name][:, :n], None if scale is None else scale[:, :n], self._dtype))
        return out[0], out[1]

    def commit(self) -> None:
        """Store the kept rows (eager; once the compiled graph has run)."""
        if self.pending is None:
            return
        n = self._sink.length
        for name, (q, scale) in self.pending.items():
            self._views[name][:, :n] = q
            if scale is not None:
                self._views[f"{name}_scale"][:, :n] = scale
        self.pending = None


class OffloadRing(LayerStore):
    """One denoising step's ring (kv_cache.RingKVCache's rules for begin / write slot / active)."""

    def __init__(self, capacity: int, **kw) -> None:
        super().__init__(tokens=capacity, **kw)
        self.capacity = capacity
        self.write_slot = self.write_len = self.active = 0
        self._static: tuple[Tensor, Tensor, Tensor | None] | None = None

    def begin(self, start_token: int, num_tokens: int) -> None:
        """Position this forward's writes (block at absolute token `start_token`), as RingKVCache."""
        self.write_slot, self.active = ring_window(start_token, num_tokens, self.capacity)
        self.write_len = num_tokens
        self._static = None

    def static_positions(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """This forward's positions as tensors, made once per forward on the compute device:
        is_new bool [1, capacity, 1, 1] (the rows this block writes), new_row [capacity] (which of
        the block's rows lands in each ring row, clamped where none does) and valid bool [capacity]
        (the rows written so far, this block's included; None once all are)."""
        if self._static is None:
            rows = torch.arange(self.capacity, device=self.device)
            lo, n = self.write_slot, self.write_len
            is_new = ((rows >= lo) & (rows < lo + n)).view(1, -1, 1, 1)
            new_row = (rows - lo).clamp(0, n - 1)
            valid = None if self.active == self.capacity else rows < self.active
            self._static = (is_new, new_row, valid)
        return self._static


class OffloadSink(LayerStore):
    """The sink cache (kv_cache.SinkKVCache's role); `length` rows are valid after the prefill."""

    def __init__(self, capacity: int, **kw) -> None:
        super().__init__(tokens=capacity, **kw)
        self.length = 0


@dataclass
class _Open:
    ring: dict[str, Tensor] | None
    sink: dict[str, Tensor]
    sink_layer: OffloadSinkLayer
    ring_layer: OffloadRingLayer | StaticRingLayer | None


class KVOffload:
    """All KV caches of a run: `steps` rings + the sink, each on the GPU or streamed from the host.

    `rings[s]` is None where this process does not hold step s's ring: a pipeline rank
    (pipeline/multirank) runs only some steps and keeps only their rings.
    """

    def __init__(self, rings: list[OffloadRing | None], sink: OffloadSink, num_layers: int,
                 compute_dtype: torch.dtype, device: torch.device, copy_stream: object | None = None,
                 timing: bool = False) -> None:
        self.rings, self.sink, self.num_layers = rings, sink, num_layers
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        # Host rings share ONE streamer (two slots, as the plan counts them): units in execution order.
        host_rings = [r for r in rings if r is not None and not r.on_device]
        sources = []
        for r in host_rings:
            r.first_unit = len(sources)
            sources += [PinnedSource(b) for b in r.bufs]
        self._ring_units = len(sources)
        # The KV copies have a copy stream of their own (not the weights'): a weight unit queued for
        # prefetch never delays the next layer's KV (the write-backs run there too, after each release).
        if sources:
            st = UnitStreamer(sources, self.device, copy_stream=copy_stream, timing=timing)
            for r in host_rings:
                r.streamer = st
        if not sink.on_device:
            sink.streamer = UnitStreamer([PinnedSource(b) for b in sink.bufs], self.device, copy_stream=copy_stream,
                                         timing=timing)
        self._open: dict[tuple[int | None, int], _Open] = {}

    @classmethod
    def build(cls, cfg: DiTConfig, ring_tokens: int, sink_tokens: int, kv_dtype: str,
              ring_gpu: Sequence[bool | None], sink_gpu: bool, device: torch.device | str,
              compute_dtype: torch.dtype = torch.bfloat16, copy_stream: object | None = None,
              timing: bool = False, num_layers: int | None = None) -> KVOffload:
        """Caches for `len(ring_gpu)` steps; ring_gpu[s] / sink_gpu: keep that cache on `device`
        (ring_gpu[s] None: no ring for step s here, another pipeline rank holds it). num_layers:
        a layer-split pipeline rank's layer count (default: the model's); layers index from 0."""
        if kv_dtype not in STORE_DTYPES:
            raise ValueError(f"unknown KV dtype {kv_dtype!r}")
        dev = torch.device(device)
        layers = cfg.num_layers if num_layers is None else num_layers
        common = dict(layers=layers, heads=cfg.num_heads, head_dim=cfg.head_dim, kv_dtype=kv_dtype, device=dev)
        rings = [None if g is None else OffloadRing(ring_tokens, on_device=g, **common) for g in ring_gpu]
        sink = OffloadSink(sink_tokens, on_device=sink_gpu, **common)
        return cls(rings, sink, layers, compute_dtype, dev, copy_stream, timing)

    def streamers(self) -> list[UnitStreamer]:
        out = {id(s.streamer): s.streamer for s in [*self.held_rings(), self.sink] if s.streamer is not None}
        return list(out.values())

    def held_rings(self) -> list[OffloadRing]:
        """The rings this process holds, in step order."""
        return [r for r in self.rings if r is not None]

    def ring(self, step: int) -> OffloadRing:
        """Step `step`'s ring; a clear error where another pipeline rank holds it."""
        ring = self.rings[step] if 0 <= step < len(self.rings) else None
        if ring is None:
            held = [s for s, r in enumerate(self.rings) if r is not None]
            raise RuntimeError(f"no KV ring for step {step} here: this runtime holds steps {held}")
        return ring

    def _next_ring_unit(self, ring: OffloadRing, i: int) -> int | None:
        if ring.on_device:
            return None
        return (ring.first_unit + i + 1) % self._ring_units  # cyclic: the next host ring's layer 0 follows

    def open_layer(self, step: int | None, i: int, static: bool = False) -> LayerKV:
        """LayerKV for layer i of denoising step `step` (None: the sink prefill, no ring); `static`:
        the views of compiled units (see module docstring)."""
        ring = None if step is None else self.ring(step)
        ring_views = ring.open(i, self._next_ring_unit(ring, i)) if ring is not None else None
        sink_next = None if self.sink.on_device else (i + 1) % self.num_layers
        sink_views = self.sink.open(i, sink_next)
        sink_layer = OffloadSinkLayer(self.sink, sink_views, self.compute_dtype, static)
        ring_cls = StaticRingLayer if static else OffloadRingLayer
        ring_layer = None if ring is None else ring_cls(ring, ring_views, self.compute_dtype)
        self._open[(step, i)] = _Open(ring_views, sink_views, sink_layer, ring_layer)
        return LayerKV(ring=ring_layer, sink=sink_layer)  # type: ignore[arg-type]

    def close_layer(self, step: int | None, i: int) -> None:
        """Release layer i's slots; host caches get back only the rows this forward wrote."""
        o = self._open.pop((step, i))
        if isinstance(o.ring_layer, StaticRingLayer):
            o.ring_layer.commit()  # a compiled unit's new rows go into the cache now
        o.sink_layer.commit()
        if step is not None:
            ring = self.ring(step)
            ring.close(i, o.ring, slice(ring.write_slot, ring.write_slot + ring.write_len))
        self.sink.close(i, o.sink, slice(0, self.sink.length) if o.sink_layer.written else None)

    def device_bytes(self) -> dict[str, int]:
        """Measured device bytes: caches kept on the device, and the KV slots of the host caches."""
        return {"gpu_kv": sum(c.nbytes for c in [*self.held_rings(), self.sink] if c.on_device),
                "kv_slots": sum(st.device_bytes for st in self.streamers())}

    def host_bytes(self) -> int:
        """Measured host bytes of the caches placed on the host."""
        return sum(c.nbytes for c in [*self.held_rings(), self.sink] if not c.on_device)

    def state_dict(self) -> dict[str, object]:
        """Every cache's bytes (plus the sink length), for resume: views of the live caches, no copy
        (see `LayerStore.state`); save them before the next forward."""
        return {"rings": [r.state() for r in self.held_rings()], "sink": self.sink.state(), "sink_length": self.sink.length,
                "kv_dtype": self.sink.kv_dtype}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["kv_dtype"] != self.sink.kv_dtype:
            raise ValueError(f"KV state is {state['kv_dtype']}, these caches are {self.sink.kv_dtype}")
        for r, bufs in zip(self.held_rings(), state["rings"], strict=True):  # type: ignore[call-overload]
            r.load_state(bufs)
        self.sink.load_state(state["sink"])  # type: ignore[arg-type]
        self.sink.length = int(state["sink_length"])  # type: ignore[call-overload]
