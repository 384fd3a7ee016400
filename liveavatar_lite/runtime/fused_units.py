"""The DiT's streaming units compiled into fused graphs (`torch.compile`, inductor).

Two compiled functions serve every unit of a render:

* `block`: one DiT block. Its graphs: the sink prefill, a denoising call while the ring fills (its
  not-yet-written rows masked), and a denoising call on a full ring (no mask). All three have
  static shapes; which one runs depends only on the call kind and on whether the ring is full,
  never on a Python int of the ring's position (`kv_offload` static views: the write rows and
  the fill mask are tensors), so every variant is built in the first clip and none after.
* `inject`: an audio injector (the layers that have one, denoising calls only).

The modules are arguments: their (re-bound) parameters are graph inputs, so resident and streamed
units, and every layer, share the graphs. RoPE is in real fp32 arithmetic (`rope.RopeTable`;
inductor generates no code for complex numbers); the text K/V are inputs (computed once per prompt
by the runtime); the 8-bit KV dequantization is fused into the concatenation that feeds attention.
The quantized linears (`qlinear.QuantLinear`) and `attend` are ordinary calls inside the graph.

    fused = FusedUnits()
    x = fused.block(block, x, ctx, lkv, text_kv); x = fused.inject(inject, x, ctx)
    fused.graphs  # {"sink": GraphFigures(kernels=..., bytes_accessed=...), "block": ..., ...}
    fused_stats()  # {"graphs": ..., "compiles": ..., "graph_breaks": ...}: dynamo's own counters
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch._dynamo.exc import TorchDynamoException

from ..errors import first_line

if TYPE_CHECKING:
    from ..model.dit import DiTContext
    from ..model.dit_blocks import CrossAttention, DiTBlock
    from ..model.kv import LayerKV

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
# Inductor keeps a cast-down-then-up (x.bfloat16().float()) in fp32 unless told to round: the
# model's bf16 roundings (la_roundings) are part of its numerics, so they are kept.
_OPTIONS = {"emulate_precision_casts": True}


def compile_wanted(mode: str | bool, device: torch.device) -> bool:
    """Whether units are compiled: "on" / "off", or "auto" = on for CUDA, off elsewhere (on a CPU
    the compile takes longer than a short render saves). True / False stand for "on" / "off"."""
    if isinstance(mode, bool):
        return mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _block(block: DiTBlock, x: Tensor, ctx: DiTContext, kv: LayerKV, text_kv: tuple[Tensor, Tensor]) -> Tensor:
    return block(x, ctx.e0, ctx.text, ctx.freqs, ctx.sink_freqs, kv, ctx.la_roundings, text_kv)


def _inject(inject: tuple[object, CrossAttention], x: Tensor, ctx: DiTContext) -> Tensor:
    from ..model.dit import inject_audio

    return inject_audio(inject, x, ctx)  # type: ignore[arg-type]


@dataclass
class GraphFigures:
    """What inductor built for one graph, from its own counters (`torch._inductor.metrics`, read
    around the call that compiled it): IR nodes before fusion, kernels it generated after fusion
    (elementwise / reductions), extern kernels (GEMMs, attention), bytes per call read and written
    by the generated kernels and by all kernels, and the compile time. The byte counts need
    `record_inductor_bytes()` before the compile (else 0)."""

    nodes_pre_fusion: int = 0
    kernels: int = 0
    extern_kernels: int = 0
    elementwise_bytes: int = 0
    bytes_accessed: int = 0
    compile_s: float = 0.0


def record_inductor_bytes() -> None:
    """Make inductor count each graph's bytes as it compiles it (it does so only while its
    `inductor_metrics` log is enabled; the records go nowhere). For benchmarks and tests."""
    import logging

    log = torch._logging.getArtifactLogger("torch._inductor.compile_fx", "inductor_metrics")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())


_EAGER = {"sink": _block, "block-filling": _block, "block": _block, "inject": _inject}


class FusedUnits:
    """The compiled unit functions (one compile cache each; see module docstring). `graphs` records
    each graph built, by kind: "sink", "block-filling" (ring not full: masked), "block", "inject"."""

    def __init__(self, backend: str | Callable[..., object] = "inductor") -> None:
        opts = {"options": _OPTIONS} if backend == "inductor" else {}
        self._block = torch.compile(_block, dynamic=False, backend=backend, **opts)
        self._inject = torch.compile(_inject, dynamic=False, backend=backend, **opts)
        self.graphs: dict[str, GraphFigures] = {}
        self.failed: dict[str, str] = {}  # kind -> why its graph could not be built (that kind runs eager)

    def block(self, block: DiTBlock, x: Tensor, ctx: DiTContext, kv: LayerKV, text_kv: tuple[Tensor, Tensor]) -> Tensor:
        kind = "sink" if ctx.is_sink else "block" if kv.ring is None or kv.ring.valid_keys() is None else "block-filling"
        return self._call(kind, self._block, block, x, ctx, kv, text_kv)

    def inject(self, inject: tuple[object, CrossAttention], x: Tensor, ctx: DiTContext) -> Tensor:
        return self._call("inject", self._inject, inject, x, ctx)

    def _call(self, kind: str, fn: Callable[..., Tensor], *args: object) -> Tensor:
        from torch._dynamo.utils import counters
        from torch._inductor import metrics

        if kind in self.graphs:
            return fn(*args)
        if kind in self.failed:
            return _EAGER[kind](*args)
        frames, pre, seen, t0 = (counters["frames"]["total"], metrics.ir_nodes_pre_fusion,
                                 len(metrics.nodes_num_elem), time.perf_counter())
        try:
            out = fn(*args)
        except TorchDynamoException as e:  # the compiler failed on this graph (raised before it ran):
            # this kind runs eager from now on, the same program (the render goes on, loudly)
            self.failed[kind] = first_line(e)
            log.warning("could not compile the %s unit (%s); running it eager", kind, self.failed[kind])
            return _EAGER[kind](*args)
        if counters["frames"]["total"] != frames:  # this call compiled the graph of its kind
            from torch._inductor.scheduler import ExternKernelSchedulerNode

            nodes = metrics.nodes_num_elem[seen:]  # (scheduler node after fusion, bytes // 4)
            own = [n for node, n in nodes if not isinstance(node, ExternKernelSchedulerNode)]
            self.graphs[kind] = GraphFigures(metrics.ir_nodes_pre_fusion - pre, len(own), len(nodes) - len(own),
                                             4 * sum(own), 4 * sum(n for _, n in nodes), time.perf_counter() - t0)
        return out


def fused_stats() -> dict[str, int]:
    """Dynamo's process-wide counters: graphs built, frames compiled (a first compile, or a recompile
    when a cached graph's guards failed), graph breaks. The difference between two reads counts
    what happened between them: after warm-up, compiles and graphs must not move."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "compiles": int(counters["frames"]["total"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
