"""Transformer pieces of the Wan2.2-S2V DiT: norms, attentions, the block, the head, FramePack.

Attribute names mirror the upstream checkpoint keys (`blocks.{i}.self_attn.q.weight`, ...), so a
state_dict loads without renaming. Every Linear is a plain `nn.Linear` reached as an attribute,
so the runtime can swap it for a quantized linear by module replacement.

Numerics follow Live Avatar's causal model (LIVEAVATAR.md §2.2): the AdaLN modulation, gates and
residual adds run in fp32; with `la_roundings=True` the two bf16 roundings LA hard-codes (the input
of `norm3` and q/k/v entering attention) are kept, so fp32 runs reproduce upstream (bitwise on CPU).

    block = DiTBlock(cfg); x = block(x, e0, text, freqs, sink_freqs, kv, True)  # via dit.unit_forward
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DiTConfig
from .rope import apply_rope

if TYPE_CHECKING:  # the cache types are only used in annotations
    from .kv import LayerKV

AttnKernel = Callable[[Tensor, Tensor, Tensor], Tensor]  # q, k, v [B, n, L, d] -> [B, n, Lq, d]


class RMSNorm(nn.Module):
    """RMS norm over the last dim (computed in fp32, cast back) with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def attend(q: Tensor, k: Tensor, v: Tensor, bf16_inputs: bool, kernel: AttnKernel | None = None,
           valid: Tensor | None = None) -> Tensor:
    """Dense attention. q [B, Lq, n, d], k/v [B, Lk, n, d] -> [B, Lq, n*d] in q's dtype.

    `bf16_inputs` rounds q/k/v to bf16 first (what upstream's flash/cuDNN kernels see). `kernel`:
    softmax(q k^T / sqrt(d)) v on [B, n, L, d] (runtime/attention.py picks one); None: torch's SDPA.
    `valid` (bool [Lk]) masks out the keys where it is False (a fused graph's ring while it fills);
    None attends to all. A masked call is torch's SDPA with the mask, whatever `kernel` is.
    """
    out_dtype = q.dtype
    if bf16_inputs:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    sdpa = F.scaled_dot_product_attention if kernel is None else kernel
    # SDPA wants heads before sequence: [B, n, L, d]
    if valid is not None:
        mask = valid.view(1, 1, 1, -1)  # broadcast over batch, heads, queries
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    else:
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2).to(out_dtype)  # [B, Lq, n*d]


