"""The KV-cache interface the DiT's self-attention consumes (the caches themselves live in runtime/).

Per layer, a forward gets a `LayerKV`: its ring view (None in the sink prefill) and its sink view.

    lkv.ring.write(k, v)               # k, v [1, n, heads, head_dim]: this call's block, at the
                                       #   position the ring's begin(start, n) set
    k_all, v_all = lkv.ring.history()  # [1, active, heads, head_dim], INCLUDING the block just
                                       #   written; any dtype (the model casts to its own)
    valid = lkv.ring.valid_keys()      # None: every history row is attended to; else bool [rows]
                                       #   (a static-shape ring returns all its rows and masks the
                                       #   ones not yet written)
    lkv.sink.write(k, v)               # sink prefill only: un-roped k, v [1, Lc, heads, head_dim]
    k_s, v_s = lkv.sink.read()         # [1, Lc, heads, head_dim]

`runtime/kv_cache.py` (plain in-memory caches) and `runtime/kv_offload.py` (GPU / pinned host,
bf16 / fp8 / int8) implement it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class RingView(Protocol):
    """One layer of a denoising step's ring cache."""

    def write(self, k: Tensor, v: Tensor) -> None: ...

    def history(self) -> tuple[Tensor, Tensor]: ...

    def valid_keys(self) -> Tensor | None: ...


class SinkView(Protocol):
    """One layer of the sink (ref + motion) cache."""

    def write(self, k: Tensor, v: Tensor) -> None: ...

    def read(self) -> tuple[Tensor, Tensor]: ...


@dataclass
class LayerKV:
    """What one layer's self-attention gets: its ring view (None in the sink prefill) and sink view."""

    ring: RingView | None
    sink: SinkView
