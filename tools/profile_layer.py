#!/usr/bin/env python3
"""Where one DiT layer's time goes on a GPU: GEMM vs elementwise vs attention vs copy wait.

Runs the real runtime (`DiTRuntime`, as `generate` does) on 14B-shaped random units for a few
layers at 704*384 under `torch.profiler`, all but the first streamed, KV on the host, and sorts every CUDA
kernel's time into GEMM, attention, copies and the rest (elementwise: casts, modulation, RoPE,
(de)quantization, epilogues). The plan's prediction for the same layer is printed beside it: its
elementwise bytes (counted on the meta device, `runtime/traffic.py`) and the implied bandwidth.

    python tools/profile_layer.py --layers 4 --kv fp8 --device-profile rtx4090      # needs a GPU
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from liveavatar_lite.config import PRESETS
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.dit_runtime import DiTRuntime
from liveavatar_lite.runtime.plan import GB, Budget, make_plan
from liveavatar_lite.runtime.plan_inputs import plan_input
from liveavatar_lite.runtime.traffic import unit_elementwise_bytes

GEMM = ("gemm", "cutlass", "xmma", "s8", "i8", "e4m3", "matmul", "sm80", "sm89", "sm90")
ATTENTION = ("flash", "fmha", "attention", "efficient")


def classify(name: str) -> str:
    n = name.lower()
    if "memcpy" in n:
        return "copy"
    if any(k in n for k in ATTENTION):
        return "attention"
    if any(k in n for k in GEMM):
        return "gemm"
    return "elementwise"


def main(argv: list[str] | None = None) -> int:
    from bench_stream import run_steps, synthetic_units
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--format", default="int8", choices=("int8", "fp8", "int4", "bf16"))
    ap.add_argument("--kv", default="fp8", choices=("bf16", "fp8", "int8"))
    ap.add_argument("--device-profile", default="rtx4090")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_layer needs a CUDA device", file=sys.stderr)
        return 2
    full = PRESETS["14b"].dit
    cfg = replace(full, num_layers=args.layers, audio_inject_layers=tuple(i for i in full.audio_inject_layers
                                                                          if i < args.layers))
    size = (704, 384)
    units = synthetic_units(cfg, args.format, pin=True)
    inp = plan_input(cfg, size, args.format, unit_sizes={u.name: u.nbytes for u in units})
    plan = make_plan(inp, Budget(vram_bytes=1e15, kv_dtype=args.kv, vae_arena_bytes=0), get_profile(args.device_profile))
    # every KV cache on the host and every layer but the first streamed (3+ streamed units are copied
    # every pass): the copies and their waits are part of what is profiled
    plan = replace(plan, kv=tuple(replace(k, placement="host") for k in plan.kv),
                   units=tuple(replace(u, placement="host") if u.layer else u for u in plan.units))
    rt = DiTRuntime(cfg, units, plan, device="cuda", timing=True)
    run_steps(rt, cfg, size, blocks=1, device="cuda")  # warm-up: kernels, caches, the time-embedding cache
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps(rt, cfg, size, blocks=1, device="cuda")
    buckets: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        buckets[classify(e.key)] = buckets.get(classify(e.key), 0.0) + us / 1e3
    calls = 4 * args.layers  # 4 denoising steps x layers
    wait = rt.copy_counters()
    plain, _ = unit_elementwise_bytes(full, size, args.format, args.kv)
    print(f"14B layer at 704*384, {args.format} weights, {args.kv} KV; ms per layer-step (mean of {calls}):")
    for k in ("gemm", "attention", "elementwise", "copy"):
        print(f"  {k:<12} {buckets.get(k, 0.0) / calls:8.2f}")
    print(f"  copy wait    {1e3 * (wait['copy_wait_weights_s'] + wait['copy_wait_kv_s']) / (2 * calls):8.2f}  "
          f"(weights {wait['copy_wait_weights_s']:.3f} s, KV {wait['copy_wait_kv_s']:.3f} s over both passes)")
    ew_ms = buckets.get("elementwise", 0.0) / calls
    print(f"plan: {plain / GB:.1f} GB of elementwise traffic per layer (meta-device count); measured "
          f"{ew_ms:.1f} ms -> {plain / GB / max(ew_ms, 1e-9) * 1e3:.0f} GB/s effective")
    return 0


if __name__ == "__main__":
    sys.exit(main())
