"""The planner's cost model: seconds of one layer-step, of the embed/head, of the VAE decoder per
block, the bytes one block hands on, and how the decoder overlaps the DiT.

Every rate is a `DeviceProfile` figure (device_profiles.py names each figure's source) and every
amount of work is counted from the model's shapes (`plan_inputs.workload`, `traffic.py`). Two
execution modes (the runtime's compile mode):

* eager (`compile off`): each op its own kernel. Non-matmul traffic traced op by op on the meta
  device (`traffic.unit_elementwise_bytes`). These are the costs the H100 measurements of
  2026-11-26 were checked against (within 4 %, when the text K/V were still projected on every call).
* fused (`compile on`): one graph per unit kind. Non-matmul traffic of the fused kernels
  (`traffic.fused_unit_traffic`).

Both modes keep each layer's text K/V once per prompt (`DiTRuntime._layer_text_kv`): no per-call
FLOPs for them, and their bytes on the device (`plan._text_kv_bytes`).

Attention is priced at the chosen backend's rate in both modes (`DeviceProfile.attention_tflops`).

    k = resolve_kernels("on", "auto", prof)              # Kernels(fused=True, attention="flash")
    costs = layer_step_costs(inp, prof, k, "fp8")        # one LayerCost per layer
    decode_seconds_per_block(inp, prof)                  # 1.16 s on the rtx4090 profile at 704*384
    audio_feature_seconds(4.88, inp, prof)               # wav2vec2 over one talk-session window
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import PRESETS, Wav2VecConfig, preset_for_dit
from ..errors import UserError
from .device_profiles import COMPILE_CHOICES, DeviceProfile, resolve_attention_name
from .plan_inputs import PlanInput

# wav2vec2 runs in fp32 (conditioning/audio_features.py; torch leaves TF32 off for matmuls): no
# tensor cores, so it is priced at this fraction of the bf16 tensor rate (RTX 4090: 82.6 of 165
# TFLOP/s = 0.5; H100: 67 of 989 = 0.07; 1/8 between them). Its share of a talk block is ~1 %.
WAV2VEC_FP32_OF_BF16 = 0.125
# wav2vec2's conv front-end (512 channels, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2):
# sum over layers of 2 * C_in * C_out * k * (output rate): 4.9 GFLOP per second of 16 kHz audio.
WAV2VEC_FRONTEND_FLOP_PER_S = 4.9e9

# The streaming VAE decoder's work per latent frame at 704*384 after the first (4 video frames):
# 9.13 TFLOP, counted with meta-device hooks (LIVEAVATAR.md §3); it scales with the pixels and with
# the square of the VAE's base width (96 for Wan2.1's VAE).
VAE_FLOP_PER_LATENT_704x384 = 9.13e12


@dataclass(frozen=True)
class Kernels:
    """How the DiT's units run: fused graphs or eager ops, and the attention backend (resolved)."""

    fused: bool = False
    attention: str = "sdpa"

    def label(self) -> str:
        return f"{'fused graphs (compile on)' if self.fused else 'eager (compile off)'}, attention {self.attention}"


def is_gpu_profile(profile: DeviceProfile) -> bool:
    """A named GPU profile or a probed CUDA device (not the CPU probe)."""
    return profile.name != "probe:cpu"


def resolve_kernels(compile_mode: str, attention: str, profile: DeviceProfile) -> Kernels:
    """The runtime's choices as it makes them on `profile`'s device: compile "auto" = fused on a
    GPU, eager on a CPU (`fused_units.compile_wanted`); attention "auto" / "sdpa" = the
    architecture's pick. UserError for an unknown name or an unpriced backend."""
    if compile_mode not in COMPILE_CHOICES:
        raise UserError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    fused = compile_mode == "on" or (compile_mode == "auto" and is_gpu_profile(profile))
    profile.attention_tflops(attention)  # raises for an unpriced backend
    return Kernels(fused, resolve_attention_name(attention, profile))


@dataclass(frozen=True)
class LayerCost:
    """Seconds of one layer in one denoising call (one block-step), by cause."""

    gemm: float
    attention: float
    elementwise: float

    @property
    def seconds(self) -> float:
        return self.gemm + self.attention + self.elementwise


