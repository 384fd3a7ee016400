"""ONNX export of the VAE decoder step + the ORT streaming decoder vs the torch reference (tiny VAE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from vae_fixtures import random_latents, random_vae

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.vae_export import export_decoder
from liveavatar_lite.decode.vae_onnx import OnnxVAEDecoder
from liveavatar_lite.errors import ArtifactError, UserError
from liveavatar_lite.model.vae import WanVAE

# onnxruntime-gpu's CUDA provider (a machine with torch on CUDA may have the CPU-only onnxruntime)
ort_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")

FP32_TOL = 1e-4  # measured ~4e-6
FP16_TOL = 2e-2  # measured ~4e-3 on outputs of magnitude ~3 (tiny random weights)


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return random_vae(PRESETS["tiny"].vae, seed=0)


@pytest.fixture(scope="session")
def float_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 decoder step graph with float frames out (exported once per session)."""
    vae = random_vae(PRESETS["tiny"].vae, seed=0)
    return export_decoder(vae, tmp_path_factory.mktemp("vae_onnx") / "tiny_fp32_float.onnx", output="float")


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return random_latents((1, 16, 6, 3, 4), seed=7)


@pytest.fixture(scope="module")
def torch_frames(tiny_vae: WanVAE, z: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return tiny_vae.decode(z).numpy()  # [1, 3, 21, 24, 32]


def _decode_chunks(decoder: OnnxVAEDecoder, z: torch.Tensor, chunks: tuple[int, ...]) -> np.ndarray:
    parts, start = [], 0
    for n in chunks:
        parts.append(decoder.decode(z[0, :, start:start + n].numpy()))
        start += n
    return np.concatenate(parts, axis=2)


def test_graph_contract(float_onnx: Path) -> None:
    model = onnx.load(str(float_onnx), load_external_data=False)
    assert model.opset_import[0].version == 20
    assert not any(n.op_type == "If" for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["liveavatar_lite.vae_decoder"] == "1"
    assert meta["liveavatar_lite.format_version"] == "1"
    assert meta["liveavatar_lite.dtype"] == "fp32"
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["latents", "first", "cache_in_0"] and len(names) == 2 + 32
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 16] and all(isinstance(d, str) for d in dims[2:])  # T, h, w dynamic


@pytest.mark.parametrize("chunks", [(6,), (1, 2, 3), (3, 3), (1, 1, 1, 1, 1, 1)])
def test_chunked_ort_equals_torch_whole(float_onnx: Path, z, torch_frames, chunks) -> None:
    decoder = OnnxVAEDecoder(float_onnx, device="cpu", threads=1)
    frames = _decode_chunks(decoder, z, chunks)
    assert frames.shape == torch_frames.shape == (1, 3, 21, 24, 32)
    assert np.abs(frames - torch_frames).max() <= FP32_TOL


def test_other_resolution_same_graph(float_onnx: Path, tiny_vae: WanVAE) -> None:
    z5 = random_latents((1, 16, 2, 5, 2), seed=8)
    with torch.no_grad():
        want = tiny_vae.decode(z5).numpy()
    got = OnnxVAEDecoder(float_onnx, device="cpu", threads=1).decode(z5[0].numpy())
    assert got.shape == want.shape == (1, 3, 5, 40, 16)
    assert np.abs(got - want).max() <= FP32_TOL


def test_state_reset_and_resume(float_onnx: Path, z, torch_frames) -> None:
    decoder = OnnxVAEDecoder(float_onnx, device="cpu", threads=1)
    decoder.decode(z[0, :, :2].numpy())
    snapshot = decoder.state()
    tail = decoder.decode(z[0, :, 2:].numpy())
    resumed = OnnxVAEDecoder(float_onnx, device="cpu", threads=1)
    resumed.load_state(snapshot)
    assert np.array_equal(resumed.decode(z[0, :, 2:].numpy()), tail)
    decoder.reset()
    assert np.abs(_decode_chunks(decoder, z, (6,)) - torch_frames).max() <= FP32_TOL
    assert decoder.cache_bytes((3, 4)) == 2 * 4 * sum(c * 2 * 3 * 4 * s * s for c, s in decoder.cache_layout)


def test_bad_latents_and_files(float_onnx: Path, tmp_path: Path) -> None:
    decoder = OnnxVAEDecoder(float_onnx, device="cpu", threads=1)
    with pytest.raises(UserError, match="latents must be"):
        decoder.decode(np.zeros((8, 1, 3, 4), np.float32))
    with pytest.raises(UserError, match="NaN or Inf"):
        decoder.decode(np.full((16, 1, 3, 4), np.nan, np.float32))
    decoder.decode(np.zeros((16, 1, 3, 4), np.float32))
    with pytest.raises(UserError, match="changed mid-stream"):
        decoder.decode(np.zeros((16, 1, 4, 4), np.float32))
    with pytest.raises(ArtifactError, match="not found"):
        OnnxVAEDecoder(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a loadable"):
        OnnxVAEDecoder(garbage)
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(float_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(ArtifactError, match="not a liveavatar-lite VAE decoder"):
        OnnxVAEDecoder(foreign)


@pytest.mark.slow
def test_fp16_graph_within_tolerance(float_onnx: Path, tiny_vae: WanVAE, z, torch_frames, tmp_path: Path) -> None:
    path = export_decoder(tiny_vae, tmp_path / "tiny_fp16.onnx", dtype="fp16", output="float")
    assert next(tiny_vae.parameters()).dtype == torch.float32  # the caller's module is left alone
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["liveavatar_lite.dtype"] == "fp16"
    decoder = OnnxVAEDecoder(path, device="cpu", threads=1)
    fp32_bytes = OnnxVAEDecoder(float_onnx, device="cpu").cache_bytes((3, 4))
    assert decoder.cache_bytes((3, 4)) * 2 == fp32_bytes
    frames = _decode_chunks(decoder, z, (1, 5))
    assert np.abs(frames - torch_frames).max() <= FP16_TOL


def test_decoder_splits_calls_and_owns_exact_banks(float_onnx: Path, z, torch_frames) -> None:
    """latents_per_call (the plan's) splits a decode into graph calls; the banks are torch tensors of
    exactly the graph's cache bytes, bound by pointer: ORT writes them in place, then they swap."""
    from liveavatar_lite.decode.decoder_memory import DecoderGraph

    split = OnnxVAEDecoder(float_onnx, device="cpu", latents_per_call=2)
    calls = []
    real = split._call
    split._call = lambda part: calls.append(part.shape[1]) or real(part)  # type: ignore[method-assign]
    frames = split.decode(z[0, :, :5].numpy())
    assert calls == [2, 2, 1] and frames.shape[2] == 1 + 4 * 4
    assert np.abs(frames - torch_frames[:, :, :17]).max() <= FP32_TOL
    assert split.bank_bytes() == DecoderGraph.from_onnx(float_onnx).cache_bytes((3, 4)) == split.cache_bytes((3, 4))
    assert all(isinstance(t, torch.Tensor) for bank in split._banks for t in bank)
    written = split._banks[1]  # the bank the next call writes
    before = [t.clone() for t in written]
    split.decode(z[0, :, 5:6].numpy())
    assert split._banks[0] is written and any(not torch.equal(x, y) for x, y in zip(before, written))


@pytest.mark.gpu
@ort_cuda
def test_cuda_ep_streams_like_cpu(float_onnx: Path, z, torch_frames) -> None:
    decoder = OnnxVAEDecoder(float_onnx, device="cuda", gpu_mem_limit=1 << 30)
    assert decoder.device == "cuda"
    head = decoder.decode(z[0, :, :1].numpy())
    snapshot = decoder.state()  # device caches copied to host
    tail = decoder.decode(z[0, :, 1:].numpy())
    frames = np.concatenate([head, tail], axis=2)
    assert np.abs(frames - torch_frames).max() <= 1e-2  # the CUDA EP may use TF32 convs
    decoder.load_state(snapshot)
    assert np.abs(decoder.decode(z[0, :, 1:].numpy()) - tail).max() <= 1e-5


@pytest.mark.gpu
@ort_cuda
def test_cuda_device_memory_of_the_decoder_includes_ort(tmp_path: Path) -> None:
    """Device-wide memory (NVML/mem_get_info: ORT's arena and the context included, which torch's own
    counters never see) at the real VAE size, 704*384: after the session, after the banks, after a
    1-latent and a 3-latent call. The banks are torch memory of exactly the plan's size; ORT stays
    within the plan's arena cap for the call size it was sized for (a 1-latent call), and a 3-latent call
    fails inside that cap instead of growing past it. Prints the figures for BENCHMARKS.md."""
    from liveavatar_lite.decode.decoder_memory import DecoderGraph
    from liveavatar_lite.pipeline.ledger import device_memory

    def used() -> int:
        torch.cuda.synchronize()
        d = device_memory(torch.device("cuda"))
        return d["process_bytes"] or d["device_used_bytes"]

    vae = random_vae(PRESETS["14b"].vae, seed=0)
    path = export_decoder(vae, tmp_path / "dec.onnx", dtype="fp16")
    del vae
    g = DecoderGraph.from_onnx(path)
    mem = g.memory((704, 384))
    ws = dict(mem.working_set_bytes)
    cap = mem.weights_bytes + ws[1] + mem.workspace_bytes
    torch.cuda.init()
    base = used()
    decoder = OnnxVAEDecoder(path, device="cuda", gpu_mem_limit=cap, latents_per_call=1)
    after_session = used()
    z = random_latents((1, 16, 7, 48, 88), seed=1)[0].numpy()
    decoder.decode(z[:, :1])
    after_one = used()
    assert decoder.bank_bytes() == mem.caches_bytes
    decoder.decode(z[:, 1:4])  # three calls of one latent (the plan's split)
    after_three = used()
    print(f"\ndecoder device memory at 704*384 (MB): session {(after_session - base) / 1e6:.0f}, after banks and "
          f"a 1-latent call {(after_one - base) / 1e6:.0f}, after 3 x 1 latent {(after_three - base) / 1e6:.0f}; "
          f"plan: banks {mem.caches_bytes / 1e6:.0f} + arena cap {cap / 1e6:.0f}")
    # everything the decoder holds: the banks (torch) + at most the cap (ORT), plus ORT's CUDA/cuDNN handles
    assert after_three - base <= mem.caches_bytes + cap + 0.5e9
    wide = OnnxVAEDecoder(path, device="cuda", gpu_mem_limit=cap)  # no split: 3 latents need ws[3] > cap
    with pytest.raises(Exception, match="(?i)allocate|memory"):
        wide.decode(z[:, :3])
