#!/usr/bin/env python3
"""One process vs a pipeline of ranks, side by side: steady-state seconds per clip of the same render.

Runs `liveavatar-lite generate` twice on the same inputs, once as one process and once with
`--ranks N` (and `--gpus`, `--vram` as given), reads each run's telemetry and prints the seconds
per clip after the first (the pipeline is full by then) and their ratio, and whether the frames
are identical. With two ranks on ONE GPU, each capped to half the card, the DiT work is the same
as one process, so the difference is what the pipeline costs: the block hand-off and the second
sink prefill.

    python tools/bench_ranks.py --artifact art --image me.jpg --audio hi.wav --num-clip 4 \
        --ranks 2 --gpus 0,0 --vram 11 --single-vram 22
    OMP_NUM_THREADS=1 python tools/bench_ranks.py --artifact /tmp/la-tiny/art ... --size 64*64 --ranks 2  # CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _render(args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    tel = out.with_suffix(".jsonl")
    cmd = [sys.executable, "-m", "liveavatar_lite.cli", "generate", "--artifact", str(args.artifact),
           "--image", str(args.image), "--audio", str(args.audio), "--prompt", args.prompt, "--out", str(out),
           "--size", args.size, "--num-clip", str(args.num_clip), "--seed", "7", "--no-progress",
           "--telemetry", str(tel), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    clips = [json.loads(line) for line in tel.read_text().splitlines()]
    seconds = [c["seconds"] for c in clips if c["event"] == "clip"]
    steady = seconds[1:] or seconds
    return {"wall_s": wall, "clip_s": seconds, "steady_s_per_clip": sum(steady) / len(steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--audio", type=Path, required=True)
    p.add_argument("--prompt", default="a person talking to the camera")
    p.add_argument("--size", default="704*384")
    p.add_argument("--num-clip", type=int, default=4, help="clips per render (the first is not timed)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--split", default="auto", choices=("auto", "steps", "layers"), help="generate --split")
    p.add_argument("--gpus", default=None, help="GPU of each rank, e.g. 0,0 (two ranks on one GPU)")
    p.add_argument("--vram", type=float, default=None, help="GB per rank")
    p.add_argument("--single-vram", type=float, default=None, help="GB for the one-process run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = _render(args, root / "one.mp4", ["--vram", str(args.single_vram)] if args.single_vram else [])
        extra = ["--ranks", str(args.ranks), "--split", args.split] + (["--gpus", args.gpus] if args.gpus else [])
        extra += ["--vram", str(args.vram)] if args.vram else []
        many = _render(args, root / "ranks.mp4", extra)
        same = bool((_frames(root / "one.mp4") == _frames(root / "ranks.mp4")).all())
    print(f"one process : {one['steady_s_per_clip']:.3f} s per clip after the first (clips {one['clip_s']}), "
          f"{one['wall_s']:.1f} s wall")
    print(f"{args.ranks} ranks     : {many['steady_s_per_clip']:.3f} s per clip after the first "
          f"(clips {many['clip_s']}), {many['wall_s']:.1f} s wall")
    print(f"ratio       : {many['steady_s_per_clip'] / one['steady_s_per_clip']:.3f} (ranks / one process); "
          f"frames identical: {same}")


def _frames(path: Path):
    """Every decoded frame of `path`, uint8 [T, H, W, 3]."""
    import av
    import numpy as np

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


if __name__ == "__main__":
    main()
