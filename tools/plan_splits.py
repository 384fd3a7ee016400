"""Predicted throughput of one RTX 4090 and of 4-5 with the step and the layer split, side by side.

    python tools/plan_splits.py [--size 704*384]

Three cost models (all predictions, `runtime/stage_plan.py`): the plan's as it is on this branch
(unfused elementwise traffic counted by runtime/traffic.py, attention at 55 % of bf16 peak), and
two what-ifs for the fused path with the figures of ../shared/reference/SPEED.md: ~1.9 GB of
non-matmul traffic per layer, attention at FlashAttention-2's ~163 TFLOP/s or SageAttention2's
~450 TFLOP/s. tests/test_multirank.py checks the what-ifs' verdicts.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.decoder_memory import DecoderGraph
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.plan_inputs import Budget, parse_size, plan_input
from liveavatar_lite.runtime.stage_plan import plan_ranks, plan_split, predict_pipeline, rank_roles

FUSED_ELEMENTWISE_BYTES = 1.9e9  # per layer and block-step, SPEED.md's estimate for a fully fused unit


def models(inp, kv: str):
    base = get_profile("rtx4090")
    fused = replace(inp, workload=replace(inp.workload, elementwise_bytes=((kv, (FUSED_ELEMENTWISE_BYTES,) * 40),)))
    yield "today's plan (unfused)", inp, base
    yield "fused, FA2 163 TFLOP/s", fused, replace(base, attn_efficiency=163.0 / base.bf16_tflops)
    yield "fused, Sage2 450 TFLOP/s", fused, replace(base, attn_efficiency=450.0 / base.bf16_tflops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*384")
    args = ap.parse_args()
    inp0 = plan_input(PRESETS["14b"].dit, parse_size(args.size), "int8", decoder=DecoderGraph.for_preset("14b"))
    print(f"RTX 4090 (profile rtx4090), int8 weights, {args.size}, --vram 24 per card, --ram 128: predicted real-time factor")
    print(f"{'cost model':<26}{'KV':<6}{'1 GPU':>7}{'4 steps':>9}{'4 layers':>10}{'5 steps':>9}{'5 layers':>10}  auto (4 / 5)")
    for kv in ("bf16", "fp8"):
        budget = Budget(vram_bytes=24e9, ram_bytes=128e9, kv_dtype=kv)
        for name, inp, prof in models(inp0, kv):
            one = predict_pipeline(plan_ranks(inp, budget, prof, rank_roles(1)), inp.sample).realtime_factor
            cells, auto = [], []
            for n in (4, 5):
                for split in ("steps", "layers"):
                    cells.append(plan_split(inp, budget, prof, n, split).prediction.realtime_factor)
                auto.append(plan_split(inp, budget, prof, n).split)
            print(f"{name:<26}{kv:<6}{one:7.2f}{cells[0]:9.2f}{cells[1]:10.2f}{cells[2]:9.2f}{cells[3]:10.2f}"
                  f"  {auto[0]} / {auto[1]}")


if __name__ == "__main__":
    main()
