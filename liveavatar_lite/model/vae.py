"""Wan2.1 VAE (causal 3-D conv autoencoder, stride 4x8x8, 16 latent channels) with explicit caches.

The temporal state of every causal conv is an ordinary tensor that goes in and comes out of a step
function, so the same code runs eagerly, streams chunk by chunk and exports to ONNX:

    vae = WanVAE(PRESETS["14b"].vae)                       # state_dict keys == upstream WanVAE_
    z = vae.encode(video)                                  # [1,3,T,H,W] in [-1,1] -> [1,16,1+(T-1)//4,H/8,W/8]
    frames = vae.decode(z)                                 # -> [1,3,1+4(T'-1),H,W], not clamped
    out, caches = vae.decode_step(z[:, :, :1], True, None) # streaming: feed `caches` to the next call

Decoder cache layout: one [B, C, 2, h*s, w*s] tensor per causal conv whose time kernel is 3, in
forward order (`decoder_cache_layout()` gives (C, s) for each). Zeros mean "start of the video".

The first latent frame is special upstream: it yields ONE pixel frame (the temporal upsamplers skip
it). Here that is done without data-dependent shapes, so the step can be exported: with `first` set,
each temporal upsampler emits a zero "junk" frame in front of the first frame instead of doubling it,
and every later causal conv zeroes the junk frames before reading them. The step then always
returns 4*T frames; the first 3 are junk when `first` is set (`decode_step` drops them when `first`
is a Python bool; the raw graph leaves that to the caller).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig

CACHE_FRAMES = 2  # left context kept per causal conv (time kernel 3)
FIRST_CALL_JUNK_FRAMES = 3  # junk frames in front of the output of a `first` decoder step

Caches = tuple[Tensor, ...]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding is taken from the left (a cache of past frames, zeros at start).

    Spatial padding is symmetric. Only convs with time kernel 3 ("cached" convs) keep state.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=0)
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad = 2 * pad[0]
        if self.time_pad not in (0, CACHE_FRAMES):
            raise ValueError(f"causal time padding {self.time_pad} is not 0 or {CACHE_FRAMES}")
        self.spatial_pad = (pad[2], pad[2], pad[1], pad[1], 0, 0)  # F.pad order: w, h, t

    def forward(self, x: Tensor) -> Tensor:
        """Plain conv for time kernel 1 (or an input that already carries its left context)."""
        if any(self.spatial_pad):
            x = F.pad(x, self.spatial_pad)
        return super().forward(x)

    def step(self, x: Tensor, cache: Tensor | None, junk: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal conv over x [B,C,T,H,W] with left context `cache` [B,C,2,H,W] (None = zeros).

        `junk` [T] bool marks frames that must read as zeros (see module docstring).
        Returns (y [B,C',T,H,W], new cache = the last 2 input frames including the old cache).
        """
        if junk is not None:
            x = x.masked_fill(junk.view(1, 1, -1, 1, 1), 0.0)
        if cache is None:
            b, c, _, h, w = x.shape
            cache = x.new_zeros(b, c, CACHE_FRAMES, h, w)
        x = torch.cat([cache, x], dim=2)  # [B, C, 2+T, H, W]
        new_cache = x[:, :, -CACHE_FRAMES:].clone()  # a copy: a view would keep all of x alive
        return self.forward(x), new_cache


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma, the sum of squares always in fp32.

    `frames=True` -> gamma [C,1,1,1] for [B,C,T,H,W]; False -> [C,1,1] for [N,C,H,W] (upstream shapes).
    """

    def __init__(self, dim: int, frames: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if frames else (dim, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        sum_sq = x.float().square().sum(dim=1, keepdim=True)  # [B,1,...] fp32 even for fp16 x
        inv_norm = sum_sq.clamp_min(1e-24).rsqrt()  # == 1 / max(||x||, 1e-12), as F.normalize
        # sqrt(C) is folded in before the cast so a large norm does not underflow in fp16
        return x * (inv_norm * self.scale).to(x.dtype) * self.gamma


def frames_to_images(x: Tensor) -> Tensor:
    """[B,C,T,H,W] -> [B*T,C,H,W]."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def images_to_frames(x: Tensor, b: int) -> Tensor:
    """[B*T,C,H,W] -> [B,C,T,H,W]."""
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