class SelfAttention(nn.Module):
    """Causal self-attention over [sink (ref + motion) tokens] + [ring-cached history] + [this block]."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)
        self.attn_kernel: AttnKernel | None = None  # set by runtime.attention.use_attention; None: torch's SDPA

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s = x.shape[:2]
        heads = (b, s, self.num_heads, self.head_dim)  # [B, L, dim] -> [B, L, n, d]
        q = self.norm_q(self.q(x)).view(heads)
        k = self.norm_k(self.k(x)).view(heads)
        v = self.v(x).view(heads)
        return q, k, v

    def forward_sink(self, x: Tensor, freqs: Tensor, kv: LayerKV, bf16_attn: bool) -> Tensor:
        """Sink prefill: x [1, Lc, dim] ref+motion tokens. Stores un-roped K and V, attends among them."""
        q, k, v = self._qkv(x)
        kv.sink.write(k, v)
        _, v_cached = kv.sink.read()  # upstream attends to the cache's (possibly rounded) V copy
        k_rot = apply_rope(k, freqs).type_as(v)
        out = attend(apply_rope(q, freqs).type_as(v), k_rot, v_cached.type_as(v), bf16_attn, self.attn_kernel)
        return self.o(out)

    def forward_block(
        self, x: Tensor, freqs: Tensor, sink_freqs: Tensor, kv: LayerKV, bf16_attn: bool
    ) -> Tensor:
        """One denoising call: x [1, Lb, dim] block tokens at absolute RoPE positions `freqs`."""
        q, k, v = self._qkv(x)
        q = apply_rope(q, freqs).type_as(v)
        k = apply_rope(k, freqs).type_as(v)
        kv.ring.write(k, v)
        hist_k, hist_v = kv.ring.history()  # includes the block just written, ring order
        sink_k, sink_v = kv.sink.read()  # un-roped; re-roped at this call's sink offset
        keys = torch.cat([hist_k.type_as(v), apply_rope(sink_k, sink_freqs).type_as(v)], dim=1)
        values = torch.cat([hist_v.type_as(v), sink_v.type_as(v)], dim=1)
        valid = kv.ring.valid_keys()  # None, or which history rows are written yet (the sink's all are)
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(sink_k.shape[1])])
        return self.o(attend(q, keys, values, bf16_attn, self.attn_kernel, valid))


class CrossAttention(nn.Module):
    """Cross-attention from tokens to a context (text tokens, or 5 audio tokens per frame)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attn_kernel: AttnKernel | None = None  # set by runtime.attention.use_attention; None: torch's SDPA

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of a context [B, Lc, dim] -> 2 x [B, Lc, n, d] (a fixed context's can be kept)."""
        b, n, d = context.shape[0], self.num_heads, self.head_dim
        k = self.norm_k(self.k(context)).view(b, -1, n, d)  # [B, Lc, n, d]
        v = self.v(context).view(b, -1, n, d)  # [B, Lc, n, d]
        return k, v

    def forward(self, x: Tensor, context: Tensor, bf16_attn: bool,
                context_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, L, dim], context [B, Lc, dim] -> [B, L, dim]; context_kv: `context_kv(context)` if known."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)  # [B, L, n, d]
        k, v = self.context_kv(context) if context_kv is None else context_kv
        return self.o(attend(q, k, v, bf16_attn, self.attn_kernel))


class DiTBlock(nn.Module):
    """One transformer block: AdaLN self-attention, text cross-attention, AdaLN GELU FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        # shift/scale/gate for attention, then shift/scale/gate for the FFN; added to the time projection
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / math.sqrt(dim))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        context: Tensor,
        freqs: Tensor,
        sink_freqs: Tensor | None,
        kv: LayerKV,
        la_roundings: bool,
        text_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One block.

        x [1, F*hw, dim] tokens (F frames sharing one timestep each; F=1 for the sink prefill);
        e0 [F, 6, dim] fp32 time projection per frame; context [1, text_len, dim];
        freqs [F*hw, 1, head_dim/2] complex RoPE of these tokens (or their `RopeTable`); sink_freqs:
        RoPE of the cached sink tokens for a denoising call, None for the sink prefill (which fills kv.sink);
        text_kv: the cross-attention's `context_kv(context)` when the caller keeps it per prompt.
        """
        frames = e0.shape[0]
        act_dtype = x.dtype
        mod = self.modulation.float() + e0  # [1, 6, dim] + [F, 6, dim] -> [F, 6, dim] fp32
        # 6 x [1, F, 1, dim]: broadcast over each frame's tokens
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m[None, :, None] for m in mod.unbind(dim=1)
        )

        def per_frame(t: Tensor) -> Tensor:
            return t.unflatten(1, (frames, -1))  # [1, F*hw, dim] -> [1, F, hw, dim]

        h = per_frame(self.norm1(x).float()) * (1 + scale_msa) + shift_msa
        h = h.flatten(1, 2).to(act_dtype)  # [1, F*hw, dim]
        if sink_freqs is None:
            y = self.self_attn.forward_sink(h, freqs, kv, la_roundings)
        else:
            y = self.self_attn.forward_block(h, freqs, sink_freqs, kv, la_roundings)
        x = (per_frame(x) + per_frame(y).float() * gate_msa).flatten(1, 2)  # fp32 residual stream

        # LA feeds norm3 a bf16 copy of the residual stream even in fp32 runs
        norm3_in = x.bfloat16() if la_roundings else x.to(act_dtype)
        x = x + self.cross_attn(self.norm3(norm3_in).to(act_dtype), context, la_roundings, text_kv).float()

        h = per_frame(self.norm2(x).float()) * (1 + scale_mlp) + shift_mlp
        y = self.ffn(h.flatten(1, 2).to(act_dtype))  # [1, F, hw, dim] -> [1, F*hw, dim]
        x = per_frame(x) + per_frame(y).float() * gate_mlp
        return x.flatten(1, 2).to(act_dtype)  # [1, F*hw, dim]


class Head(nn.Module):
    """Output head: AdaLN (shift, scale from the time embedding) then a Linear to patch pixels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        out = math.prod(cfg.patch_size) * cfg.out_dim
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / math.sqrt(cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [1, F*hw, dim]; e [F, dim] fp32 per-frame time embedding -> [1, F*hw, out] in x's dtype."""
        num_frames = e.shape[0]
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).unbind(dim=1)  # 2 x [F, dim]
        h = self.norm(x).float().unflatten(1, (num_frames, -1))  # [1, F, hw, dim]
        h = h * (1 + scale[None, :, None]) + shift[None, :, None]
        # LA runs the head Linear inside an fp32 autocast region: fp32 math on the stored weights
        out = F.linear(h.flatten(1, 2), self.head.weight.float(), self.head.bias.float())  # [1, F*hw, out]
        return out.to(x.dtype)


class FramePacker(nn.Module):
    """FramePack motion tokens: the last 19 motion latents packed at 1x / 2x / 4x compression.

    Buckets (nearest first) are 1 frame at (1,2,2), 2 frames at (2,4,4), 16 frames at (4,8,8).
    """

    BUCKETS = (1, 2, 16)

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        c = cfg.in_dim
        self.proj = nn.Conv3d(c, cfg.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, cfg.dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, cfg.dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: Tensor) -> Tensor:
        """motion [C, T, h, w] latents (T may be < 19: zero-padded at the far end) -> [1, Lm, dim]."""
        total = sum(self.BUCKETS)
        c, t, h, w = motion.shape
        packed = motion.new_zeros(c, total, h, w)
        keep = min(total, t)
        if keep:
            packed[:, total - keep :] = motion[:, t - keep :]
        far, mid, near = packed.unsqueeze(0).split(list(reversed(self.BUCKETS)), dim=2)  # 16, 2, 1 frames
        tokens = [
            self.proj(near.to(self.proj.weight.dtype)),
            self.proj_2x(mid.to(self.proj.weight.dtype)),
            self.proj_4x(far.to(self.proj.weight.dtype)),
        ]
        return torch.cat([t_.flatten(2).transpose(1, 2) for t_ in tokens], dim=1)  # [1, Lm, dim]
