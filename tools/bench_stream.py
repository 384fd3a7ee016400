#!/usr/bin/env python3
"""Streamed vs resident DiT step time, copy-wait fraction and H2D GB/s, side by side.

Builds the DiT's units with random bytes in the artifact's exact layout (no checkpoint needed:
14B-shaped INT8 blocks at 704*384 on a GPU, the tiny model on CPU), then runs the real runtime
(`DiTRuntime`, the same loop `generate` uses) twice: every unit resident, and placed by the plan
for `--vram`. On CPU the same control flow runs (copies are synchronous memcpys, so copy-wait is
the copy time itself).

    python tools/bench_stream.py --preset 14b --size 704*384 --vram 12 --device cuda
    python tools/bench_stream.py --preset tiny --size 64*64 --device cpu        # CPU: control flow only

Each layout runs `--warmup` untimed times, then `--samples` timed times interleaved with the other
layout; the table shows medians and the ratio's spread over the samples (one sample swung from
0.07x to 16x between two runs on a loaded 2-core VM).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

import torch

from liveavatar_lite.artifact.format import TensorSpec, block_unit_name, layout_file
from liveavatar_lite.artifact.qtypes import QuantType
from liveavatar_lite.config import DiTConfig
from liveavatar_lite.runtime.device_profiles import get_profile, probe_profile
from liveavatar_lite.runtime.dit_runtime import DiTRuntime, UnitData
from liveavatar_lite.runtime.pinned import host_buffer
from liveavatar_lite.runtime.plan import GB, Budget, Plan, make_plan, min_vram_bytes
from liveavatar_lite.runtime.plan_inputs import plan_input

from bench_args import add_model_args, model_config  # tools/: beside this script

TIMESTEPS = (1000.0, 857.69, 602.15, 8.93)


def synthetic_units(cfg: DiTConfig, fmt: str, pin: bool, seed: int = 0, group_size: int = 128,
                    fill_device: str = "cpu") -> list[UnitData]:
    """Every DiT unit with random, numerically sane bytes, laid out exactly as `format.py` writes them.
    `fill_device="cuda"` draws the values on the GPU (16 GB of 14B int8 blocks in seconds instead of
    minutes on one CPU core) and copies them into the host buffers; the values then differ from the
    CPU draw's, the layout does not."""
    from liveavatar_lite.model.dit import WanS2VDiT
    from liveavatar_lite.model.units import resident_keys, unit_keys
    from quantize.policy import Policy

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanS2VDiT(cfg).state_dict().items()}
    policy = Policy(QuantType(fmt), group_size=group_size)
    groups = [("resident", None, resident_keys(cfg))] + [(block_unit_name(i), i, unit_keys(cfg, i))
                                                         for i in range(cfg.num_layers)]
    g = torch.Generator(device=fill_device).manual_seed(seed)
    units = []
    for name, layer, keys in groups:
        specs = []
        for k in keys:
            qt, grp = policy.decide(k, shapes[k])
            specs.append(TensorSpec(k, qt, shapes[k], grp, "BF16"))
        lay = layout_file(specs, name)
        buf = host_buffer(lay.data_nbytes, pin=pin, zero=True)  # exact size, as the runtime reads units
        for e in lay.tensors:
            for p in e.parts:
                view = buf[p.offset:p.offset + p.nbytes].view(p.torch_dtype).reshape(p.shape)
                _fill(view, e.name, p.role, e.logical_shape, g)
        units.append(UnitData(name, layer, lay.data_nbytes, lay.tensors, host=buf))
    return units


