"""Deterministic random weights and inputs for the Wan VAE (tests, goldens and benchmarks).

Weights come from a seeded CPU generator in state_dict order, scaled so activations stay O(1)
through the whole network (fan-in scaled convs, gammas near 1), which the zero-init upstream
`proj` and default inits would not give.

    vae = random_vae(PRESETS["tiny"].vae, seed=0)
"""
from __future__ import annotations

import torch

from liveavatar_lite.config import VAEConfig
from liveavatar_lite.model.vae import WanVAE


def random_vae_state(cfg: VAEConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 state_dict with WanVAE's (== upstream WanVAE_'s) keys, reproducible from `seed`."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if key.endswith(".gamma"):
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            state[key] = 0.05 * noise
        else:
            fan_in = noise[0].numel()
            state[key] = noise / fan_in**0.5
    return state


def random_vae(cfg: VAEConfig, seed: int = 0) -> WanVAE:
    """An eval-mode fp32 WanVAE filled with `random_vae_state(cfg, seed)`."""
    vae = WanVAE(cfg)
    vae.load_state_dict(random_vae_state(cfg, seed))
    return vae.eval().requires_grad_(False)


def random_video(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A reproducible video-like tensor in (-1, 1), e.g. shape [1, 3, T, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(shape, generator=g))


def random_latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Reproducible normalized latents (unit normal), e.g. shape [1, 16, T, h, w]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)
