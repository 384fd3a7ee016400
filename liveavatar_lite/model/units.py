"""Which DiT state-dict keys belong to which streaming unit, and which stay resident.

Streaming unit i is `blocks.{i}.*` plus, when block i is an audio-inject layer (the j-th one),
`audio_injector.injector.{j}.*` and `audio_injector.injector_adain_layers.{j}.*`. Everything else
(embeddings, time MLPs, audio encoder, FramePack, head, ...) is resident. The key names are
derived from a meta-device `WanS2VDiT`, so they always equal what the model loads.

    keys = unit_keys(cfg, 0)      # ['blocks.0.modulation', ..., 'audio_injector.injector.0.q.weight', ...]
    rest = resident_keys(cfg)
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..config import DiTConfig


@lru_cache(maxsize=4)
def _all_keys(cfg: DiTConfig) -> tuple[str, ...]:
    from .dit import WanS2VDiT

    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    return tuple(model.state_dict().keys())


def unit_prefixes(cfg: DiTConfig, i: int) -> tuple[str, ...]:
    """Key prefixes (ending in '.') of streaming unit i."""
    if not 0 <= i < cfg.num_layers:
        raise ValueError(f"unit {i} outside 0..{cfg.num_layers - 1}")
    prefixes = [f"blocks.{i}."]
    j = cfg.inject_slot(i)
    if j is not None:
        prefixes += [f"audio_injector.injector.{j}.", f"audio_injector.injector_adain_layers.{j}."]
    return tuple(prefixes)


def unit_keys(cfg: DiTConfig, i: int) -> list[str]:
    """State-dict keys of streaming unit i, in the model's order."""
    prefixes = unit_prefixes(cfg, i)
    return [k for k in _all_keys(cfg) if k.startswith(prefixes)]


def resident_keys(cfg: DiTConfig) -> list[str]:
    """State-dict keys outside every streaming unit (kept on the GPU for the whole run)."""
    streamed = tuple(p for i in range(cfg.num_layers) for p in unit_prefixes(cfg, i))
    return [k for k in _all_keys(cfg) if not k.startswith(streamed)]


def unit_of_key(cfg: DiTConfig, key: str) -> int | None:
    """The streaming unit a key belongs to, or None for a resident key."""
    if key.startswith("blocks."):
        return int(key.split(".")[1])
    for sub in ("audio_injector.injector.", "audio_injector.injector_adain_layers."):
        if key.startswith(sub):
            j = int(key[len(sub) :].split(".")[0])
            return cfg.audio_inject_layers[j]
    return None
