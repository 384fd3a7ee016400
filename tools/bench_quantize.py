#!/usr/bin/env python3
"""Converter throughput and peak RSS: ours (int8, int4) vs optimum-quanto qint8, same DiT tensors.

A variant named `...+lora` merges `--lora` (the others do not), so `--variants ours-int8,ours-int8+lora`
measures what the LoRA costs side by side (goal: peak RSS <= 1.0 GB, wall <= 1.5x without it).

Each variant runs in its own subprocess (so peak RSS is its own `ru_maxrss`), one after another;
the output directory is deleted after each run (disk). Reports wall time, peak RSS, GB/s of source
bytes, output size. quanto quantizes exactly the Linears our policy quantizes (same per-unit
grouping), keeps the rest bf16, and saves each unit with safetensors `save_file` plus its
`quantization_map`, as its docs show.

    python tools/bench_quantize.py /work/scratch/ck14b --out /work/scratch/bench_q --variants ours-int8,quanto-qint8,ours-int4
    python tools/bench_quantize.py /work/scratch/ck14b --out /work/scratch/bench_q --variants ours-int8,ours-int8+lora \
        --lora /work/scratch/ck14b/liveavatar.safetensors
    python tools/bench_quantize.py /work/scratch/ck14b --compute-only      # CPU cost only, no disk
Needs the `[bench]` extra (optimum-quanto==0.2.7) for the quanto variant.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours-int8", "ours-int4", "ours-fp8", "ours-nf4", "quanto-qint8")
LORA_SUFFIX = "+lora"  # e.g. ours-int8+lora: the same variant with --lora merged


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_ours(ckpt: Path, out: Path, fmt: str, lora: Path | None) -> None:
    from liveavatar_lite.artifact.qtypes import QuantType
    from quantize.convert import ConvertOptions, convert

    convert(ConvertOptions(ckpt, out, QuantType(fmt), lora=lora, components=("dit",), progress=False))


def run_quanto(ckpt: Path, out: Path, lora: Path | None) -> None:
    import torch
    from optimum.quanto import freeze, qint8, quantization_map, quantize
    from safetensors.torch import save_file
    from torch import nn

    from liveavatar_lite.artifact.checkpoint import (
        CheckpointDir,
        LoraWeights,
        merge_lora,
    )
    from liveavatar_lite.artifact.qtypes import QuantType
    from quantize.policy import Policy
    from quantize.source import DitSource

    ck = CheckpointDir(ckpt)
    src = DitSource(ck)
    src.validate()
    lw = LoraWeights.open(lora) if lora else None
    policy = Policy(QuantType.INT8)
    units, resident = src.units()
    out.mkdir(parents=True, exist_ok=True)
    groups = [(name, keys) for name, _, keys in units] + [("resident", resident)]
    with torch.no_grad():  # quanto's generic paths break under inference_mode (QUANT_LIBS.md §3.1)
        for name, keys in groups:
            sd: dict[str, torch.Tensor] = {}
            qmap: dict[str, dict] = {}
            for k in keys:
                t = ck.read_dit_tensor(k)
                delta = lw.delta_for_weight(k) if lw else None
                if delta is not None:
                    t = merge_lora(t, delta).to(torch.bfloat16)
                qtype, _ = policy.decide(k, tuple(t.shape))
                if qtype is not QuantType.INT8:
                    sd[k] = t
                    continue
                lin = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta", dtype=torch.bfloat16)
                lin.weight = nn.Parameter(t, requires_grad=False)
                holder = nn.Sequential(lin)
                quantize(holder, weights=qint8)
                freeze(holder)
                module = k[: -len(".weight")]
                for sk, sv in holder.state_dict().items():  # "0.weight._data", "0.weight._scale"
                    sd[module + sk[1:]] = sv.contiguous()
                qmap[module] = quantization_map(holder)["0"]
            save_file(sd, str(out / f"{name}.safetensors"), metadata={"quantization_map": json.dumps(qmap)})
            del sd


def child(args: argparse.Namespace) -> None:
    import quantize.convert  # noqa: F401  imports are not part of the timed conversion
    if args.variant.startswith("quanto"):
        import optimum.quanto  # noqa: F401
    t0 = time.perf_counter()
    variant = args.variant.removesuffix(LORA_SUFFIX)
    if variant.startswith("ours-"):
        run_ours(args.ckpt, args.out, variant.split("-", 1)[1], args.lora)
    else:
        run_quanto(args.ckpt, args.out, args.lora)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.variant, "wall_s": wall, "peak_rss_gb": peak_kb * 1024 / 1e9}))


def compute_only(args: argparse.Namespace) -> int:
    """Per-tensor CPU cost with no disk in the way: the same in-memory weights, each variant in turn."""
    import hashlib

    import torch
    from torch import nn

    from liveavatar_lite.artifact.checkpoint import CheckpointDir
    from liveavatar_lite.artifact.qtypes import QuantType
    from quantize.quantizers import quantize_tensor

    ck = CheckpointDir(args.ckpt)
    keys = [f"blocks.{args.block}.{m}.weight" for m in ("self_attn.q", "self_attn.o", "ffn.0", "ffn.2")]
    weights = [ck.read_dit_tensor(k) for k in keys]
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def ours(fmt: QuantType, group: int | None) -> None:
        for w in weights:
            for t in quantize_tensor(fmt, w, group).values():
                hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()

    def quanto() -> None:
        from optimum.quanto import freeze, qint8, quantize

        with torch.no_grad():
            for w in weights:
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=torch.bfloat16)
                lin.weight = nn.Parameter(w, requires_grad=False)
                holder = nn.Sequential(lin)
                quantize(holder, weights=qint8)
                freeze(holder)
                {k: v.contiguous() for k, v in holder.state_dict().items()}

    runs = {"ours-int8 (quantize+sha256)": lambda: ours(QuantType.INT8, None),
            "ours-int4 g128 (quantize+sha256)": lambda: ours(QuantType.INT4, 128),
            "quanto-qint8 (quantize+freeze)": quanto}
    try:
        import optimum.quanto  # noqa: F401  (the [bench] extra)
    except ImportError:
        del runs["quanto-qint8 (quantize+freeze)"]
    if args.lora:  # the converter's LoRA merge (in place, fp32 row chunks) before the same int8 quantization
        from liveavatar_lite.artifact.checkpoint import LoraWeights, merge_lora_inplace

        lora = LoraWeights.open(args.lora)
        factors = [lora.factors_for_weight(k) for k in keys]

        def ours_lora() -> None:
            for w, f in zip(weights, factors):
                merged = merge_lora_inplace(w.clone(), f) if f is not None else w
                for t in quantize_tensor(QuantType.INT8, merged, None).values():
                    hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()

        runs["ours-int8+lora (merge+quantize+sha256)"] = ours_lora
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeat):  # interleaved rounds, min of each: robust to other jobs on the machine
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"compute only, {len(weights)} tensors of block {args.block} ({nbytes / 1e9:.2f} GB bf16), min of {args.repeat}:")
    for name, t in best.items():
        print(f"  {name:<34} {t:6.2f} s  {nbytes / 1e9 / t:6.2f} GB/s")
    q = best.get("quanto-qint8 (quantize+freeze)")
    if q is not None:
        print(f"  ours-int8 / quanto-qint8 throughput: {q / best['ours-int8 (quantize+sha256)']:.2f}x")
    if args.lora:
        print(f"  ours-int8+lora / ours-int8 time: "
              f"{best['ours-int8+lora (merge+quantize+sha256)'] / best['ours-int8 (quantize+sha256)']:.2f}x")
    return 0


def parent(args: argparse.Namespace) -> int:
    from liveavatar_lite.artifact.checkpoint import CheckpointDir

    if args.out is None:
        print("--out is required (scratch directory for the outputs)", file=sys.stderr)
        return 2
    ck = CheckpointDir(args.ckpt)
    src_bytes = sum(p.stat().st_size for p in ck.shard_files)
    results = []
    for variant in args.variants.split(","):
        if variant.removesuffix(LORA_SUFFIX) not in VARIANTS:
            print(f"unknown variant {variant}; choose from {VARIANTS} (optionally +lora)", file=sys.stderr)
            return 2
        if variant.endswith(LORA_SUFFIX) and not args.lora:
            print(f"variant {variant} needs --lora", file=sys.stderr)
            return 2
        out = args.out / variant
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, str(args.ckpt), "--out", str(out), "--variant", variant]
        if args.lora and variant.endswith(LORA_SUFFIX):
            cmd += ["--lora", str(args.lora)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        print(f"[bench] {variant} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["out_gb"] = _dir_bytes(out) / 1e9
        r["source_gb"] = src_bytes / 1e9
        r["gb_per_s"] = src_bytes / 1e9 / r["wall_s"]
        results.append(r)
        print(f"[bench] {variant}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"{r['gb_per_s']:.3f} GB/s, output {r['out_gb']:.2f} GB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n| variant | wall s | peak RSS GB | GB/s (source) | output GB |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['gb_per_s']:.3f} | {r['out_gb']:.2f} |")
    by = {r["variant"]: r for r in results}
    if "quanto-qint8" in by:
        for v in ("ours-int8", "ours-int4"):
            if v in by:
                print(f"{v} throughput / quanto-qint8: {by[v]['gb_per_s'] / by['quanto-qint8']['gb_per_s']:.2f}x")
    for v, r in by.items():  # the LoRA's cost, side by side with the same variant without it
        base = by.get(v.removesuffix(LORA_SUFFIX)) if v.endswith(LORA_SUFFIX) else None
        if base is not None:
            print(f"{v}: wall {r['wall_s'] / base['wall_s']:.2f}x of {base['variant']} (goal <= 1.5x), "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB (goal <= 1.0 GB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path, help="checkpoint directory (a DiT-only one is enough)")
    p.add_argument("--out", type=Path, default=None, help="scratch directory for outputs (deleted after each run)")
    p.add_argument("--variants", default="ours-int8,quanto-qint8,ours-int4")
    p.add_argument("--lora", type=Path, default=None, help="the LoRA that `+lora` variants merge")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--compute-only", action="store_true", help="time quantization of one block's weights in memory (no disk)")
    p.add_argument("--block", type=int, default=0, help="block used by --compute-only")
    p.add_argument("--repeat", type=int, default=3, help="rounds for --compute-only")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    if args.variant:
        child(args)
        return 0
    return compute_only(args) if args.compute_only else parent(args)


if __name__ == "__main__":
    sys.exit(main())
