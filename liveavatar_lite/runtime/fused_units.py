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
    fused_stats()  # {"graphs": ..., "compiles": ..., "graph_breaks": ...}: dynamo's own counters
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..model.dit import DiTContext
    from ..model.dit_blocks import CrossAttention, DiTBlock
    from ..model.kv import LayerKV

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


class FusedUnits:
    """The compiled unit functions (one compile cache each; see module docstring)."""

    def __init__(self) -> None:
        self.block = torch.compile(_block, dynamic=False, options=_OPTIONS)
        self.inject = torch.compile(_inject, dynamic=False, options=_OPTIONS)


def fused_stats() -> dict[str, int]:
    """Dynamo's process-wide counters: graphs built, frames compiled (a first compile, or a recompile
    when a cached graph's guards failed), graph breaks. The difference between two reads counts
    what happened between them: after warm-up, compiles and graphs must not move."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "compiles": int(counters["frames"]["total"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
