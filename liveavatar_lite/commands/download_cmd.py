"""`liveavatar-lite download DIR`: the upstream checkpoint + the Live Avatar LoRA, only the files we use."""
from __future__ import annotations

import argparse
from pathlib import Path

from .flags import int_range

DESCRIPTION = (
    "Download Wan-AI/Wan2.2-S2V-14B (DiT shards, umT5 encoder and tokenizer, Wan2.1 VAE, wav2vec2) and "
    "Quark-Vision/Live-Avatar (liveavatar.safetensors) from the Hugging Face Hub into DIR: only the files "
    "liveavatar-lite reads (about 50 GB). Interrupted? Run the same command again: finished files are "
    "kept and partial ones continue. Then: liveavatar-lite quantize DIR ART --format int8. Gated or "
    "private repositories use your `hf auth login` token or $HF_TOKEN; HF_HUB_OFFLINE=1 checks DIR only."
)
DISK_FULL_HINT = "free some space and re-run the same command: the download continues where it stopped"
RESUME_HINT = "re-run the same command to continue the download"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", type=Path, metavar="DIR", help="folder to download into (created if needed)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of Wan-AI/Wan2.2-S2V-14B (default main)")
    parser.add_argument("--lora-revision", default=None,
                        help="branch, tag or commit of Quark-Vision/Live-Avatar (default main)")
    parser.add_argument("--no-lora", action="store_true", help="skip the Live Avatar LoRA (not recommended)")
    parser.add_argument("--max-workers", type=int_range(1, 64), default=8, help="parallel file downloads (default 8)")


def run(args: argparse.Namespace) -> int:
    import logging
    import stat

    from ..artifact.download import download
    from ..errors import UserError
    from ..fileio import file_kind

    dest: Path = args.dest
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is {file_kind(dest.stat().st_mode)}, not a folder to download into")
    parent = dest.parent if not dest.exists() else dest
    while not parent.exists():
        parent = parent.parent
    if not stat.S_ISDIR(parent.stat().st_mode):
        raise UserError(f"{dest}: {parent} is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    missing = download(dest, args.revision, args.lora_revision, lora=not args.no_lora, max_workers=args.max_workers)
    if missing:
        raise UserError(f"{dest} is incomplete, it lacks {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                        + "; re-run with network access to finish the download")
    logging.getLogger(__name__).info("%s is complete: run `liveavatar-lite quantize %s ART --format int8`", dest, dest)
    return 0
