"""Build the planner's `PlanInput` from a DiT config + size + weight format (or an artifact's unit sizes).

The 14B plan is computed without any weights: unit byte sizes come from the architecture's
tensor shapes and `qtypes.stored_nbytes`, so `plan` answers before a 32 GB checkpoint exists.

    inp = plan_input(PRESETS["14b"].dit, (704, 384), "int8"); make_plan(inp, Budget(24e9), prof)
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from ..artifact.format import Manifest, block_unit_name
from ..artifact.qtypes import QuantType, dequant_scratch_bytes, stored_nbytes
from ..config import PRESETS, DiTConfig, SampleConfig, VAEConfig, preset_for_dit
from ..errors import UserError

# Sizes the smallest-change search tries, largest first (LIVEAVATAR.md §5), as (width, height).
SIZES: tuple[tuple[int, int], ...] = ((704, 384), (688, 368), (640, 384), (384, 256))
WEIGHT_FORMATS = ("bf16", "int8", "fp8", "int4", "nf4")

GB = 1e9  # budgets and reports use decimal GB (a "24 GB" card has 24.0-25.7e9 bytes)
KV_DTYPES = ("bf16", "fp8", "int8")
ALIGN = 64  # every packed tensor (a KV layer's k, v, scales) starts at a 64-byte offset (streamer.pack_tensors)
# Streamed weight units are copied in pieces of this size on their own copy stream (KV copies have
# another stream; the copy engine runs queued pieces in order: runtime/streamer.py).
WEIGHT_CHUNK_BYTES = 16 << 20


def aligned(n: int, align: int = ALIGN) -> int:
    """`n` rounded up to a multiple of `align`."""
    return -(-n // align) * align


class DecoderFigures(Protocol):
    """The VAE decoder's device memory at one size, as `decode.decoder_memory.DecoderMemory` gives it
    (derived from the ONNX graph's shapes)."""

    weights_bytes: int
    workspace_bytes: int
    caches_bytes: int  # both cache banks
    working_set_bytes: tuple[tuple[int, int], ...]  # (latents per decode call, bytes), largest call first


class DecoderSizer(Protocol):
    """Gives the decoder's figures at a pixel size (`decode.decoder_memory.DecoderGraph.memory`)."""

    def memory(self, size: tuple[int, int]) -> DecoderFigures: ...


@dataclass(frozen=True)
class UnitSize:
    """One weight unit as stored in the artifact. `layer` None = always resident (prologue, head)."""

    name: str
    nbytes: int
    layer: int | None = None


@dataclass(frozen=True)
class KVSpec:
    """One KV cache: `step` 0..3 for a per-step ring, None for the sink (ref + motion, all steps)."""

    name: str
    step: int | None
    layers: int
    tokens: int
    heads: int
    head_dim: int

    def layer_bytes(self, dtype: str) -> int:
        """K + V of one layer; 8-bit dtypes add one fp32 scale per (token, head) for K and for V.
        Each part is 64-byte aligned, exactly as the runtime packs a layer (`kv_offload.LayerStore`)."""
        elems = self.tokens * self.heads * self.head_dim
        if dtype == "bf16":
            return 2 * aligned(2 * elems)
        return 2 * aligned(elems) + 2 * aligned(self.tokens * self.heads * 4)

    def nbytes(self, dtype: str) -> int:
        return self.layers * self.layer_bytes(dtype)


@dataclass(frozen=True)
class Workload:
    """Per-step compute of one block of frames at one size (computed from the config)."""

    size: tuple[int, int]  # (width, height) in pixels
    block_tokens: int  # tokens denoised together (frames_per_block x tokens_per_frame)
    linear_flops: tuple[float, ...]  # per layer, quantized-linear FLOPs
    attn_flops: tuple[float, ...]  # per layer, bf16 attention FLOPs
    activation_bytes: int  # peak transient memory of one unit forward
    new_kv_layer_bytes_bf16: int  # K + V of the current block for one layer (the write-back)
    vae_cache_bytes: int = 0  # the streaming VAE decoder's causal caches (both banks), resident all run
    steps: int = 4
    blocks_per_clip: int = 4
    decoder: DecoderFigures | None = None  # the ONNX decoder at this size; None: no decoder on the device
    # Non-matmul bytes per layer and denoising call, per KV dtype ((dtype, per-layer bytes) pairs);
    # empty: counted from the model on the meta device (`traffic.py`) when the plan has the config
    elementwise_bytes: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass(frozen=True)
class PlanInput:
    """Everything the plan depends on besides the budgets: bytes, shapes, workload."""

    weight_format: str  # the artifact's main linear format: bf16 / int8 / fp8 / int4 / nf4
    units: tuple[UnitSize, ...]  # execution order
    kv: tuple[KVSpec, ...]
    workload: Workload
    dit: DiTConfig | None = None  # lets a no-fit message try other formats and sizes
    sample: SampleConfig = SampleConfig()
    decoder_graph: DecoderSizer | None = None  # sizes the decoder at other sizes (no-fit suggestions)


@dataclass(frozen=True)
class Budget:
    """The one knob (VRAM) and its companions. Fixed costs are counted inside `vram_bytes`."""

    vram_bytes: float
    ram_bytes: float | None = None  # None: host RAM is not limited
    kv_dtype: str = "bf16"
    reserve_frac: float = 0.07  # kept free for allocator fragmentation and driver surprises
    cuda_context_bytes: float = 0.8e9  # CUDA context + cuBLAS/cuDNN workspaces
    # The ONNX decoder's weights + working set + workspace (its arena cap): None = from the plan
    # input's decoder figures (the graph's shapes); a number replaces them (0: no decoder counted)
    vae_arena_bytes: float | None = None
    host_baseline_bytes: float = 3.0e9  # python, torch, encoders kept on the host
    # Latents per ONNX decoder call. 1 (default): the decoder's frames differ by one level in rare
    # pixels with the split of latents into calls, so a fixed split keeps a render's frames the same
    # whatever --vram is; one latent fills a GPU's kernels at these sizes and needs a third of a
    # 3-latent call's working set (1.25 vs 3.74 GB at 704*384). None: the plan picks the largest
    # call that costs the DiT no speed.
    decode_latents: int | None = 1
    # How the units run (the runtime's compile mode): "off" = eager (today's traced costs), "on" =
    # fused graphs (runtime/costs.py), "auto" = fused on a GPU profile. Fused also keeps every
    # layer's text K/V on the device (computed once per prompt).
    compile: str = "off"
    attention: str = "auto"  # the attention backend (`--attention`), priced per device profile
    overlap_decode: bool = True  # the VAE decode of block b runs during the DiT of block b+1



def parse_size(text: str) -> tuple[int, int]:
    """'704*384' -> (704, 384) = (width, height); both must be multiples of 16 (VAE 8 x patch 2).

        parse_size("704*384")
    """
    try:
        w, h = (int(x) for x in text.lower().replace("x", "*").split("*"))
    except ValueError:
        raise UserError(f"size {text!r} is not WIDTH*HEIGHT, e.g. 704*384") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise UserError(f"size {text!r}: width and height must be positive multiples of 16")
    return w, h


def unit_shapes(cfg: DiTConfig) -> dict[str, list[tuple[str, tuple[int, ...], bool]]]:
    """Unit name -> [(key, shape, quantizable)] for every DiT tensor, grouped as the runtime streams it:
    'resident' (embeddings, audio encoder, FramePack, head) and 'block_{i:03d}' (block i with the
    audio injector and AdaLN that run right after it), as `format.py` names the artifact's files.
    `quantizable`: a Linear weight the artifact may quantize (LA's set: block and injector Linears;
    embeddings, time_projection, head stay bf16). A table, so `plan` never builds the 14B model;
    tests/test_plan.py checks it against the meta-built model's keys and shapes."""
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_dim
    a = cfg.audio_dim
    pk = (1, *cfg.patch_size[1:])  # (1, 2, 2) conv kernels of patch/cond embedding

    def lin(name: str, n: int, k: int, quant: bool) -> list[tuple[str, tuple[int, ...], bool]]:
        return [(f"{name}.weight", (n, k), quant), (f"{name}.bias", (n,), False)]

    pro: list[tuple[str, tuple[int, ...], bool]] = []
    pro += [("patch_embedding.weight", (d, cfg.in_dim, *pk), False), ("patch_embedding.bias", (d,), False)]
    pro += lin("text_embedding.0", d, t, False) + lin("text_embedding.2", d, d, False)
    pro += lin("time_embedding.0", d, cfg.freq_dim, False) + lin("time_embedding.2", d, d, False)
    pro += lin("time_projection.1", 6 * d, d, False)
    pro += [("cond_encoder.weight", (d, cfg.cond_dim, *pk), False), ("cond_encoder.bias", (d,), False)]
    pro += [("trainable_cond_mask.weight", (3, d), False)]
    enc = "casual_audio_encoder"  # (sic, the checkpoint's spelling)
    q = d // 4  # the audio encoder's per-head width
    pro += [(f"{enc}.weights", (1, cfg.audio_layers, 1, 1), False)]
    for name, n, k in (("conv1_local", q * cfg.num_audio_token, a), ("conv1_global", q, a),
                       ("conv2", 2 * q, q), ("conv3", d, 2 * q)):
        pro += [(f"{enc}.encoder.{name}.conv.weight", (n, k, 3), False), (f"{enc}.encoder.{name}.conv.bias", (n,), False)]
    pro += lin(f"{enc}.encoder.final_linear", d, d, False) + [(f"{enc}.encoder.padding_tokens", (1, 1, 1, d), False)]
    for name, k in (("proj", (1, 2, 2)), ("proj_2x", (2, 4, 4)), ("proj_4x", (4, 8, 8))):
        pro += [(f"frame_packer.{name}.weight", (d, cfg.in_dim, *k), False), (f"frame_packer.{name}.bias", (d,), False)]

    pro += [("head.modulation", (1, 2, d), False)] + lin("head.head", cfg.out_dim * 4, d, False)
    units = {"resident": pro}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        ts = [(f"{b}.modulation", (1, 6, d), False), (f"{b}.norm3.weight", (d,), False), (f"{b}.norm3.bias", (d,), False)]
        for att in ("self_attn", "cross_attn"):
            for p in "qkvo":
                ts += lin(f"{b}.{att}.{p}", d, d, True)
            ts += [(f"{b}.{att}.norm_q.weight", (d,), False), (f"{b}.{att}.norm_k.weight", (d,), False)]
        ts += lin(f"{b}.ffn.0", f, d, True) + lin(f"{b}.ffn.2", d, f, True)
        if i in cfg.audio_inject_layers:
            j = cfg.audio_inject_layers.index(i)
            inj = f"audio_injector.injector.{j}"
            for p in "qkvo":
                ts += lin(f"{inj}.{p}", d, d, True)
            ts += [(f"{inj}.norm_q.weight", (d,), False), (f"{inj}.norm_k.weight", (d,), False)]
            ts += lin(f"audio_injector.injector_adain_layers.{j}.linear", 2 * d, d, True)
        units[block_unit_name(i)] = ts
    return units


def synthesize_unit_sizes(cfg: DiTConfig, weight_format: str, group_size: int = 128) -> tuple[UnitSize, ...]:
    """Byte size of every unit if quantizable Linears are stored as `weight_format`, the rest bf16.

        synthesize_unit_sizes(PRESETS["14b"].dit, "int8")[1].nbytes  # block_000 with injector 0
    """
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"unknown weight format {weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    qt = QuantType(weight_format)
    out = []
    for name, tensors in unit_shapes(cfg).items():
        total = sum(stored_nbytes(qt if quant else QuantType.BF16, shape, group_size if qt is QuantType.INT4 else None)
                    for _, shape, quant in tensors)
        out.append(UnitSize(name, total, _layer_of(name)))
    return tuple(out)


def vae_cache_bytes(vae: VAEConfig, size: tuple[int, int], itemsize: int = 2) -> int:
    """Device bytes of the ONNX decoder's two cache banks at `size` (fp16 graph: itemsize 2).
    Cache i is [1, C_i, 2, h*s_i, w*s_i] (`WanVAE.decoder_cache_layout`, 2.56 GB at 704*384)."""
    import torch

    from ..model.vae import WanVAE

    with torch.device("meta"):
        layout = WanVAE(vae).decoder_cache_layout()
    h, w = size[1] // vae.stride[1], size[0] // vae.stride[2]
    return 2 * itemsize * sum(c * 2 * (h * s) * (w * s) for c, s in layout)


def _token_counts(size: tuple[int, int]) -> tuple[int, int]:
    """(tokens per latent frame, FramePack motion tokens of the sink) at pixel `size` = (w, h).

    Latents are 8x smaller than pixels and 2x2-patched; the motion buckets pack 1 frame at 2x2, 2
    frames at 4x4 and 16 frames at 8x8 latent pixels per token (dit_blocks.FramePacker)."""
    w, h = size
    lh, lw = h // 8, w // 8  # latent grid
    tpf = (lh // 2) * (lw // 2)
    motion = (lh // 2) * (lw // 2) + (lh // 4) * (lw // 4) + 4 * (lh // 8) * (lw // 8)
    return tpf, motion


def workload(cfg: DiTConfig, size: tuple[int, int], sample: SampleConfig = SampleConfig(),
             vae: VAEConfig | None = None, decoder: DecoderSizer | None = None) -> Workload:
    """FLOPs per layer and activation peak of one block-step at `size` (LIVEAVATAR.md §5 formulas),
    and the VAE decoder caches that stay on the device next to the DiT."""
    w, h = size
    tpf, motion = _token_counts(size)
    t = sample.frames_per_block * tpf  # tokens denoised per block
    ring = sample.latent_frames_per_clip * tpf
    keys = ring + tpf + motion  # ring (incl. this block) + sink (ref frame + FramePack)
    d, f, tl = cfg.dim, cfg.ffn_dim, cfg.text_len
    lin, attn = [], []
    for i in range(cfg.num_layers):
        flops = 2 * t * (6 * d * d + 2 * d * f) + 2 * tl * 2 * d * d  # qkvo + cross q,o + FFN; cross k,v on text
        a_flops = 4 * t * keys * d + 4 * t * tl * d  # QK^T and PV for self- and cross-attention
        if i in cfg.audio_inject_layers:
            flops += 2 * t * 2 * d * d  # injector q, o on the tokens (k, v act on 5 audio tokens)
        lin.append(float(flops))
        attn.append(float(a_flops))
    # fp32 residual + six fp32 modulation maps + norms (~12 [t, d] fp32), the concatenated bf16 K/V
    # with their fp32 RoPE copies (~4 [keys, d] bf16), the FFN hidden with its GELU (3 [t, f] bf16),
    # and one fp32 [ring, d] temporary while an 8-bit ring is dequantized.
    act = 12 * t * d * 4 + 4 * keys * d * 2 + 3 * t * f * 2 + ring * d * 4
    return Workload(
        size=(w, h), block_tokens=t, linear_flops=tuple(lin), attn_flops=tuple(attn), activation_bytes=act,
        new_kv_layer_bytes_bf16=2 * t * d * 2, steps=sample.num_steps, blocks_per_clip=sample.blocks_per_clip,
        vae_cache_bytes=vae_cache_bytes(vae or _vae_for(cfg), size),
        decoder=decoder.memory(size) if decoder is not None else None,
    )


def _vae_for(cfg: DiTConfig) -> VAEConfig:
    """The VAE that ships with this DiT (the tiny preset's for the tiny DiT, the real one otherwise)."""
    return preset_for_dit(cfg, default=PRESETS["14b"]).vae


def kv_specs(cfg: DiTConfig, size: tuple[int, int], sample: SampleConfig = SampleConfig()) -> tuple[KVSpec, ...]:
    """The 4 per-step rings (one clip of tokens each) and the sink (ref + FramePack motion tokens)."""
    tpf, motion = _token_counts(size)
    hd = cfg.head_dim
    rings = tuple(KVSpec(f"ring.{s}", s, cfg.num_layers, sample.latent_frames_per_clip * tpf, cfg.num_heads, hd)
                  for s in range(sample.num_steps))
    return rings + (KVSpec("sink", None, cfg.num_layers, tpf + motion, cfg.num_heads, hd),)


def _layer_of(unit_name: str) -> int | None:
    """'block_007' -> 7; any other unit (the resident set) -> None."""
    return int(unit_name[len("block_"):]) if unit_name.startswith("block_") else None


def manifest_unit_sizes(manifest: Manifest) -> dict[str, int]:
    """Unit name -> bytes of the DiT's units in an artifact (T5 and the VAE are not planned here)."""
    return {u.name: u.data_nbytes for u in manifest.units if u.kind in ("dit_block", "dit_resident")}


def plan_input(cfg: DiTConfig, size: tuple[int, int], weight_format: str,
               unit_sizes: Mapping[str, int] | None = None, sample: SampleConfig = SampleConfig(),
               decoder: DecoderSizer | None = None) -> PlanInput:
    """The planner's input: real unit sizes (an artifact's manifest) or synthesized ones, and the VAE
    decoder's graph (`decode.decoder_memory.DecoderGraph`; None: no decoder shares the device).

        plan_input(PRESETS["14b"].dit, (704, 384), "int8", decoder=DecoderGraph.for_preset("14b"))
    """
    if unit_sizes is None:
        units = synthesize_unit_sizes(cfg, weight_format)
    else:
        units = tuple(UnitSize(n, int(b), _layer_of(n)) for n, b in unit_sizes.items())
    return PlanInput(weight_format=weight_format, units=units, kv=kv_specs(cfg, size, sample),
                     workload=_format_workload(cfg, size, sample, decoder, weight_format), dit=cfg, sample=sample,
                     decoder_graph=decoder)


def _format_workload(cfg: DiTConfig, size: tuple[int, int], sample: SampleConfig, decoder: DecoderSizer | None,
                     weight_format: str) -> Workload:
    """`workload` plus what the weight format adds to a unit's transient memory."""
    wl = workload(cfg, size, sample, decoder=decoder)
    if weight_format in ("bf16", "fp32"):
        return wl
    # A quantized Linear runs on a dequantized copy of its weight (int4, nf4, int8 on Hopper) or
    # holds an int32 accumulator (W8A8): one Linear at a time, so the largest one's scratch counts
    # (measured on an H100, 2026-11-26: uncounted, the int4 layouts' peak exceeded the plan by 0.7 GB).
    return replace(wl, activation_bytes=wl.activation_bytes + dequant_scratch_bytes(cfg.ffn_dim, cfg.dim))


def alternatives(inp: PlanInput, budget: Budget) -> Iterator[tuple[str, PlanInput, Budget]]:
    """Smaller variants in order of how little they change: KV dtype, then weight format, then size."""
    if budget.kv_dtype == "bf16":
        yield "--kv fp8", inp, replace(budget, kv_dtype="fp8")
    if inp.dit is None:
        return
    cfg, sample = inp.dit, inp.sample
    kv8 = replace(budget, kv_dtype="fp8")
    smaller = {"bf16": ("int8", "int4"), "int8": ("int4",), "fp8": ("int4",)}.get(inp.weight_format, ())
    for fmt in smaller:
        alt = plan_input(cfg, inp.workload.size, fmt, sample=sample, decoder=inp.decoder_graph)
        yield f"re-quantize with --format {fmt}", alt, budget
        if budget.kv_dtype == "bf16":
            yield f"re-quantize with --format {fmt} and --kv fp8", alt, kv8
    cur = inp.workload.size[0] * inp.workload.size[1]
    for w, h in SIZES:
        if w * h >= cur:
            continue
        alt = replace(inp, kv=kv_specs(cfg, (w, h), sample),
                      workload=_format_workload(cfg, (w, h), sample, inp.decoder_graph, inp.weight_format))
        yield f"--size {w}*{h}", alt, budget
        if budget.kv_dtype == "bf16":
            yield f"--size {w}*{h} --kv fp8", alt, kv8
