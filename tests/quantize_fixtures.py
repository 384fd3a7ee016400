"""Small DiT-only checkpoints for the quantize tests, independent of the model package.

Same on-disk layout as upstream (config.json, sharded safetensors + index, PEFT LoRA file), keys
and shapes from `quantize.source.expected_dit_shapes`, values seeded per key.

    ck = write_dit_checkpoint(tmp_path / "ck")
"""
from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from liveavatar_lite.config import PRESETS, DiTConfig
from quantize.source import expected_dit_shapes

LORA_TARGET = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|audio_injector\.injector\.\d+\.[qkvo])\.weight$")


def value_for(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g)
    if key.endswith(".weight") and len(shape) >= 2:
        t = t / math.sqrt(math.prod(shape[1:]))
    elif "norm" in key:
        t = 1.0 + 0.1 * t
    else:
        t = 0.02 * t
    return t.to(torch.bfloat16)


def write_dit_checkpoint(out: Path, cfg: DiTConfig | None = None, seed: int = 0, shards: int = 2,
                         lora_rank: int = 8, with_lora: bool = True) -> Path:
    cfg = cfg or PRESETS["tiny"].dit
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_upstream_json(), indent=2))
    shapes = expected_dit_shapes(cfg)
    keys = list(shapes)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i * per:(i + 1) * per]
        save_file({k: value_for(k, shapes[k], seed) for k in chunk}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    if with_lora:
        lora = {}
        for k, (n, kin) in ((k, s) for k, s in shapes.items() if LORA_TARGET.match(k)):
            m = k[: -len(".weight")]
            lora[f"base_model.model.{m}.lora_A.weight"] = value_for(m + ".A", (lora_rank, kin), seed + 1)
            lora[f"base_model.model.{m}.lora_B.weight"] = (0.1 * value_for(m + ".B", (n, lora_rank), seed + 1).float()).to(torch.bfloat16)
        save_file(lora, str(out / "liveavatar.safetensors"))
    return out
