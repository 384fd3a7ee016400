"""`liveavatar-lite` entry point: parses flags, dispatches to one subcommand, maps errors to exit codes.

    liveavatar-lite quantize CKPT_DIR OUT_DIR --format int8

Whatever goes wrong, the user gets ONE line on stderr and a non-zero exit (docs/errors.md):
bad input (`UserError`) 2, a memory budget that cannot fit 3, the system refusing a file operation
(disk full, read-only, permission) 1, an unexpected error (a bug) 70 with the traceback written to a
log file whose path the line names, Ctrl-C 130. `-v` (before or after the subcommand) adds debug
logging and prints tracebacks.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import UserError, first_line

# name -> (module under liveavatar_lite.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "download": ("download_cmd", "fetch the upstream checkpoint and the Live Avatar LoRA from the Hugging Face Hub"),
    "quantize": ("quantize_cmd", "convert an upstream checkpoint into a quantized, streamable artifact"),
    "calibrate": ("calibrate_cmd", "measure each Linear's quantization error on a synthetic calibration set"),
    "inspect": ("inspect_cmd", "summarize an artifact: formats, bytes per unit, source, verification"),
    "plan": ("plan_cmd", "place weights and KV caches within a VRAM/RAM budget and predict speed"),
    "generate": ("generate_cmd", "photo + speech + prompt -> mp4 (streaming, resumable)"),
    "eval": ("eval_cmd", "what a weight format or runtime setting costs in picture: PSNR, SSIM, flicker, lip-sync, drift"),
    "serve": ("serve_cmd", "the kiosk service: HTTP API, durable job queue, one warm worker (docs/serve.md)"),
    "farm": ("farm_cmd", "render a batch of jobs on a Ray cluster, one warm actor per GPU (docs/farm.md)"),
    "vae": ("vae_cmd", "export the VAE decoder to ONNX, or decode saved latents with it"),
    "bench": ("bench_cmd", "run a benchmark (stream, quantize, vae, pipeline, serve, farm, gpu, ...) side by side"),
}

OUR_LOGGERS = ("liveavatar_lite", "quantize", "calibration")
EXIT_OS_ERROR = 1  # the system refused a file operation: disk full, read-only, permission denied
EXIT_BUG = 70  # an unexpected exception (sysexits' EX_SOFTWARE); the traceback is in a log file
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is ONE line ("PROG: error: ... (see PROG --help)"), exit code 2."""

    def error(self, message: str):  # type: ignore[no-untyped-def]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="liveavatar-lite",
        description=(
            "Run Live Avatar (Wan2.2-S2V-14B + the Live Avatar LoRA) on one 24 GB GPU. "
            "Download the weights, quantize the checkpoint once, then generate talking-avatar videos "
            "from a photo, speech and a prompt."
        ),
        epilog="Run `liveavatar-lite SUBCOMMAND --help` for the flags of each subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and print tracebacks")
    # the same flag after the subcommand (`liveavatar-lite generate ... -v`); SUPPRESS keeps the
    # value given before the subcommand when it is not repeated after it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages and print tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"liveavatar_lite.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text),
                           parents=[common], formatter_class=getattr(mod, "FORMATTER", argparse.HelpFormatter))
        mod.register(p)
        p.set_defaults(_run=mod.run, _module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    # Our packages log at INFO (DEBUG with -v); third-party libraries (onnxscript, transformers)
    # only at WARNING, so long jobs print progress bars and our messages, not exporter chatter.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # Python warnings (torchvision's, ...) go through logging as `py.warnings`: shown with -v only.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    prefix = f"liveavatar-lite {args.command}: "
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"{prefix}error: {first_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prefix}interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno == errno.EPIPE:  # `liveavatar-lite inspect ART | head`: the reader left; not an error
            return 0
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{prefix}error: {describe_os_error(e, args)}", file=sys.stderr)
        return EXIT_OS_ERROR
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line + where the traceback is
        if verbose:
            import traceback

            traceback.print_exc()
        log = write_crash_log(args.command, argv)
        where = f"; the traceback is in {log}" if log else ""
        print(f"{prefix}internal error: {type(e).__name__}: {first_line(e)}{where} "
              "(please report it, with that file)", file=sys.stderr)
        return EXIT_BUG


def _resume_hint(args: argparse.Namespace) -> str:
    hint = getattr(getattr(args, "_module", None), "RESUME_HINT", "")
    return f" ({hint})" if hint else ""


def describe_os_error(e: OSError, args: argparse.Namespace) -> str:
    """One line for a refused file operation, naming the file and, for a full disk, how to continue."""
    target = e.filename if e.filename is not None else getattr(e, "filename2", None)
    where = f" {target}" if target else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = getattr(getattr(args, "_module", None), "DISK_FULL_HINT", "free some space and re-run")
        return f"disk full while writing{where}: {hint}"
    if e.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}"
    text = e.strerror or first_line(e)
    return f"{text}:{where}" if where else text


def write_crash_log(command: str, argv: list[str] | None) -> Path | None:
    """Write the current exception's traceback to a log file; its path, or None if nothing is writable.

    Lives in the cache dir's `logs/` ($LIVEAVATAR_LITE_CACHE, else ~/.cache/liveavatar-lite), else the
    system temp dir.
    """
    import os
    import tempfile
    import time
    import traceback

    from .conditioning.caches import default_cache_dir

    text = (f"liveavatar-lite {__version__} {command}\nargv: {sys.argv[:1] + list(argv if argv is not None else sys.argv[1:])}\n"
            f"python {sys.version.split()[0]}\n\n{traceback.format_exc()}")
    name = f"crash-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (default_cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
