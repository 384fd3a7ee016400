"""The Wan2.2-S2V-14B DiT as Live Avatar runs it: causal, block by block, with KV caches.

`WanS2VDiT(cfg)` has exactly upstream `WanModel_S2V`'s state_dict keys and shapes (1260 for the
14B config), so the stock checkpoint loads strictly. The forward is split for block streaming:

    x, ctx = dit.prepare_block(latents, t, frame0, audio, text, sink_offset)   # resident weights
    for i in range(cfg.num_layers):
        x = dit.forward_unit(i, x, ctx, layer_kv(ring, sink, i))     # blocks[i] (+ injector j)
    v = dit.finish(x, ctx)                                                  # head + unpatchify

`forward_unit(i)` reads only `blocks.{i}.*` and, when i is an audio-inject layer,
`audio_injector.injector.{j}.*` and `audio_injector.injector_adain_layers.{j}.*` (a "streaming
unit"; see `units.py`). `unit_forward` is the same computation as a free function taking those
modules, for runtimes that keep their own module instances. The sink prefill uses the same
units with `prepare_sink`; its output is discarded (only the sink KV cache is kept).

Precision: the parameters' dtype is the compute dtype (fp32 or bf16). The AdaLN modulation, gates,
residual stream, time embedding, audio encoder and head run in fp32 as in Live Avatar.
`la_roundings=True` keeps LA's two hard-coded bf16 roundings (norm3 input; q/k/v entering every
attention) so fp32 runs reproduce upstream's fp32 numerics.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DiTConfig
from .audio_modules import AdaLayerNorm, AudioInjector, CausalAudioEncoder
from .dit_blocks import CrossAttention, DiTBlock, FramePacker, Head
from .rope import RopeGrid, RopeTable, rope_factors

if TYPE_CHECKING:  # only for annotations: the model never imports the cache implementations
    from .kv import LayerKV

# Live Avatar's fixed layout constants (upstream hard-codes them in the model)
REF_BASE_FRAME = 30  # RoPE frame of the reference (sink) frame during the prefill
MOTION_PAD_FRAMES = 73  # audio frames prepended (copies of the first) before each block's audio
MOTION_LATENT_FRAMES = 19  # encoder outputs dropped after that padding: (73 + 3) // 4
MASK_NOISY, MASK_REF, MASK_MOTION = 0, 1, 2  # rows of trainable_cond_mask
_CACHE_ENTRIES = 8  # time embeddings (4 timesteps + the sink's) and RoPE layouts kept per model


@dataclass
class DiTContext:
    """Everything a streaming unit needs besides its own weights (built by prepare_*).

    e0 [F, 6, dim] fp32 time projection per frame (F=1, t=0 for the sink); e_head [F, dim] fp32;
    text [1, text_len, dim]; freqs [L, 1, head_dim/2] RoPE of x's tokens; sink_freqs: RoPE of the
    cached sink tokens (None in the sink prefill); audio_tokens [F, 5, dim] and audio_global
    [F, dim] (None in the sink prefill); grid (F, h/2, w/2) for unpatchify.
    """

    e0: Tensor
    e_head: Tensor | None
    text: Tensor
    freqs: Tensor | RopeTable
    sink_freqs: Tensor | RopeTable | None
    audio_tokens: Tensor | None
    audio_global: Tensor | None
    grid: tuple[int, int, int]
    la_roundings: bool = True

    @property
    def is_sink(self) -> bool:
        return self.sink_freqs is None


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """t [N] -> [N, dim] fp32: [cos, sin] of t * 10000^(-j/half), computed in fp64."""
    half = dim // 2
    pos = t.to(torch.float64)
    # the frequency ladder is built on t's device: torch.outer refuses a CPU operand for a CUDA t
    inv_freq = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, inv_freq)  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def sink_grids(h: int, w: int, ref_shift: int) -> list[RopeGrid]:
    """RoPE layout of the sink tokens for latents h x w: ref frame, then FramePack 1x/2x/4x buckets."""
    hp, wp = h // 2, w // 2
    ref = RopeGrid((REF_BASE_FRAME, 0, 0), (REF_BASE_FRAME + 1, hp, wp), (1, hp, wp)).shifted(ref_shift)
    b1, b2, b4 = FramePacker.BUCKETS
    return [
        ref,
        RopeGrid((-b1, 0, 0), (0, hp, wp), (b1, hp, wp)),
        RopeGrid((-(b1 + b2), 0, 0), (-(b1 + b2) + b2 // 2, h // 4, w // 4), (b2, hp, wp)),
        RopeGrid((-(b1 + b2 + b4), 0, 0), (-(b1 + b2 + b4) + b4 // 4, h // 8, w // 8), (b4, hp, wp)),
    ]


def unit_forward(
    block: DiTBlock,
    inject: tuple[AdaLayerNorm, CrossAttention] | None,
    x: Tensor,
    ctx: DiTContext,
    kv: LayerKV,
    text_kv: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One streaming unit: block, then (denoising calls only) its audio injector.

    inject = (adain, cross-attention) of injector j when this is an inject layer, else None;
    text_kv: the block's text K/V (`block.cross_attn.context_kv(ctx.text)`) when the caller keeps it.
    """
    x = block(x, ctx.e0, ctx.text, ctx.freqs, ctx.sink_freqs, kv, ctx.la_roundings, text_kv)
    return inject_audio(inject, x, ctx)