def _fill(view: torch.Tensor, key: str, role: str, logical: tuple[int, ...], g: torch.Generator) -> None:
    k_in = logical[1] if len(logical) == 2 else max(1, math.prod(logical[1:]))
    dev = g.device  # random draws happen where the generator lives; copy_ moves them into the host view
    if role == "data" and view.dtype in (torch.int8, torch.uint8):
        hi = 127 if view.dtype == torch.int8 else 255
        view.copy_(torch.randint(-hi if hi == 127 else 0, hi + 1, view.shape, generator=g, dtype=torch.int16,
                                 device=dev).to(view.dtype))
    elif role == "data" and view.dtype == torch.float8_e4m3fn:
        view.copy_((torch.randn(view.shape, generator=g, device=dev) * 100).to(view.dtype))
    elif role == "scale":  # int8/fp8: |w| ~ 1/sqrt(K); int4: (q - zero) * scale
        view.fill_(1.0 / (60 * math.sqrt(k_in)) if view.dtype == torch.float32 else 1.0 / (8 * math.sqrt(k_in)))
    elif role == "zero":
        view.fill_(7.5)
    elif role == "absmax":
        view.fill_(2.0 / math.sqrt(k_in))
    elif "norm" in key and key.endswith("weight"):
        view.fill_(1.0)
    elif len(logical) >= 2 and key.endswith("weight"):
        view.copy_((torch.randn(view.shape, generator=g, device=dev) / math.sqrt(k_in)).to(view.dtype))
    else:
        view.copy_((torch.randn(view.shape, generator=g, device=dev) * 0.02).to(view.dtype))


def run_steps(rt: DiTRuntime, cfg: DiTConfig, size: tuple[int, int], blocks: int, device: str) -> list[float]:
    """Sink prefill, then `blocks` blocks x 4 steps at steady state (full rings); seconds per step."""
    g = torch.Generator().manual_seed(1)
    h, w = size[1] // 8, size[0] // 8
    text = rt.embed_text(torch.randn(16, cfg.text_dim, generator=g))
    rt.prefill_sink(torch.randn(16, 1, h, w, generator=g), torch.randn(16, 19, h, w, generator=g), text)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for b in range(blocks):
        x = torch.randn(16, 3, h, w, generator=g)
        audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g)
        for step, t in enumerate(TIMESTEPS):
            sync()  # timing boundary only: each step is timed on its own
            t0 = time.perf_counter()
            v = rt.denoise(step, x, t, 12 + 3 * b, audio, text, sink_offset=7)
            sync()
            times.append(time.perf_counter() - t0)
            x = (x.float() - 0.25 * v.float().cpu()).to(x.dtype)
    return times