def text_kv_flops(inp: PlanInput) -> float:
    """FLOPs per layer of the cross-attention's text K and V projections (text_len x dim -> 2 x dim)."""
    if inp.dit is None:
        return 0.0
    return 2.0 * inp.dit.text_len * 2 * inp.dit.dim * inp.dit.dim


def elementwise_bytes(inp: PlanInput, kv_dtype: str, kernels: Kernels, profile: DeviceProfile) -> list[float]:
    """Non-matmul bytes per layer of one denoising call: given in the workload, else counted from
    the model (eager: traced op by op; fused: the fused kernels' table); 0 without a model config."""
    wl = inp.workload
    n = len(wl.linear_flops)
    given = dict(wl.elementwise_bytes)
    if kv_dtype in given:
        return list(given[kv_dtype])
    if inp.dit is None:
        return [0.0] * n
    from .traffic import fused_elementwise_bytes, unit_elementwise_bytes

    if kernels.fused:
        plain, inject = fused_elementwise_bytes(inp.dit, wl.size, inp.weight_format, kv_dtype, inp.sample,
                                                profile.int8_kernel)
    else:
        plain, inject = unit_elementwise_bytes(inp.dit, wl.size, inp.weight_format, kv_dtype, inp.sample)
    return [float(inject if i in inp.dit.audio_inject_layers else plain) for i in range(n)]


def gemm_tops(weight_format: str, profile: DeviceProfile, kernels: Kernels) -> float:
    """Effective op/s (1e12) of the GEMMs of a quantized linear. Eager: the linear's whole forward
    as the profile rates it (a measured W8A16 / int4 forward includes its dequantize). Fused: a
    format that runs dequantize + bf16 GEMM (W8A16, int4, nf4) is priced at bf16's GEMM rate, its
    dequantize pass being in the fused traffic (`traffic.fused_unit_traffic`'s weight_dequant)."""
    if not kernels.fused:
        return profile.linear_tops(weight_format)
    fmt = weight_format.lower()
    if (fmt == "int8" and profile.int8_kernel == "w8a8") or fmt == "fp8":
        return profile.linear_tops(fmt)
    return profile.linear_tops("bf16")


def layer_step_costs(inp: PlanInput, profile: DeviceProfile, kernels: Kernels, kv_dtype: str) -> list[LayerCost]:
    """Seconds of every layer in one block-step: GEMM FLOPs at the weight format's effective rate
    (without the text K/V projections, kept per prompt in both modes), attention FLOPs at the backend's
    rate, non-matmul bytes at the effective memory bandwidth."""
    wl = inp.workload
    lin_rate = gemm_tops(inp.weight_format, profile, kernels) * 1e12
    attn_rate = profile.attention_tflops(kernels.attention) * 1e12
    mem_rate = profile.memory_gbps() * 1e9
    text = text_kv_flops(inp)  # kept per prompt by the runtime, eager and fused alike
    elem = elementwise_bytes(inp, kv_dtype, kernels, profile)
    return [LayerCost(max(0.0, wl.linear_flops[i] - text) / lin_rate, wl.attn_flops[i] / attn_rate,
                      elem[i] / mem_rate if mem_rate > 0 else 0.0) for i in range(len(wl.linear_flops))]


def embed_head_flops(inp: PlanInput) -> float:
    """FLOPs of the resident prologue and head per denoising call: the patch and condition
    embeddings (2x2 patches of in_dim / cond_dim channels) and the head (dim -> 2x2 x out_dim)."""
    if inp.dit is None:
        return 0.0
    c, t = inp.dit, inp.workload.block_tokens
    return 2.0 * t * c.dim * 4 * (c.in_dim + c.cond_dim + c.out_dim)


def embed_head_seconds(inp: PlanInput, profile: DeviceProfile) -> float:
    """Seconds of the prologue and head per denoising call (bf16 GEMMs; they stay unquantized)."""
    return embed_head_flops(inp) / (profile.linear_tops("bf16") * 1e12)


