"""Device placement of the DiT's forward, checked without a GPU.

The model and every input live on the meta device, where any op that mixes in a tensor created on
the CPU (a constant built without `device=`) raises, exactly as it would on CUDA. This is the CPU
stand-in for the GPU run: `sinusoidal_embedding` once built its frequency ladder on the CPU.
"""
from __future__ import annotations

import torch

from liveavatar_lite.config import PRESETS
from liveavatar_lite.model.dit import WanS2VDiT, sinusoidal_embedding
from liveavatar_lite.runtime.kv_cache import RingKVCache, SinkKVCache, layer_kv

CFG = PRESETS["tiny"].dit
META = torch.device("meta")


def test_sinusoidal_embedding_stays_on_the_input_device():
    assert sinusoidal_embedding(CFG.freq_dim, torch.zeros(3, device=META)).device == META


def test_sink_prefill_and_denoise_never_touch_cpu_tensors():
    h = w = 8
    with META:
        dit = WanS2VDiT(CFG)
    sink = SinkKVCache(CFG.num_layers, dtype=torch.float32)
    ring = RingKVCache(CFG.num_layers, 12 * 16, CFG.num_heads, CFG.head_dim, torch.float32, META)
    with torch.no_grad():
        text = dit.embed_text(torch.randn(7, CFG.text_dim))  # CPU inputs are moved by the model
        x, ctx = dit.prepare_sink(torch.randn(16, 1, h, w), torch.randn(16, 22, h, w), text)
        assert dit.forward(x, ctx, lambda i: layer_kv(None, sink, i)) is None
        audio = torch.randn(CFG.audio_layers, CFG.audio_dim, 12)
        x, ctx = dit.prepare_block(torch.randn(16, 3, h, w), torch.tensor(857.69), 0, audio, text, 10)
        ring.begin(0, x.shape[1])
        flow = dit.forward(x, ctx, lambda i: layer_kv(ring, sink, i))
    assert flow.device == META and flow.shape == (16, 3, h, w)
