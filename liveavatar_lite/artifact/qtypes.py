"""Quantization types of the artifact: one enum member, one storage layout, one dequantizer each.

Runtime side, pure torch. The offline quantizers (the inverse of each dequantizer) live in
`quantize/quantizers.py`; the byte layout of files lives in `format.py` (docs/FORMAT.md).

A logical weight W [N, K] (N = out features, K = in features) is stored as named *parts*:

| qtype | part "data"                                   | other parts                                  | W =                        |
|-------|-----------------------------------------------|----------------------------------------------|----------------------------|
| bf16  | bfloat16 [..]                                 | -                                            | data                       |
| fp32  | float32 [..]                                  | -                                            | data                       |
| int8  | int8 [N, K], symmetric, in [-127, 127]        | scale fp32 [N]                               | data * scale[:, None]      |
| fp8   | float8_e4m3fn [N, K]                          | scale fp32 [N]                               | data * scale[:, None]      |
| int4  | uint8 [N, K/2]: col 2j in the low nibble,     | scale bf16 [N, K/G], zero bf16 [N, K/G]      | (q - zero) * scale per     |
|       | col 2j+1 in the high nibble; q in [0, 15]     | (G = group size, 64 or 128, along K)         | group of G columns         |
| nf4   | uint8 [N*K/2, 1], bitsandbytes layout: flat   | absmax fp32 [N*K/64]                         | NF4_CODE[q] * absmax per   |
|       | row-major element 2i in the HIGH nibble       | (blocksize 64, no double quantization)       | block of 64 elements       |

    w = dequantize(QuantType.INT8, {"data": q, "scale": s}, (N, K), group_size=None)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import torch


class QuantType(str, Enum):
    """How one tensor is stored. The manifest (never the stored dtype) says which."""

    BF16 = "bf16"
    FP32 = "fp32"
    INT8 = "int8"
    FP8 = "fp8"
    INT4 = "int4"
    NF4 = "nf4"

    @property
    def is_quantized(self) -> bool:
        return self not in (QuantType.BF16, QuantType.FP32)


NF4_BLOCKSIZE = 64  # bitsandbytes' blocksize for our nf4 (its kernels take 64..4096)
INT4_GROUP_SIZES = (64, 128)
INT8_QMAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023), the values bitsandbytes uses for "nf4".
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class PartSpec:
    """One stored tensor of a quantized weight: its role, dtype and (packed) shape."""

    role: str  # "data", "scale", "zero" or "absmax"
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def check_quantizable(qtype: QuantType, shape: tuple[int, ...], group_size: int | None) -> str | None:
    """Why `shape` cannot be stored as `qtype` (None when it can)."""
    if not qtype.is_quantized:
        return None
    if len(shape) != 2:
        return f"{qtype.value} needs a 2-D [out, in] weight, got {list(shape)}"
    n, k = shape
    if qtype is QuantType.INT4:
        if group_size not in INT4_GROUP_SIZES:
            return f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}"
        if k % group_size:
            return f"in_features {k} is not a multiple of the int4 group size {group_size}"
    if qtype is QuantType.NF4 and (n * k) % NF4_BLOCKSIZE:
        return f"{n}x{k} elements are not a multiple of the nf4 blocksize {NF4_BLOCKSIZE}"
    return None


def part_specs(qtype: QuantType, shape: tuple[int, ...], group_size: int | None = None) -> tuple[PartSpec, ...]:
    """The stored tensors of one logical tensor of `shape`, in storage order.

        part_specs(QuantType.INT4, (5120, 5120), 128)  # data u8 [5120,2560], scale, zero bf16 [5120,40]
    """
    shape = tuple(int(s) for s in shape)
    why = check_quantizable(qtype, shape, group_size)
    if why:
        raise ValueError(why)
    if qtype is QuantType.BF16:
        return (PartSpec("data", torch.bfloat16, shape),)
    if qtype is QuantType.FP32:
        return (PartSpec("data", torch.float32, shape),)
    n, k = shape
    if qtype is QuantType.INT8:
        return (PartSpec("data", torch.int8, (n, k)), PartSpec("scale", torch.float32, (n,)))
    if qtype is QuantType.FP8:
        return (PartSpec("data", torch.float8_e4m3fn, (n, k)), PartSpec("scale", torch.float32, (n,)))
    if qtype is QuantType.INT4:
        assert group_size is not None
        groups = (n, k // group_size)
        return (
            PartSpec("data", torch.uint8, (n, k // 2)),
            PartSpec("scale", torch.bfloat16, groups),
            PartSpec("zero", torch.bfloat16, groups),
        )
    if qtype is QuantType.NF4:
        return (
            PartSpec("data", torch.uint8, (n * k // 2, 1)),
            PartSpec("absmax", torch.float32, (n * k // NF4_BLOCKSIZE,)),
        )
    raise ValueError(f"unknown quant type {qtype!r}")


def stored_nbytes(qtype: QuantType, shape: tuple[int, ...], group_size: int | None = None) -> int:
    """Bytes of all parts (no alignment padding)."""
    return sum(p.nbytes for p in part_specs(qtype, shape, group_size))


# Approximate bytes per weight of a large [N, K] matrix: the `--help` size table.
SIZE_TABLE: dict[str, float] = {
    "bf16": 2.0,
    "fp32": 4.0,
    "int8": 1.0,
    "fp8": 1.0,
    "int4 (g64)": 0.5 + 4 / 64,  # bf16 scale + zero per 64 weights
    "int4 (g128)": 0.5 + 4 / 128,
    "nf4": 0.5 + 4 / NF4_BLOCKSIZE,  # fp32 absmax per 64 weights
}


# ---------------------------------------------------------------- dequantizers (one per type)

def _dequant_passthrough(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], group_size: int | None,
                         dtype: torch.dtype) -> torch.Tensor:
    return parts["data"].reshape(shape).to(dtype)


# Dequantizing a [N, K] weight in one expression holds two or three fp32 [N, K] temporaries at once
# (0.85 GB for a 13824x5120 FFN weight in int4: measured on an H100, 2026-11-26, as the int4 layouts'
# device peak exceeding the plan by 0.7 GB). Large weights are therefore dequantized in row chunks
# straight into the output: each element goes through the same fp32 expression and one rounding, so
# the result is bit for bit the one-shot result. The chunks are large because every chunk costs a
# handful of kernel launches: with 4 M-element chunks the H100's int4 linears ran 4x slower, bound by
# the host's launch overhead (same date); 16 M elements keep 2-5 chunks per DiT weight.
DEQUANT_CHUNK_ELEMS = 1 << 24  # elements per row chunk (64 MB per fp32 temporary)


def dequant_scratch_bytes(n: int, k: int, dtype_bytes: int = 2) -> int:
    """Device bytes one dequantize of a [n, k] weight holds at its peak: the output in the compute
    dtype plus one row chunk's temporaries (fp32 values updated in place, the unpacked codes; what
    the plan counts per quantized Linear)."""
    return n * k * dtype_bytes + 6 * min(n * k, max(k, DEQUANT_CHUNK_ELEMS))


def _dequant_rowscaled(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], group_size: int | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """int8 / fp8: [N, K] data * [N, 1] fp32 scale, rounded once to `dtype`."""
    data, scale = parts["data"], parts["scale"].float()
    if data.dim() != 2 or data.numel() <= DEQUANT_CHUNK_ELEMS:
        return (data.float() * scale[:, None]).to(dtype)
    n, k = data.shape
    out = torch.empty((n, k), dtype=dtype, device=data.device)
    step = max(1, DEQUANT_CHUNK_ELEMS // k)
    for r in range(0, n, step):  # one fp32 [rows, K] temporary; the assignment rounds once, as .to(dtype)
        out[r:r + step] = data[r:r + step].float().mul_(scale[r:r + step, None])
    return out


_dequant_int8 = _dequant_rowscaled
_dequant_fp8 = _dequant_rowscaled


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in [0, 15]; column 2j from the low nibble."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)  # [N, K/2, 2] -> [N, K]


def _dequant_int4(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], group_size: int | None,
                  dtype: torch.dtype) -> torch.Tensor:
    assert group_size is not None
    n, k = shape
    if n * k <= DEQUANT_CHUNK_ELEMS:
        q = unpack_int4(parts["data"]).float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
        scale = parts["scale"].float()[..., None]  # [N, K/G, 1]
        zero = parts["zero"].float()[..., None]
        return ((q - zero) * scale).reshape(n, k).to(dtype)
    out = torch.empty((n, k), dtype=dtype, device=parts["data"].device)
    step = max(1, DEQUANT_CHUNK_ELEMS // k)
    for r in range(0, n, step):  # (q - zero) * scale on [rows, K/G, G] in fp32, in place: one temporary
        q = unpack_int4(parts["data"][r:r + step]).float().reshape(-1, k // group_size, group_size)
        q.sub_(parts["zero"][r:r + step].float()[..., None]).mul_(parts["scale"][r:r + step].float()[..., None])
        out[r:r + step] = q.reshape(-1, k)
    return out


_NF4_CODES: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device | str) -> torch.Tensor:
    """NF4's 16 levels, fp32 [16] on `device`, made once per device: building them per call with
    `torch.tensor(..., device="cuda")` copies from pageable host memory, a host sync per linear."""
    device = torch.device(device)
    code = _NF4_CODES.get(device)
    if code is None:
        code = _NF4_CODES[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return code


def _dequant_nf4(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], group_size: int | None,
                 dtype: torch.dtype) -> torch.Tensor:
    packed = parts["data"].reshape(-1)  # [numel/2]
    idx = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1).long()  # [numel]: high nibble first
    vals = nf4_code(packed.device)[idx].reshape(-1, NF4_BLOCKSIZE)  # [numel/64, 64]
    return (vals * parts["absmax"].float()[:, None]).reshape(shape).to(dtype)


Dequantizer = Callable[[Mapping[str, torch.Tensor], tuple[int, ...], "int | None", torch.dtype], torch.Tensor]

DEQUANTIZERS: dict[QuantType, Dequantizer] = {
    QuantType.BF16: _dequant_passthrough,
    QuantType.FP32: _dequant_passthrough,
    QuantType.INT8: _dequant_int8,
    QuantType.FP8: _dequant_fp8,
    QuantType.INT4: _dequant_int4,
    QuantType.NF4: _dequant_nf4,
}


def dequantize(
    qtype: QuantType,
    parts: Mapping[str, torch.Tensor],
    shape: tuple[int, ...],
    group_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The logical tensor of `shape` in `dtype`, from its stored parts (any device).

        w = dequantize(QuantType.INT4, {"data": d, "scale": s, "zero": z}, (N, K), 128)
    """
    return DEQUANTIZERS[QuantType(qtype)](parts, tuple(shape), group_size, dtype)
