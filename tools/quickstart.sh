#!/usr/bin/env bash
# The README quick start: tiny random checkpoint -> quantize -> plan -> generate 3 clips (CPU, ~1 min).
# Usage: bash tools/quickstart.sh [WORKDIR]   (default /tmp/la-tiny; uses .venv from tools/setup.sh)
# WORKDIR must be new, empty, or one this script made before (it holds .la-quickstart): only then is
# it emptied; any other directory is refused, never deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/la-tiny}
BIN=.venv/bin
[ -x "$BIN/liveavatar-lite" ] || BIN=$(dirname "$(command -v liveavatar-lite)")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -e "$W" ] && { [ ! -d "$W" ] || [ -L "$W" ]; }; then
    echo "quickstart: $W exists and is not a directory; pass a new directory" >&2; exit 2
fi
if [ -d "$W" ] && [ -n "$(ls -A "$W")" ] && [ ! -f "$W/.la-quickstart" ]; then
    echo "quickstart: $W is not empty and was not made by this script; pass a new or empty directory" >&2; exit 2
fi
if [ -f "$W/.la-quickstart" ]; then  # our own earlier run: only the names this script writes go
    rm -rf -- "$W/ckpt" "$W/art" "$W/speech.wav" "$W/photo.jpg" "$W/out.mp4" "$W/telemetry.jsonl" "$W/.out.mp4.work"
fi
mkdir -p "$W" && touch "$W/.la-quickstart"
"$BIN/python" tools/make_checkpoint.py --preset tiny --out "$W/ckpt"
"$BIN/liveavatar-lite" quantize "$W/ckpt" "$W/art" --format int8 --no-progress  # merges $W/ckpt/liveavatar.safetensors
"$BIN/liveavatar-lite" inspect "$W/art"
"$BIN/liveavatar-lite" plan "$W/art" --vram 24 --size 64*64
"$BIN/python" - "$W" <<'PY'
# 4.7 s of voiced "speech" and a photo
import sys
import numpy as np, soundfile as sf
from PIL import Image
w = sys.argv[1]
t = np.arange(int(4.7 * 16000)) / 16000
voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8)) * np.clip(np.sin(2 * np.pi * 2.1 * t), 0, None)
sf.write(f"{w}/speech.wav", (0.2 * voice).astype(np.float32), 16000)
y, x = np.mgrid[0:384, 0:512]
Image.fromarray(np.stack([x // 2, y // 2, (x + y) // 4], -1).astype(np.uint8)).save(f"{w}/photo.jpg")
PY
"$BIN/liveavatar-lite" generate --artifact "$W/art" --image "$W/photo.jpg" --audio "$W/speech.wav" \
    --prompt "a person talking to the camera" --out "$W/out.mp4" --size 64*64 --telemetry "$W/telemetry.jsonl"
echo "wrote $W/out.mp4"
