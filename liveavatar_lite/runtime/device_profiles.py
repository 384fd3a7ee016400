"""Bandwidth and throughput figures of a device, used by the planner to predict seconds per clip.

Named profiles hold spec-sheet (dense, no sparsity) tensor throughputs, memory bandwidth and a
measured pinned H2D bandwidth; `probe_profile` measures an unknown device in a few seconds instead,
timing the kernels production runs. `resolve_profile` is the one rule `plan` and `generate` share.

    prof = get_profile("rtx4090"); prof.h2d_gbps  # 24.0
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger(__name__)

# What the runtime can run, as the planner prices it (`runtime/attention.py`, `--attention`; the
# compile mode of `dit_runtime`: fused graphs or eager units).
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "cudnn", "efficient", "math", "sage")
COMPILE_CHOICES = ("auto", "on", "off")
# The streaming VAE decoder's share of the bf16 tensor peak where no rate was measured on the card:
# the torch decoder (bf16, real Wan2.1 shapes) took 0.73 s for one clip's 12 latents at 704*384 on
# an H100 SXM (BENCHMARKS.md, "GPU: the 14B DiT ...", 2026-11-26): 2.91 + 11 x 9.13 = 103.3 TFLOP
# (LIVEAVATAR.md §3) in 0.73 s = 141 TFLOP/s = 14.3 % of its 989 TFLOP/s. Assumed to carry over to
# other cards (an extrapolation: cuDNN's 3-D convolutions, not the tensor peak, bound it).
VAE_MEASURED_TFLOPS_H100 = 103.3 / 0.73
VAE_EFFICIENCY = VAE_MEASURED_TFLOPS_H100 / 989.0


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
    mem_gbps: float = 0.0  # device memory bandwidth: what unfused elementwise kernels are bound by
    # Fraction of peak that real kernels reach at our shapes (M ~ 3k tokens, K ~ 5k): GEMMs of
    # this size run at 60-75 % of peak; SDPA/flash attention at 50-60 %; elementwise kernels at
    # 75-85 % of the memory bandwidth. A probed profile measures the real kernels: efficiency 1.
    # Measured op/s of the int4 linear (dequantize + bf16 GEMM) where probed; 0: priced at bf16's rate.
    # On an H100 it ran at 0.33-0.38x of bf16 (2026-11-26): the dequantize's kernel launches, not its
    # bytes, bound it, and a plan at bf16's rate predicted 6.8 s per clip where the card took 10.3 s.
    int4_tops: float = 0.0
    gemm_efficiency: float = 0.65
    attn_efficiency: float = 0.55
    mem_efficiency: float = 0.8
    # Attention kernels' effective bf16 TFLOP/s at head dim 128, non-causal, long sequences, from the
    # kernels' published charts ((backend, TFLOP/s) pairs; already effective: no efficiency applied).
    # A backend without a figure is priced at bf16_tflops x attn_efficiency (the generic figure; a
    # probed profile's attn_efficiency makes that the measured SDPA rate); "sage" needs a figure.
    attention_rates: tuple[tuple[str, float], ...] = ()
    attention_pick: str = ""  # what "auto" pins and unpinned SDPA picks here ("": the generic figure)
    # The int8 linear the runtime runs here (`qlinear`, by architecture): "w8a8" (int8 activations,
    # `_int_mm`) or "w8a16" (weights dequantized to bf16; Hopper, where `_int_mm` measured slow).
    int8_kernel: str = "w8a8"
    vae_tflops: float = 0.0  # the VAE decoder's effective rate where measured; 0: bf16 x VAE_EFFICIENCY

    def linear_tops(self, weight_format: str) -> float:
        """Effective op/s (in 1e12) of a quantized linear in `weight_format`."""
        fmt = weight_format.lower()
        if fmt == "int8" and self.int8_tops > 0:
            peak = self.int8_tops
        elif fmt == "fp8" and self.fp8_tflops > 0:
            peak = self.fp8_tflops
        elif fmt in ("int4", "nf4") and self.int4_tops > 0:
            peak = self.int4_tops
        else:  # bf16, int4/nf4 (dequantize then bf16 matmul), or no native path on this device
            peak = self.bf16_tflops
        return peak * self.gemm_efficiency

    def attention_tflops(self, backend: str = "sdpa") -> float:
        """Effective attention throughput (1e12 FLOP/s) of `backend` (ATTENTION_CHOICES): "auto"
        and "sdpa" are what this architecture picks (`attention_pick`); a backend with a chart
        figure gets it; any other the generic bf16_tflops x attn_efficiency. UserError for "sage"
        without a figure (an 8-bit kernel is not priced at a bf16 guess)."""
        backend = resolve_attention_name(backend, self)
        rates = dict(self.attention_rates)
        if backend in rates:
            return rates[backend]
        if backend == "sage":
            raise UserError(f"device profile {self.name} has no rate for --attention sage; "
                            f"choose one of {', '.join(sorted(rates) or ['sdpa'])}")
        return self.bf16_tflops * self.attn_efficiency

    def vae_rate(self) -> float:
        """Effective op/s (in 1e12) of the streaming VAE decoder on this device."""
        return self.vae_tflops if self.vae_tflops > 0 else self.bf16_tflops * VAE_EFFICIENCY

    def memory_gbps(self) -> float:
        """Effective bandwidth (1e9 B/s) of elementwise kernels (0: not known, not counted)."""
        return self.mem_gbps * self.mem_efficiency


def resolve_attention_name(backend: str, profile: DeviceProfile) -> str:
    """The backend a request runs as on `profile`: "auto" and "sdpa" -> the architecture's pick."""
    if backend not in ATTENTION_CHOICES:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if backend in ("auto", "sdpa"):
        return profile.attention_pick or "sdpa"
    return backend


