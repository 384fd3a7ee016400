"""Bandwidth and throughput figures of a device, used by the planner to predict seconds per clip.

Named profiles hold spec-sheet (dense, no sparsity) tensor throughputs and a measured pinned H2D
bandwidth; `probe_profile` measures an unknown device in a few seconds instead.

    prof = get_profile("rtx4090"); prof.h2d_gbps  # 24.0
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceProfile:
    """Peak figures of one accelerator. Units: GB/s (1e9 B/s) and TFLOPS/TOPS (1e12 op/s)."""

    name: str
    h2d_gbps: float  # pinned host -> device copy bandwidth
    d2h_gbps: float  # device -> host (only KV write-back uses it)
    bf16_tflops: float  # dense bf16 tensor math, fp32 accumulate
    int8_tops: float  # dense int8 tensor math, int32 accumulate (0 = no int8 tensor cores)
    fp8_tflops: float  # dense fp8 e4m3 math, fp32 accumulate (0 = no fp8 tensor cores)
    disk_gbps: float = 3.0  # sequential read of a streamed unit from disk (NVMe)
    # Fraction of peak that real kernels reach at our shapes (M ~ 3k tokens, K ~ 5k): GEMMs of
    # this size run at 60-75 % of peak; SDPA/flash attention at 50-60 %.
    gemm_efficiency: float = 0.65
    attn_efficiency: float = 0.55

    def linear_tops(self, weight_format: str) -> float:
        """Effective op/s (in 1e12) of a quantized linear in `weight_format`."""
        fmt = weight_format.lower()
        if fmt == "int8" and self.int8_tops > 0:
            peak = self.int8_tops
        elif fmt == "fp8" and self.fp8_tflops > 0:
            peak = self.fp8_tflops
        else:  # bf16, int4/nf4 (dequantize then bf16 matmul), or no native path on this device
            peak = self.bf16_tflops
        return peak * self.gemm_efficiency

    def attention_tflops(self) -> float:
        """Effective bf16 attention throughput (1e12 FLOP/s)."""
        return self.bf16_tflops * self.attn_efficiency


# Spec-sheet dense figures (vendor whitepapers); H2D figures are measured pinned copies where
# PRIOR_ART.md §4 cites one (4090: 23.9-26.4 GB/s), otherwise the PCIe generation's usual ~75 %.
PROFILES: dict[str, DeviceProfile] = {
    "rtx4090": DeviceProfile("rtx4090", h2d_gbps=24.0, d2h_gbps=26.0, bf16_tflops=165.0, int8_tops=660.0, fp8_tflops=330.0),
    "rtx3090": DeviceProfile("rtx3090", h2d_gbps=24.0, d2h_gbps=24.0, bf16_tflops=71.0, int8_tops=284.0, fp8_tflops=0.0),
    "rtx5090": DeviceProfile("rtx5090", h2d_gbps=48.0, d2h_gbps=48.0, bf16_tflops=209.0, int8_tops=838.0, fp8_tflops=419.0),
    "l40s": DeviceProfile("l40s", h2d_gbps=24.0, d2h_gbps=24.0, bf16_tflops=362.0, int8_tops=733.0, fp8_tflops=733.0),
    "h100-pcie": DeviceProfile("h100-pcie", h2d_gbps=48.0, d2h_gbps=48.0, bf16_tflops=756.0, int8_tops=1513.0, fp8_tflops=1513.0),
}


def get_profile(name: str) -> DeviceProfile:
    """The named profile; UserError listing the known names otherwise.

    prof = get_profile("rtx4090")
    """
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise UserError(f"unknown device profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def probe_profile(device: str | None = None, seconds: float = 2.0) -> DeviceProfile:
    """Measure H2D bandwidth and matmul throughput of `device` (default: cuda if present, else cpu).

    prof = probe_profile()  # a few seconds; figures are already 'effective' (efficiency = 1)
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = dev.type == "cuda"
    budget = seconds / 3

    # H2D: 64 MiB pinned -> device (on CPU: a plain memcpy, which is what the CPU path does).
    src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=on_cuda)
    dst = torch.empty_like(src, device=dev)
    h2d = _rate(lambda: dst.copy_(src, non_blocking=True), src.numel(), dev, budget) / 1e9

    n = 2048 if on_cuda else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    bf16 = _rate(lambda: a @ a, 2 * n**3, dev, budget) / 1e12
    int8 = 0.0
    try:
        ai = torch.randint(-100, 100, (n, n), device=dev, dtype=torch.int8)
        int8 = _rate(lambda: torch._int_mm(ai, ai), 2 * n**3, dev, budget) / 1e12
    except RuntimeError as e:  # no int8 GEMM on this device/build
        log.debug("int8 probe failed: %s", e)
    name = f"probe:{torch.cuda.get_device_name(dev) if on_cuda else 'cpu'}"
    prof = DeviceProfile(
        name=name, h2d_gbps=h2d, d2h_gbps=h2d, bf16_tflops=bf16, int8_tops=int8, fp8_tflops=0.0,
        gemm_efficiency=1.0, attn_efficiency=0.8,
    )
    log.info("probed %s: H2D %.1f GB/s, bf16 %.2f TFLOPS, int8 %.2f TOPS", name, h2d, bf16, int8)
    return prof


def _rate(fn, work: float, dev, budget_s: float) -> float:
    """Work units per second of `fn`, timed for about `budget_s` after one warm-up call."""
    import torch

    fn()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= 3 and time.perf_counter() - t0 >= budget_s:
            break
        if n >= 1000:
            break
    sync()  # the timed calls are asynchronous on CUDA; the wall clock is only valid after this
    return n * work / max(time.perf_counter() - t0, 1e-9)
