"""`liveavatar-lite bench NAME [ARGS...]`: run one of the benchmark scripts in tools/.

    liveavatar-lite bench stream --preset 14b --vram 16 --kv fp8
    liveavatar-lite bench stream --help
"""
from __future__ import annotations

import argparse
from pathlib import Path

BENCHES = {
    "stream": "bench_stream.py",  # streamed vs resident step time, copy-wait fraction, H2D GB/s
    "quantize": "bench_quantize.py",  # converter throughput and RSS vs optimum-quanto
    "vae": "bench_vae.py",  # ONNX Runtime vs torch VAE decode
    "pipeline": "bench_pipeline.py",  # time to first frame: cold generate vs a warm Pipeline; RSS over renders
    "checksum": "bench_checksum.py",  # xxh3 vs sha256/blake2b/blake3, and what verifying adds to a unit read
    "serve": "bench_serve.py",  # 100 jobs through the service: failures, latency, TTFF, RSS drift of server + worker
    "serve-soak": "bench_serve_soak.py",  # a compressed week: many faces, a full disk, stalls; 0 lost, state dir, RSS
    "farm": "bench_farm.py",  # farm run throughput: jobs per minute with 1 vs 2 Ray actors
    "speed": "bench_speed.py",  # per block-step, eager vs fused units: seconds, launches, attention, elementwise bytes
    "gpu": "gpu_proof.py",  # on a GPU: the 14B DiT under 24/16/12 GB caps (NVML), GEMMs, streamed vs resident
    "qlinear": "bench_qlinear.py",  # W8A8 linear eager vs fused: kernels, bytes, ms (CUDA: W8A16, fp8 too)
}

DESCRIPTION = (
    "Run a benchmark from the source checkout's tools/ directory and print its side-by-side table. "
    "stream: streamed vs resident DiT step time, copy-wait fraction and H2D GB/s (median of --samples "
    "interleaved runs after --warmup). quantize: converter throughput and peak RSS vs optimum-quanto. "
    "vae: ONNX Runtime vs torch streaming VAE decode (median of --repeats after a warm-up pass). "
    "pipeline: time to first frame of a cold generate vs a warm Pipeline, RSS over many renders. "
    "checksum: hash throughput of the artifact's load-time check vs sha256, and its cost per unit read. "
    "serve: a soak of many jobs through the HTTP service (latency, time to first frame, RSS drift). "
    "serve-soak: a compressed week of the service (many faces, a full disk, stalled workers): jobs lost, "
    "the state dir against --max-state-gb, RSS drift. "
    "farm: jobs per minute of `farm run` with 1 vs 2 Ray actors. "
    "speed: per DiT block-step, eager vs fused units (torch.compile) side by side: seconds, kernel launches, "
    "attention backend, elementwise bytes, and inductor's figures per fused graph. "
    "gpu (CUDA): the 14B DiT's runtime at 704*384 placed for 24/16/12 GB, torch capped at each budget and "
    "the whole device sampled with NVML, next to the plan; GEMM kernels; streamed vs resident. "
    "qlinear: the W8A8 linear eager vs fused (torch.compile): kernels, bytes, ms, error; on CUDA also W8A16 and "
    "fp8 _scaled_mm at the 14B shapes. "
    "Arguments after NAME go to the script: `liveavatar-lite bench NAME --help` lists them."
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES), metavar="NAME",
                        help="which benchmark: " + ", ".join(sorted(BENCHES)))
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="arguments for the benchmark script, e.g. `stream --preset tiny --samples 5`")


def run(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    from ..errors import UserError

    script = Path(__file__).resolve().parents[2] / "tools" / BENCHES[args.name]
    if not script.is_file():
        raise UserError(f"{script} not found: benchmarks run from a source checkout of liveavatar-lite")
    return subprocess.call([sys.executable, str(script), *args.args])
