"""3-axis rotary position embedding (time, height, width) as Live Avatar computes it.

A head of `head_dim` channels is split 44/42/42 (for 128) between the time, height and width
axes; each axis has its own frequency ladder `theta ** -(2j / axis_dim)`. Token positions come
from `RopeGrid`s: a grid says which latent-frame / row / column positions a run of tokens takes
(compressed FramePack tokens sample positions sparsely, negative frames are conjugated).

Live Avatar stores the per-token rotation factors at float16 precision (its `rope_precompute`
writes them into a complex32 tensor); `fp16_factors=True` reproduces that rounding. The rotation
itself is applied in float64 (as upstream) unless the factors are complex64.

    grid = RopeGrid.video(frame0=9, frames=3, h=4, w=4)  # 3 latent frames of 4x4 patches
    freqs = rope_factors([grid], head_dim=128)            # [48, 1, 64] complex128
    q = apply_rope(q, freqs)                              # q [B, 48, n, 128] -> fp32
    q = apply_rope(q, RopeTable.of(freqs))                # the same rotation in real fp32 arithmetic

`RopeTable` holds the same factors as cos / sin in fp32 and rotates each channel pair
(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos): the complex product written out, which a compiler
can fuse (inductor generates no code for complex numbers). The factors are fp16-rounded, so fp32
holds them exactly; only the rotation's own fp32 rounding differs from the fp64 complex form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeGrid:
    """A run of tokens laid out f-major, then rows, then columns.

    start/end: the (frame, row, col) range in token units (end - start tokens per axis);
    extent: the (frames, rows, cols) span of positions those tokens are spread over.
    A negative start frame means frames in the past: positions are mirrored and conjugated.
    """

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    extent: tuple[int, int, int]

    @staticmethod
    def video(frame0: int, frames: int, h: int, w: int) -> RopeGrid:
        """Plain tokens of `frames` latent frames starting at absolute frame `frame0`, h x w patches."""
        return RopeGrid((frame0, 0, 0), (frame0 + frames, h, w), (frames, h, w))

    @property
    def num_tokens(self) -> int:
        n = 1
        for a, b in zip(self.start, self.end):
            n *= max(0, b - a)
        return n

    def shifted(self, frames: int) -> RopeGrid:
        """The same grid moved `frames` later in time (start and end; extent unchanged)."""
        (f0, h0, w0), (f1, h1, w1) = self.start, self.end
        return RopeGrid((f0 + frames, h0, w0), (f1 + frames, h1, w1), self.extent)

    def positions(self) -> tuple[list[int], list[int], list[int], bool]:
        """Sampled (frame, row, col) positions and whether the frame positions are conjugated."""
        seq = [b - a for a, b in zip(self.start, self.end)]
        f0, h0, w0 = self.start
        tf, th, tw = self.extent
        past = f0 < 0
        if past:  # frames before the window: sample |positions| then conjugate
            f_pos = np.linspace(-f0, -tf - f0 + 1, seq[0])
        else:
            f_pos = np.linspace(f0, tf + f0 - 1, seq[0])
        h_pos = np.linspace(h0, th + h0 - 1, seq[1])
        w_pos = np.linspace(w0, tw + w0 - 1, seq[2])
        # truncation toward zero, like numpy's astype(int)
        return (
            f_pos.astype(int).tolist(),
            h_pos.astype(int).tolist(),
            w_pos.astype(int).tolist(),
            past,
        )


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (time, height, width): 44/42/42 for head_dim 128."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def _axis_angles(positions: list[int], axis_dim: int) -> Tensor:
    """[len(positions), axis_dim/2] float64 angles pos * theta^(-2j/axis_dim)."""
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, axis_dim, 2, dtype=torch.float64).div(axis_dim))
    return torch.outer(torch.tensor(positions, dtype=torch.float64), inv)


def grid_factors(grid: RopeGrid, head_dim: int, fp16_factors: bool = True) -> Tensor:
    """Rotation factors of one grid: [num_tokens, 1, head_dim/2] complex128."""
    f_pos, h_pos, w_pos, past = grid.positions()
    dt, dh, dw = axis_dims(head_dim)
    ft = torch.polar(torch.ones(len(f_pos), dt // 2, dtype=torch.float64), _axis_angles(f_pos, dt))
    if past:
        ft = ft.conj()
    fh = torch.polar(torch.ones(len(h_pos), dh // 2, dtype=torch.float64), _axis_angles(h_pos, dh))
    fw = torch.polar(torch.ones(len(w_pos), dw // 2, dtype=torch.float64), _axis_angles(w_pos, dw))
    nf, nh, nw = len(f_pos), len(h_pos), len(w_pos)
    full = torch.cat(
        [
            ft.view(nf, 1, 1, -1).expand(nf, nh, nw, -1),
            fh.view(1, nh, 1, -1).expand(nf, nh, nw, -1),
            fw.view(1, 1, nw, -1).expand(nf, nh, nw, -1),
        ],
        dim=-1,
    ).reshape(nf * nh * nw, 1, -1)  # [f, h, w, d/2] -> [L, 1, d/2]
    if fp16_factors:  # LA keeps the factors in complex32: round real and imag parts to fp16
        real = full.real.to(torch.float16).to(torch.float64)
        imag = full.imag.to(torch.float16).to(torch.float64)
        full = torch.complex(real, imag)
    return full


def rope_factors(grids: list[RopeGrid], head_dim: int, fp16_factors: bool = True) -> Tensor:
    """Factors for consecutive runs of tokens: [sum(num_tokens), 1, head_dim/2] complex128."""
    parts = [grid_factors(g, head_dim, fp16_factors) for g in grids if g.num_tokens > 0]
    if not parts:
        return torch.zeros(0, 1, head_dim // 2, dtype=torch.complex128)
    return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class RopeTable:
    """RoPE factors in real form: cos and sin [L, 1, d/2] fp32 (the complex factors' real / imag parts)."""

    cos: Tensor
    sin: Tensor

    @staticmethod
    def of(factors: Tensor) -> RopeTable:
        return RopeTable(factors.real.float().contiguous(), factors.imag.float().contiguous())


def apply_rope(x: Tensor, factors: Tensor | RopeTable) -> Tensor:
    """Rotate x [B, L, n, d] by factors [L, 1, d/2] (complex128, complex64 or a RopeTable) -> fp32 [B, L, n, d]."""
    if isinstance(factors, RopeTable):
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, n, d/2, 2]: (real, imag) channel pairs
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = factors.cos, factors.sin  # [L, 1, d/2], broadcast over batch and heads
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3)
    real_dtype = torch.float64 if factors.dtype == torch.complex128 else torch.float32
    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.to(real_dtype).reshape(b, s, n, d // 2, 2))  # [B, L, n, d/2] complex
    out = torch.view_as_real(xc * factors.to(x.device)).flatten(3)  # [B, L, n, d]
    return out.float()
