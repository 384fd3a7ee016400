#!/usr/bin/env python3
"""Per block-step speed of the DiT, eager vs fused units (torch.compile), side by side in one run.

Builds the DiT's units with random bytes in the artifact's exact layout (`bench_stream.synthetic_units`:
no checkpoint needed) and runs the real runtime (`DiTRuntime`, the loop `generate` uses) twice,
`compile_units="off"` and `"on"`, on the same plan. Per block-step at steady state (full rings):

- seconds: median of the timed steps, eager and fused interleaved block by block;
- kernel launches: CUDA kernels recorded by torch.profiler; on a CPU, the compute ops recorded
  (leaf aten ops that are not views, plus inductor's generated C++ kernels);
- attention: the SDPA kernels the profiler saw (which backend torch picked);
- elementwise bytes in the units: the compiled program (`fused_units`) run eager on a third runtime
  with every non-GEMM, non-attention op's reads and writes counted by a dispatch mode, vs
  inductor's own count for the kernels it generated (`GraphFigures`); per unit kind too.

    python tools/bench_speed.py --preset tiny --device cpu               # CPU: tiny model, 64*64
    python tools/bench_speed.py --preset 14b --layers 4 --device cuda    # 14B-shaped blocks, 704*384
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from liveavatar_lite.config import DiTConfig
from liveavatar_lite.runtime.device_profiles import get_profile
from liveavatar_lite.runtime.dit_runtime import DiTRuntime
from liveavatar_lite.runtime import fused_units
from liveavatar_lite.runtime.fused_units import fused_stats, record_inductor_bytes
from liveavatar_lite.runtime.plan import GB, Budget, make_plan
from liveavatar_lite.runtime.plan_inputs import plan_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import add_model_args, model_config  # noqa: E402
from bench_stream import TIMESTEPS, synthetic_units  # noqa: E402

EXTERN = ("mm", "addmm", "bmm", "_int_mm", "_scaled_mm", "convolution", "linear")  # GEMMs: not elementwise
NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "transpose", "t", "permute", "unsqueeze", "squeeze",
             "select", "slice", "as_strided", "detach", "alias", "resolve_conj", "resolve_neg", "unflatten",
             "flatten", "split", "split_with_sizes", "unbind", "chunk", "view_as_real", "view_as_complex",
             "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "narrow", "expand_as",
             "contiguous", "lift_fresh_copy", "is_nonzero", "item", "_local_scalar_dense", "set_", "record_stream"}


class OpBytes(TorchDispatchMode):
    """Bytes read + written per op class, counted as the ops run (views move no bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.elementwise = self.gemm = self.attention = self.ops = self.extern = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.ops += 1
        if "attention" in name:
            self.attention += nbytes
            self.extern += 1
        elif name in EXTERN:
            self.gemm += nbytes
            self.extern += 1
        else:
            self.elementwise += nbytes
        return out


class CountedUnits:
    """The fused units' functions run EAGER, each kind's ops and bytes counted (`OpBytes`): the same
    program inductor compiles, so eager vs fused per unit compares the fusion alone."""

    def __init__(self) -> None:
        self.kinds: dict[str, OpBytes] = {}
        self.calls: dict[str, int] = {}

    def _count(self, kind: str, fn, *args):  # type: ignore[no-untyped-def]
        counter = self.kinds.setdefault(kind, OpBytes())
        self.calls[kind] = self.calls.get(kind, 0) + 1
        with counter:
            return fn(*args)

    def block(self, block, x, ctx, kv, text_kv):  # type: ignore[no-untyped-def]
        kind = "sink" if ctx.is_sink else "block" if kv.ring.valid_keys() is None else "block-filling"
        return self._count(kind, fused_units._block, block, x, ctx, kv, text_kv)

    def inject(self, inject, x, ctx):  # type: ignore[no-untyped-def]
        return self._count("inject", fused_units._inject, inject, x, ctx)


def _inputs(cfg: DiTConfig, size: tuple[int, int], blocks: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    h, w = size[1] // 8, size[0] // 8
    return {"text": torch.randn(16, cfg.text_dim, generator=g), "ref": torch.randn(16, 1, h, w, generator=g),
            "motion": torch.randn(16, 19, h, w, generator=g),
            "latents": [torch.randn(16, 3, h, w, generator=g) for _ in range(blocks)],
            "audio": [torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(blocks)]}


class Run:
    """One runtime (eager or fused) stepping through blocks: prefill once, then block after block."""

    def __init__(self, rt: DiTRuntime, inp: dict, device: str) -> None:
        self.rt, self.inp, self.device = rt, inp, device
        self.text = rt.embed_text(inp["text"])
        rt.prefill_sink(inp["ref"], inp["motion"], self.text)
        self.block = 0

    def steps(self, hook=None) -> list[float]:  # type: ignore[no-untyped-def]
        """The next block's 4 steps; seconds per step (`hook(step)` returns a context around one step)."""
        b, inp, sync = self.block, self.inp, (torch.cuda.synchronize if self.device == "cuda" else (lambda: None))
        x = inp["latents"][b % len(inp["latents"])]
        times = []
        for step, t in enumerate(TIMESTEPS):
            ctx = hook(step) if hook is not None else None
            sync()  # timing boundary only
            t0 = time.perf_counter()
            if ctx is not None:
                with ctx:
                    v = self.rt.denoise(step, x, t, 3 * b, inp["audio"][b % len(inp["audio"])], self.text, sink_offset=7)
            else:
                v = self.rt.denoise(step, x, t, 3 * b, inp["audio"][b % len(inp["audio"])], self.text, sink_offset=7)
            sync()
            times.append(time.perf_counter() - t0)
            x = (x.float() - 0.25 * v.float().cpu()).to(x.dtype)
        self.block += 1
        return times


def _profile_step(run: Run) -> dict:
    """Launches and SDPA kernels of one steady-state block-step (step 0 of the next block)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device == "cuda" else [])
    prof = profile(activities=acts)
    holder: dict = {}

    def hook(step: int):  # type: ignore[no-untyped-def]
        return prof if step == 0 else None

    run.steps(hook)
    events = prof.events()
    attention = sorted({e.name for e in events if "attention" in e.name and e.name != "aten::scaled_dot_product_attention"
                        and e.device_type == DeviceType.CPU and e.name.startswith("aten::")})
    if run.device == "cuda":
        launches = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        cuda_attn = sorted({e.name[:60] for e in events if e.device_type == DeviceType.CUDA
                            and any(k in e.name.lower() for k in ("flash", "fmha", "attention", "cudnn"))})
        holder["attention_kernels"] = cuda_attn
    else:
        launches = sum(1 for e in events if e.device_type == DeviceType.CPU and not e.cpu_children
                       and ((e.name.startswith("aten::") and e.name[6:] not in NO_KERNEL) or "cpp_fused" in e.name))
    holder.update(launches=launches, attention=attention)
    return holder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, layers_help="keep only the first N blocks (14B-shaped blocks on one GPU)",
                   vram_help="plan for this many GB (default: everything resident)")
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--blocks", type=int, default=2, help="timed blocks of 4 steps each, after the warm-up blocks")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cfg, size = model_config(args)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    record_inductor_bytes()
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False  # compile here, so inductor's counters see every graph

    units = synthetic_units(cfg, args.format, pin=args.device == "cuda")
    inp_plan = plan_input(cfg, size, args.format, unit_sizes={u.name: u.nbytes for u in units})
    plan = make_plan(inp_plan, Budget(vram_bytes=args.vram * GB if args.vram else 1e15, kv_dtype=args.kv,
                                      vae_arena_bytes=0), get_profile("rtx4090"))
    warm = 4  # blocks before the rings are full: every graph variant is built in these
    inp = _inputs(cfg, size, warm + args.blocks + 3, args.device)
    runs = {}
    for mode in ("eager", "fused"):
        rt = DiTRuntime(cfg, units, plan, device=args.device, compute_dtype=dtype,
                        compile_units="on" if mode == "fused" else "off")
        runs[mode] = Run(rt, inp, args.device)
    stats0 = None
    for b in range(warm):
        for run in runs.values():
            run.steps()
        if b == warm - 1:
            stats0 = fused_stats()
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(args.blocks):  # interleaved, so other load hits both alike
        for mode, run in runs.items():
            times[mode] += run.steps()
    figures = {m: {"s_per_step": statistics.median(t), **_profile_step(runs[m])} for m, t in times.items()}
    graphs = runs["fused"].rt.fused.graphs  # type: ignore[union-attr]
    after = fused_stats()
    # the units' program run eager with its ops counted, on a third runtime (same plan and inputs)
    counted = CountedUnits()
    rt = DiTRuntime(cfg, units, plan, device=args.device, compute_dtype=dtype, compile_units="off")
    rt.fused = counted  # type: ignore[assignment]  # the static-view program, eager
    run = Run(rt, inp, args.device)
    for _ in range(warm + 1):
        run.steps()
    per_call = {k: (c.ops // counted.calls[k], c.extern // counted.calls[k], c.elementwise // counted.calls[k])
                for k, c in counted.kinds.items()}
    steady = [("block", cfg.num_layers), ("inject", len(cfg.audio_inject_layers))]
    figures["eager"]["unit_elementwise_bytes"] = sum(per_call[k][2] * n for k, n in steady if k in per_call)
    figures["fused"]["unit_elementwise_bytes"] = sum(graphs[k].elementwise_bytes * n for k, n in steady if k in graphs)
    recompiles = {k: after[k] - stats0[k] for k in after} if stats0 else {}
    result = {"device": args.device, "torch": torch.__version__, "preset": args.preset, "layers": cfg.num_layers,
              "size": f"{size[0]}*{size[1]}", "format": args.format, "kv": args.kv, "dtype": str(dtype)[6:],
              "figures": figures, "graphs": {k: asdict(v) for k, v in graphs.items()},
              "eager_units_per_call": {k: dict(zip(("ops", "extern", "elementwise_bytes"), v)) for k, v in per_call.items()},
              "after_warmup": recompiles}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.preset} DiT, {cfg.num_layers} layers, {result['size']}, {args.format} weights, {args.kv} KV, "
          f"{result['dtype']}, {args.device}, torch {torch.__version__}; per block-step at steady state")
    e, f = figures["eager"], figures["fused"]
    print("| | eager | fused | fused / eager |\n|---|---:|---:|---:|")
    print(f"| seconds (median of {len(times['eager'])}) | {e['s_per_step']:.4f} | {f['s_per_step']:.4f} | "
          f"{f['s_per_step'] / e['s_per_step']:.2f} |")
    print(f"| kernel launches | {e['launches']} | {f['launches']} | {f['launches'] / e['launches']:.2f} |")
    print(f"| elementwise bytes in the units (MB) | {e['unit_elementwise_bytes'] / 1e6:.2f} | "
          f"{f['unit_elementwise_bytes'] / 1e6:.2f} | {f['unit_elementwise_bytes'] / e['unit_elementwise_bytes']:.2f} |")
    print(f"| attention | {', '.join(e['attention']) or '-'} | {', '.join(f['attention']) or '-'} | |")
    if args.device == "cuda":
        print(f"| attention kernels | {', '.join(e['attention_kernels'])} | {', '.join(f['attention_kernels'])} | |")
    print("\nper unit call, eager (the same program, ops counted as dispatched) vs fused (inductor's counters)")
    print("| unit | eager ops | fused kernels | extern (GEMM, attention) | eager elementwise MB | fused elementwise MB "
          "| fused / eager bytes | IR nodes before fusion | compile s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, g in graphs.items():
        ops, ext, eb = per_call.get(kind, (0, 0, 0))
        print(f"| {kind} | {ops} | {g.kernels} | {g.extern_kernels} | {eb / 1e6:.2f} | {g.elementwise_bytes / 1e6:.2f} | "
              f"{g.elementwise_bytes / eb if eb else 0:.2f} | {g.nodes_pre_fusion} | {g.compile_s:.1f} |")
    print(f"\nafter the {warm} warm-up blocks: {recompiles.get('compiles', 0)} compiles, "
          f"{recompiles.get('graphs', 0)} new graphs, {after['graph_breaks']} graph breaks in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
