"""The artifact backend of `generate`: builds the real renderer from a quantized artifact.

`generate.py` runs the clip loop against the `Backend`/`ClipRenderer` protocols; this module is
the one implementation that is not a test fake. Per render it encodes the conditioning (prompt
cache + umT5, wav2vec2 features, the VAE encode of the photo), plans memory for the budget, drives
the streamed DiT runtime through `reference.CausalGenerator`, and decodes each block with the
ONNX streaming VAE decoder.

    backend = ArtifactBackend.open(Path("artifact"), vram_gb=24)
    renderer = backend.build(inputs)  # inputs: generate.RenderInputs
    frames = renderer.block_frames(0, 0)  # uint8 [12, H, W, 3]
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .request import RenderInputs

log = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("dit", "t5", "vae", "audio", "tokenizer")


class ArtifactBackend:
    """Builds renderers from a quantized artifact: conditioning, the streamed DiT, the ONNX decoder.

    backend = ArtifactBackend.open(Path("artifact"), vram_gb=24); renderer = backend.build(inputs)
    """

    def __init__(self, directory: Path, manifest: Any, preset: Any, vram_gb: float | None, ram_gb: float | None,
                 kv_dtype: str = "bf16", device_profile: str | None = None, compile_units: bool = False) -> None:
        import torch

        self.directory, self.manifest, self.preset = directory, manifest, preset
        self.vram_gb, self.ram_gb, self.kv_dtype = vram_gb, ram_gb, kv_dtype
        self.device_profile, self.compile_units = device_profile, compile_units
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.plan: Any = None  # set by build(): the memory plan this render runs under
        self._plan_args: tuple[Any, Any, Any] | None = None  # (inputs, budget, profile), for oom_advice

    @classmethod
    def open(cls, directory: Path, vram_gb: float | None = None, ram_gb: float | None = None,
             kv_dtype: str = "bf16", device_profile: str | None = None, compile_units: bool = False) -> ArtifactBackend:
        """Validate the artifact (format version, model, components) before any heavy work.

        ArtifactBackend.open(Path("artifact"), vram_gb=20.0, kv_dtype="int8")  # ArtifactError if unusable
        """
        from ..artifact.format import read_manifest
        from ..config import preset_for_dit
        from ..errors import ArtifactError, CheckpointError

        manifest = read_manifest(directory)
        missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
        if missing:
            raise ArtifactError(f"{directory}: the artifact lacks {', '.join(missing)}; generate needs all of "
                                f"{', '.join(REQUIRED_COMPONENTS)} (re-run quantize without --components)")
        for key in ("audio_dir", "tokenizer_dir", "vae_onnx"):
            if key not in manifest.paths or not (directory / manifest.paths[key]).exists():
                raise ArtifactError(f"{directory}: the artifact has no {key.replace('_', ' ')} (incomplete conversion)")
        try:
            preset = preset_for_dit(manifest.dit)
        except CheckpointError:  # same check as for a checkpoint, worded for an artifact
            dit = manifest.dit
            raise ArtifactError(f"the artifact's DiT (dim {dit.dim}, {dit.num_layers} layers) is not a model this "
                                "runtime knows (Wan2.2-S2V-14B + Live Avatar)") from None
        return cls(directory, manifest, preset, vram_gb, ram_gb, kv_dtype, device_profile, compile_units)

    def identity(self) -> str:
        """sha256 of the manifest bytes: what the prompt cache and the resume journal key on."""
        from ..artifact.format import MANIFEST_FILE

        return hashlib.sha256((self.directory / MANIFEST_FILE).read_bytes()).hexdigest()

    def build(self, inputs: RenderInputs) -> ArtifactRenderer:
        """Conditioning (prompt, audio, ref/motion latents), then the DiT runtime and the decoder.

        renderer = backend.build(inputs); renderer.block_frames(0, 0)  # uint8 [12, H, W, 3]
        """
        from ..conditioning.prompt_cache import PromptCache, default_cache_dir
        from ..decode.vae_onnx import OnnxVAEDecoder
        from ..runtime.dit_runtime import DiTRuntime
        from .generator import CausalGenerator, GenerationInputs

        req = inputs.request
        plan = self._plan((inputs.width, inputs.height))  # first: a budget that cannot fit fails in a second
        cache = PromptCache(req.cache_dir or default_cache_dir())
        text, _ = cache.get_or_compute(req.prompt, self.identity(), lambda: self._encode_prompt(req.prompt))
        audio = self._audio_features(inputs.wave)
        ref_latents, motion_latents = self._encode_reference(inputs.reference, req.sample.motion_frames)
        runtime = DiTRuntime.from_artifact(self.directory, plan, device=self.device, timing=self.device.type == "cuda",
                                           compile_units=self.compile_units)
        gen_inputs = GenerationInputs(text=text.to(self.device), audio=audio,
                                      ref_latents=ref_latents, motion_latents=motion_latents)
        generator = CausalGenerator(_OnDevice(runtime.dit, self.device), gen_inputs, seed=req.seed,
                                    sample=req.sample, num_clips=inputs.num_clips, runner=_RuntimeRunner(runtime))
        # The plan sized the decoder: its arena cap (weights + one call's working set + workspace,
        # from the graph's shapes) and the latents per call that working set was counted for.
        decoder = OnnxVAEDecoder(self.directory / self.manifest.paths["vae_onnx"],
                                 gpu_mem_limit=plan.decoder_arena_bytes if self.device.type == "cuda" else None,
                                 latents_per_call=plan.decode_latents_per_call or None)
        # As upstream's streaming decoder (TPP rank 4): warm the causal state up on the first 7
        # motion latents and discard those frames, so block 0 continues a "video" of the photo.
        decoder.decode(motion_latents[:, :7].float().cpu().numpy())
        return ArtifactRenderer(generator, decoder, runtime, req.sample.blocks_per_clip, plan=plan)

    # ---- conditioning ---------------------------------------------------------------------------

    def _load_module(self, module: Any, unit_name: str) -> Any:
        """Fill a meta-built module from one artifact unit (quantized Linears stay quantized)."""
        import torch

        from ..artifact.format import read_unit
        from ..errors import ArtifactError
        from ..runtime.qlinear import QuantLinear, part_attr, swap_linears

        buf, views = read_unit(self.directory, unit_name, manifest=self.manifest)
        specs = {n[: -len(".weight")]: (v.entry.qtype, v.entry.group_size)
                 for n, v in views.items() if v.entry.qtype.is_quantized and n.endswith(".weight")}
        swap_linears(module, specs, bias_dtype=self.dtype)
        for name, view in views.items():
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path)
            if view.entry.qtype.is_quantized:
                if not isinstance(owner, QuantLinear):
                    raise ArtifactError(f"{self.directory}: {name} is stored quantized but {path} is not a Linear")
                for role, t in view.parts(buf).items():
                    setattr(owner, part_attr(role), t.to(self.device, copy=True))  # own memory: buf is freed
            else:
                t = view.dequantize(buf, self.dtype).to(self.device)
                if attr in owner._parameters:
                    setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
                else:
                    setattr(owner, attr, t)
        leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if leftover:
            raise ArtifactError(f"{self.directory}: unit {unit_name} lacks {leftover[0]}")
        return module.eval()

    def _encode_prompt(self, prompt: str) -> Any:
        """umT5 states [L, text_dim] for the prompt (runs only on a prompt-cache miss)."""
        import torch

        from ..conditioning.text_tokenizer import load_tokenizer, tokenize
        from ..model.t5 import UMT5Encoder, encode_prompt

        log.info("encoding the prompt with umT5 (cached for next time)")
        tokenizer = load_tokenizer(self.directory / self.manifest.paths["tokenizer_dir"])
        with torch.device("meta"):
            encoder = UMT5Encoder(self.preset.t5)
        encoder = self._load_module(encoder, "t5")
        ids, mask = tokenize(tokenizer, prompt, self.preset.t5.text_len)
        with torch.no_grad():
            states = encode_prompt(encoder, ids.to(self.device), mask.to(self.device))[0]
        del encoder
        self._free()
        return states.float().cpu()

    def _audio_features(self, wave: np.ndarray) -> Any:
        """Per-video-frame wav2vec2 features [25, audio_dim, clips*48], kept in host memory.

        They stay on the CPU (51 KB per video frame at width 1024 in bf16): each block moves only
        its own 12 frames to the device.
        """
        from ..conditioning.audio_features import extract_audio_features, load_wav2vec

        encoder = load_wav2vec(self.directory / self.manifest.paths["audio_dir"], device=self.device)
        feats = extract_audio_features(encoder, wave, out_dtype=self.dtype)
        del encoder
        self._free()
        return feats

    def _encode_reference(self, reference: np.ndarray, motion_frames: int) -> tuple[Any, Any]:
        """(ref_latents [16, 1, h, w], motion_latents [16, 92, h, w]) as upstream encodes the photo.

        Upstream encodes the photo repeated 5 frames (keeping latent 1) and the photo repeated
        5 * 73 = 365 frames (92 latents). Both are prefixes of one constant video through a causal
        encoder, so one pass gives both: ref_latents = motion_latents[:, 1:2].
        """
        import torch

        from ..conditioning.photo import encode_constant_video
        from ..model.vae import WanVAE

        with torch.device("meta"):
            vae = WanVAE(self.preset.vae)
        vae = self._load_module(vae, "vae")
        frame = torch.from_numpy(reference).to(self.device, self.dtype)[None, :, None]  # [1, 3, 1, H, W]
        with torch.no_grad():
            motion_latents = encode_constant_video(vae, frame, 5 * motion_frames)[0]  # [16, 92, h, w]
        del vae
        self._free()
        return motion_latents[:, 1:2].clone(), motion_latents

    def _plan(self, size: tuple[int, int]) -> Any:
        """The memory plan for this budget and size (width, height); BudgetError if nothing fits."""
        from .memory import RenderBudget, plan_render

        planned = plan_render(self.directory, self.manifest, size,
                              RenderBudget(self.vram_gb, self.ram_gb, self.kv_dtype, self.device_profile),
                              self.device.type)
        self.plan, self._plan_args = planned.plan, (planned.inputs, planned.budget, planned.profile)
        return planned.plan

    def oom_advice(self) -> str:
        """What to change after running out of memory: the plan for a 15 % smaller VRAM budget.

        backend.oom_advice()  # 'rerun with --resume --vram 17.0 (the plan then keeps ...)'
        """
        from dataclasses import replace

        from ..errors import BudgetError
        from ..runtime.plan import make_plan

        if self._plan_args is None:
            return "pass a smaller --vram or --size"
        inp, budget, profile = self._plan_args
        smaller = replace(budget, vram_bytes=budget.vram_bytes * 0.85)
        try:
            plan = make_plan(inp, smaller, profile)
        except BudgetError as e:
            return str(e)
        return (f"rerun with --resume --vram {smaller.vram_bytes / 1e9:.1f} (the plan then keeps "
                f"{plan.peak_vram_bytes / 1e9:.1f} GB on the GPU, "
                f"predicted {plan.predicted_seconds_per_clip:.0f} s per clip)")

    def _free(self) -> None:
        """Return the memory of a conditioning model that was just dropped (before the DiT loads)."""
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _OnDevice:
    """The runtime's DiT as CausalGenerator sees it: tensor inputs moved to the compute device,
    flows returned on the CPU (where the generator keeps its noise and steps the scheduler)."""

    def __init__(self, dit: Any, device: Any) -> None:
        self.dit, self.device, self.cfg = dit, device, dit.cfg

    @property
    def compute_dtype(self) -> Any:
        return self.dit.compute_dtype

    @property
    def compute_device(self) -> Any:
        return self.device

    def _moved(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        import torch

        def move(v: Any) -> Any:
            return v.to(self.device) if isinstance(v, torch.Tensor) else v

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def embed_text(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._moved(args, kwargs)
        return self.dit.embed_text(*args, **kwargs)

    def prepare_sink(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._moved(args, kwargs)
        return self.dit.prepare_sink(*args, **kwargs)

    def prepare_block(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._moved(args, kwargs)
        return self.dit.prepare_block(*args, **kwargs)

    def finish(self, x: Any, ctx: Any) -> Any:
        return self.dit.finish(x, ctx).cpu()  # [16, 3, h, w]


class _RuntimeRunner:
    """reference.UnitRunner over DiTRuntime's unit loop (streamed weights, placed KV caches)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def prefill_sink(self, x: Any, ctx: Any) -> None:
        self.runtime.prefill_units(x, ctx)

    def denoise(self, step: int, start_token: int, x: Any, ctx: Any) -> Any:
        return self.runtime.denoise_units(step, start_token, x, ctx)

    def cache_state(self) -> dict[str, Any]:
        return self.runtime.kv_state()

    def load_cache_state(self, state: dict[str, Any]) -> None:
        self.runtime.load_kv_state(state)


