"""Memory traffic of the non-matmul work in one streaming unit, counted on the meta device.

The time prediction used to count only GEMM and attention FLOPs. But a 14B layer also moves many
gigabytes through unfused elementwise kernels: dtype casts, the AdaLN modulation, gated residual
adds, RoPE, the per-token activation quantization and the GEMM epilogues, and the KV (de)quantization.
On a 24 GB card that traffic takes longer than the int8 GEMMs. This module runs one unit forward
(a block, with or without its audio injector) on the meta device exactly as the runtime runs it on
a GPU: bf16 compute, the quantized linears' CUDA kernels, the KV storage dtype, complex64 RoPE,
a full ring. A dispatch mode then adds up the bytes read and written by every op that is not a
matmul, a view or an allocation. Attention is timed by its FLOPs (a fused kernel reads q/k/v once),
so `scaled_dot_product_attention` is not decomposed.

    unit_elementwise_bytes(PRESETS["14b"].dit, (704, 384), "int8", "fp8")  # (plain layer, inject layer)
"""
from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import DiTConfig, SampleConfig

_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
           _aten._int_mm.default, _aten._scaled_mm.default}
FREE = {_aten.empty.memory_format, _aten.empty_strided.default, _aten._unsafe_view.default, _aten.detach.default,
        _aten.lift_fresh.default, _aten.zeros.default}
KERNEL_FOR_FORMAT = {"int8": "w8a8", "fp8": "scaled_mm", "int4": "reference", "nf4": "reference", "bf16": "reference"}


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an op really touches: a broadcast (stride 0) input is read once, not once per element."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


class _Counter(TorchDispatchMode):
    """Adds up read + written bytes of every non-matmul, non-view op."""

    def __init__(self) -> None:
        super().__init__()
        self.elementwise = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in MATMULS or func in FREE or getattr(func, "is_view", False):
            return out
        mutated = {id(a) for a, arg in zip(args, func._schema.arguments)
                   if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write}
        read = sum(_nbytes(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) not in mutated)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        written = sum(_nbytes(o) for o in outs if isinstance(o, torch.Tensor))
        self.elementwise += read + written
        name = func.overloadpacket.__name__
        self.by_op[name] = self.by_op.get(name, 0) + read + written
        return out


