"""`liveavatar-lite generate`: photo + speech + prompt -> mp4 (streaming, resumable)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import ATTENTION_CHOICES, COMPILE_CHOICES, PROFILE_NAMES, float_range, int_range, non_negative_float, seed

DESCRIPTION = (
    "Render a talking-avatar video from a photo, a speech recording and a prompt. Frames are "
    "decoded and written block by block; finished clips survive a crash (rerun with --resume). "
    "The output file appears only when the video is complete; --live DIR lets you watch it while "
    "it renders (an HLS playlist, DIR/index.m3u8, growing by one segment per clip)."
)
DISK_FULL_HINT = "free some space and re-run the same command with --resume: finished clips are kept"
RESUME_HINT = "re-run the same command with --resume to continue from the newest checkpoint"


def add_memory_flags(parser: argparse.ArgumentParser) -> None:
    """--vram, --ram, --kv: the memory budget a Pipeline is planned for (generate and serve)."""
    parser.add_argument("--vram", type=float_range(0.0, 1e6, lo_open=True), default=None, metavar="GB",
                        help="GPU memory budget in GB (default: what the GPU has free)")
    parser.add_argument("--ram", type=float_range(0.0, 1e6, lo_open=True), default=None, metavar="GB",
                        help="host memory budget in GB (default: this machine's RAM less max(4 GB, 15 %%), left to the OS)")
    parser.add_argument("--kv", default="bf16", choices=("bf16", "fp8", "int8"),
                        help="KV cache storage dtype; fp8/int8 halve the largest memory user (default: %(default)s)")


def register(parser: argparse.ArgumentParser) -> None:
    """Add generate's flags to its subparser (cli.py calls this once)."""
    parser.add_argument("--artifact", required=True, type=Path,
                        help="artifact directory from `liveavatar-lite quantize`")
    parser.add_argument("--image", required=True, type=Path, help="reference photo (jpg, png, webp)")
    parser.add_argument("--audio", required=True, type=Path, help="speech (wav, flac, ogg, mp3, m4a/aac, opus; any rate, mono or stereo)")
    parser.add_argument("--prompt", required=True, help="text prompt (its umT5 embedding is cached on disk)")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output .mp4 (h264 25 fps + aac)")
    parser.add_argument("--size", default="704*384",
                        help="maximum pixel area as W*H (upstream keys such as 704*384, 720*400, 688*368, "
                             "384*256, or a custom one); the photo's aspect is kept, sides snap to 64 "
                             "(default: %(default)s)")
    parser.add_argument("--num-clip", type=int_range(1, 10**6), default=None,
                        help="number of clips (45 frames, then 48 each); default: until the audio ends")
    parser.add_argument("--seed", type=seed, default=42, help="noise seed, 0 to 2^63-1 (default: %(default)s)")
    add_memory_flags(parser)
    parser.add_argument("--device-profile", metavar="NAME", default=None,
                        help=f"bandwidth/throughput figures the memory plan uses: {', '.join(PROFILE_NAMES)} "
                             "(default: this GPU's profile if known, else a short probe; as `plan`). "
                             "Without a GPU, --vram GB plans as for a GPU of that size and runs that layout on the CPU")
    parser.add_argument("--compile", nargs="?", const="on", default="auto", choices=COMPILE_CHOICES,
                        help="run each DiT unit as one fused torch.compile graph: auto = on for CUDA, off on a CPU; "
                             "--compile alone = on; off = eager. The first clip pays the compilation, no later "
                             "clip recompiles (default: %(default)s)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="attention kernel: auto (per GPU: cuDNN on sm_90, flash on sm_8x and sm_100+; torch's CPU "
                             "kernel), sdpa (torch picks per call), one SDPA backend, or sage (8-bit, CUDA, the "
                             "[attention] extra); recorded in --telemetry (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (without it, an existing file is refused before any work)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted render of the same inputs from its newest checkpoint")
    parser.add_argument("--checkpoint-interval", type=non_negative_float, default=600.0, metavar="SECONDS",
                        help="seconds between resume checkpoints; each holds every KV cache (tens of GB at 14B), "
                             "a resume re-renders the clips after the newest one; 0 = after every clip "
                             "(default: %(default)s)")
    parser.add_argument("--live", type=Path, default=None, metavar="DIR",
                        help="also write an HLS playlist DIR/index.m3u8 (one MPEG-TS segment per finished clip, "
                             "video + audio) that a browser or `ffplay DIR/index.m3u8` plays while rendering")
    parser.add_argument("--telemetry", type=Path, default=None, metavar="FILE",
                        help="write per-clip JSON lines (seconds, frames, peak VRAM, host RSS, copy-wait for "
                             "weights and KV, the memory ledger: the plan's figures next to the measured ones) and "
                             "a summary; with -v the ledger is also printed after each clip")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where prompt embeddings are cached "
                             "(default: $LIVEAVATAR_LITE_CACHE or ~/.cache/liveavatar-lite)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--ranks", type=int_range(1, 64), default=1, metavar="N",
                        help="split the 4 denoising steps over N processes, one GPU each (2: two steps each, "
                             "4: one each, 5: one each + a decoding rank); blocks flow rank to rank; CPU "
                             "processes where there is no GPU; also under torchrun (docs/multi-gpu.md)")
    parser.add_argument("--split", choices=("auto", "steps", "layers"), default="auto",
                        help="how --ranks divides the DiT: steps (each rank whole denoising steps, all layers), "
                             "layers (each rank a range of the layers for every step; only the hidden state "
                             "crosses) or auto: the planner's faster one on GPUs, steps on CPU processes "
                             "(default: %(default)s; docs/multi-gpu.md)")
    parser.add_argument("--gpus", type=_gpu_list, default=None, metavar="LIST",
                        help="GPU of each rank, e.g. 0,1,2,3 (default: rank i on GPU i); a GPU may repeat "
                             "(then give each rank its share with --vram)")


