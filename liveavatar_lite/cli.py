"""`liveavatar-lite` entry point: parses flags, dispatches to one subcommand, maps errors to exit codes.

    liveavatar-lite quantize CKPT_DIR OUT_DIR --format int8
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

# name -> (module under liveavatar_lite.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quantize": ("quantize_cmd", "convert an upstream checkpoint into a quantized, streamable artifact"),
    "calibrate": ("calibrate_cmd", "measure each Linear's quantization error on a synthetic calibration set"),
    "inspect": ("inspect_cmd", "summarize an artifact: formats, bytes per unit, source, verification"),
    "plan": ("plan_cmd", "place weights and KV caches within a VRAM/RAM budget and predict speed"),
    "generate": ("generate_cmd", "photo + speech + prompt -> mp4 (streaming, resumable)"),
    "serve": ("serve_cmd", "the kiosk service: HTTP API, durable job queue, one warm worker (docs/serve.md)"),
    "farm": ("farm_cmd", "render a batch of jobs on a Ray cluster, one warm actor per GPU (docs/farm.md)"),
    "vae": ("vae_cmd", "export the VAE decoder to ONNX, or decode saved latents with it"),
    "bench": ("bench_cmd", "run a benchmark (stream, quantize, vae) and print side-by-side ratios"),
}


OUR_LOGGERS = ("liveavatar_lite", "quantize", "calibration")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveavatar-lite",
        description=(
            "Run Live Avatar (Wan2.2-S2V-14B + the Live Avatar LoRA) on one 24 GB GPU. "
            "Quantize the checkpoint once, then generate talking-avatar videos from a photo, "
            "speech and a prompt."
        ),
        epilog="Run `liveavatar-lite SUBCOMMAND --help` for the flags of each subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"liveavatar_lite.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text))
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our packages log at INFO (DEBUG with -v); third-party libraries (onnxscript, transformers)
    # only at WARNING, so long jobs print progress bars and our messages, not exporter chatter.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"liveavatar-lite {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"liveavatar-lite {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
