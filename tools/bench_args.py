"""The model flags the DiT benches share (bench_speed.py, bench_stream.py): which model, at what size,
in which formats, on which device, and the config and frame size they select."""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from liveavatar_lite.config import PRESETS, DiTConfig
from liveavatar_lite.runtime.plan_inputs import parse_size


def add_model_args(ap: argparse.ArgumentParser, layers_help: str, vram_help: str) -> None:
    """--preset --layers --size --format --kv --vram --device (the help of --layers and --vram is the bench's)."""
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help=layers_help)
    ap.add_argument("--size", default=None, help="W*H (default 704*384 for 14b, 64*64 for tiny)")
    ap.add_argument("--format", default="int8", choices=("int8", "fp8", "int4", "nf4", "bf16"))
    ap.add_argument("--kv", default="bf16", choices=("bf16", "fp8", "int8"))
    ap.add_argument("--vram", type=float, help=vram_help)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_config(args: argparse.Namespace) -> tuple[DiTConfig, tuple[int, int]]:
    """The DiT config (`--preset`, cut to `--layers` blocks) and the frame size (`--size` or the preset's)."""
    cfg = PRESETS[args.preset].dit
    if args.layers:
        cfg = replace(cfg, num_layers=args.layers,
                      audio_inject_layers=tuple(i for i in cfg.audio_inject_layers if i < args.layers))
    return cfg, parse_size(args.size or ("704*384" if args.preset == "14b" else "64*64"))