# Spec-sheet dense figures (vendor whitepapers); H2D figures are measured pinned copies where
# PRIOR_ART.md §4 cites one (4090: 23.9-26.4 GB/s), otherwise the PCIe generation's usual ~75 %;
# memory bandwidth from the spec sheets (4090: 1008 GB/s GDDR6X).
PROFILES: dict[str, DeviceProfile] = {
    # Attention (SPEED.md's table, from SageAttention's published kernel charts on an RTX 4090):
    # FlashAttention-2 ~160-163 TFLOP/s (torch's SDPA picks it on sm_89), SageAttention 1 (int8
    # Q.K^T) ~320. Not 55 % of 165 (= 91), the generic figure these replaced.
    "rtx4090": DeviceProfile("rtx4090", h2d_gbps=24.0, d2h_gbps=26.0, bf16_tflops=165.0, int8_tops=660.0,
                             fp8_tflops=330.0, mem_gbps=1008.0,
                             attention_rates=(("flash", 160.0), ("sage", 320.0)), attention_pick="flash"),
    "rtx3090": DeviceProfile("rtx3090", h2d_gbps=24.0, d2h_gbps=24.0, bf16_tflops=71.0, int8_tops=284.0,
                             fp8_tflops=0.0, mem_gbps=936.0),
    "rtx5090": DeviceProfile("rtx5090", h2d_gbps=48.0, d2h_gbps=48.0, bf16_tflops=209.0, int8_tops=838.0,
                             fp8_tflops=419.0, mem_gbps=1792.0),
    "l40s": DeviceProfile("l40s", h2d_gbps=24.0, d2h_gbps=24.0, bf16_tflops=362.0, int8_tops=733.0,
                          fp8_tflops=733.0, mem_gbps=864.0),
    # int8 at bf16's rate: on Hopper int8 weights run dequantized to bf16 (qlinear: `_int_mm` measured
    # at under half bf16's rate on an H100, 2026-11-26); int4 at the 0.35x of bf16 measured there
    "h100-pcie": DeviceProfile("h100-pcie", h2d_gbps=48.0, d2h_gbps=48.0, bf16_tflops=756.0, int8_tops=756.0,
                               int4_tops=265.0,
                               fp8_tflops=1513.0, mem_gbps=2039.0, int8_kernel="w8a16"),
    # The card the GPU campaigns ran on (NVIDIA H100 80GB HBM3, SXM), 2026-11-26: H2D 55 GB/s pinned
    # (SPEED.md); bf16 GEMMs at one block of tokens 708-813 of 989 TFLOP/s (BENCHMARKS.md's GEMM
    # table: efficiency 0.77); int8 runs W8A16, whose eager forward (dequantize + bf16 GEMM) measured
    # 368-382 TFLOP/s (int8_tops 487 x 0.77 = 375; the fused path prices its GEMM at bf16's rate and
    # its dequantize as traffic); int4 linears measured 264 TFLOP/s (= 343 x 0.77); the torch VAE
    # decoder 141 TFLOP/s. Spec: 3350 GB/s HBM3, fp8 1979.
    # Attention (SPEED.md, FlashAttention-3's charts): FA2 ~339, cuDNN / FA3 ~650 (SDPA's pick).
    "h100": DeviceProfile("h100", h2d_gbps=55.0, d2h_gbps=55.0, bf16_tflops=989.0, int8_tops=487.0,
                          int4_tops=343.0, fp8_tflops=1979.0, mem_gbps=3350.0, gemm_efficiency=0.77,
                          attention_rates=(("flash", 339.0), ("cudnn", 650.0)), attention_pick="cudnn",
                          int8_kernel="w8a16", vae_tflops=VAE_MEASURED_TFLOPS_H100),
}