def inject_audio(inject: tuple[AdaLayerNorm, CrossAttention] | None, x: Tensor, ctx: DiTContext) -> Tensor:
    """The audio injector after a block (denoising calls of inject layers; else x unchanged)."""
    if inject is not None and not ctx.is_sink:
        adain, attn = inject
        frames = ctx.audio_tokens.shape[0]
        h = x.unflatten(1, (frames, -1)).squeeze(0)  # [1, F*hw, dim] -> [F, hw, dim]
        h = adain(h, ctx.audio_global)
        res = attn(h, ctx.audio_tokens, ctx.la_roundings)  # [F, hw, dim]
        x = x + res.flatten(0, 1).unsqueeze(0).to(x.dtype)  # [F, hw, dim] -> [1, F*hw, dim]
    return x


class WanS2VDiT(nn.Module):
    """Wan2.2-S2V DiT with Live Avatar's causal streaming forward. Build on meta, load strictly."""

    def __init__(self, cfg: DiTConfig, la_roundings: bool = True, rope_fp64: bool = True,
                 rope_real: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.la_roundings = la_roundings
        self.rope_fp64 = rope_fp64
        self.rope_real = rope_real  # contexts carry RoPE as fp32 cos/sin (`RopeTable`), not complex
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePacker(cfg)
        # Per-call inputs that depend only on the timestep / the token positions, computed once:
        # (e, e0) per timestep (the fp32 time MLP reads the 629 MB time_projection weight at 14B)
        # and RoPE factors per layout of grids (built on the host, then copied to the device).
        self._time_cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._rope_cache: OrderedDict[tuple, Tensor] = OrderedDict()

    # ---- resident stage -------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def compute_device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def inject_slot(self, i: int) -> int | None:
        """Injector index j applied after block i, or None (the same rule as `units.unit_keys`)."""
        return self.cfg.inject_slot(i)

    def embed_text(self, text: Tensor) -> Tensor:
        """text [L, text_dim] umT5 states (L <= text_len) -> [1, text_len, dim], zero-padded first."""
        cfg = self.cfg
        if text.shape[0] > cfg.text_len:
            raise ValueError(f"text has {text.shape[0]} tokens, more than text_len {cfg.text_len}")
        padded = text.new_zeros(cfg.text_len, text.shape[1])
        padded[: text.shape[0]] = text
        padded = padded.to(self.compute_device, self.compute_dtype).unsqueeze(0)  # [1, text_len, text_dim]
        return self.text_embedding(padded)  # [1, text_len, dim]

    def _time_embed(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [N] per-frame timesteps -> (e [N, dim], e0 [N, 6, dim]) fp32 (fp32 math on stored weights).

        Like upstream, the MLP runs on the 2N rows [t..., 0...] (the zero rows are the "zero
        timestep" of ref/motion tokens): the same GEMM shapes give bitwise-equal fp32 results.
        """
        n = t.shape[0]
        t = torch.cat([t.float(), torch.zeros(n, device=t.device)])
        e, e0 = self._time_mlp(t)
        return e[:n], e0[:n]

    def _time_cached(self, key: tuple, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(e, e0) for `key` (a timestep and frame count), computed once per weights and device."""
        ws = (self.time_embedding[0].weight, self.time_embedding[2].weight, self.time_projection[1].weight)
        full = (*key, *((id(w), w._version, w.device) for w in ws))  # rebinding the weights misses
        hit = self._time_cache.get(full)
        if hit is None:
            hit = self._time_cache[full] = compute()
            while len(self._time_cache) > _CACHE_ENTRIES:
                self._time_cache.popitem(last=False)
        return hit

    def _time_mlp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lin0, lin2 = self.time_embedding[0], self.time_embedding[2]
        h = F.linear(sinusoidal_embedding(self.cfg.freq_dim, t), lin0.weight.float(), lin0.bias.float())
        e = F.linear(F.silu(h), lin2.weight.float(), lin2.bias.float())
        proj = self.time_projection[1]
        e0 = F.linear(F.silu(e), proj.weight.float(), proj.bias.float())  # [N, 6*dim]
        return e, e0.unflatten(1, (6, self.cfg.dim))  # [N, dim], [N, 6, dim]

    def _factors(self, grids: list[RopeGrid]) -> Tensor | RopeTable:
        """RoPE factors on the compute device (used by every unit; the last few layouts are kept)."""
        key = (tuple(grids), self.rope_fp64, self.rope_real, self.compute_device)
        hit = self._rope_cache.get(key)
        if hit is None:
            f = rope_factors(grids, self.cfg.head_dim, fp16_factors=True)
            if self.rope_real:
                hit = RopeTable.of(f.to(self.compute_device))
            else:
                hit = (f if self.rope_fp64 else f.to(torch.complex64)).to(self.compute_device)
            self._rope_cache[key] = hit
            while len(self._rope_cache) > _CACHE_ENTRIES:
                self._rope_cache.popitem(last=False)
        else:
            self._rope_cache.move_to_end(key)
        return hit

    def prepare_sink(
        self, ref_latents: Tensor, motion_latents: Tensor, text: Tensor, frames_per_block: int = 3
    ) -> tuple[Tensor, DiTContext]:
        """Sink prefill inputs: ref_latents [16, 1, h, w], motion_latents [16, T, h, w] (last 19 used),
        text = embed_text(...) [1, text_len, dim]. Returns x [1, Lc, dim] and its context."""
        dt, dev = self.compute_dtype, self.compute_device
        _, _, h, w = ref_latents.shape
        if h < 8 or w < 8 or h % 2 or w % 2:
            raise ValueError(f"latents {h}x{w}: need even sizes >= 8 (FramePack packs 8x8 latent patches)")
        ref = self.patch_embedding(ref_latents.to(dev, dt).unsqueeze(0)).flatten(2).transpose(1, 2)  # [1, hw/4, dim]
        mot = self.frame_packer(motion_latents.to(dev, dt))  # [1, Lm, dim]
        mask = self.trainable_cond_mask.weight
        x = torch.cat([ref + mask[MASK_REF].to(dt), mot + mask[MASK_MOTION].to(dt)], dim=1)  # [1, Lc, dim]
        # zero-timestep modulation, taken (like upstream) from a [0]*2F batch with F = frames_per_block
        _, e0 = self._time_cached(("sink", frames_per_block),
                                  lambda: self._time_mlp(torch.zeros(2 * frames_per_block, device=dev)))
        e0 = e0[frames_per_block : frames_per_block + 1]  # [1, 6, dim]
        ctx = DiTContext(
            e0=e0,
            e_head=None,
            text=text,
            freqs=self._factors(sink_grids(h, w, ref_shift=0)),
            sink_freqs=None,
            audio_tokens=None,
            audio_global=None,
            grid=(0, h // 2, w // 2),
            la_roundings=self.la_roundings,
        )
        return x, ctx

    def encode_audio(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """audio [layers, audio_dim, 4F] (this block's video frames) -> (tokens [F, 5, dim], global [F, dim]).

        Upstream encodes each block on its own: 73 copies of its first frame are prepended and the
        first 19 encoder outputs dropped.
        """
        audio = audio.to(self.compute_device)
        pad = audio[..., :1].expand(-1, -1, MOTION_PAD_FRAMES)  # [layers, audio_dim, 73]
        feats = torch.cat([pad, audio], dim=-1).unsqueeze(0)  # [1, layers, audio_dim, 73 + 4F]
        glob, local = self.casual_audio_encoder(feats)
        dt = self.compute_dtype
        glob = glob[0, MOTION_LATENT_FRAMES:, 0].to(dt)  # [F, dim]
        local = local[0, MOTION_LATENT_FRAMES:].to(dt)  # [F, 5, dim]
        return local, glob

    def prepare_block(
        self,
        latents: Tensor,
        t: float | Tensor,
        frame0: int,
        audio: Tensor,
        text: Tensor,
        sink_offset: int,
        sink_hw: tuple[int, int] | None = None,
        cond: Tensor | None = None,
    ) -> tuple[Tensor, DiTContext]:
        """Denoising-call inputs.

        latents [16, F, h, w] noisy block; t the (scheduler) timestep shared by its frames;
        frame0 the absolute latent-frame index of its first frame (RoPE and ring position);
        audio [layers, audio_dim, 4F]; text = embed_text(...); sink_offset d: the ref frame sits
        at RoPE frame frame0 + d once frame0 >= 30 - d (upstream draws d in [4, 30] per call);
        sink_hw: latent (h, w) of the sink (defaults to the block's); cond [16, F, h, w] pose latents
        (None = zeros, LA's case: only the conv bias is added).
        """
        dt, dev = self.compute_dtype, self.compute_device
        _, frames, h, w = latents.shape
        x = self.patch_embedding(latents.to(dev, dt).unsqueeze(0))  # [1, dim, F, h/2, w/2]
        if cond is None:
            x = x + self.cond_encoder.bias.view(1, -1, 1, 1, 1)  # the conv of zeros is its bias
        else:
            x = x + self.cond_encoder(cond.to(dev, dt).unsqueeze(0))  # [1, dim, F, h/2, w/2]
        x = x.flatten(2).transpose(1, 2)  # [1, F*hw/4, dim]
        x = x + self.trainable_cond_mask.weight[MASK_NOISY].to(dt)

        t_cpu = torch.as_tensor(t, dtype=torch.float32, device="cpu").reshape(1)
        t_vec = t_cpu.expand(frames).to(dev)  # [F]
        # the 4 timesteps repeat every block: the time MLP runs once per timestep, not per call
        e, e0 = self._time_cached(("block", float(t_cpu), frames), lambda: self._time_embed(t_vec))  # [F, dim], [F, 6, dim]
        tokens, glob = self.encode_audio(audio)
        if tokens.shape[0] != frames:
            raise ValueError(f"audio gives {tokens.shape[0]} latent frames, block has {frames}")
        sh, sw = sink_hw if sink_hw is not None else (h, w)
        ref_shift = max(0, frame0 - (REF_BASE_FRAME - sink_offset))
        ctx = DiTContext(
            e0=e0,
            e_head=e,
            text=text,
            freqs=self._factors([RopeGrid.video(frame0, frames, h // 2, w // 2)]),
            sink_freqs=self._factors(sink_grids(sh, sw, ref_shift)),
            audio_tokens=tokens,
            audio_global=glob,
            grid=(frames, h // 2, w // 2),
            la_roundings=self.la_roundings,
        )
        return x, ctx

    # ---- streamed stage --------------------------------------------------------------------

    def unit_modules(self, i: int) -> tuple[DiTBlock, tuple[AdaLayerNorm, CrossAttention] | None]:
        """The modules of streaming unit i: blocks[i] and its injector (adain, attn) or None."""
        j = self.inject_slot(i)
        inject = None
        if j is not None:
            inject = (self.audio_injector.injector_adain_layers[j], self.audio_injector.injector[j])
        return self.blocks[i], inject

    def forward_unit(self, i: int, x: Tensor, ctx: DiTContext, kv: LayerKV) -> Tensor:
        """Streaming unit i on x [1, L, dim]; kv: the LayerKV of layer i (see model/kv.py)."""
        block, inject = self.unit_modules(i)
        return unit_forward(block, inject, x, ctx, kv)

    # ---- resident tail ---------------------------------------------------------------------

    def finish(self, x: Tensor, ctx: DiTContext) -> Tensor:
        """Head + unpatchify: x [1, F*h/2*w/2, dim] -> flow prediction [16, F, h, w] in the compute dtype."""
        if ctx.e_head is None:
            raise ValueError("finish() is for denoising calls; the sink prefill has no output")
        out = self.head(x, ctx.e_head)  # [1, F*hp*wp, 64]
        f, hp, wp = ctx.grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        out = out[0].view(f, hp, wp, pt, ph, pw, c)  # [F, hp, wp, 1, 2, 2, 16]
        out = torch.einsum("fhwpqrc->cfphqwr", out)
        return out.reshape(c, f * pt, hp * ph, wp * pw)  # [16, F, h, w]

    def forward(self, x: Tensor, ctx: DiTContext, kv_for_layer: Callable[[int], LayerKV]) -> Tensor | None:
        """All units in order. kv_for_layer(i) -> LayerKV. Returns finish(...) or None for the sink."""
        for i in range(self.cfg.num_layers):
            x = self.forward_unit(i, x, ctx, kv_for_layer(i))
        return None if ctx.is_sink else self.finish(x, ctx)

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return f"params={params:,} ({math.ceil(params / 1e6)}M), la_roundings={self.la_roundings}"