def _gpu_list(text: str) -> tuple[int, ...]:
    """argparse type: '0,1,2,3' -> (0, 1, 2, 3)."""
    try:
        gpus = tuple(int(x) for x in text.split(","))
    except ValueError:
        gpus = ()
    if not gpus or any(g < 0 for g in gpus):
        raise argparse.ArgumentTypeError(f"must be GPU numbers separated by commas, e.g. 0,1,2,3; got {text}")
    return gpus


def run(args: argparse.Namespace) -> int:
    """Build the pipeline options and the render request from the flags, then render once.

    liveavatar-lite generate --artifact art --image me.jpg --audio hi.wav --prompt "..." -o out.mp4
    """
    import logging

    from ..pipeline.pipeline import generate
    from ..pipeline.request import PipelineOptions, RenderRequest

    options = PipelineOptions(artifact=args.artifact, vram_gb=args.vram, ram_gb=args.ram, kv_dtype=args.kv,
                              device_profile=args.device_profile, compile_units=args.compile, attention=args.attention,
                              cache_dir=args.cache_dir, progress=not args.no_progress)
    request = RenderRequest(
        image=args.image,
        audio=args.audio,
        prompt=args.prompt,
        out=args.out,
        size=args.size,
        num_clip=args.num_clip,
        seed=args.seed,
        resume=args.resume,
        telemetry=args.telemetry,
        live=args.live,
        checkpoint_interval_s=args.checkpoint_interval,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if args.ranks > 1:
        from ..pipeline.multirank import generate_multirank

        result = generate_multirank(options, request, args.ranks, args.gpus, args.split)
        if result is None:  # a torchrun rank that does not write the video
            return 0
    elif args.gpus is not None:
        from ..errors import UserError

        raise UserError("--gpus places the ranks of --ranks N (N >= 2); for one process pick the GPU with "
                        "CUDA_VISIBLE_DEVICES")
    elif args.split != "auto":
        from ..errors import UserError

        raise UserError(f"--split {args.split} divides the work of --ranks N (N >= 2) processes")
    else:
        result = generate(request, options)
    log = logging.getLogger("liveavatar_lite.pipeline.generate")
    log.info("wrote %s: %d clips, %d frames at %dx%d in %.1f s%s", result.out, result.clips, result.frames,
             result.width, result.height, result.seconds,
             f" (resumed after {result.resumed_clips} clips)" if result.resumed_clips else "")
    if result.first_frame_seconds is not None and result.realtime_factor is not None:
        log.info("first frame after %.1f s; real-time factor %.3f (seconds of video per second of wall time)",
                 result.first_frame_seconds, result.realtime_factor)
    if result.live_playlist is not None:
        log.info("live playlist: %s", result.live_playlist)
    return 0
