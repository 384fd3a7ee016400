"""`liveavatar-lite quantize CKPT_DIR OUT_DIR --format int8`: the offline converter (quantize/ package).

Only argparse here; `quantize` (the offline package) is imported inside `run`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import float_range

FORMATS = ("int8", "fp8", "int4", "nf4", "bf16")
FORMATTER = argparse.RawDescriptionHelpFormatter
DISK_FULL_HINT = "free some space and re-run the same command: finished files are kept and reused"
RESUME_HINT = "re-run the same command to resume: finished files are kept"
COMPONENTS = ("dit", "t5", "vae", "audio", "tokenizer")

DESCRIPTION = """Convert an upstream Wan2.2-S2V-14B checkpoint + the Live Avatar LoRA
(CKPT_DIR/liveavatar.safetensors unless --lora or --no-lora) into a quantized, streamable
liveavatar-lite artifact. Reads one tensor at a time (bounded RAM), merges the LoRA in fp32 before
quantizing, writes every file via temp + rename and manifest.json last. Re-running the same command
after an interruption or a full disk resumes and produces identical bytes.

bytes per weight of a large Linear:  bf16 2.0 | int8 1.0 | fp8 1.0 | int4 g64 0.5625 | int4 g128 0.53 | nf4 0.5625
Kept in bf16 whatever --format says: text/time embeddings, time_projection, the head, the audio
encoder's final linear, and every norm, modulation table, bias, convolution and embedding."""


def _components(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown component(s) {bad}; choose from {','.join(COMPONENTS)}")
    return parts


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", type=Path, metavar="CKPT_DIR", help="upstream checkpoint directory (or a DiT-only one with --components dit)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="artifact directory to create (or resume)")
    parser.add_argument("-q", "--format", choices=FORMATS, required=True, help="format of the DiT's Linear weights")
    parser.add_argument("--lora", type=Path, default=None, metavar="FILE",
                        help="Live Avatar LoRA to merge (default: CKPT_DIR/liveavatar.safetensors, which "
                             "`liveavatar-lite download` puts there; without it the command stops)")
    parser.add_argument("--no-lora", action="store_true",
                        help="convert the base Wan2.2-S2V model without the LoRA (renders poorly with 4 steps "
                             "and no CFG; for experiments only)")
    parser.add_argument("--group-size", type=int, choices=(64, 128), default=128, help="int4 group size along in-features (default 128)")
    parser.add_argument("--keep-bf16", nargs="+", default=[], metavar="GLOB", help="extra tensor-name globs kept in bf16, e.g. 'blocks.0.*'")
    parser.add_argument("--target-size", type=float_range(0.0, 1e4, lo_open=True), default=None, metavar="GB",
                        help="pick per-layer formats so the DiT fits in GB (needs --measurement)")
    parser.add_argument("--measurement", type=Path, default=None, metavar="FILE",
                        help="measurement.json from `liveavatar-lite calibrate`")
    parser.add_argument("--t5", choices=("int8", "bf16"), default="int8", help="format of the umT5 encoder's Linears (default int8)")
    parser.add_argument("--components", type=_components, default=COMPONENTS, metavar="LIST", help=f"comma list of {','.join(COMPONENTS)} (default: all)")
    parser.add_argument("--no-vae-onnx", action="store_true", help="do not export the VAE decoder to ONNX")
    parser.add_argument("--force", action="store_true", help="redo a conversion made with other options, or write into a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from quantize.cli import run as run_quantize

    return run_quantize(args)
