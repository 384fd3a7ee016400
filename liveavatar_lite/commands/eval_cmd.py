"""`liveavatar-lite eval`: what a weight format or a runtime setting costs in picture, on your own input."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import float_range, int_range, seed

DESCRIPTION = (
    "Render the same photo + speech + prompt with a reference setting and with each candidate (one "
    "loaded at a time) and report, per clip and overall: latent relative L2, PSNR, SSIM, flicker, a "
    "lip-sync proxy, drift (colour, face similarity), speed and peak memory. A setting is "
    "ARTIFACT_DIR[:key=value,...] with keys kv (bf16|fp8|int8), compile (on|off), attention "
    "(auto|sdpa|flash|cudnn|efficient|math|sage), vram, ram, profile. "
    "Sweeps: --candidates int8,fp8,int4,nf4 compares the artifacts DIR/int8, DIR/fp8, ... (--artifacts "
    "DIR, default: the reference artifact's parent); --kv bf16,fp8,int8 renders each candidate (or the "
    "reference's artifact) once per KV dtype. --out DIR adds report.json, drift.png and, per candidate, "
    "a contact sheet and a side-by-side mp4. docs/eval.md explains the numbers."
)


def register(parser: argparse.ArgumentParser) -> None:
    """Add eval's flags to its subparser (cli.py calls this once)."""
    parser.add_argument("--reference", required=True, metavar="ART[:SETTINGS]",
                        help="what the candidates are compared with, e.g. la-bf16 or la-int8:kv=bf16")
    parser.add_argument("--candidate", action="append", default=[], metavar="ART[:SETTINGS]",
                        help="a setting to compare (repeatable), e.g. la-int8:kv=fp8")
    parser.add_argument("--candidates", default=None, metavar="FORMATS",
                        help="a comma list of weight formats (bf16, int8, fp8, int4, nf4): the artifacts "
                             "DIR/FORMAT under --artifacts DIR")
    parser.add_argument("--artifacts", type=Path, default=None, metavar="DIR",
                        help="where --candidates finds DIR/int8, DIR/fp8, ... (default: the reference "
                             "artifact's parent directory)")
    parser.add_argument("--kv", default=None, metavar="DTYPES",
                        help="a comma list of KV dtypes (bf16, fp8, int8): each candidate once per dtype")
    parser.add_argument("--image", required=True, type=Path, help="reference photo (jpg, png, webp)")
    parser.add_argument("--audio", required=True, type=Path, help="speech (wav, flac, ogg, mp3, m4a/aac, opus)")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--size", default="704*384", help="maximum pixel area W*H, as generate (default: %(default)s)")
    parser.add_argument("--num-clip", type=int_range(1, 10**6), default=None,
                        help="number of clips (45 frames, then 48 each); default: until the audio ends")
    parser.add_argument("--seed", type=seed, default=42, help="noise seed, the same for every render (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write report.json, drift.png and per candidate a contact sheet and a side-by-side mp4")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--vram", type=float_range(0.0, 1e6, lo_open=True), default=None, metavar="GB",
                        help="GPU memory budget for every setting without vram= (default: the GPU's free memory)")
    parser.add_argument("--ram", type=float_range(0.0, 1e6, lo_open=True), default=None, metavar="GB",
                        help="host memory budget for every setting without ram= (default: this machine's RAM)")
    parser.add_argument("--device-profile", metavar="NAME", default=None,
                        help="device profile for every setting without profile= (as generate)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prompt and photo caches (default: $LIVEAVATAR_LITE_CACHE or ~/.cache/liveavatar-lite)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress lines")


def build_job(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The EvalJob the flags describe (UserError, one line, for a bad setting or list)."""
    from ..evaluate.run import EvalJob
    from ..evaluate.settings import (
        KV_CHOICES,
        WEIGHT_FORMATS,
        format_candidates,
        parse_list,
        parse_setting,
        with_kv_sweep,
    )

    reference = parse_setting(args.reference, "--reference")
    candidates = tuple(parse_setting(c, "--candidate") for c in args.candidate)
    if args.candidates is not None:
        formats = parse_list(args.candidates, "--candidates", WEIGHT_FORMATS)
        candidates += format_candidates(formats, args.artifacts or reference.artifact.resolve().parent)
    elif args.artifacts is not None:
        from ..errors import UserError

        raise UserError("--artifacts names where --candidates FORMATS are; give --candidates too")
    if args.kv is not None:
        candidates = with_kv_sweep(candidates, reference, parse_list(args.kv, "--kv", KV_CHOICES))
    return EvalJob(reference=reference, candidates=candidates, image=args.image, audio=args.audio,
                   prompt=args.prompt, size=args.size, num_clip=args.num_clip, seed=args.seed, out=args.out,
                   vram_gb=args.vram, ram_gb=args.ram, device_profile=args.device_profile,
                   cache_dir=args.cache_dir, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """liveavatar-lite eval --reference la-bf16 --candidates int8,int4 --image me.jpg --audio hi.wav --prompt "..." """
    import json

    from ..evaluate.report import format_table, to_json
    from ..evaluate.run import evaluate

    report = evaluate(build_job(args))
    if args.json:
        print(json.dumps(to_json(report), indent=1))
    else:
        print(format_table(report))
    return 0
