"""Offloaded / 8-bit KV caches against kv_cache.py's resident bf16 caches."""
from __future__ import annotations

import pytest
import torch

from liveavatar_lite.config import PRESETS
from liveavatar_lite.runtime.kv_cache import RingKVCache, SinkKVCache, layer_kv
from liveavatar_lite.runtime.kv_offload import KVOffload, dequantize_kv, quantize_kv

CFG = PRESETS["tiny"].dit  # 4 layers, 2 heads x 128
BLOCK, CAP, SINK = 6, 24, 10  # tokens per block, ring capacity (4 blocks), sink tokens


def _drive(open_layer, close_layer, begin, blocks: int, seed: int = 0) -> list[torch.Tensor]:
    """Sink prefill, then `blocks` blocks x 4 steps of write + history on every layer; returns what
    attention would see (history and sink reads)."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for i in range(CFG.num_layers):  # prefill
        lkv = open_layer(None, i)
        lkv.sink.write(torch.randn(1, SINK, 2, 128, generator=g), torch.randn(1, SINK, 2, 128, generator=g))
        close_layer(None, i)
    for b in range(blocks):
        for step in range(4):
            begin(step, b * BLOCK, BLOCK)
            for i in range(CFG.num_layers):
                lkv = open_layer(step, i)
                lkv.ring.write(torch.randn(1, BLOCK, 2, 128, generator=g), torch.randn(1, BLOCK, 2, 128, generator=g))
                seen += [t.float().clone() for t in (*lkv.ring.history(), *lkv.sink.read())]
                close_layer(step, i)
    return seen


def _reference(blocks: int) -> list[torch.Tensor]:
    rings = [RingKVCache(CFG.num_layers, CAP, 2, 128) for _ in range(4)]
    sink = SinkKVCache(CFG.num_layers)
    return _drive(lambda s, i: layer_kv(None if s is None else rings[s], sink, i), lambda s, i: None,
                  lambda s, start, n: rings[s].begin(start, n), blocks)


def _offload(kv_dtype: str, ring_gpu, sink_gpu, blocks: int) -> tuple[list[torch.Tensor], KVOffload]:
    kv = KVOffload.build(CFG, CAP, SINK, kv_dtype, ring_gpu, sink_gpu, "cpu", compute_dtype=torch.float32)
    return _drive(kv.open_layer, kv.close_layer, lambda s, start, n: kv.rings[s].begin(start, n), blocks), kv


@pytest.mark.parametrize("ring_gpu,sink_gpu", [
    ([True] * 4, True), ([False] * 4, False), ([False, True, False, True], True), ([True, True, True, False], False),
])
def test_bf16_offload_equals_resident_reference(ring_gpu, sink_gpu):
    want = _reference(blocks=6)  # 6 blocks > 4: the ring wraps
    got, kv = _offload("bf16", ring_gpu, sink_gpu, blocks=6)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for st in kv.streamers():  # only this block's rows go back: 4 steps x 4 layers x 6 blocks x k,v
        assert st.stats.d2h_bytes <= (6 * 4 * 4 + 4) * 2 * max(BLOCK, SINK) * 2 * 128 * 2


@pytest.mark.parametrize("kv_dtype,max_rel", [("int8", 0.01), ("fp8", 0.06)])
def test_8bit_kv_error(kv_dtype, max_rel):
    want = _reference(blocks=5)
    got, _ = _offload(kv_dtype, [False] * 4, False, blocks=5)
    for a, b in zip(got, want):
        rel = (a - b).norm() / b.norm()
        assert rel < max_rel, float(rel)


def test_state_roundtrip_continues_identically():
    _, kv = _offload("int8", [False, True, False, False], False, blocks=3)
    state = kv.state_dict()
    fresh = KVOffload.build(CFG, CAP, SINK, "int8", [False, True, False, False], False, "cpu",
                            compute_dtype=torch.float32)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.state_dict()["rings"], state["rings"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert fresh.sink.length == SINK


def test_quantize_kv_roundtrip():
    x = torch.randn(1, 7, 2, 128) * torch.logspace(-3, 3, 7)[None, :, None, None]  # very different token scales
    for dt, tol in (("int8", 0.01), ("fp8", 0.05)):
        q, s = quantize_kv(x, dt)
        y = dequantize_kv(q, s, torch.float32)
        assert ((y - x).norm(dim=-1) / x.norm(dim=-1)).max() < tol
    q, s = quantize_kv(x, "bf16")
    assert s is None and torch.equal(dequantize_kv(q, s, torch.float32), q)



def test_load_state_waits_for_in_flight_writebacks_first():
    """On CUDA a write-back may still be copying into the host buffers: restoring must wait for it."""
    _, kv = _offload("bf16", [False] * 4, False, blocks=1)
    state = kv.state_dict()
    logs = []
    for store in (*kv.rings, kv.sink):
        log: list[str] = []
        logs.append(log)
        store.streamer = _SpyStreamer(log)  # type: ignore[assignment]
        store.bufs = [_SpyBuffer(b, log) for b in store.bufs]  # type: ignore[assignment]
    kv.load_state_dict(state)
    for log in logs:
        assert log == ["wait"] + ["copy"] * CFG.num_layers + ["invalidate"]


class _SpyStreamer:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def wait_copies(self) -> None:
        self.log.append("wait")

    def invalidate(self) -> None:
        self.log.append("invalidate")


class _SpyBuffer:
    def __init__(self, buf: torch.Tensor, log: list[str]) -> None:
        self.buf, self.log = buf, log

    def copy_(self, src: torch.Tensor) -> torch.Tensor:
        self.log.append("copy")
        return self.buf.copy_(src)
