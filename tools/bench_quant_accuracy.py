#!/usr/bin/env python3
"""Accuracy of each weight format: ours vs optimum-quanto vs bitsandbytes, then end to end on the tiny model.

Part 1 (real-sized Linears): the same Gaussian weight (std 0.02, stored bf16 like the checkpoint),
quantized by each library, dequantized, and applied in fp32 to a realistic activation: unit
Gaussian tokens with log-normal per-channel scales and a few outlier channels (x20), as DiT
activations have. Output SNR (dB) against the fp32 product with the unquantized bf16 weight.
Dequantizing and multiplying in fp32 ourselves isolates the weight format from each library's
kernel choices.

Part 2 (end to end): the tiny checkpoint converted to every format by `liveavatar-lite quantize`,
each artifact dequantized into the reference DiT, and the latents after 1 block x 4 denoising
steps (liveavatar_lite.pipeline.generator.CausalGenerator) compared with the bf16 reference (the LoRA-merged
bf16 weights, computed in fp32): SNR in dB per format.

    python tools/bench_quant_accuracy.py --tokens 256          # part 1 + part 2
    python tools/bench_quant_accuracy.py --skip-linear          # part 2 only
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

import torch

from liveavatar_lite.artifact.qtypes import QuantType, dequantize
from quantize.quantizers import quantize_tensor

SHAPES = ((5120, 5120), (13824, 5120))  # [out, in]: attention projections and ffn.0


def snr_db(approx: torch.Tensor, ref: torch.Tensor) -> float:
    err = (approx.double() - ref.double()).pow(2).mean()
    return math.inf if err == 0 else float(10 * torch.log10(ref.double().pow(2).mean() / err))


def realistic_activation(tokens: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[tokens, K]: per-channel log-normal scales, 0.5% of channels are x20 outliers."""
    scale = torch.exp(0.5 * torch.randn(k, generator=g))
    outliers = torch.randperm(k, generator=g)[: max(1, k // 200)]
    scale[outliers] *= 20.0
    return torch.randn(tokens, k, generator=g) * scale


def ours(w: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, q, g in (("int8", QuantType.INT8, None), ("fp8", QuantType.FP8, None), ("int4 g64", QuantType.INT4, 64),
                       ("int4 g128", QuantType.INT4, 128), ("nf4", QuantType.NF4, None)):
        out[f"ours {name}"] = dequantize(q, quantize_tensor(q, w, g), tuple(w.shape), g, torch.float32)
    return out


def quanto(w: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize
    except ImportError:
        logging.warning("optimum-quanto not installed ([bench] extra): skipping it")
        return {}
    out = {}
    for name, qt in (("qint8", qint8), ("qfloat8", qfloat8), ("qint4 g128", qint4)):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        holder = torch.nn.Sequential(lin)
        quantize(holder, weights=qt)
        freeze(holder)
        out[f"quanto {name}"] = holder[0].weight.dequantize().detach().float()
    return out


def bnb(w: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        import bitsandbytes.functional as F
    except ImportError:
        logging.warning("bitsandbytes not installed: skipping it")
        return {}
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    out = {}
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out["bnb nf4 (double quant)"] = F.dequantize_4bit(packed, state).float()
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="fp4")
    out["bnb fp4"] = F.dequantize_4bit(packed, state).float()
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    out["bnb int8 (vectorwise)"] = cb.float() * scb.float()[:, None] / 127.0
    return out


def linear_accuracy(tokens: int, seed: int, shapes=SHAPES) -> list[tuple[str, tuple[int, int], float, float]]:  # type: ignore[no-untyped-def]
    rows = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(seed)
        w = (0.02 * torch.randn(n, k, generator=g)).to(torch.bfloat16)  # stored like the checkpoint
        x = realistic_activation(tokens, k, g)
        ref = x @ w.float().T  # [tokens, N]
        cands = {**ours(w), **quanto(w), **bnb(w)}
        for name, w_hat in cands.items():
            rows.append((name, (n, k), snr_db(x @ w_hat.T, ref), snr_db(w_hat, w.float())))
            print(f"  {name:<24} {n}x{k}: output {rows[-1][2]:6.2f} dB, weight {rows[-1][3]:6.2f} dB", flush=True)
    return rows


def end_to_end(ckpt: Path | None, seed: int) -> list[tuple[str, float]]:
    from calibration.inputs import build_conditioning, default_samples
    from liveavatar_lite.artifact.checkpoint import CheckpointDir, LoraWeights
    from liveavatar_lite.artifact.dit_loading import build_meta_dit, merged_dit_tensor
    from liveavatar_lite.artifact.format import read_manifest, read_unit
    from liveavatar_lite.config import preset_for_dit
    from liveavatar_lite.pipeline.generator import CausalGenerator
    from quantize.convert import ConvertOptions, convert

    with tempfile.TemporaryDirectory() as tmp:
        if ckpt is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from make_checkpoint import write_checkpoint

            ckpt = write_checkpoint("tiny", Path(tmp) / "ck", seed=seed)
        ck = CheckpointDir(ckpt)
        lora = LoraWeights.open(ckpt / "liveavatar.safetensors")
        inputs = build_conditioning(ck, preset_for_dit(ck.dit_config), default_samples(1, 2.0, 64, 64), torch.float32)[0]

        def first_block(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            model = build_meta_dit(ck)
            model.load_state_dict(tensors, strict=True, assign=True)
            gen = CausalGenerator(model.float().eval(), inputs, seed=seed, num_clips=1, sink_offset=4)
            with torch.no_grad():
                return gen.next_block().latents  # [16, 3, h, w] after 4 steps

        ref_sd = {k: merged_dit_tensor(ck, lora, k, torch.bfloat16).float() for k in ck.dit_keys}
        ref = first_block(ref_sd)
        rows = []
        for fmt, group in (("bf16", 128), ("int8", 128), ("fp8", 128), ("int4", 64), ("int4", 128), ("nf4", 128)):
            out = Path(tmp) / f"art_{fmt}_{group}"
            convert(ConvertOptions(ckpt, out, QuantType(fmt), lora=ckpt / "liveavatar.safetensors", group_size=group,
                                   components=("dit",), progress=False))
            m = read_manifest(out)
            sd = {}
            for unit in m.units:
                buf, views = read_unit(out, unit, manifest=m)
                sd.update({k: v.dequantize(buf, torch.float32) for k, v in views.items()})
            name = f"{fmt} g{group}" if fmt == "int4" else fmt
            rows.append((name, snr_db(first_block(sd), ref)))
            print(f"  {name:<10} latents SNR vs bf16 reference: {rows[-1][1]:6.2f} dB", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="activation rows for part 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, default=None, help="tiny checkpoint for part 2 (default: write one)")
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--shapes", default=None, help="part 1 shapes as NxK,NxK (default 5120x5120,13824x5120)")
    p.add_argument("--skip-e2e", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    if not args.skip_linear:
        print("Part 1: output SNR of real-sized Linears (weight std 0.02 bf16; activation with outlier channels)")
        shapes = SHAPES if not args.shapes else tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        rows = linear_accuracy(args.tokens, args.seed, shapes)
        print("\n| format | " + " | ".join(f"{n}x{k} out dB" for n, k in shapes) + " | weight dB |")
        print("|---|" + "---:|" * (len(shapes) + 1))
        for name in dict.fromkeys(r[0] for r in rows):
            vals = [next(r for r in rows if r[0] == name and r[1] == s) for s in shapes]
            print(f"| {name} | " + " | ".join(f"{v[2]:.2f}" for v in vals) + f" | {vals[0][3]:.2f} |")
    if not args.skip_e2e:
        print("\nPart 2: tiny model, latents after 1 block x 4 steps vs the bf16 reference")
        rows2 = end_to_end(args.ckpt, args.seed)
        print("\n| format | latents SNR dB |\n|---|---:|")
        for name, v in rows2:
            print(f"| {name} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
