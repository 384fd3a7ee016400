"""Benchmark the streaming VAE decode: ONNX Runtime graph vs torch eager, same device, same latents.

    python tools/bench_vae.py --device cpu --height 96 --width 160 --latents 7 --chunk 3 --threads 2
    python tools/bench_vae.py --device cuda --height 384 --width 704 --dtype fp16      # on a GPU box

Random real-size weights (seeded, `vae_fixtures.random_vae_state`), exported once to a temp .onnx
(or --onnx to reuse one). Both backends decode the same latents chunk by chunk (first call 1 latent,
then --chunk latents per call, like Live Avatar's streaming decode); the first call and one warm-up
pass are not timed; passes alternate between the backends. Prints per-backend steady-state
ms/chunk and frames/s, the ORT/torch speed ratio, and the max uint8 difference between the outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_fixtures import random_latents, random_vae  # noqa: E402

from liveavatar_lite.config import PRESETS  # noqa: E402
from liveavatar_lite.decode.vae_export import DTYPES, export_decoder, frames_to_uint8  # noqa: E402
from liveavatar_lite.decode.vae_onnx import OnnxVAEDecoder  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    spans = [(0, 1)]
    spans += [(s, min(s + chunk, total)) for s in range(1, total, chunk)]
    return spans


def torch_pass(vae, z: torch.Tensor, spans, device: str) -> tuple[list[float], np.ndarray]:
    """One streaming pass: seconds of every chunk after the first, and the uint8 frames."""
    times: list[float] = []
    caches, parts = None, []
    for i, (a, b) in enumerate(spans):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            frames, caches = vae.decode_step(z[:, :, a:b], i == 0, caches)
            u8 = frames_to_uint8(frames).cpu()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        parts.append(u8.numpy())
    return times, np.concatenate(parts)


def ort_pass(decoder: OnnxVAEDecoder, z_np: np.ndarray, spans) -> tuple[list[float], np.ndarray]:
    """Same as torch_pass for the ONNX decoder (decode() returns host uint8: synchronous)."""
    times: list[float] = []
    decoder.reset()
    parts = []
    for i, (a, b) in enumerate(spans):
        t0 = time.perf_counter()
        parts.append(decoder.decode(z_np[:, a:b]))
        if i:
            times.append(time.perf_counter() - t0)
    return times, np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", choices=tuple(PRESETS), default="14b")
    p.add_argument("--height", type=int, default=96, help="pixel height (multiple of 8)")
    p.add_argument("--width", type=int, default=160, help="pixel width (multiple of 8)")
    p.add_argument("--latents", type=int, default=7, help="latent frames decoded per pass")
    p.add_argument("--chunk", type=int, default=3, help="latents per call after the first")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both backends")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after one warm-up pass (median reported)")
    p.add_argument("--onnx", type=Path, default=None, help="reuse an exported graph (must match preset/dtype)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_vae: error: --device cuda but no CUDA device", file=sys.stderr)
        return 2

    cfg = PRESETS[args.preset].vae
    vae = random_vae(cfg, seed=0)
    h, w = args.height // 8, args.width // 8
    z = random_latents((1, cfg.z_dim, args.latents, h, w), seed=1)
    spans = _chunks(args.latents, args.chunk)

    export_s = None
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx
        if path is None:
            t0 = time.perf_counter()
            path = export_decoder(vae, Path(tmp) / "vae_decoder.onnx", dtype=args.dtype)
            export_s = time.perf_counter() - t0
        decoder = OnnxVAEDecoder(path, device=args.device, threads=args.threads)
        vae = vae.to(args.device, dtype)
        z_dev, z_np = z.to(args.device, dtype), z[0].numpy()
        # Passes alternate between the backends so that load from other processes hits both alike;
        # pass 0 of each is a warm-up.
        ort_times: list[float] = []
        torch_times: list[float] = []
        for rep in range(args.repeats + 1):
            t_ort, ort_frames = ort_pass(decoder, z_np, spans)
            t_torch, torch_frames = torch_pass(vae, z_dev, spans, args.device)
            if rep:
                ort_times += t_ort
                torch_times += t_torch
        del decoder

    frames_per_chunk = 4 * args.chunk
    ort_ms, torch_ms = 1e3 * statistics.median(ort_times), 1e3 * statistics.median(torch_times)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": args.threads,
        "preset": args.preset,
        "dtype": args.dtype,
        "pixels": [args.height, args.width],
        "latents": args.latents,
        "chunk": args.chunk,
        "export_s": export_s,
        "ort_ms_per_chunk": ort_ms,
        "torch_ms_per_chunk": torch_ms,
        "ort_fps": frames_per_chunk / ort_ms * 1e3,
        "torch_fps": frames_per_chunk / torch_ms * 1e3,
        "speedup_ort_over_torch": torch_ms / ort_ms,
        "max_uint8_diff": int(np.abs(ort_frames.astype(np.int16) - torch_frames.astype(np.int16)).max()),
        "frames": list(ort_frames.shape),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(f"VAE streaming decode, {args.preset} {args.dtype}, {args.height}x{args.width}, {args.device} "
          f"({result['device_name']}, {args.threads} threads), "
          f"chunks of {args.chunk} latents ({frames_per_chunk} frames)")
    print(f"  {'backend':<12}{'ms/chunk':>10}{'frames/s':>10}")
    print(f"  {'torch eager':<12}{torch_ms:>10.1f}{result['torch_fps']:>10.2f}")
    print(f"  {'onnxruntime':<12}{ort_ms:>10.1f}{result['ort_fps']:>10.2f}")
    print(f"  ORT/torch speed ratio: {result['speedup_ort_over_torch']:.2f}x;  "
          f"max |uint8 diff|: {result['max_uint8_diff']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
