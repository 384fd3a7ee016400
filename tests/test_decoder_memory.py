"""The VAE decoder's memory from its ONNX graph's shapes: liveness on a hand-built graph, the stored
14B graph against the VAE's structure (the decoder's split calls and banks: test_vae_onnx.py)."""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.decoder_memory import (
    ARENA_ALIGN,
    CUDNN_WORKSPACE_BYTES,
    DecoderGraph,
)


def _tiny_graph(path) -> None:
    """x [1, 8, t, h, w] fp16 -> Mul -> Reshape (alias) -> Add(cache_in) -> y; cache_out = Identity(x)."""
    from onnx import TensorProto, helper

    def info(name, dims, elem=TensorProto.FLOAT16):
        return helper.make_tensor_value_info(name, elem, dims)

    nodes = [
        helper.make_node("Mul", ["latents", "two"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["b"]),
        helper.make_node("Add", ["b", "cache_in_0"], ["c"]),
        helper.make_node("Mul", ["c", "two"], ["frames"]),
        helper.make_node("Identity", ["latents"], ["cache_out_0"]),
    ]
    dims = [1, 8, "t", "h", "w"]
    graph = helper.make_graph(
        nodes, "g",
        [info("latents", dims), info("cache_in_0", dims)],
        [info("frames", dims), info("cache_out_0", dims)],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT16, [1], [2.0]),
                     helper.make_tensor("shape", TensorProto.INT64, [5], [1, 8, -1, 1, 1])],
        value_info=[info("a", dims), info("b", [1, 8, "t*h*w", 1, 1]), info("c", [1, 8, "t*h*w", 1, 1])],
    )
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "liveavatar_lite.cache_layout", "[[8, 1]]"
    onnx.save_model(model, str(path))


def test_working_set_is_the_peak_of_live_tensors(tmp_path):
    _tiny_graph(tmp_path / "g.onnx")
    g = DecoderGraph.from_onnx(tmp_path / "g.onnx")
    assert g.weights_bytes == 2 + 5 * 8
    t, h, w = 3, 4, 6
    x = 8 * t * h * w * 2  # one [1, 8, t, h, w] fp16 tensor: 1152 bytes
    al = -(-x // ARENA_ALIGN) * ARENA_ALIGN
    # latents + a (Mul) alive; b aliases a; c (Add) while b alive; frames while c alive; latents stays
    # until the Identity reads it; cache_in/out are the caller's buffers: never counted
    assert g.working_set_bytes((h, w), t) == 3 * al
    assert g.working_set_bytes((2 * h, w), t) == 3 * -(-2 * x // ARENA_ALIGN) * ARENA_ALIGN
    assert g.cache_bytes((h, w)) == 2 * 2 * 8 * 2 * h * w
    roundtrip = DecoderGraph.from_json(g.to_json())
    assert roundtrip == g


def test_stored_14b_graph_matches_the_vae():
    """The stored structure (tools/decoder_graph.py) is the real decoder's: its weights are the
    decoder's fp16 parameters, its caches the VAE's layout, and the working set grows with the call."""
    from liveavatar_lite.model.vae import WanVAE
    from liveavatar_lite.runtime.plan_inputs import vae_cache_bytes

    g = DecoderGraph.for_preset("14b")
    with torch.device("meta"):
        vae = WanVAE(PRESETS["14b"].vae)
    params = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "conv2.")))
    assert abs(g.weights_bytes - 2 * params) < 1e4  # fp16, plus a few graph constants
    assert [tuple(x) for x in g.cache_layout] == [tuple(x) for x in vae.decoder_cache_layout()]
    mem = g.memory((704, 384))
    assert mem.caches_bytes == vae_cache_bytes(PRESETS["14b"].vae, (704, 384))
    assert mem.workspace_bytes == CUDNN_WORKSPACE_BYTES
    ws = dict(mem.working_set_bytes)
    # one latent: 4 frames of 96-channel fp16 maps at 704*384 (52 MB each per frame) several at once
    assert 0.8e9 < ws[1] < 2e9 and ws[3] > 2.5 * ws[1] * 0.9
    # the old arena guess (64*W*H*96 = 1.66 GB) could not hold the 7-latent warm-up it ran
    assert g.working_set_bytes((48, 88), 7) > 4 * 64 * 704 * 384 * 96