def upsample_nearest2x(x: Tensor) -> Tensor:
    """Nearest x2 of [N,C,H,W] (== nearest-exact for an exact factor 2) without a Resize op."""
    n, c, h, w = x.shape
    x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2)  # [N, C, H, 2, W, 2]
    return x.reshape(n, c, 2 * h, 2 * w)


class ResidualBlock(nn.Module):
    """RMS->SiLU->conv3->RMS->SiLU->(dropout)->conv3, plus a 1x1x1 shortcut when widths differ."""

    num_caches = 2

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        # Indices match upstream's nn.Sequential: 0 norm, 2 conv, 3 norm, 6 conv (1, 4, 5 hold no weights).
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # upstream Dropout(0.0)
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def cache_layout(self, scale: int) -> list[tuple[int, int]]:
        return [(self.in_dim, scale), (self.out_dim, scale)]

    def step(self, x: Tensor, caches: Sequence[Tensor | None], junk: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        r = self.residual
        y, c0 = r[2].step(F.silu(r[0](x)), caches[0], junk)
        y, c1 = r[6].step(F.silu(r[3](y)), caches[1], junk)
        return y + self.shortcut(x), [c0, c1]


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal state)."""

    num_caches = 0

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def cache_layout(self, scale: int) -> list[tuple[int, int]]:
        return []

    def forward(self, x: Tensor) -> Tensor:
        b, c, _, h, w = x.shape
        y = self.norm(frames_to_images(x))  # [N=B*T, C, H, W]
        n = y.shape[0]
        qkv = self.to_qkv(y).reshape(n, 3, c, h * w).transpose(2, 3)  # [N, 3, HW, C]
        q, k, v = qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3]  # each [N, 1, HW, C] (4-D: one head)
        scores = torch.matmul(q * c**-0.5, k.transpose(2, 3))  # [N, 1, HW, HW]
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        y = torch.matmul(probs, v)  # [N, 1, HW, C]
        y = y[:, 0].transpose(1, 2).reshape(n, c, h, w)  # [N, C, H, W]
        return images_to_frames(self.proj(y), b) + x

    def step(self, x: Tensor, caches: Sequence[Tensor | None], junk: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        return self.forward(x), []


class Downsample(nn.Module):
    """Encoder resampler: 2x spatial stride-2 conv per frame; `temporal` adds a stride-2 time conv.

    The temporal conv keeps 1 cached frame; on the first chunk it is skipped (upstream semantics:
    the first frame is not downsampled in time).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        self.num_caches = 1 if temporal else 0

    def step(self, x: Tensor, caches: Sequence[Tensor | None], first: bool) -> tuple[Tensor, list[Tensor]]:
        b = x.shape[0]
        x = images_to_frames(self.resample(frames_to_images(x)), b)  # [B, C, T, H/2, W/2]
        if not self.temporal:
            return x, []
        new_cache = x[:, :, -1:].clone()
        if not first:
            x = self.time_conv(torch.cat([caches[0], x], dim=2))  # [B, C, T/2, H/2, W/2]
        return x, [new_cache]


class Upsample(nn.Module):
    """Decoder resampler: nearest 2x + conv (halves channels) per frame; `temporal` doubles T first.

    Temporal doubling: a (3,1,1) causal conv makes 2C channels, read as 2 interleaved frames.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.dim, self.temporal = dim, temporal
        # Index 0 is upstream's (weightless) nn.Upsample; we upsample with upsample_nearest2x.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.num_caches = 1 if temporal else 0

    def cache_layout(self, scale: int) -> list[tuple[int, int]]:
        return [(self.dim, scale)] if self.temporal else []

    def step(
        self, x: Tensor, cache: Tensor | None, junk_count: Tensor | None, first: Tensor | None
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Returns (y, new caches, junk_count of y).

        `first`: int64 0/1 tensor (the exported graph), or None when the call is statically known
        not to be first (eager streaming; skips the masks).
        """
        b, c, t, h, w = x.shape
        new_caches: list[Tensor] = []
        if self.temporal:
            skip = None
            if first is not None:
                n_in = junk_count if junk_count is not None else torch.zeros_like(first)
                skip = torch.arange(t, device=x.device) < n_in + first  # junk + first real frame: not doubled
                junk_count = 2 * n_in + first
            y, cache_out = self.time_conv.step(x, cache, skip)
            new_caches.append(cache_out)
            y = y.reshape(b, 2, c, t, h, w)
            doubled = torch.stack([y[:, 0], y[:, 1]], dim=3).reshape(b, c, 2 * t, h, w)  # [B,C,2T,H,W]
            if skip is None:
                x = doubled
            else:
                passed = torch.stack([torch.zeros_like(x), x], dim=3).reshape(b, c, 2 * t, h, w)  # [0,x0,0,x1..]
                skip2 = skip[:, None].expand(t, 2).reshape(2 * t)  # [2T]
                x = torch.where(skip2.view(1, 1, -1, 1, 1), passed, doubled)
        x = images_to_frames(self.resample[1](upsample_nearest2x(frames_to_images(x))), b)
        return x, new_caches, junk_count