class _FusedAttention(TorchFunctionMode):
    """Keeps `F.scaled_dot_product_attention` whole (a fused kernel on the GPU): returns its output
    shape without running the math fallback the meta device would decompose it into."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return func(*args, **(kwargs or {}))


@lru_cache(maxsize=64)
def unit_elementwise_bytes(cfg: DiTConfig, size: tuple[int, int], weight_format: str, kv_dtype: str,
                           sample: SampleConfig | None = None) -> tuple[int, int]:
    """(bytes for a plain layer, bytes for an audio-inject layer) of one denoising call at steady state.

    The tokens of one block at `size`, the ring full (the KV history of one clip), the sink of the
    ref frame + FramePack tokens, the linears in `weight_format` with their CUDA kernel.
    """
    return tuple(trace_unit(cfg, size, weight_format, kv_dtype, sample, inject)[0] for inject in (False, True))  # type: ignore[return-value]


def trace_unit(cfg: DiTConfig, size: tuple[int, int], weight_format: str, kv_dtype: str,
               sample: SampleConfig | None = None, inject: bool = False) -> tuple[int, dict[str, int]]:
    """(elementwise bytes, bytes per aten op) of one unit forward on the meta device."""
    sample = sample or SampleConfig()
    from ..artifact.qtypes import QuantType
    from ..model.audio_modules import AdaLayerNorm
    from ..model.dit import DiTContext, unit_forward
    from ..model.dit_blocks import CrossAttention, DiTBlock
    from ..model.kv import LayerKV
    from .kv_offload import STORE_DTYPES, OffloadRingLayer, OffloadSinkLayer
    from .plan_inputs import _token_counts
    from .qlinear import swap_linears

    dt, dev = torch.bfloat16, torch.device("meta")
    tpf, motion = _token_counts(size)
    frames = sample.frames_per_block
    t, ring, sink = frames * tpf, sample.latent_frames_per_clip * tpf, tpf + motion
    d, n, hd = cfg.dim, cfg.num_heads, cfg.head_dim
    with torch.device("meta"):
        block = DiTBlock(cfg).to(dt)
        modules: list[torch.nn.Module] = [block]
        inj = None
        if inject:
            inj = (AdaLayerNorm(d).to(dt), CrossAttention(d, n, cfg.eps).to(dt))
            modules += list(inj)
    fmt = QuantType(weight_format)
    if fmt.is_quantized:
        for m in modules:
            names = {name: (fmt, 128 if fmt is QuantType.INT4 else None)
                     for name, sub in m.named_modules() if isinstance(sub, torch.nn.Linear) and name}
            swap_linears(m, names, kernel=KERNEL_FOR_FORMAT[weight_format], bias_dtype=dt)
    store = STORE_DTYPES[kv_dtype]

    def views(tokens: int) -> dict[str, torch.Tensor]:
        v = {k: torch.empty(1, tokens, n, hd, dtype=store, device=dev) for k in ("k", "v")}
        if kv_dtype != "bf16":
            v |= {f"{k}_scale": torch.empty(1, tokens, n, 1, device=dev) for k in ("k", "v")}
        return v

    ring_state = SimpleNamespace(write_slot=ring - t, write_len=t, active=ring, kv_dtype=kv_dtype)
    sink_state = SimpleNamespace(length=sink, kv_dtype=kv_dtype)
    kv = LayerKV(ring=OffloadRingLayer(ring_state, views(ring), dt),  # type: ignore[arg-type]
                 sink=OffloadSinkLayer(sink_state, views(sink), dt))  # type: ignore[arg-type]
    ctx = DiTContext(
        e0=torch.empty(frames, 6, d, device=dev), e_head=torch.empty(frames, d, device=dev),
        text=torch.empty(1, cfg.text_len, d, dtype=dt, device=dev),
        freqs=torch.empty(t, 1, hd // 2, dtype=torch.complex64, device=dev),
        sink_freqs=torch.empty(sink, 1, hd // 2, dtype=torch.complex64, device=dev),
        audio_tokens=torch.empty(frames, cfg.num_audio_token + 1, d, dtype=dt, device=dev),
        audio_global=torch.empty(frames, d, dtype=dt, device=dev), grid=(frames, 1, tpf), la_roundings=True,
    )
    x = torch.empty(1, t, d, dtype=dt, device=dev)
    counter = _Counter()
    with torch.no_grad(), _FusedAttention(), counter:
        unit_forward(block, inj, x, ctx, kv)
    return counter.elementwise, counter.by_op


# ------------------------------------------------------------------ the fused path, kernel by kernel

def fused_unit_traffic(cfg: DiTConfig, size: tuple[int, int], weight_format: str, kv_dtype: str,
                       sample: SampleConfig | None = None, inject: bool = False,
                       int8_kernel: str = "w8a8") -> dict[str, int]:
    """Bytes read + written per fused kernel of one unit's denoising call at steady state (the ring
    full), when each unit runs as fused graphs (`compile` on) with the text K/V kept per prompt.

    Counted from the tensors each kernel must touch once, not traced: one block of `t` tokens, width
    `d`, FFN width `f`. The residual stream stays fp32 between kernels (4 bytes), the GEMMs' inputs
    and outputs are as the linear's kernel needs them (W8A8 / fp8: 8-bit activations + an fp32
    per-token scale, made by the kernel before the GEMM; the weight scale, bias and (FFN) GELU in
    the GEMM's epilogue, bf16 out; W8A16, int4, nf4: one pass dequantizing each weight to bf16).
    As with the traced count, GEMMs (timed by FLOPs) and attention (a fused kernel, timed by FLOPs)
    are not in it. Kernels (names are the keys):

    * norm1_mod_quant: LayerNorm + AdaLN modulation of x, quantized for q/k/v (one input, 3 GEMMs)
    * qk_norm_rope_kv_write: q/k RMSNorm + real RoPE, q out; k/v written into the ring in its dtype
    * kv_gather: the history (ring) + sink keys/values concatenated for attention, the sink's keys
      re-RoPE'd, an 8-bit ring dequantized in the same pass (never a separate pass over the ring)
    * attn_out_quant / cross_out_quant: attention outputs quantized for the o projections
    * residual1_norm3_quant, residual2_norm2_mod_quant, residual3: gated residual adds, each
      fused with the norm + quantization that follows it
    * cross_q_norm: the cross-attention q RMSNorm (its K/V: once per prompt, not per call)
    * ffn_gelu_quant: the FFN hidden (GELU) quantized for ffn.2
    * weight_dequant: W8A16 / int4 / nf4 only
    * inject_*: the audio injector of an inject layer (AdaLN, q norm, output quantize, residual)
    """
    sample = sample or SampleConfig()
    from .plan_inputs import _token_counts

    tpf, motion = _token_counts(size)
    t = sample.frames_per_block * tpf
    keys = sample.latent_frames_per_clip * tpf + tpf + motion  # the ring (this block included) + sink
    d, f, n = cfg.dim, cfg.ffn_dim, cfg.num_heads
    kernel = int8_kernel if weight_format == "int8" else KERNEL_FOR_FORMAT.get(weight_format, "reference")
    eight_bit_in = kernel in ("w8a8", "scaled_mm")
    bf16, fp32 = 2, 4

    def gemm_in(k: int) -> int:  # what a kernel writes for a GEMM over [t, k] to read
        return t * k + fp32 * t if eight_bit_in else bf16 * t * k

    kv_item = 2 if kv_dtype == "bf16" else 1
    kv_scales = 0 if kv_dtype == "bf16" else 2 * fp32 * n  # per token: one fp32 scale per head for K and V
    stored_per_token = 2 * d * kv_item + kv_scales
    x = fp32 * t * d  # the residual stream
    y = bf16 * t * d  # a GEMM's bf16 output
    k: dict[str, int] = {
        "norm1_mod_quant": x + gemm_in(d),
        "qk_norm_rope_kv_write": 3 * y + y + t * stored_per_token,
        "kv_gather": keys * stored_per_token + 2 * bf16 * keys * d,
        "attn_out_quant": y + gemm_in(d),
        "residual1_norm3_quant": x + y + x + gemm_in(d),
        "cross_q_norm": 2 * y,
        "cross_out_quant": y + gemm_in(d),
        "residual2_norm2_mod_quant": x + y + x + gemm_in(d),
        "ffn_gelu_quant": bf16 * t * f + (gemm_in(f) if eight_bit_in else bf16 * t * f),
        "residual3": x + y + x,
    }
    weights = 6 * d * d + 2 * d * f  # self q,k,v,o, cross q,o, FFN (cross k,v: once per prompt)
    if inject:
        k |= {"inject_adanorm_quant": x + gemm_in(d), "inject_q_norm": 2 * y,
              "inject_out_quant": y + gemm_in(d), "inject_residual": x + y + x}
        weights += 2 * d * d
    if kernel not in ("w8a8", "scaled_mm") and weight_format != "bf16":
        stored = {"int8": 1.0, "int4": 0.5, "nf4": 0.5}.get(weight_format, 2.0)
        k["weight_dequant"] = int(weights * (stored + bf16))  # read the stored weight, write bf16
    return k


@lru_cache(maxsize=64)
def fused_elementwise_bytes(cfg: DiTConfig, size: tuple[int, int], weight_format: str, kv_dtype: str,
                            sample: SampleConfig | None = None, int8_kernel: str = "w8a8") -> tuple[int, int]:
    """(plain layer, audio-inject layer) bytes of the fused path (`fused_unit_traffic` summed)."""
    return tuple(sum(fused_unit_traffic(cfg, size, weight_format, kv_dtype, sample, inj, int8_kernel).values())
                 for inj in (False, True))  # type: ignore[return-value]