def decode_flops_per_block(inp: PlanInput) -> float:
    """The streaming decoder's FLOPs for one block of latents at steady state (frames_per_block
    latents of 4 frames each)."""
    vae = preset_for_dit(inp.dit, default=PRESETS["14b"]).vae if inp.dit is not None else PRESETS["14b"].vae
    w, h = inp.workload.size
    per_latent = VAE_FLOP_PER_LATENT_704x384 * (w * h) / (704 * 384) * (vae.dim / 96) ** 2
    return per_latent * inp.sample.frames_per_block


def decode_seconds_per_block(inp: PlanInput, profile: DeviceProfile) -> float:
    """Seconds the VAE decoder takes for one block on `profile`'s device (`DeviceProfile.vae_rate`)."""
    return decode_flops_per_block(inp) / (profile.vae_rate() * 1e12)


def wav2vec_flops(seconds: float, cfg: Wav2VecConfig | None = None) -> float:
    """FLOPs of one wav2vec2 forward over `seconds` of speech (50 frames/s): the conv front-end, the
    feature projection, the conv position embedding, and per layer the attention projections,
    scores and FFN (wav2vec2-large-xlsr-53: ~36 GFLOP per second of speech at a 5 s window)."""
    c = cfg or PRESETS["14b"].wav2vec
    t = 50.0 * seconds  # frames
    d, f = c.hidden_size, c.intermediate_size
    per_frame = 2 * c.conv_dim[-1] * d + 2 * d * (d // c.num_conv_pos_embedding_groups) * c.num_conv_pos_embeddings
    per_layer = 2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * t * d  # q, k, v, o; FFN; scores and weighted sum
    scale = c.conv_dim[-1] / 512  # the front-end figure is for 512 channels
    return WAV2VEC_FRONTEND_FLOP_PER_S * seconds * scale ** 2 + t * (per_frame + c.num_hidden_layers * per_layer)


def audio_feature_seconds(window_seconds: float, inp: PlanInput, profile: DeviceProfile) -> float:
    """Seconds of wav2vec2 over one talk-session window (context + block + lookahead) on `profile`'s
    device, in fp32 (`WAV2VEC_FP32_OF_BF16`)."""
    cfg = preset_for_dit(inp.dit, default=PRESETS["14b"]).wav2vec if inp.dit is not None else None
    rate = profile.bf16_tflops * profile.gemm_efficiency * WAV2VEC_FP32_OF_BF16 * 1e12
    return wav2vec_flops(window_seconds, cfg) / rate


def block_handoff_bytes(inp: PlanInput, itemsize: int = 2) -> int:
    """Bytes of one block's latents as they leave the DiT ([16, frames_per_block, H/8, W/8])."""
    w, h = inp.workload.size
    z = inp.dit.out_dim if inp.dit is not None else 16
    return z * inp.sample.frames_per_block * (h // 8) * (w // 8) * itemsize


def clip_with_decode(dit_block: float, dit_busy: float, decode_block: float, blocks: int,
                     overlap: bool) -> tuple[float, float]:
    """(seconds per clip, of which decoder time not hidden) with the decoder on the DiT's GPU.

    `dit_block`: the DiT's wall time per block (compute + copy stalls); `dit_busy`: its compute.
    Serial: every block's decode follows its DiT. Overlapped (`render.ArtifactRenderer`): block
    b's decode runs while the DiT computes block b+1 of the same clip; the last block's decode of a
    clip runs alone (a checkpoint may follow it). Both run on one GPU, so the decoder's kernels add
    to the DiT's busy time and hide only in the DiT's idle time (its copy stalls): a pair takes
    max(dit_block, dit_busy + decode_block). Host-side parts (latents to the host, frames out) are
    milliseconds and not counted.
    """
    if blocks <= 0:
        return 0.0, 0.0
    if not overlap:
        clip = blocks * (dit_block + decode_block)
    else:
        pair = max(dit_block, dit_busy + decode_block)
        clip = dit_block + (blocks - 1) * pair + decode_block
    return clip, clip - blocks * dit_block
