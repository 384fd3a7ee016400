#!/usr/bin/env python3
"""What fp8 / int8 KV storage costs in accuracy: DiT flow error vs bf16 KV on the tiny model.

    python tools/bench_kv_accuracy.py [--blocks 5] [--format int8]

Writes the tiny checkpoint, quantizes its DiT, and runs the same sink prefill + N blocks x 4 steps
(rings wrap after 4 blocks) with the KV caches stored in bf16, fp8 and int8 (the leanest plan: every
cache on the "host", so every KV read goes through the quantized store). Prints the relative L2
error of every step's flow prediction against the bf16-KV run, side by side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from liveavatar_lite.artifact.format import read_manifest
from liveavatar_lite.config import PRESETS, DiTConfig
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.dit_runtime import DiTRuntime
from liveavatar_lite.runtime.plan import Budget, make_plan, min_vram_bytes
from liveavatar_lite.runtime.plan_inputs import manifest_unit_sizes, plan_input

TIMESTEPS = (1000.0, 857.69, 602.15, 8.93)


def synthetic_inputs(cfg: DiTConfig, size: tuple[int, int], blocks: int, seed: int = 0) -> dict:
    """Seeded DiT inputs for `blocks` blocks at pixel size (W, H): latents are (H/8, W/8)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size[1] // 8, size[0] // 8
    return dict(
        ref=torch.randn(16, 1, h, w, generator=g),
        motion=torch.randn(16, 19, h, w, generator=g),
        text=torch.randn(7, cfg.text_dim, generator=g),
        audio=[torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(blocks)],
        latents=[torch.randn(16, 3, h, w, generator=g) for _ in range(blocks)],
    )


def run_blocks(rt: DiTRuntime, inp: dict, blocks: int) -> list[torch.Tensor]:
    """Sink prefill, then `blocks` blocks x 4 steps; returns every step's flow prediction."""
    text = rt.embed_text(inp["text"])
    rt.prefill_sink(inp["ref"], inp["motion"], text)
    outs = []
    for b in range(blocks):
        x = inp["latents"][b]
        for step, t in enumerate(TIMESTEPS):
            v = rt.denoise(step, x, t, 3 * b, inp["audio"][b], text, sink_offset=7)
            outs.append(v.clone())
            x = (x.float() - 0.2 * v.float().to(x.device)).to(x.dtype)  # a stand-in Euler update (v may be on the GPU)
    return outs


def leanest_plan(art: Path, cfg: DiTConfig, size: tuple[int, int], kv: str):  # type: ignore[no-untyped-def]
    """The plan with the least VRAM: every unit streamed and every KV cache on the host."""
    inp = plan_input(cfg, size, "int8", unit_sizes=manifest_unit_sizes(read_manifest(art)))
    budget = Budget(vram_bytes=1, ram_bytes=None, kv_dtype=kv, cuda_context_bytes=0, vae_arena_bytes=0, host_baseline_bytes=0)
    lo = min_vram_bytes(inp, budget)
    return make_plan(inp, Budget(vram_bytes=lo * 1.001, ram_bytes=None, kv_dtype=kv, cuda_context_bytes=0,
                                 vae_arena_bytes=0, host_baseline_bytes=0), get_profile("rtx4090"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=5, help="blocks of 3 latent frames (default 5: the rings wrap)")
    ap.add_argument("--format", default="int8", choices=["bf16", "int8", "fp8", "int4", "nf4"], help="weight format")
    args = ap.parse_args(argv)

    from make_checkpoint import write_checkpoint

    from liveavatar_lite.artifact.qtypes import QuantType
    from quantize.convert import ConvertOptions, convert

    cfg, size = PRESETS["tiny"].dit, (64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        ck = write_checkpoint("tiny", Path(tmp) / "ck", dit_only=True)
        art = Path(tmp) / "art"
        convert(ConvertOptions(ck, art, QuantType(args.format), components=("dit",), progress=False))
        inp = synthetic_inputs(cfg, size, args.blocks)
        flows = {kv: run_blocks(DiTRuntime.from_artifact(art, leanest_plan(art, cfg, size, kv), device="cpu"), inp, args.blocks)
                 for kv in ("bf16", "fp8", "int8")}
    print(f"tiny model, {args.format} weights, {args.blocks} blocks x 4 steps, relative L2 error of the flow vs bf16 KV")
    print("| KV | mean | max, first block | max, last block |\n|---|---|---|---|")
    for kv in ("fp8", "int8"):
        rel = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(flows[kv], flows["bf16"])]
        print(f"| {kv} | {100 * sum(rel) / len(rel):.2f} % | {100 * max(rel[:4]):.2f} % | {100 * max(rel[-4:]):.2f} % |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