def _junk_mask(junk_count: Tensor | None, t: int, device: torch.device) -> Tensor | None:
    if junk_count is None:
        return None
    return torch.arange(t, device=device) < junk_count  # [T] bool


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """[B,3,T,H,W] -> [B,2*z_dim,T',H/8,W/8] (mu and log_var), stepped over chunks of 1, 4, 4, ..."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]  # [96, 96, 192, 384, 384] for dim 96
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, temporal=cfg.temperal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top), nn.SiLU(), CausalConv3d(top, 2 * cfg.z_dim, 3, padding=1))

    def step(self, x: Tensor, first: bool, caches: Caches | None) -> tuple[Tensor, Caches]:
        """One chunk through the encoder. caches=None means the start of the video (zeros)."""
        slots: list[Tensor | None] = list(caches) if caches is not None else [None] * self.cache_count()
        out: list[Tensor] = []
        pos = 0

        x, c = self.conv1.step(x, slots[pos], None)
        out.append(c)
        pos += 1
        for layer in [*self.downsamples, *self.middle]:
            n = layer.num_caches
            if isinstance(layer, Downsample):
                x, cs = layer.step(x, slots[pos:pos + n], first)
            else:
                x, cs = layer.step(x, slots[pos:pos + n], None)
            out.extend(cs)
            pos += n
        x, c = self.head[2].step(F.silu(self.head[0](x)), slots[pos], None)
        out.append(c)
        return x, tuple(out)

    def cache_count(self) -> int:
        return 2 + sum(layer.num_caches for layer in [*self.downsamples, *self.middle])


class Decoder3d(nn.Module):
    """[B,z_dim,T,h,w] -> [B,3,4T,8h,8w] per step (see the module docstring for `first`)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]  # [384, 384, 384, 192, 96] for dim 96
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous Upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Upsample(out_dim, temporal=temporal_up[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))
        self._z_dim = cfg.z_dim

    def cache_layout(self) -> list[tuple[int, int]]:
        """(channels, spatial scale vs the latent) of each cache, in step order."""
        layout = [(self._z_dim, 1)]
        scale = 1
        for layer in [*self.middle, *self.upsamples]:
            layout.extend(layer.cache_layout(scale))
            if isinstance(layer, Upsample):
                scale *= 2
        layout.append((self.head[0].gamma.shape[0], scale))
        return layout

    def step(self, x: Tensor, first: Tensor | None, caches: Sequence[Tensor | None]) -> tuple[Tensor, Caches]:
        """x [B,z_dim,T,h,w] (after conv2); one cache per cache_layout().

        first: int64 0/1 tensor, or None for "statically not first" (no masking work at all).
        """
        out: list[Tensor] = []
        junk_count: Tensor | None = None  # None: no junk frames (before the first temporal upsampler)
        x, c = self.conv1.step(x, caches[0], None)
        out.append(c)
        pos = 1
        for layer in [*self.middle, *self.upsamples]:
            n = layer.num_caches
            if isinstance(layer, Upsample):
                x, cs, junk_count = layer.step(x, caches[pos] if n else None, junk_count, first)
            else:
                x, cs = layer.step(x, caches[pos:pos + n], _junk_mask(junk_count, x.shape[2], x.device))
            out.extend(cs)
            pos += n
        junk = _junk_mask(junk_count, x.shape[2], x.device)
        x, c = self.head[2].step(F.silu(self.head[0](x)), caches[pos], junk)
        out.append(c)
        return x, tuple(out)


