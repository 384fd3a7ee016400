"""Build the DiT on the meta device and load it strictly from an upstream checkpoint + LoRA.

The Live Avatar LoRA (rank 128, alpha 64) is merged at load time in fp32, W + alpha/r * B @ A,
then cast to the requested dtype (upstream merges into the bf16 base with PEFT `merge_and_unload`).
Every checkpoint key must be consumed and every shape must match (CheckpointError otherwise); every
LoRA module must name a Linear of the model. This path is for the CPU reference and small models:
it holds the whole DiT in `dtype` (the runtime streams quantized units instead).

    model = load_dit(CheckpointDir(path), LoraWeights.open(lora_path), dtype=torch.float32)
"""
from __future__ import annotations

import logging

import torch

from ..model.dit import WanS2VDiT
from .checkpoint import (
    CheckpointDir,
    LoraWeights,
    expected_shapes,
    materialize_strict,
    merge_lora,
)

log = logging.getLogger(__name__)


def build_meta_dit(ck: CheckpointDir, la_roundings: bool = True) -> WanS2VDiT:
    """A WanS2VDiT for the checkpoint's config.json, on the meta device (no memory)."""
    with torch.device("meta"):
        return WanS2VDiT(ck.dit_config, la_roundings=la_roundings)


def merged_dit_tensor(ck: CheckpointDir, lora: LoraWeights | None, key: str, dtype: torch.dtype) -> torch.Tensor:
    """One DiT tensor with its LoRA delta (if any) added in fp32, cast to `dtype`."""
    t = ck.read_dit_tensor(key)
    delta = lora.delta_for_weight(key) if lora is not None else None
    if delta is not None:
        t = merge_lora(t, delta)
    return t.to(dtype) if t.is_floating_point() else t


def load_dit(
    ck: CheckpointDir,
    lora: LoraWeights | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    la_roundings: bool = True,
) -> WanS2VDiT:
    """The merged DiT in `dtype` on `device`, in eval mode. Raises CheckpointError on any mismatch."""
    model = build_meta_dit(ck, la_roundings=la_roundings)
    if lora is not None:
        lora.check_targets(expected_shapes(model))
    tensors = {key: merged_dit_tensor(ck, lora, key, dtype) for key in ck.dit_keys}
    merged = 0 if lora is None else sum(1 for k in tensors if k.endswith(".weight") and k[:-7] in lora.targets)
    log.info("DiT: %d tensors loaded, %d LoRA deltas merged in fp32, dtype %s", len(tensors), merged, dtype)
    materialize_strict(model, tensors, source=str(ck.path), dtype=dtype)
    return model.to(device).eval()
