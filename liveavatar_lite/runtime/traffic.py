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