# ----------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE; builds from `VAEConfig` alone (meta-device friendly, keys == upstream WanVAE_).

        vae = WanVAE(cfg); z = vae.encode(video); video2 = vae.decode(z)
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if len(cfg.latent_mean) != cfg.z_dim or len(cfg.latent_std) != cfg.z_dim:
            raise ValueError(f"latent_mean/latent_std must have z_dim={cfg.z_dim} values")
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> mu, log_var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # before the decoder
        self.decoder = Decoder3d(cfg)

    # -- latent normalization (the DiT works on normalized latents) --

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=like.device).view(shape)
        return mean.to(like.dtype), (1.0 / std).to(like.dtype)

    def normalize_latents(self, mu: Tensor) -> Tensor:
        """Raw encoder mean [B,16,T,h,w] -> normalized latent: (mu - mean) / std."""
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """Normalized latent -> raw decoder input: z * std + mean."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    # -- encoder --

    def encode(self, video: Tensor) -> Tensor:
        """Video [B,3,T,H,W] in [-1,1] -> normalized latents [B,z,1+(T-1)//4,H/8,W/8] (the mean).

        Chunks of 1, 4, 4, ... frames (trailing frames that do not fill a chunk are ignored, as upstream).
        """
        t = video.shape[2]
        chunks = [video[:, :, :1]] + [video[:, :, 1 + 4 * i:5 + 4 * i] for i in range((t - 1) // 4)]
        caches: Caches | None = None
        outs = []
        for i, chunk in enumerate(chunks):
            z, caches = self.encode_step(chunk, i == 0, caches)
            outs.append(z)
        return torch.cat(outs, dim=2)

    def encode_step(self, chunk: Tensor, first: bool, caches: Caches | None) -> tuple[Tensor, Caches]:
        """Streaming encode of video frames [B,3,n,H,W] -> (normalized [B,z,n',H/8,W/8], caches).

        The first call takes exactly 1 frame (n' = 1), later calls a multiple of 4 (n' = n/4).
        `first=True` starts a new video (caches None); pass the returned caches to the next call.
        """
        n = chunk.shape[2]
        if (first and n != 1) or (not first and (n == 0 or n % 4)):
            raise ValueError(f"encode_step takes 1 frame first, then multiples of 4; got {n} (first={first})")
        y, caches = self.encoder.step(chunk, first, caches)
        mu = self.conv1(y)[:, : self.cfg.z_dim]  # [B, z, n', h, w] (the log-variance half is unused)
        return self.normalize_latents(mu), caches

    # -- decoder --

    def decoder_cache_layout(self) -> list[tuple[int, int]]:
        """(channels, spatial scale) of each decoder cache; cache i is [B, C_i, 2, h*s_i, w*s_i]."""
        return self.decoder.cache_layout()

    def init_decoder_caches(
        self, latent_hw: tuple[int, int], batch: int = 1, dtype=torch.float32, device=None
    ) -> Caches:
        """Zero caches (= start of a video) for latents of spatial size latent_hw."""
        h, w = latent_hw
        return tuple(
            torch.zeros(batch, c, CACHE_FRAMES, h * s, w * s, dtype=dtype, device=device)
            for c, s in self.decoder_cache_layout()
        )

    def decode_step_raw(self, z: Tensor, first: Tensor | None, caches: Caches) -> tuple[Tensor, Caches]:
        """Exportable step: normalized z [B,16,T,h,w], first int64 0/1 -> ([B,3,4T,H,W], caches).

        When first == 1 the first FIRST_CALL_JUNK_FRAMES output frames are junk; first=None is
        the same as 0 without the masking work.
        """
        x = self.conv2(self.denormalize_latents(z))
        return self.decoder.step(x, first, caches)

    def decode_step(self, z: Tensor, first: bool, caches: Caches | None) -> tuple[Tensor, Caches]:
        """Streaming decode: normalized z [B,16,T,h,w] -> (frames [B,3,4T-3*first,H,W], caches).

        `first=True` starts a new video (caches may be None); pass the returned caches on.
        """
        if caches is None:
            caches = self.init_decoder_caches(z.shape[-2:], z.shape[0], z.dtype, z.device)
        flag = torch.tensor(1, dtype=torch.int64, device=z.device) if first else None
        frames, caches = self.decode_step_raw(z, flag, caches)
        if first:
            frames = frames[:, :, FIRST_CALL_JUNK_FRAMES:]
        return frames, caches

    def decode(self, z: Tensor) -> Tensor:
        """Whole-sequence decode: normalized z [B,16,T,h,w] -> [B,3,1+4(T-1),H,W] (not clamped)."""
        frames, _ = self.decode_step(z, True, None)
        return frames