class ArtifactRenderer:
    """ClipRenderer: CausalGenerator blocks -> ONNX streaming decode -> uint8 frames.

    frames = renderer.block_frames(clip, block)  # in order: clip 0 blocks 0..3, clip 1 block 0, ...
    """

    def __init__(self, generator: Any, decoder: Any, runtime: Any, blocks_per_clip: int, plan: Any = None) -> None:
        self.generator, self.decoder, self.runtime = generator, decoder, runtime
        self.blocks_per_clip, self.plan = blocks_per_clip, plan

    def block_frames(self, clip: int, block: int) -> np.ndarray:
        """The next block's 12 frames, uint8 [12, H, W, 3]; (clip, block) must be the next in order."""
        out = self.generator.next_block()
        if (out.clip, out.block) != (clip, block):
            raise RuntimeError(f"generator produced clip {out.clip} block {out.block}, expected {clip}/{block}")
        return self.decoder.decode(out.latents.float().cpu().numpy())  # [12, H, W, 3] uint8

    def state(self) -> dict[str, Any]:
        """Everything the next block depends on, as tensors (torch.save-able)."""
        import torch

        # np.array (not ascontiguousarray, which turns 0-d arrays into 1-d) keeps every shape
        decoder = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.decoder.state().items()}
        return {"generator": self.generator.state_dict(), "decoder": decoder}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of an earlier renderer built from the same inputs."""
        import torch

        # The state may be memory-mapped from the checkpoint file: the generator keeps its small
        # tensors (latents, RNG) by reference, so give it copies; the caches are copied into place.
        gen = {k: v.clone() if isinstance(v, torch.Tensor) and k != "caches" else v
               for k, v in state["generator"].items()}
        self.generator.load_state_dict(gen)
        self.decoder.load_state({k: v.numpy() for k, v in state["decoder"].items()})

    def copy_wait_seconds(self) -> float:
        """Seconds compute has waited for weight and KV copies so far (CUDA: timed with events)."""
        return self.runtime.copy_wait_seconds()

    def layout(self) -> dict[str, Any]:
        """The layout this render runs under (telemetry's `layout` line)."""
        return {**self.runtime.layout(), "decode_latents_per_call": self.plan.decode_latents_per_call}

    def counters(self) -> dict[str, float]:
        """Running copy-wait (weights, KV) and H2D byte totals (ledger.clip_mark)."""
        return self.runtime.copy_counters()

    def ledger(self, seconds: float | None, clip: dict[str, float]) -> dict[str, Any]:
        """The plan's figures next to the measured ones, for the clip just rendered."""
        from .ledger import memory_ledger

        return memory_ledger(self.plan, self.runtime, self.decoder, seconds, clip)
