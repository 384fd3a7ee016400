"""Deterministic tiny DiT weights and inputs for the DiT tests and the upstream golden files.

`tests/golden/dit/` was produced by running upstream Live Avatar code on exactly these tensors
(see tests/golden/README.md, section "dit"), so this file must not change what it generates.
"""
from __future__ import annotations

import torch

from liveavatar_lite.config import DiTConfig
from liveavatar_lite.model.dit import WanS2VDiT

GOLDEN_SEED = 123
GOLDEN_BLOCKS = 5  # 5 blocks of 3 latent frames: crosses the 12-frame ring wrap and a clip boundary
GOLDEN_HW = (8, 8)  # latent h, w: 16 tokens per latent frame, 40 sink tokens
GOLDEN_SINK_OFFSET = 28  # ref RoPE frame = frame0 + 28 from frame 2 on


def random_state_dict(cfg: DiTConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor non-zero (zero-init layers too), fan-in scaled, norms near 1."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanS2VDiT(cfg).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        r = torch.randn(shape, generator=gen)
        if k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t = 1 + 0.1 * r
        elif k == "casual_audio_encoder.weights":
            t = 0.01 + 0.5 * r
        elif len(shape) >= 2:
            fan_in = 1 if k == "trainable_cond_mask.weight" else shape[1:].numel()
            t = 0.2 * r if k.endswith("modulation") else r / fan_in**0.5
        else:
            t = 0.05 * r
        sd[k] = t.contiguous()
    return sd


def golden_case(cfg: DiTConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state_dict, inputs) of the golden run: text, ref, motion (22 frames), audio, noise."""
    g = torch.Generator().manual_seed(GOLDEN_SEED)
    sd = random_state_dict(cfg, g)
    h, w = GOLDEN_HW
    n = GOLDEN_BLOCKS
    inputs = dict(
        text=torch.randn(7, cfg.text_dim, generator=g),
        ref=torch.randn(16, 1, h, w, generator=g),
        motion=torch.randn(16, 22, h, w, generator=g),
        audio=torch.randn(cfg.audio_layers, cfg.audio_dim, 12 * n, generator=g),
        noise=torch.randn(16, 3 * n, h, w, generator=g),
    )
    return sd, inputs


def load_model(cfg: DiTConfig, sd: dict[str, torch.Tensor], dtype=torch.float32, **kw) -> WanS2VDiT:
    with torch.device("meta"):
        model = WanS2VDiT(cfg, **kw)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.to(dtype).eval()


def two_clip_case(cfg: DiTConfig):
    """(model, GenerationInputs) of the golden weights and inputs, with the audio tiled to 2 clips
    of 48 frames: what the generator tests run."""
    from liveavatar_lite.pipeline.generator import GenerationInputs

    sd, inputs = golden_case(cfg)
    audio = torch.cat([inputs["audio"], inputs["audio"]], dim=-1)[..., :96]
    return load_model(cfg, sd), GenerationInputs(inputs["text"], audio, inputs["ref"], inputs["motion"])
