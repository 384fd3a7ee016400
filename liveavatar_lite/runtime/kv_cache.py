"""KV caches of Live Avatar's causal DiT, as explicit objects the caller owns.

Two kinds (LIVEAVATAR.md §1.4):

* `RingKVCache`: one per denoising step ("timestep forcing": step i reads and writes only ring i).
  Per layer, K (roped) and V of the last `capacity` tokens (4 blocks = 12 latent frames upstream).
  A block whose absolute start token is `start` is written at `start % capacity`. While
  `start < capacity` a call attends to slots [0, start + n); from then on to the whole ring (slot
  order, not time order: attention does not care). This is exactly upstream's rule.
* `SinkKVCache`: one, shared by all steps. Per layer, the UN-roped K and the V of the sink tokens
  (ref frame + FramePack motion tokens), written by the sink prefill. Every denoising call re-ropes
  K with that call's sink position (the model does it, the cache only stores).

Both implement the per-layer interface of `model/kv.py` (`layer_kv(ring, sink, i)` -> LayerKV).

Call order per forward: `ring.begin(start_token, n_tokens)` once, then for each layer i in order
`write` then `history` (denoising) or `sink.write` (prefill). `state_dict()` / `load_state_dict()`
snapshot a cache for resume.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..model.kv import LayerKV


def ring_window(start_token: int, num_tokens: int, capacity: int) -> tuple[int, int]:
    """(write slot, active slots) of a block at absolute token `start_token` (upstream's rule).

        ring_window(96, 48, 192)   # (96, 144): filling up, attend to slots [0, 144)
        ring_window(240, 48, 192)  # (48, 192): steady state, overwrite the oldest block, attend to all
    """
    if start_token >= capacity:
        slot, active = start_token % capacity, capacity
    else:
        slot, active = start_token, start_token + num_tokens
    if slot + num_tokens > capacity:
        raise ValueError(f"block [{start_token}, +{num_tokens}) does not fit ring capacity {capacity}")
    return slot, active


class RingLayer:
    """Layer view of a RingKVCache (see module docstring)."""

    def __init__(self, cache: RingKVCache, i: int) -> None:
        self._cache, self._i = cache, i

    def write(self, k: Tensor, v: Tensor) -> None:
        c = self._cache
        lo, n = c.write_slot, c.write_len
        if k.shape[1] != n:
            raise ValueError(f"ring.write got {k.shape[1]} tokens, begin() announced {n}")
        c.k[self._i][:, lo : lo + n] = k
        c.v[self._i][:, lo : lo + n] = v

    def history(self) -> tuple[Tensor, Tensor]:
        c = self._cache
        return c.k[self._i][:, : c.active], c.v[self._i][:, : c.active]

    def valid_keys(self) -> None:
        return None  # history() is cut to the active rows


class SinkLayer:
    """Layer view of a SinkKVCache (see module docstring)."""

    def __init__(self, cache: SinkKVCache, i: int) -> None:
        self._cache, self._i = cache, i

    def write(self, k: Tensor, v: Tensor) -> None:
        c = self._cache
        c.k[self._i] = k.to(c.dtype).clone()
        c.v[self._i] = v.to(c.dtype).clone()

    def read(self) -> tuple[Tensor, Tensor]:
        c = self._cache
        k, v = c.k[self._i], c.v[self._i]
        if k is None or v is None:
            raise RuntimeError(f"sink cache layer {self._i} is empty: run the sink prefill first")
        return k, v


class RingKVCache:
    """One denoising step's rolling self-attention cache: num_layers x {k, v} [1, capacity, heads, d]."""

    def __init__(
        self,
        num_layers: int,
        capacity: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (1, capacity, num_heads, head_dim)
        self.capacity = capacity
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_slot = 0
        self.write_len = 0
        self.active = 0

    def begin(self, start_token: int, num_tokens: int) -> None:
        """Position the next forward's writes: its block starts at absolute token `start_token`."""
        self.write_slot, self.active = ring_window(start_token, num_tokens, self.capacity)
        self.write_len = num_tokens

    def layer(self, i: int) -> RingLayer:
        return RingLayer(self, i)

    def state_dict(self) -> dict[str, object]:
        return {"k": self.k, "v": self.v, "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"ring capacity {state['capacity']} != {self.capacity}")
        self.k = [t.clone() for t in state["k"]]  # type: ignore[union-attr]
        self.v = [t.clone() for t in state["v"]]  # type: ignore[union-attr]


class SinkKVCache:
    """The sink (ref + motion) cache: per layer un-roped K and V, or None before the prefill."""

    def __init__(self, num_layers: int, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers

    def layer(self, i: int) -> SinkLayer:
        return SinkLayer(self, i)

    @property
    def filled(self) -> bool:
        return all(t is not None for t in self.k)

    def state_dict(self) -> dict[str, object]:
        return {"k": self.k, "v": self.v}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.k = [None if t is None else t.clone() for t in state["k"]]  # type: ignore[union-attr]
        self.v = [None if t is None else t.clone() for t in state["v"]]  # type: ignore[union-attr]


def layer_kv(ring: RingKVCache | None, sink: SinkKVCache, i: int) -> LayerKV:
    """The LayerKV of layer i for one forward (ring=None for the sink prefill)."""
    return LayerKV(ring=None if ring is None else ring.layer(i), sink=sink.layer(i))
