"""Running renders the way a user does: the `liveavatar-lite` CLI in a subprocess, one thread.

The renders run with OMP_NUM_THREADS=1, so every render of the same inputs (CLI, Pipeline child,
resumed run) sees identical thread counts and so bit-identical math.

    proc = subprocess.run(cli_command(*generate_args(art, media, out)), env=render_env())
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

SIZE = "64*64"  # a custom size the tiny model accepts (upstream keys stay the user-facing default)
PROMPT = "a person talking to the camera"


def render_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "liveavatar_lite.cli", *args]


def generate_args(art: Path, media: Path, out: Path, *extra: str, seed: int = 7) -> list[str]:
    """`generate` flags for the tiny artifact and the `media` fixture (3 clips unless --num-clip)."""
    return ["generate", "--artifact", str(art), "--image", str(media / "photo.png"),
            "--audio", str(media / "speech.wav"), "--prompt", PROMPT,
            "--out", str(out), "--size", SIZE, "--seed", str(seed), "--cache-dir", str(media / "cache"),
            "--checkpoint-interval", "0", "--no-progress", *extra]
