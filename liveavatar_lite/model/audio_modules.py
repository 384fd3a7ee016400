"""Audio conditioning of the S2V DiT: the causal audio encoder and the audio injectors.

`CausalAudioEncoder` turns 25 stacked wav2vec2 hidden states per video frame into, per latent
frame, 4 local audio tokens + 1 learned padding token (the injector's context) and 1 global
token (the AdaLN conditioning). Stride-2 causal convolutions take 4 video frames to 1 latent frame.

`AudioInjector` holds, per injected layer j, an `AdaLayerNorm` (`injector_adain_layers.{j}`) and a
cross-attention (`injector.{j}`); `dit.unit_forward` applies both to the noisy tokens frame by frame.

Names keep upstream's checkpoint spelling (`casual_audio_encoder` is a typo in the checkpoint).

    enc = CausalAudioEncoder(cfg); glob, local = enc(feats)   # feats [1, 25, audio_dim, T]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DiTConfig
from .dit_blocks import CrossAttention


class CausalConv1d(nn.Module):
    """Conv1d with (kernel-1) frames of replicate padding on the left: output t sees inputs <= t."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, C_out, ceil(T / stride)] (for kernel 3)."""
        x = F.pad(x, (self.left_pad, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class AudioMotionEncoder(nn.Module):
    """Two causal conv stacks sharing conv2/conv3: a local one (num_token heads) and a global one."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int) -> None:
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_token, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _shared_tail(self, x: Tensor) -> Tensor:
        """x [N, T, C/4] after conv1 -> [N, T/4, C]: norm, SiLU, conv2 (/2), norm, SiLU, conv3 (/2), norm, SiLU."""
        x = F.silu(_layer_norm(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)  # [N, T/2, C/2]
        x = F.silu(_layer_norm(x))
        x = self.conv3(x.transpose(1, 2)).transpose(1, 2)  # [N, T/4, C]
        return F.silu(_layer_norm(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, in_dim] fp32 -> (global [B, T/4, 1, C], local [B, T/4, num_token+1, C])."""
        b = x.shape[0]
        xc = x.transpose(1, 2)  # [B, in_dim, T]
        local = self.conv1_local(xc)  # [B, num_token*C/4, T]
        # [B, (n c), T] -> [B*n, T, c]: each audio token is its own conv stream
        local = local.unflatten(1, (self.num_token, -1)).permute(0, 1, 3, 2).flatten(0, 1)
        local = self._shared_tail(local)  # [B*n, T/4, C]
        local = local.unflatten(0, (b, self.num_token)).transpose(1, 2)  # [B, T/4, n, C]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)  # [B, T/4, 1, C]
        local = torch.cat([local, pad], dim=2)  # [B, T/4, n+1, C]

        glob = self.conv1_global(xc).transpose(1, 2)  # [B, T, C/4]
        glob = self._shared_tail(glob)  # [B, T/4, C]
        glob = F.linear(glob, self.final_linear.weight.float(), self.final_linear.bias.float())
        return glob.unsqueeze(2), local  # [B, T/4, 1, C], [B, T/4, n+1, C]


class CausalAudioEncoder(nn.Module):
    """SiLU-weighted mean of the wav2vec2 hidden states, then the causal conv encoder (all fp32)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.encoder = AudioMotionEncoder(cfg.audio_dim, cfg.dim, cfg.num_audio_token)
        self.weights = nn.Parameter(torch.full((1, cfg.audio_layers, 1, 1), 0.01))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, layers, audio_dim, T] -> (global [B, T', 1, dim], local [B, T', 5, dim]) fp32."""
        w = F.silu(self.weights.float())
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        return self.encoder(mixed.transpose(1, 2))  # input [B, T, audio_dim]


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) modulated by (shift, scale) = Linear(SiLU(temb)).chunk(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x [N, L, dim], temb [N, dim] -> [N, L, dim]."""
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)  # 2 x [N, dim]
        # LA: the norm runs in fp32 under autocast and the modulation stays fp32 until the next Linear
        h = self.norm(x.float()) * (1 + scale.float()[:, None]) + shift.float()[:, None]
        return h.to(x.dtype)


class AudioInjector(nn.Module):
    """Per-injected-layer AdaLN + audio cross-attention (`injector.{j}`, `injector_adain_layers.{j}`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(CrossAttention(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim) for _ in range(n))
