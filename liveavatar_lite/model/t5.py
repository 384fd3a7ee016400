"""umT5 encoder (the text encoder of Wan2.2-S2V), laid out exactly like models_t5_umt5-xxl-enc-bf16.pth.

The module tree reproduces the keys of Wan's own T5 encoder checkpoint (`token_embedding`,
`blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}`, `norm`),
so the .pth state_dict loads with no key map and the model builds on the meta device from a
`T5Config` alone. We use our own module rather than transformers' `UMT5EncoderModel` because that
class names the same tensors differently (`encoder.block.N.layer.0.SelfAttention.q` ...), would need
a translation table for 242 tensors and computes in a slightly different order; this file is small
and is checked against Wan's encoder on random weights (tests/test_t5.py).

Numerics follow the reference: RMS layer norm (eps 1e-6, computed in fp32), attention without the
1/sqrt(d) scaling, a relative position bias learned per layer (32 buckets, bidirectional, max
distance 128), gated-GELU feed-forward `fc2(fc1(x) * gelu_tanh(gate(x)))`, softmax in fp32 and, in
fp16 only, clamping of the residual stream when it overflows.

    enc = UMT5Encoder(PRESETS["tiny"].t5); out = enc(ids, mask)  # [B, L, dim]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import T5Config

# Relative positions further than this share the last log-spaced bucket (T5's `max_distance`).
_MAX_DISTANCE = 128


def _clamp_fp16_overflow(x: torch.Tensor) -> torch.Tensor:
    """In fp16 only: pull +-inf back into range (umT5 activations overflow fp16 in late layers)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class RMSNorm(nn.Module):
    """T5 layer norm: scale by 1/rms (no mean removal, no bias); the statistic is taken in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = x * inv_rms  # promotes to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive bias and no 1/sqrt(head_dim) scaling (T5)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B or 1, heads, L, L] (position bias + key mask) -> [B, L, dim]."""
        b, n, _ = x.shape
        # [B, L, dim_attn] -> [B, heads, L, head_dim]
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) + bias  # [B, heads, L, L], unscaled as in T5
        probs = F.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)  # [B, L, dim_attn]
        return self.o(out)


class TanhGELU(nn.Module):
    """tanh-approximated GELU evaluated in the input dtype, term by term like the reference encoder.

    nn.GELU(approximate="tanh") rounds once from fp32 internally; in bf16 that differs from the
    reference by 1-2 ulp per activation, so we keep the reference's evaluation order (bit-exact).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class GatedGeluFFN(nn.Module):
    """`fc2(fc1(x) * gelu_tanh(gate(x)))`; `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativePositionBias(nn.Module):
    """Bidirectional bucketed relative position bias: [1, heads, Lq, Lk] from a [buckets, heads] table."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """Bucket index of `key_pos - query_pos`: half the buckets per sign, exact then log-spaced."""
        half = self.num_buckets // 2
        base = (rel > 0).long() * half  # keys after the query use the upper half
        dist = rel.abs()
        exact = half // 2
        # log-spaced buckets for exact <= dist < _MAX_DISTANCE, saturating at half - 1
        log_ratio = torch.log(dist.float().clamp(min=1) / exact) / math.log(_MAX_DISTANCE / exact)
        far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return base + torch.where(dist < exact, dist, far)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # [Lq, Lk]: key - query
        bias = self.embedding(self.bucket(rel))  # [Lq, Lk, heads]
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, heads, Lq, Lk]


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + pre-norm gated FFN, each with a residual; own position bias."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedGeluFFN(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, key_mask_bias: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1]).to(x.dtype)  # [1, heads, L, L]
        if key_mask_bias is not None:
            bias = bias + key_mask_bias  # [B, heads, L, L]
        x = _clamp_fp16_overflow(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16_overflow(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack: token embedding, `num_layers` blocks, final RMS norm (no dropout: inference)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] int64, mask [B, L] (1 = real token, 0 = padding) -> hidden states [B, L, dim]."""
        x = self.token_embedding(ids)  # [B, L, dim]
        key_mask_bias = None
        if mask is not None:
            # Padding keys get the most negative finite value, so their softmax weight is exactly 0.
            neg = torch.finfo(x.dtype).min
            key_mask_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            key_mask_bias = key_mask_bias.masked_fill(mask == 0, neg)[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, key_mask_bias)
        return self.norm(x)


@torch.no_grad()
def encode_prompt(encoder: UMT5Encoder, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Text embeddings per prompt, cut to the real token count (as upstream): list of [L_i, dim].

    Upstream runs all 512 padded positions with a key mask and then cuts; masked keys get softmax
    weight exactly 0 and the position bias depends only on i - j, so running only the first L_i
    tokens gives the same real-token outputs (up to float summation order) at a fraction of the cost.

        embs = encode_prompt(enc, ids, mask)  # ids, mask from text_tokenizer.tokenize
    """
    device = encoder.token_embedding.weight.device
    out = []
    for row_ids, row_mask in zip(ids, mask):
        n = int(row_mask.gt(0).sum())
        real = row_ids[:n].to(device)[None]  # [1, L_i]
        out.append(encoder(real)[0])  # [L_i, dim]
    return out
