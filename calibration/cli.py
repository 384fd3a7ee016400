"""`liveavatar-lite calibrate`: measure per-Linear quantization error and write measurement.json."""
from __future__ import annotations

import argparse
import logging

import torch

from liveavatar_lite.artifact.checkpoint import LORA_FILE, CheckpointDir, LoraWeights
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import preset_for_dit
from liveavatar_lite.errors import UserError
from liveavatar_lite.pipeline.workdir import check_output_path

from .inputs import default_samples
from .measure import measure
from .measurement import write_measurement

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    ck = CheckpointDir(args.ckpt_dir)
    preset = preset_for_dit(ck.dit_config)
    lora_path = args.lora or (ck.path / LORA_FILE if (ck.path / LORA_FILE).exists() and not args.no_lora else None)
    lora = LoraWeights.open(lora_path) if lora_path else None
    try:
        formats = [QuantType(f) for f in args.formats.split(",")]
    except ValueError:
        raise UserError(f"--formats {args.formats!r}: choose from int8, fp8, int4, nf4") from None
    if any(not f.is_quantized for f in formats):
        raise UserError("--formats lists quantized formats only (bf16 is always measured as the reference)")
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        raise UserError(f"--height/--width must be positive multiples of 16 (got {args.height}x{args.width})")
    check_output_path(args.out, "--out", suffix=None)
    if args.out.exists() and not args.force:
        raise UserError(f"{args.out} exists (use --force to replace it)")
    samples = default_samples(args.samples, args.seconds, args.height, args.width)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    m = measure(ck, preset, lora, formats, samples, args.group_size, args.blocks, dtype, args.seed)
    write_measurement(args.out, m)
    worst = sorted(m.layers.items(), key=lambda kv: -max(e.rel_mse for e in kv[1].formats.values()))[:3]
    for key, layer in worst:
        print(f"{key}: " + ", ".join(f"{q.value} {e.snr_db:.1f} dB" for q, e in layer.formats.items() if q.is_quantized))
    print(f"wrote {args.out}: {len(m.layers)} Linears x {len(formats)} formats, {len(samples)} samples")
    return 0