def get_profile(name: str) -> DeviceProfile:
    """The named profile; UserError listing the known names otherwise.

    prof = get_profile("rtx4090")
    """
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise UserError(f"unknown device profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def known_profile(gpu_name: str) -> DeviceProfile | None:
    """The named profile of a GPU by its CUDA name ("NVIDIA GeForce RTX 4090" -> rtx4090), or None."""
    flat = gpu_name.lower().replace(" ", "").replace("-", "")
    for key, prof in PROFILES.items():
        if key.replace("-", "") in flat:
            return prof
    return None


def resolve_profile(name: str | None, device: str | None = None) -> tuple[DeviceProfile, str]:
    """The profile `plan` and `generate` use, and a note for the user ("" when there is none to give).

    A name wins; otherwise a GPU with a named profile uses it (no probe: its figures are the stable
    ones the layout was chosen with), an unknown GPU is probed, and a machine without a GPU probes
    its CPU (then the times are the CPU's).

        prof, note = resolve_profile(None, "cuda")  # rtx4090 on an RTX 4090
    """
    if name:
        return get_profile(name), ""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        known = known_profile(gpu)
        if known is not None:
            return known, ""
        return probe_profile(str(dev)), f"note: {gpu} has no named profile; its figures were probed"
    return probe_profile("cpu", seconds=1.0), ("note: no GPU here, so times are for this CPU; "
                                               "pass --device-profile rtx4090 (or another) to predict a GPU")


def probe_profile(device: str | None = None, seconds: float = 2.0) -> DeviceProfile:
    """Measure `device` (default: cuda if present, else cpu) running what production runs.

    The figures are already effective (efficiencies 1): pinned H2D and D2H copies of exact-size
    host buffers; an elementwise kernel's bandwidth; and, at a production-like shape (one block of
    tokens x 5120 x 5120 on a GPU), the quantized linears' real forward (`QuantLinear`: the int8 one
    quantizes the activations per token and runs `_int_mm` against the weight's column-major view;
    the fp8 one runs `_scaled_mm` with row-wise scales, on sm_89+), bf16 GEMM and SDPA attention.

        prof = probe_profile()  # a few seconds
    """
    import torch
    import torch.nn.functional as F

    from ..artifact.qtypes import QuantType
    from .pinned import host_buffer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = dev.type == "cuda"
    budget = seconds / 7
    dtype = torch.bfloat16 if on_cuda else torch.float32  # the runtime's compute dtype there

    # Copies: 64 MiB exact-size pinned host buffer <-> device (on CPU: memcpys, what the CPU path does).
    host = host_buffer(64 << 20, pin=on_cuda)
    dst = torch.empty_like(host, device=dev)
    h2d = _rate(lambda: dst.copy_(host, non_blocking=True), host.numel(), dev, budget) / 1e9
    d2h = _rate(lambda: host.copy_(dst, non_blocking=True), host.numel(), dev, budget) / 1e9
    big = torch.empty((256 if on_cuda else 16) << 20, dtype=torch.uint8, device=dev).view(torch.bfloat16)
    mem = _rate(lambda: big.mul_(1.0), 2 * big.numel() * 2, dev, budget) / 1e9  # read + write

    m, k = (3168, 5120) if on_cuda else (256, 256)  # one 704*384 block of tokens; the 14B width
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(k, k, device=dev, dtype=dtype) / k**0.5
    flops = 2 * m * k * k
    bf16 = _rate(lambda: F.linear(x, w), flops, dev, budget) / 1e12
    int8 = _linear_rate(QuantType.INT8, x, dev, budget, flops)
    fp8 = 0.0
    if on_cuda and torch.cuda.get_device_capability(dev) >= (8, 9):
        fp8 = _linear_rate(QuantType.FP8, x, dev, budget, flops)
    int4 = _linear_rate(QuantType.INT4, x, dev, budget, flops)
    heads, keys = (40, 15312) if on_cuda else (2, 1024)
    q = torch.randn(1, heads, m, 128, device=dev, dtype=dtype)
    kv = torch.randn(1, heads, keys, 128, device=dev, dtype=dtype)
    attn = _rate(lambda: F.scaled_dot_product_attention(q, kv, kv), 4 * m * keys * heads * 128, dev, budget) / 1e12
    name = f"probe:{torch.cuda.get_device_name(dev) if on_cuda else 'cpu'}"
    prof = DeviceProfile(
        name=name, h2d_gbps=h2d, d2h_gbps=d2h, bf16_tflops=bf16, int8_tops=int8, fp8_tflops=fp8, mem_gbps=mem,
        int4_tops=int4,
        gemm_efficiency=1.0, attn_efficiency=attn / bf16 if bf16 > 0 else 1.0, mem_efficiency=1.0,
    )
    log.info("probed %s: H2D %.1f GB/s, memory %.0f GB/s, bf16 %.2f TFLOPS, int8 linear %.2f TOPS, fp8 linear "
             "%.2f TFLOPS, int4 linear %.2f TOPS, attention %.2f TFLOPS", name, h2d, mem, bf16, int8, fp8, int4, attn)
    return prof


def _linear_rate(qtype, x, dev, budget: float, flops: float) -> float:  # type: ignore[no-untyped-def]
    """op/s (1e12) of a `QuantLinear` forward with random stored parts; 0 when the kernel fails here."""
    import torch

    from .qlinear import QuantLinear

    k = x.shape[1]
    int4 = qtype.value == "int4"
    lin = QuantLinear(k, k, qtype, group_size=128 if int4 else None, device=dev, bias_dtype=x.dtype)
    with torch.no_grad():
        data = lin.weight_data  # int8 / fp8 [k, k]; int4: packed uint8 [k, k/2]
        codes = torch.randint(0, 256, data.shape, device=dev, dtype=torch.int16) if int4 else \
            torch.randint(-100, 100, data.shape, device=dev, dtype=torch.int16)
        data.copy_(codes.to(data.dtype))
        lin.weight_scale.fill_(1.0 / (127 * k**0.5))
        if int4:
            lin.weight_zero.fill_(7.5)
        lin.bias.zero_()
    try:
        with torch.no_grad():
            return _rate(lambda: lin(x), flops, dev, budget) / 1e12
    except RuntimeError as e:  # no such kernel on this device/build
        log.debug("%s probe failed: %s", qtype.value, e)
        return 0.0


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
