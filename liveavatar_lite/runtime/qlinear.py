"""Quantized linear layers, one per stored QuantType, and the module swap that installs them.

`QuantLinear` holds a weight's stored parts (`qtypes.part_specs`) as buffers named
`weight_<role>` (weight_data, weight_scale, ...), so the runtime can bind them to views of a
streamed unit buffer. Kernels, picked per call from the device and the qtype:

| qtype | CUDA                                                                   | reference (CPU, tests)        |
|-------|------------------------------------------------------------------------|-------------------------------|
| int8  | W8A8: per-token dynamic activation scale + `torch._int_mm` (int32 acc);| dequantize + `F.linear`       |
|       | inside `torch.compile` one functional expression (`w8a8_expr`) whose   |                               |
|       | quantize prologue and scale epilogue inductor fuses; "w8a8_fused":     |                               |
|       | that expression compiled on its own (no unit graph needed);            |                               |
|       | W8A16 (dequantize + matmul) when M <= 16 or K/N not multiples of 8,    |                               |
|       | and on Hopper (sm_90), where `_int_mm` runs at under half bf16's rate  |                               |
| fp8   | `torch._scaled_mm` with row-wise scales (per-token x, per-channel w)   | dequantize + `F.linear`       |
|       | on sm_89+, never per-tensor activation scales; dequantize otherwise.   |                               |
|       | Token counts that are not a multiple of 16 are padded with zero rows   |                               |
| int4  | dequantize into bf16 + matmul                                          | dequantize + `F.linear`       |
| nf4   | bitsandbytes' dequantize_4bit kernel + matmul (dequantize without bnb) | dequantize + `F.linear`       |

    swap_linears(dit, {"blocks.0.ffn.0": (QuantType.INT8, None)}); dit.blocks[0].ffn[0].weight_data
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..artifact.qtypes import (
    FP8_MAX,
    INT8_QMAX,
    NF4_BLOCKSIZE,
    QuantType,
    dequantize,
    nf4_code,
    part_specs,
)
from ..errors import first_line

log = logging.getLogger(__name__)

KERNELS = ("auto", "reference", "w8a8", "w8a8_fused", "w8a16", "scaled_mm", "bnb")


def part_attr(role: str) -> str:
    """Buffer name of a stored part: 'data' -> 'weight_data'."""
    return f"weight_{role}"


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as `qtype` parts. Build on meta; the runtime binds the buffers.

    kernel: "auto" (per device, table above), or force one: "reference" (dequantize + F.linear),
    "w8a8" (int8 `_int_mm`), "w8a8_fused" (the same, its quantize and epilogue fused by a standalone
    `torch.compile`), "w8a16", "scaled_mm" (fp8), "bnb" (nf4 via bitsandbytes).
    """

    def __init__(self, in_features: int, out_features: int, qtype: QuantType, group_size: int | None = None,
                 bias: bool = True, bias_dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "meta",
                 kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.qtype, self.group_size, self.kernel = QuantType(qtype), group_size, kernel
        specs = part_specs(self.qtype, (out_features, in_features), group_size)
        self.roles = tuple(p.role for p in specs)
        for p in specs:
            self.register_buffer(part_attr(p.role), torch.empty(p.shape, dtype=p.dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    def parts(self) -> dict[str, Tensor]:
        """role -> the bound stored tensor."""
        return {role: getattr(self, part_attr(role)) for role in self.roles}

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The logical weight [out, in] in `dtype` (qtypes' reference dequantizer)."""
        return dequantize(self.qtype, self.parts(), (self.out_features, self.in_features), self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel_on(x.device)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [..., K] -> [M, K]
        y = None
        try:
            if kernel == "w8a8" and _int_mm_ok(x2, self.out_features):
                y = linear_w8a8(x2, self.weight_data, self.weight_scale, self.bias)
            elif kernel == "w8a8_fused" and _int_mm_ok(x2, self.out_features):
                y = linear_w8a8_fused(x2, self.weight_data, self.weight_scale, self.bias)
            elif kernel == "scaled_mm" and _scaled_mm_ok(x2, self.out_features):
                y = linear_fp8_rowwise(x2, self.weight_data, self.weight_scale, self.bias)
            elif kernel == "bnb":
                y = F.linear(x2, _bnb_dequant_nf4(self, x2.dtype), _cast(self.bias, x2.dtype))
        except RuntimeError as e:  # a kernel this torch build / GPU lacks: fall back for good, loudly
            if self.kernel != "auto":
                raise
            log.warning("%s kernel failed (%s); using dequantize + matmul for this layer", kernel, first_line(e))
            self.kernel = "reference"
        if y is None:  # reference / w8a16 / shapes the fast kernels refuse: dequantize then matmul
            y = F.linear(x2, self.dequantized(x2.dtype), _cast(self.bias, x2.dtype))
        return y.reshape(*lead, self.out_features)  # [M, N] -> [..., N]

    def kernel_on(self, device: torch.device) -> str:
        """The kernel this layer runs on `device` (its forced one, or the "auto" pick per the table;
        shapes the fast kernels refuse still fall back per call)."""
        if self.kernel != "auto":
            return self.kernel
        if device.type != "cuda":
            return "reference"
        if self.qtype is QuantType.INT8:
            # Hopper: cuBLASLt's int8 GEMM ran at 0.37-0.47x of bf16 at the DiT's shapes (266-385 vs
            # 720-814 TFLOP/s, H100 80GB HBM3, torch 2.11, 2026-11-26), so dequantizing to bf16 wins there;
            # chosen by architecture, not by timing, so the same machine always renders the same frames
            return "w8a16" if _int8_gemm_slow(device) else "w8a8"
        if self.qtype is QuantType.FP8 and torch.cuda.get_device_capability(device) >= (8, 9):
            return "scaled_mm"
        if self.qtype is QuantType.NF4 and _has_bnb():
            return "bnb"
        return "reference"

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features}, {self.out_features}, {self.qtype.value}{g}, kernel={self.kernel}"


def linear_kernels(root: nn.Module, device: torch.device | str) -> dict[str, int]:
    """How many quantized linears under `root` run each kernel on `device` ({"w8a8": 280, ...}):
    what `bench speed` and telemetry can print beside the attention kernel."""
    counts: dict[str, int] = {}
    for m in root.modules():
        if isinstance(m, QuantLinear):
            k = m.kernel_on(torch.device(device))
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def _int8_gemm_slow(device: torch.device) -> bool:
    """Whether `_int_mm` is slower than a bf16 GEMM here (sm_90, Hopper: measured; see kernel_on)."""
    return torch.cuda.get_device_capability(device)[0] == 9


def _cast(b: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if b is None else b.to(dtype)


def _int_mm_ok(x2: Tensor, n: int) -> bool:
    """cuBLASLt int8 GEMM limits: M > 16 and K, N multiples of 8 (CPU has no limits)."""
    if x2.device.type != "cuda":
        return True
    return x2.shape[0] > 16 and x2.shape[1] % 8 == 0 and n % 8 == 0


def _scaled_mm_ok(x2: Tensor, n: int) -> bool:
    """fp8 `_scaled_mm` needs K and N divisible by 16 (M too, which `linear_fp8_rowwise` pads)."""
    return x2.shape[1] % 16 == 0 and n % 16 == 0


FP8_ROW_MULTIPLE = 16  # _scaled_mm's granularity for M; e.g. 2967 tokens at 688*368 are padded to 2976


def row_absmax(x2: Tensor) -> Tensor:
    """max |x| per row, fp32 [M, 1]: one reduction over x as stored (no |x| or fp32 copy of it)."""
    return torch.linalg.vector_norm(x2, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)


def quantize_per_token_int8(x2: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M, 1]), symmetric per row (token).

    The same values as `round(x.float() / (absmax / 127))`, with fewer passes over x (this runs on
    every linear's input): the absmax is one reduction, the division widens x itself.
    """
    scale = row_absmax(x2).clamp_min(1e-12) / INT8_QMAX  # [M, 1]
    q = torch.div(x2, scale).round_().clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)  # fp32 math, as x.float() / s
    return q, scale


def w8a8_expr(x2: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 as one functional expression, the same math as `linear_w8a8`, written for inductor.

    Under `torch.compile` the per-token absmax, the division, round, clamp and int8 cast become one
    kernel (fused with whatever produced x), the GEMM stays `_int_mm`, and the scales, bias and the
    cast to x's dtype one epilogue kernel: per token ~2K (x, bf16) + K (xq) + K (GEMM read) + 4N
    (int32 out) + 4N + 2N (epilogue) bytes, against ~30K + 26N for `linear_w8a8` run eagerly.
    """
    sx = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / INT8_QMAX  # [M, 1], exact absmax
    xq = (x2.float() / sx).round().clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)  # [M, K]
    y = torch._int_mm(xq, w_int8.t()) * sx * w_scale.float()[None, :]  # int32 [M, N] -> fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


@functools.cache
def _compiled_w8a8() -> Callable[..., Tensor]:
    return torch.compile(w8a8_expr, fullgraph=True)  # built once, on first use; recompiles per shape set


def linear_w8a8_fused(x2: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`w8a8_expr` compiled on its own: two fused kernels around the GEMM (inside a compiled unit
    graph `linear_w8a8` already traces to the same expression)."""
    if torch.compiler.is_compiling():
        return w8a8_expr(x2, w_int8, w_scale, bias)
    return _compiled_w8a8()(x2, w_int8, w_scale, bias)


def linear_w8a8(x2: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8: per-token int8 x [M, K] times per-channel int8 W [N, K] with int32 accumulation.

    y = (xq @ Wq^T) * sx[:, None] * sw[None, :] + b, in fp32 in that order, rounded once to x's dtype.
    Each step reads its input once and the last writes x's dtype directly (no int32 -> fp32 pass,
    no fp32 result to cast): the epilogue's traffic drops from ~42 to ~26 bytes per output.
    Traced by `torch.compile` it is `w8a8_expr` (functional, so inductor fuses it).
    """
    if torch.compiler.is_compiling():
        return w8a8_expr(x2, w_int8, w_scale, bias)
    xq, sx = quantize_per_token_int8(x2)
    acc = torch._int_mm(xq, w_int8.t())  # [M, K] @ [K, N] (column-major view of W) -> int32 [M, N]
    y = torch.mul(acc, sx)  # int32 * fp32 -> fp32 [M, N]
    out = torch.empty(y.shape, dtype=x2.dtype, device=y.device)
    if bias is None:
        return torch.mul(y, w_scale.float()[None, :], out=out)
    y.mul_(w_scale.float()[None, :])
    return torch.add(y, bias.float(), out=out)


def linear_fp8_rowwise(x2: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """FP8 e4m3 with row-wise scales: per-token activation scale [M, 1], per-channel weight [1, N].

    M not a multiple of 16 is padded with zero rows (their outputs are dropped); only the fp8 copy
    is padded, so the padding costs one small allocation, not a pass over x.
    """
    m, k = x2.shape
    mp = -(-m // FP8_ROW_MULTIPLE) * FP8_ROW_MULTIPLE
    sx = row_absmax(x2).clamp_min(1e-12) / FP8_MAX  # [M, 1]
    q = torch.div(x2, sx).clamp_(-FP8_MAX, FP8_MAX)  # fp32 [M, K], as x.float() / sx
    if mp == m:
        xq = q.to(torch.float8_e4m3fn)
    else:  # zero rows (scale 1) below the tokens: their outputs are dropped
        xq = torch.zeros(mp, k, dtype=torch.float8_e4m3fn, device=x2.device)
        xq[:m] = q
        sx = torch.cat([sx, sx.new_ones(mp - m, 1)])
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=sx, scale_b=w_scale.float()[None, :],
                         out_dtype=torch.bfloat16)  # row-wise scaling needs a bf16 output
    y = y[:m]  # [Mp, N] -> [M, N]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _bnb_dequant_nf4(m: QuantLinear, dtype: torch.dtype) -> Tensor:
    """nf4 weight via bitsandbytes' dequantize kernel (our nf4 layout is bnb's, blocksize 64)."""
    import bitsandbytes.functional as bnbf

    data, absmax = m.weight_data, m.weight_absmax
    code = nf4_code(data.device)  # once per device (a per-call torch.tensor(..., device) is a host sync)
    state = bnbf.QuantState(absmax=absmax.float(), shape=torch.Size((m.out_features, m.in_features)), code=code,
                            blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=dtype)
    return bnbf.dequantize_4bit(data, state)


def swap_linears(root: nn.Module, specs: Mapping[str, tuple[QuantType, int | None]], kernel: str = "auto",
                 bias_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace each `nn.Linear` named in `specs` (module path -> (qtype, group size)) by a meta
    QuantLinear, by assignment in its parent module. Non-quantized qtypes are left alone.
    Returns the swapped module names.

        swap_linears(dit, {"blocks.0.self_attn.q": (QuantType.INT8, None)})
    """
    swapped = []
    for name, (qtype, group) in specs.items():
        if not QuantType(qtype).is_quantized:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        new = QuantLinear(old.in_features, old.out_features, qtype, group, bias=old.bias is not None,
                          bias_dtype=bias_dtype, kernel=kernel)
        setattr(parent, child, new)  # nn.Module.__setattr__ re-registers the child module
        swapped.append(name)
    return swapped
