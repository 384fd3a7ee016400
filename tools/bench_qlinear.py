#!/usr/bin/env python3
"""The W8A8 quantized linear, eager vs fused: kernels, bytes moved, seconds, error.

    python tools/bench_qlinear.py [--shapes tiny|14b] [--repeats 20] [--dtype fp32|bf16] [--linear qkvo]
    liveavatar-lite bench qlinear --shapes 14b          # on CUDA: also W8A16 and fp8 _scaled_mm

Eager is `linear_w8a8` as the runtime runs it without compile (quantize: norm, divide, round,
clamp, cast; `_int_mm`; the epilogue's multiply, multiply, add): its kernels and bytes are counted
per aten op with a dispatch mode (each op one kernel reading its inputs and writing its outputs).
Fused is `w8a8_expr` under `torch.compile` (what a compiled unit graph traces it to): kernels are
inductor's generated kernels plus the GEMM (an extern call), bytes are inductor's own count
(`torch._inductor.metrics.num_bytes_accessed`, which includes the extern GEMM's inputs and output).
Seconds are medians of --repeats after a warm-up. The 14B shapes are one block-step's q/k/v/o and
FFN linears at 704*384 (3168 tokens); on a CPU they take minutes.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from liveavatar_lite.artifact.qtypes import QuantType, dequantize
from liveavatar_lite.config import PRESETS
from liveavatar_lite.runtime.qlinear import (
    linear_fp8_rowwise,
    linear_w8a8,
    quantize_per_token_int8,
    w8a8_expr,
)

TOKENS_14B = 3168  # one block-step at 704*384: 3 latent frames of 44*24 patches


def shapes(which: str) -> list[tuple[str, int, int, int]]:
    """(name, M tokens, K in, N out)."""
    if which == "14b":
        d, f = PRESETS["14b"].dit.dim, PRESETS["14b"].dit.ffn_dim
        return [("qkvo", TOKENS_14B, d, d), ("ffn.0", TOKENS_14B, d, f), ("ffn.2", TOKENS_14B, f, d)]
    d, f = PRESETS["tiny"].dit.dim, PRESETS["tiny"].dit.ffn_dim
    return [("qkvo", 192, d, d), ("ffn.0", 192, d, f), ("ffn.2", 192, f, d)]


class _OpTraffic(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor inputs and outputs (views move nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if torch.Tag.view_copy in func.tags or func.is_view or func in (torch.ops.aten.empty.memory_format,):
            return out
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if func._schema.is_mutable:  # out= / in-place: the written tensor is an argument, count it once
            outs = []
        self.ops += 1
        self.bytes += sum(t.numel() * t.element_size() for t in tensors + outs)
        return out


def eager_traffic(fn: Callable, *args: object) -> tuple[int, int]:
    with _OpTraffic() as mode:
        fn(*args)
    return mode.ops, mode.bytes


def fused_traffic(args: tuple) -> tuple[Callable, str, int]:
    """Compile `w8a8_expr` for these shapes; (compiled fn, scheduled kernels incl. the GEMM, bytes)."""
    from torch._inductor import metrics

    torch._dynamo.reset()
    metrics.reset()
    fn = torch.compile(w8a8_expr, fullgraph=True, dynamic=False)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit skips the codegen that is counted
        fn(*args)
    # scheduled nodes: the fused loops and the extern GEMM; generated_kernel_count: inductor's own counter
    return fn, f"{len(metrics.nodes_num_elem)}({metrics.generated_kernel_count})", metrics.num_bytes_accessed


def seconds(fn: Callable, *args: object, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=("tiny", "14b"), default=None, help="default: 14b on CUDA, tiny on CPU")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--linear", choices=("qkvo", "ffn.0", "ffn.2"), default=None, help="one linear only")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="activations (default: bf16 on CUDA, fp32 on CPU)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if cuda else "fp32")]
    # inductor counts bytes only while its metrics log is enabled (torch._inductor.compile_fx): enable it, quietly
    metrics_log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    metrics_log.addHandler(logging.NullHandler())
    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"W8A8 linear, eager vs fused, {dev_name}, activations {str(dtype)[6:]}, torch {torch.__version__}")
    print(f"{'linear':8} {'M*K*N':>18} {'kernels e/f(gen)':>16} {'MB e/f':>15} {'bytes/tok e/f':>15} "
          f"{'ms e/f':>15} {'speedup':>7} {'max|dy| / bound':>15}")
    g = torch.Generator().manual_seed(0)
    for name, m, k, n in shapes(a.shapes or ("14b" if cuda else "tiny")):
        if a.linear not in (None, name):
            continue
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(dev)
        sw = (torch.rand(n, generator=g) / 1000 + 1e-4).to(dev)
        b = torch.randn(n, generator=g).to(dev, dtype)
        x = torch.randn(m, k, generator=g).to(dev, dtype)
        args = (x, w, sw, b)
        e_ops, e_bytes = eager_traffic(linear_w8a8, *args)
        fn, f_ops, f_bytes = fused_traffic(args)
        ref, got = linear_w8a8(*args), fn(*args)
        # a quantized value differing by one step (ties or 1-ulp division differences) moves an output by
        # at most sx * 127 * sw; plus a few fp32 roundings of the epilogue
        xq_ref, sx = quantize_per_token_int8(x)
        bound = (sx * 127 * sw.float()[None, :]).amax() + 4 * 2.0**-23 * ref.float().abs().amax()
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-8 * ref.float().abs().amax()
        dy = float((got.float() - ref.float()).abs().max())
        t_e, t_f = seconds(linear_w8a8, *args, repeats=a.repeats), seconds(fn, *args, repeats=a.repeats)
        mb = f"{e_bytes / 1e6:.2f}/{f_bytes / 1e6:.2f}"
        print(f"{name:8} {f'{m}*{k}*{n}':>18} {f'{e_ops}/{f_ops}':>16} {mb:>15} "
              f"{f'{e_bytes // m}/{f_bytes // m}':>15} {f'{t_e * 1e3:.3f}/{t_f * 1e3:.3f}':>15} {t_e / t_f:>6.2f}x "
              f"{f'{dy:.2e}/{float(bound):.1e}':>15}")
        if cuda:  # the alternatives the int8 / Hopper choice is between
            parts = {"data": w, "scale": sw}
            wbf = dequantize(QuantType.INT8, parts, (n, k), None, dtype)
            t_w8a16 = seconds(lambda: F.linear(x, dequantize(QuantType.INT8, parts, (n, k), None, dtype), b),
                              repeats=a.repeats)  # as QuantLinear's w8a16 kernel
            t_bf16 = seconds(lambda: F.linear(x, wbf, b), repeats=a.repeats)
            line = f"{'':8} W8A16 (dequantize + bf16 GEMM) {t_w8a16 * 1e3:.3f} ms, bf16 GEMM {t_bf16 * 1e3:.3f} ms"
            if torch.cuda.get_device_capability() >= (8, 9) and k % 16 == 0 and n % 16 == 0:
                w8 = (w.float() / 127 * 448).to(torch.float8_e4m3fn)
                s8 = sw * 127 / 448
                t_fp8 = seconds(linear_fp8_rowwise, x, w8, s8, b, repeats=a.repeats)
                fp8c = torch.compile(linear_fp8_rowwise, fullgraph=True, dynamic=False)
                t_fp8c = seconds(fp8c, x, w8, s8, b, repeats=a.repeats)
                line += f", fp8 _scaled_mm eager {t_fp8 * 1e3:.3f} ms / compiled {t_fp8c * 1e3:.3f} ms"
            print(line)
    print("kernels e/f(gen): eager aten ops / inductor's scheduled kernels (fused loops + the extern GEMM) "
          "(inductor's generated_kernel_count); MB: bytes each reads and writes; "
          "bound: one int8 step of one input per output (see tests/test_qlinear.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
