"""WanVAE: upstream key layout, parity with upstream goldens, streaming == whole-sequence decode."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vae_fixtures import random_latents, random_vae, random_video

from liveavatar_lite.config import PRESETS
from liveavatar_lite.model.vae import FIRST_CALL_JUNK_FRAMES, WanVAE

GOLDEN = Path(__file__).parent / "golden" / "vae" / "tiny_seed0.safetensors"
TOL = 1e-4  # fp32; measured ~3e-6


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return random_vae(PRESETS["tiny"].vae, seed=0)


def test_keys_and_shapes_match_upstream(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "wan21_vae_keys.json").read_text())
    want = {t["key"]: list(t["shape"]) for t in manifest["tensors"]}
    with torch.device("meta"):
        vae = WanVAE(PRESETS["14b"].vae)
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert len(got) == manifest["num_tensors"] == 194
    assert got == want
    assert sum(p.numel() for p in vae.parameters()) == manifest["total_params"]


def test_real_decoder_cache_layout() -> None:
    with torch.device("meta"):
        vae = WanVAE(PRESETS["14b"].vae)
    layout = vae.decoder_cache_layout()
    # 28 residual convs + conv1 + head + 2 temporal upsamplers (the 1x1x1 shortcut keeps no state)
    assert len(layout) == 32
    assert layout[0] == (16, 1) and layout[-1] == (96, 8)


def test_tiny_builds_on_meta() -> None:
    with torch.device("meta"):
        vae = WanVAE(PRESETS["tiny"].vae)
    assert len(vae.state_dict()) == 194


@torch.no_grad()
def test_encode_matches_upstream_golden(tiny_vae: WanVAE) -> None:
    g = load_file(GOLDEN)
    latents = tiny_vae.encode(g["video"])
    assert latents.shape == g["latents"].shape
    assert (latents - g["latents"]).abs().max().item() <= TOL


@torch.no_grad()
def test_decode_matches_upstream_golden(tiny_vae: WanVAE) -> None:
    g = load_file(GOLDEN)
    frames = tiny_vae.decode(g["z"])
    assert frames.shape == g["frames"].shape == (1, 3, 9, 16, 24)
    assert (frames - g["frames"]).abs().max().item() <= TOL


@pytest.mark.parametrize("chunks", [(1, 1, 1, 1), (1, 3), (2, 2), (3, 1)])
@torch.no_grad()
def test_chunked_decode_equals_whole(tiny_vae: WanVAE, chunks: tuple[int, ...]) -> None:
    z = random_latents((1, 16, sum(chunks), 3, 2), seed=5)
    whole = tiny_vae.decode(z)
    parts, caches, start = [], None, 0
    for i, n in enumerate(chunks):
        frames, caches = tiny_vae.decode_step(z[:, :, start:start + n], i == 0, caches)
        assert frames.shape[2] == 4 * n - (FIRST_CALL_JUNK_FRAMES if i == 0 else 0)
        parts.append(frames)
        start += n
    assert (torch.cat(parts, dim=2) - whole).abs().max().item() <= TOL


@torch.no_grad()
def test_encode_drops_incomplete_chunk_and_normalizes(tiny_vae: WanVAE) -> None:
    video = random_video((1, 3, 7, 16, 16), seed=3)  # 1 + 4 + 2 leftover frames -> 2 latents
    z = tiny_vae.encode(video)
    assert z.shape == (1, 16, 2, 2, 2)
    assert torch.allclose(tiny_vae.encode(video[:, :, :5]), z, atol=TOL)
    mu = torch.randn(1, 16, 1, 2, 2)
    back = tiny_vae.denormalize_latents(tiny_vae.normalize_latents(mu))
    assert torch.allclose(back, mu, atol=1e-5)


@torch.no_grad()
def test_streaming_encode_in_larger_chunks(tiny_vae: WanVAE) -> None:
    video = random_video((1, 3, 13, 16, 8), seed=4)
    whole = tiny_vae.encode(video)  # chunks 1, 4, 4, 4
    z0, caches = tiny_vae.encode_step(video[:, :, :1], True, None)
    z1, caches = tiny_vae.encode_step(video[:, :, 1:13], False, caches)  # 12 frames at once
    assert (torch.cat([z0, z1], dim=2) - whole).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_vae.encode_step(video[:, :, :3], False, caches)


@torch.no_grad()
def test_bf16_runs_close_to_fp32(tiny_vae: WanVAE) -> None:
    import copy

    z = random_latents((1, 16, 3, 3, 2), seed=7)
    video = random_video((1, 3, 5, 16, 16), seed=3)
    vae16 = copy.deepcopy(tiny_vae).to(torch.bfloat16)
    frames = vae16.decode(z.bfloat16())
    assert frames.dtype == torch.bfloat16
    assert (frames.float() - tiny_vae.decode(z)).abs().max().item() <= 0.15  # measured 0.053 (outputs ~2.5)
    assert (vae16.encode(video.bfloat16()).float() - tiny_vae.encode(video)).abs().max().item() <= 0.05  # 0.010
