"""`liveavatar-lite calibrate`: per-Linear quantization error of each format -> measurement.json."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import float_range, int_range, seed

DESCRIPTION = (
    "Run the reference DiT on a small synthetic calibration set (prompts, synthesized speech, procedural "
    "photos), one streaming unit at a time, and record each Linear's output error under each candidate "
    "format. Feed the result to `quantize --target-size GB --measurement FILE`."
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", type=Path, metavar="CKPT_DIR", help="upstream Wan2.2-S2V-14B directory")
    parser.add_argument("--out", type=Path, required=True, help="measurement.json to write")
    parser.add_argument("--lora", type=Path, help="Live Avatar LoRA (default: CKPT_DIR/liveavatar.safetensors if present)")
    parser.add_argument("--no-lora", action="store_true", help="measure the base model without the LoRA")
    parser.add_argument("--formats", default="int8,fp8,int4,nf4", help="candidate formats, comma separated (default: all)")
    parser.add_argument("--group-size", type=int, choices=(64, 128), default=128, help="int4 group size")
    parser.add_argument("--samples", type=int_range(1, 1000), default=2, help="calibration samples, 1-1000 (default 2)")
    parser.add_argument("--seconds", type=float_range(0.0, 600.0, lo_open=True), default=2.0,
                        help="speech per sample in seconds, up to 600 (default 2)")
    parser.add_argument("--height", type=int_range(16, 4096), default=128, help="photo height in pixels (multiple of 16)")
    parser.add_argument("--width", type=int_range(16, 4096), default=128, help="photo width in pixels (multiple of 16)")
    parser.add_argument("--blocks", type=int_range(1, 64), default=1, help="denoised blocks per sample (each: 4 steps)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="reference compute dtype")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the synthetic samples and the noise (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from calibration.cli import (
        run as run_calibrate,  # offline code, loaded only for this subcommand
    )

    return run_calibrate(args)
