"""One quantizer per QuantType: fp32 weight -> the stored parts `liveavatar_lite.artifact.qtypes` dequantizes.

Pure functions, no I/O. Each returns {role: tensor} with exactly the dtypes and shapes of
`qtypes.part_specs` (checked by `quantize_tensor`).

    parts = quantize_tensor(QuantType.INT4, w_fp32, group_size=128)   # {"data", "scale", "zero"}
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from liveavatar_lite.artifact.qtypes import (
    FP8_MAX,
    INT8_QMAX,
    NF4_BLOCKSIZE,
    NF4_CODE,
    QuantType,
    part_specs,
)

Parts = dict[str, torch.Tensor]

_TINY = 1e-12  # floor for scales of all-zero rows/groups, so zeros stay exact zeros


def quantize_bf16(w: torch.Tensor, group_size: int | None) -> Parts:
    return {"data": w.to(torch.bfloat16).contiguous()}


def quantize_fp32(w: torch.Tensor, group_size: int | None) -> Parts:
    return {"data": w.to(torch.float32).contiguous()}


def _row_chunks(n_rows: int, row_len: int) -> range:
    """Row starts of chunks of about 256k elements: the fp32 temporaries stay in cache (5x faster on CPU)."""
    return range(0, n_rows, max(1, (1 << 18) // max(1, row_len)))


def _absmax_rows(w: torch.Tensor) -> torch.Tensor:
    """max |w| per row in fp32; NaN/Inf propagate (amax/amin on the stored dtype are fast reductions)."""
    return torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # [N]


def _per_row_scaled(w: torch.Tensor, qmax: float, dtype: torch.dtype, rounding: bool) -> Parts:
    """q = w / scale with scale = absmax(row) / qmax, in fp32 row chunks (bounded memory), within +-qmax."""
    scale = (_absmax_rows(w) / qmax).clamp_min(_TINY)  # [N]
    q = torch.empty(w.shape, dtype=dtype)
    step = (1 << 18) // w.shape[1] or 1
    for r in _row_chunks(*w.shape):
        c = w[r:r + step].to(torch.float32, copy=True).div_(scale[r:r + step, None])  # [rows, K], never a view of w
        if rounding:
            c.round_()
        q[r:r + step] = c.clamp_(-qmax, qmax)
    return {"data": q, "scale": scale}


def quantize_int8(w: torch.Tensor, group_size: int | None) -> Parts:
    """Symmetric per output channel: scale = absmax(row) / 127, q = round(w / scale)."""
    return _per_row_scaled(w, INT8_QMAX, torch.int8, rounding=True)


def quantize_fp8(w: torch.Tensor, group_size: int | None) -> Parts:
    """e4m3 with a per-output-channel scale mapping absmax(row) to 448 (the largest finite value)."""
    return _per_row_scaled(w, FP8_MAX, torch.float8_e4m3fn, rounding=False)


def quantize_int4(w: torch.Tensor, group_size: int | None) -> Parts:
    """Asymmetric min/max per group of `group_size` input columns; two codes per byte, low nibble first.

    The range always includes 0 (so zeros stay exact), and scale/zero are rounded to bf16 *before*
    the codes are computed, so the codes are optimal for the stored scale and zero.
    """
    assert group_size is not None
    n, k = w.shape
    scale = torch.empty(n, k // group_size, dtype=torch.bfloat16)
    zero = torch.empty(n, k // group_size, dtype=torch.bfloat16)
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    step = (1 << 18) // k or 1
    for r in _row_chunks(n, k):
        g = w[r:r + step].to(torch.float32, copy=True).reshape(-1, k // group_size, group_size)  # [rows, K/G, G]
        lo = g.amin(dim=2).clamp_(max=0.0)
        hi = g.amax(dim=2).clamp_(min=0.0)
        s = ((hi - lo) / 15.0).clamp_(min=_TINY).to(torch.bfloat16)  # [rows, K/G]
        z = (-lo / s.float()).to(torch.bfloat16)
        q = g.div_(s.float()[..., None]).add_(z.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        q = q.reshape(-1, k // 2, 2)  # [rows, K/2, 2]: (col 2j, col 2j+1)
        packed[r:r + step] = q[..., 0] | (q[..., 1] << 4)
        scale[r:r + step], zero[r:r + step] = s, z
    return {"data": packed, "scale": scale, "zero": zero}


def quantize_nf4(w: torch.Tensor, group_size: int | None) -> Parts:
    """bitsandbytes NF4, blocksize 64 over the flattened row-major weight, fp32 absmax per block.

    Each value is multiplied by 1/absmax of its block (as bitsandbytes does) and mapped to the
    nearest NF4 level, ties to the lower level; element 2i goes in the high nibble of byte i.
    """
    flat = w.reshape(-1, NF4_BLOCKSIZE)  # [numel/64, 64]
    absmax = _absmax_rows(flat)  # [numel/64]
    midpoints = (torch.tensor(NF4_CODE[:-1]) + torch.tensor(NF4_CODE[1:])) / 2  # [15]
    packed = torch.empty(flat.shape[0] * NF4_BLOCKSIZE // 2, dtype=torch.uint8)
    step = 4096  # blocks per chunk
    for r in range(0, flat.shape[0], step):
        inv = 1.0 / absmax[r:r + step].clamp_min(1e-38)
        scaled = flat[r:r + step].to(torch.float32, copy=True).mul_(inv[:, None]).clamp_(-1, 1)  # [blocks, 64]
        q = torch.zeros(scaled.shape, dtype=torch.uint8)
        for m in midpoints.tolist():  # code index = number of midpoints below the value (bucketize, 4x faster here)
            q += scaled > m
        q = q.reshape(-1, 2)  # [blocks*32, 2]
        packed[r * 32:(r + step) * 32] = (q[:, 0] << 4) | q[:, 1]
    return {"data": packed.reshape(-1, 1), "absmax": absmax}


QUANTIZERS: dict[QuantType, Callable[[torch.Tensor, int | None], Parts]] = {
    QuantType.BF16: quantize_bf16,
    QuantType.FP32: quantize_fp32,
    QuantType.INT8: quantize_int8,
    QuantType.FP8: quantize_fp8,
    QuantType.INT4: quantize_int4,
    QuantType.NF4: quantize_nf4,
}


def quantize_tensor(qtype: QuantType, w: torch.Tensor, group_size: int | None = None) -> Parts:
    """Quantize one weight; the parts match `part_specs(qtype, w.shape, group_size)` exactly.

        parts = quantize_tensor(QuantType.INT8, torch.randn(64, 128))
    """
    specs = part_specs(qtype, tuple(w.shape), group_size)
    parts = QUANTIZERS[qtype](w, group_size)
    for spec in specs:
        t = parts[spec.role]
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise AssertionError(f"{qtype.value} quantizer made {spec.role} {t.dtype}{list(t.shape)}, "
                                 f"spec says {spec.dtype}{list(spec.shape)}")
    return {spec.role: parts[spec.role].contiguous() for spec in specs}
