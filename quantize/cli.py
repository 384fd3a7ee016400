"""Flags -> ConvertOptions -> convert(); the `quantize` subcommand's body (argparse lives in the command module).

    liveavatar-lite quantize CKPT OUT --format int4 --group-size 64 --lora CKPT/liveavatar.safetensors
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from liveavatar_lite.artifact.checkpoint import LORA_FILE
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.errors import UserError

from .convert import ConvertOptions, convert

log = logging.getLogger(__name__)


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """Validate flag combinations and resolve --target-size into per-layer overrides."""
    lora = resolve_lora(args)
    overrides: tuple[tuple[str, QuantType], ...] = ()
    measurement_sha = None
    if (args.target_size is None) != (args.measurement is None):
        raise UserError("--target-size and --measurement go together")
    if args.target_size is not None:
        from .target import plan_for_target

        plan = plan_for_target(args.ckpt_dir, args.measurement, args.target_size * 1e9, QuantType(args.format),
                               args.group_size, tuple(args.keep_bf16))
        overrides, measurement_sha = plan.overrides, plan.measurement_sha256
        log.info("--target-size %.2f GB: %s (predicted %.2f GB)", args.target_size, plan.describe(), plan.total_bytes / 1e9)
    return ConvertOptions(
        ckpt_dir=args.ckpt_dir, out_dir=args.out_dir, format=QuantType(args.format), lora=lora,
        group_size=args.group_size, keep_bf16=tuple(args.keep_bf16), t5=QuantType(args.t5),
        components=tuple(args.components), overrides=overrides, target_size_gb=args.target_size,
        measurement_sha256=measurement_sha, vae_onnx=not args.no_vae_onnx, force=args.force,
        progress=not args.no_progress,
    )


def resolve_lora(args: argparse.Namespace) -> Path | None:
    """The LoRA to merge: --lora, else CKPT_DIR/liveavatar.safetensors; None only with --no-lora.

    A base S2V artifact renders poor video with Live Avatar's 4 steps and no CFG, so a missing LoRA
    stops the command (one line saying where to get it) instead of silently converting without it.
    """
    no_lora = getattr(args, "no_lora", False)
    if no_lora and args.lora is not None:
        raise UserError("--lora and --no-lora contradict each other; pass one")
    if no_lora or "dit" not in tuple(args.components):
        return None
    if args.lora is not None:
        return args.lora
    default = Path(args.ckpt_dir) / LORA_FILE
    if default.exists():
        log.info("merging the Live Avatar LoRA %s (pass --no-lora to convert the base model)", default)
        return default
    if not Path(args.ckpt_dir).is_dir():
        return None  # the checkpoint directory itself is missing: convert() names that
    raise UserError(f"no Live Avatar LoRA: {default} does not exist. Get it with `liveavatar-lite download "
                    f"{args.ckpt_dir}`, pass --lora FILE, or --no-lora to convert the base S2V model "
                    "(it renders poorly with 4 steps)")


def run(args: argparse.Namespace) -> int:
    manifest = convert(options_from_args(args))
    log.info("wrote %s: %d files, %.3f GB", args.out_dir, len(manifest.units), manifest.total_nbytes / 1e9)
    return 0
