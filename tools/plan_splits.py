"""Predicted real-time factor of one RTX 4090 and of 4-5 with the step and the layer split, side by side.

    python tools/plan_splits.py [--size 704*384 --size 384*256] [--markdown]

Every figure is the plan's own prediction (`plan_split`, the cost model of runtime/costs.py), as
`liveavatar-lite plan 14b --format int8 --vram 24 --ram 128 --device-profile rtx4090 --kv KV
--compile C --attention A [--ranks N --split S]` prints it, for three ways the units run: eager
(`--compile off`), fused graphs with the architecture's attention (`--compile on`, flash on the
4090) and fused with SageAttention (`--attention sage`). VAE decoder included (on the last rank, or
a rank of its own with 5). "bound N" is `work_bound`: the best any split over N cards could do (a
clip's whole compute shared perfectly, no copies); "cards for 1.0x" the fewest cards whose bound
reaches real time. tests/test_multirank.py pins the verdicts.
"""
from __future__ import annotations

import argparse

from liveavatar_lite.config import PRESETS
from liveavatar_lite.decode.decoder_memory import DecoderGraph
from liveavatar_lite.errors import BudgetError
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.plan_inputs import Budget, parse_size, plan_input
from liveavatar_lite.runtime.stage_plan import plan_ranks, plan_split, predict_pipeline, rank_roles, work_bound

KERNELS = (("eager", "off", "auto"), ("fused + flash", "on", "auto"), ("fused + sage", "on", "sage"))


def row(inp, budget: Budget, prof) -> tuple[list[float | None], str]:
    """Real-time factors (1 GPU, 4 steps, 4 layers, 5 steps, 5 layers; None: does not fit) and
    what `--split auto` picks for 4 / 5."""
    cells: list[float | None] = []
    try:
        cells.append(predict_pipeline(plan_ranks(inp, budget, prof, rank_roles(1)), inp.sample).realtime_factor)
    except BudgetError:
        cells.append(None)
    auto = []
    for n in (4, 5):
        for split in ("steps", "layers"):
            try:
                cells.append(plan_split(inp, budget, prof, n, split).prediction.realtime_factor)
            except BudgetError:
                cells.append(None)
        auto.append(plan_split(inp, budget, prof, n).split)
    bound = work_bound(inp, budget, prof)
    cells += [bound.realtime_factor(4), bound.realtime_factor(5)]
    return cells, " / ".join(auto) + f" | {bound.cards_for_real_time}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", help="width*height (repeatable; default 704*384 and 384*256)")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (BENCHMARKS.md)")
    args = ap.parse_args()
    prof = get_profile("rtx4090")
    cols = ("1 GPU", "4 steps", "4 layers", "5 steps", "5 layers", "bound 4", "bound 5")
    if args.markdown:
        print("| size | kernels | KV | " + " | ".join(cols) + " | `auto` picks (4 / 5) | cards for 1.0x |")
        print("|---|---|---|" + "---:|" * len(cols) + "---|---:|")
    else:
        print("RTX 4090 (profile rtx4090), int8 weights, --vram 24 per card, --ram 128: predicted real-time factor")
        print(f"{'size':<9}{'kernels':<15}{'KV':<6}" + "".join(f"{c:>10}" for c in cols) + "  auto (4 / 5) | cards for 1.0x")
    for size in args.size or ["704*384", "384*256"]:
        inp = plan_input(PRESETS["14b"].dit, parse_size(size), "int8", decoder=DecoderGraph.for_preset("14b"))
        for kv in ("bf16", "fp8"):
            for name, compile_mode, attention in KERNELS:
                budget = Budget(vram_bytes=24e9, ram_bytes=128e9, kv_dtype=kv, compile=compile_mode,
                                attention=attention)
                cells, auto = row(inp, budget, prof)
                text = ["-" if c is None else f"{c:.2f}" for c in cells]
                if args.markdown:
                    print(f"| {size} | {name} | {kv} | " + " | ".join(text) + f" | {auto} |")
                else:
                    print(f"{size:<9}{name:<15}{kv:<6}" + "".join(f"{t:>10}" for t in text) + f"  {auto}")


if __name__ == "__main__":
    main()