def measure(cfg: DiTConfig, units: list[UnitData], plan: Plan, size, blocks: int, device: str) -> dict:
    from liveavatar_lite.pipeline.ledger import memory_ledger

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rt = DiTRuntime(cfg, units, plan, device=device, timing=device == "cuda")
    times = run_steps(rt, cfg, size, blocks, device)
    steady = times[4:] or times  # the first block warms up kernels and caches
    counters = rt.copy_counters()  # weights and KV apart (CPU: the copies themselves are the wait)
    wait = counters["copy_wait_weights_s"] + counters["copy_wait_kv_s"]
    copy_s = sum(st.stats.copy_seconds for st in rt.streamers())
    h2d = sum(st.stats.h2d_bytes for st in rt.streamers())
    total = sum(times)
    per_clip = 16 / len(times)  # a clip is 4 blocks x 4 steps: scale the run to one clip
    clip = {k: v * per_clip for k, v in counters.items()}
    out = {
        "streamed_units": len(plan.streamed_units),
        "host_kv": [k.name for k in plan.kv if k.placement == "host"],
        "s_per_step": sum(steady) / len(steady),
        "copy_wait_fraction": wait / total,
        "copy_wait_weights_fraction": counters["copy_wait_weights_s"] / total,
        "copy_wait_kv_fraction": counters["copy_wait_kv_s"] / total,
        "h2d_gbps": h2d / copy_s / GB if copy_s else 0.0,
        "h2d_gb_per_step": h2d / len(times) / GB,
        "predicted_s_per_step": plan.predicted_seconds_per_clip / (4 * 4),
        "predicted_peak_gb": plan.peak_vram_bytes / GB,
    }
    if device == "cuda":
        out["max_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    # predicted next to measured, scaled to one clip (this run has no VAE decoder: its rows stay empty)
    out["ledger"] = memory_ledger(plan, rt, None, sum(times) * per_clip, clip)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, layers_help="keep only the first N blocks (quick runs)",
                   vram_help="budget in GB for the streamed run (default: the leanest layout)")
    ap.add_argument("--device-profile", default=None)
    ap.add_argument("--blocks", type=int, default=3, help="blocks per sample (4 steps each; the first is not timed)")
    ap.add_argument("--samples", type=int, default=5, help="timed samples of each layout, interleaved (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each layout first (allocator, caches, page cache)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cfg, size = model_config(args)
    profile = get_profile(args.device_profile) if args.device_profile else probe_profile(args.device, seconds=1.0)
    units = synthetic_units(cfg, args.format, pin=args.device == "cuda")
    inp = plan_input(cfg, size, args.format, unit_sizes={u.name: u.nbytes for u in units})
    budget = lambda v: Budget(vram_bytes=v, kv_dtype=args.kv, vae_arena_bytes=0)  # noqa: E731
    lean = args.vram * GB if args.vram else min_vram_bytes(inp, budget(1)) * 1.001
    resident_plan = make_plan(inp, budget(1e15), profile)
    resident_plan = replace(resident_plan, kv=tuple(replace(k, placement="host") for k in resident_plan.kv)) \
        if args.device == "cuda" and args.preset == "14b" else resident_plan  # 40 GiB of KV never fits a card
    streamed_plan = make_plan(inp, budget(lean), profile)
    layouts = (("resident", resident_plan), ("streamed", streamed_plan))
    for _ in range(max(0, args.warmup)):  # warm-up runs: first-touch allocations, kernel caches, page cache
        for _label, plan in layouts:
            measure(cfg, units, plan, size, args.blocks, args.device)
    samples: dict[str, list[dict]] = {label: [] for label, _ in layouts}
    for _ in range(max(1, args.samples)):  # interleaved, so load from other processes hits both alike
        for label, plan in layouts:
            samples[label].append(measure(cfg, units, plan, size, args.blocks, args.device))
    results = {label: _median_result(runs) for label, runs in samples.items()}
    ratio = results["streamed"]["s_per_step"] / results["resident"]["s_per_step"]
    per_sample = [st["s_per_step"] / rs["s_per_step"] for st, rs in zip(samples["streamed"], samples["resident"])]
    spread = (min(per_sample), max(per_sample))
    if args.json:
        print(json.dumps({"device": args.device, "preset": args.preset, "layers": cfg.num_layers,
                          "size": f"{size[0]}*{size[1]}", "format": args.format, "kv": args.kv,
                          "samples": len(per_sample), "warmup": args.warmup, "results": results,
                          "streamed_over_resident": ratio, "per_sample_ratio_range": spread}, indent=1))
        return 0
    cols = ("s_per_step", "copy_wait_weights_fraction", "copy_wait_kv_fraction", "h2d_gbps", "h2d_gb_per_step",
            "streamed_units", "predicted_s_per_step")
    print(f"{args.preset} ({cfg.num_layers} layers) {args.format} at {size[0]}*{size[1]}, KV {args.kv}, on {args.device}")
    print(f"{'':10}" + "".join(f"{c:>22}" for c in cols))
    for label, r in results.items():
        print(f"{label:10}" + "".join(f"{r[c]:>22.4f}" if isinstance(r[c], float) else f"{r[c]:>22}" for c in cols))
    print(f"streamed / resident step time: {ratio:.3f}x (median of {len(per_sample)} interleaved samples after "
          f"{args.warmup} warm-up; per-sample ratios {spread[0]:.3f}x-{spread[1]:.3f}x)")
    from liveavatar_lite.pipeline.telemetry import format_ledger

    for label, r in results.items():
        print(format_ledger(r["ledger"], f"\nmemory ledger, {label} (plan vs measured, scaled to a clip of 16 steps; "
                                         "this bench keeps every unit in host memory and builds no decoder):"))
    return 0


def _median_result(runs: list[dict]) -> dict:
    """Per-field median over samples (numbers), the first sample's value otherwise."""
    import statistics

    out = {}
    for key, value in runs[0].items():
        numbers = [r[key] for r in runs]
        out[key] = statistics.median(numbers) if isinstance(value, float) else value
    return out


if __name__ == "__main__":
    sys.exit(main())
