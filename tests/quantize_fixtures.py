"""Small DiT-only checkpoints for the quantize, runtime and calibration tests.

The upstream on-disk layout (config.json, sharded safetensors + index, PEFT LoRA file), written by
tools/make_checkpoint.py with a chosen DiT config and shard count.

    ck = write_dit_checkpoint(tmp_path / "ck")
"""
from __future__ import annotations

from pathlib import Path

from make_checkpoint import write_checkpoint

from liveavatar_lite.config import DiTConfig


def write_dit_checkpoint(out: Path, cfg: DiTConfig | None = None, seed: int = 0, shards: int = 2,
                         with_lora: bool = True) -> Path:
    """A DiT-only checkpoint of the tiny preset (or `cfg`) in exactly `shards` shards."""
    return write_checkpoint("tiny", out, seed=seed, dit_only=True, with_lora=with_lora, dit=cfg, num_shards=shards)
