"""Benchmark the stay-loaded Pipeline on the tiny model (CPU): time to first frame and memory growth.

    python tools/bench_pipeline.py                 # builds a tiny checkpoint + int8 artifact in a temp dir
    python tools/bench_pipeline.py --renders 20 --artifact /tmp/la-tiny/art

Side by side in one run, same inputs (one clip of the tiny model at 64*64, OMP_NUM_THREADS=1 for
every render): time to first frame of a cold `liveavatar-lite generate` (process start -> the first
decoded frame, from its telemetry), of the first render on a freshly loaded Pipeline (call -> first
frame, plus the load before it) and of the second render on it; then RSS after render 1 and after
render N on the same Pipeline (growth must stay under 1 %).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same thread count as the cold CLI renders
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SIZE = "64*64"
PROMPT = "a person talking to the camera"


def _prepare(work: Path, artifact: Path | None) -> tuple[Path, Path]:
    from make_checkpoint import write_checkpoint
    from media_fixtures import write_photo, write_speech

    from liveavatar_lite.cli import main as cli_main

    media = work / "media"
    media.mkdir(parents=True, exist_ok=True)
    write_photo(media / "photo.png")
    write_speech(media / "speech.wav", 4.7)
    if artifact is None:
        ckpt = write_checkpoint("tiny", work / "ckpt", seed=0)
        artifact = work / "art"
        rc = cli_main(["quantize", str(ckpt), str(artifact), "-q", "int8", "--lora",
                       str(ckpt / "liveavatar.safetensors"), "--no-progress"])
        if rc:
            raise SystemExit("quantize failed")
    return artifact, media


def _cold_ttff(artifact: Path, media: Path, work: Path, n: int) -> list[float]:
    """Process start -> first decoded frame of `generate` (a fresh process each time)."""
    out = []
    for i in range(n):
        tel = work / f"cold{i}.jsonl"
        args = [sys.executable, "-m", "liveavatar_lite.cli", "generate", "--artifact", str(artifact),
                "--image", str(media / "photo.png"), "--audio", str(media / "speech.wav"), "--prompt", PROMPT,
                "--out", str(work / f"cold{i}.mp4"), "--size", SIZE, "--num-clip", "1", "--no-progress",
                "--cache-dir", str(work / "cache"), "--telemetry", str(tel)]
        t0 = time.time()
        subprocess.run(args, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        first = next(json.loads(line) for line in tel.read_text().splitlines() if '"first_frame"' in line)
        out.append(first["time"] - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, default=None, help="a tiny artifact (default: build one)")
    ap.add_argument("--renders", type=int, default=20, help="renders on one Pipeline for the RSS figure")
    ap.add_argument("--cold", type=int, default=3, help="cold generate runs (median reported)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from liveavatar_lite import Pipeline
    from liveavatar_lite.pipeline.telemetry import host_rss_bytes

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        artifact, media = _prepare(work, args.artifact)
        cold = _cold_ttff(artifact, media, work, args.cold)  # also warms the prompt/photo caches

        t0 = time.perf_counter()
        pipe = Pipeline.from_artifact(artifact, cache_dir=work / "cache", size=SIZE, progress=False)
        load_s = time.perf_counter() - t0
        kw = dict(image=media / "photo.png", audio=media / "speech.wav", prompt=PROMPT, size=SIZE, num_clip=1)
        ttff, rss = [], []
        for i in range(args.renders):
            result = pipe.render(out=work / f"warm{i % 2}.mp4", seed=i, **kw)
            ttff.append(result.first_frame_seconds)
            gc.collect()
            rss.append(host_rss_bytes()[0])
        loads = pipe.loads

    cold_med = statistics.median(cold)
    print(f"tiny model, {SIZE}, 1 clip per render, CPU ({os.cpu_count()} cores, OMP_NUM_THREADS=1)")
    print(f"{'':44s}{'seconds':>10s}{'vs cold':>10s}")
    print(f"{'cold generate: process start -> 1st frame':44s}{cold_med:10.2f}{1.0:10.2f}   (median of {len(cold)})")
    print(f"{'Pipeline load (once)':44s}{load_s:10.2f}")
    print(f"{'render 1 on the Pipeline: call -> 1st frame':44s}{ttff[0]:10.2f}{ttff[0] / cold_med:10.2f}")
    print(f"{'render 2 on the Pipeline: call -> 1st frame':44s}{ttff[1]:10.2f}{ttff[1] / cold_med:10.2f}")
    growth = (rss[-1] - rss[0]) / rss[0] * 100
    print(f"RSS after render 1: {rss[0] / 1e6:.1f} MB; after render {len(rss)}: {rss[-1] / 1e6:.1f} MB "
          f"({growth:+.2f} %); model loads over {len(rss)} renders: {loads}")


if __name__ == "__main__":
    main()
