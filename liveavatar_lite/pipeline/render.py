"""The artifact backend: loads a quantized artifact once and builds a renderer per render from it.

`generate.py` runs the clip loop against the `Backend`/`ClipRenderer` protocols; this module is
the one implementation that is not a test fake. It keeps what is expensive to load for as long as
it lives: the planned DiT runtime (weights placed once; KV caches re-placed only when a render's
size needs other ones), the ONNX decoder session, the wav2vec2 encoder, the VAE encoder for photos
and the tokenizer. Per render it encodes the conditioning (prompt and photo through their on-disk
caches, wav2vec2 features), resets the decoder and drives the runtime through
`generator.CausalGenerator`. `loads` counts every model load, so a caller can see a warm render
load nothing.

    backend = ArtifactBackend.open(PipelineOptions(Path("artifact"), vram_gb=24))
    renderer = backend.build(inputs)  # inputs: request.RenderInputs
    frames = renderer.block_frames(0, 0)  # uint8 [12, H, W, 3]
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import phase
from .request import PipelineOptions, RenderInputs

log = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("dit", "t5", "vae", "audio", "tokenizer")


class ArtifactBackend:
    """Builds renderers from a quantized artifact: conditioning, the streamed DiT, the ONNX decoder.

    backend = ArtifactBackend.open(PipelineOptions(Path("artifact"), vram_gb=24)); backend.build(inputs)
    """

    def __init__(self, options: PipelineOptions, manifest: Any, preset: Any) -> None:
        import torch

        from ..artifact.format import MANIFEST_FILE

        self.options, self.manifest, self.preset = options, manifest, preset
        self.directory = Path(options.artifact)
        self.kv_dtype = options.kv_dtype
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.loads: Counter[str] = Counter()  # model loads by kind: dit, decoder, audio_encoder, vae_encoder, t5
        self.plan: Any = None  # the memory plan of the latest render
        self._plan_args: tuple[Any, Any, Any] | None = None  # (inputs, budget, profile), for oom_advice
        self._profile: Any = None
        self._runtime: Any = None
        self._decoder: Any = None
        self._decoder_cap: int | None = None  # the arena cap the decoder session was opened with
        self._wav2vec: Any = None
        self._vae: Any = None
        # the manifest's exact bytes name the artifact (read once: a warm pipeline keeps its identity)
        self._artifact_id = hashlib.sha256((self.directory / MANIFEST_FILE).read_bytes()).hexdigest()
        # the attention choice refused in one line before anything heavy loads, by checks that touch
        # no device: serve's and farm's parents open a backend only to validate, and must not hold
        # a CUDA context; the probes run in `attention`, just before the DiT runtime is built
        from ..runtime.attention import check_attention

        check_attention(options.attention, self.device, manifest.dit.head_dim)
        self._attention: Any = None

    @property
    def attention(self) -> Any:
        """The attention kernel (runtime/attention.py), resolved on first use: probes the device.
        q/k/v enter attention in bf16 (la_roundings) or the compute dtype."""
        if self._attention is None:
            import torch

            from ..runtime.attention import resolve_attention

            self._attention = resolve_attention(self.options.attention, self.device, torch.bfloat16,
                                                self.manifest.dit.head_dim)
        return self._attention

    @classmethod
    def open(cls, options: PipelineOptions) -> ArtifactBackend:
        """Validate the artifact (format version, model, components) before any heavy work.

        ArtifactBackend.open(PipelineOptions(Path("artifact"), kv_dtype="int8"))  # ArtifactError if unusable
        """
        from ..artifact.format import read_manifest, verify_files
        from ..config import preset_for_dit
        from ..errors import ArtifactError, CheckpointError, UserError
        from ..runtime.fused_units import COMPILE_MODES
        from ..runtime.plan_inputs import KV_DTYPES

        if options.kv_dtype not in KV_DTYPES:
            raise UserError(f"unknown KV dtype {options.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        if not isinstance(options.compile_units, bool) and options.compile_units not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {options.compile_units!r}; choose one of {', '.join(COMPILE_MODES)}")
        directory = Path(options.artifact)
        manifest = read_manifest(directory)
        missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
        if missing:
            raise ArtifactError(f"{directory}: the artifact lacks {', '.join(missing)}; generate needs all of "
                                f"{', '.join(REQUIRED_COMPONENTS)} (re-run quantize without --components)")
        for key in ("audio_dir", "tokenizer_dir", "vae_onnx"):
            if key not in manifest.paths or not (directory / manifest.paths[key]).exists():
                raise ArtifactError(f"{directory}: the artifact has no {key.replace('_', ' ')} (incomplete conversion)")
        verify_files(directory, manifest, keys=("vae_onnx", "audio_dir", "tokenizer_dir"))  # units: as read
        if manifest.source.lora is None:
            log.warning("%s was converted without the Live Avatar LoRA (quantize --no-lora): with 4 steps and "
                        "no CFG the base model renders poor video; re-run quantize with the LoRA", directory)
        try:
            preset = preset_for_dit(manifest.dit)
        except CheckpointError:  # same check as for a checkpoint, worded for an artifact
            dit = manifest.dit
            raise ArtifactError(f"the artifact's DiT (dim {dit.dim}, {dit.num_layers} layers) is not a model this "
                                "runtime knows (Wan2.2-S2V-14B + Live Avatar)") from None
        return cls(options, manifest, preset)

    def identity(self) -> str:
        """What the frames depend on besides the request: the manifest bytes and the KV storage dtype."""
        return f"{self._artifact_id}:{self.kv_dtype}"

    @property
    def artifact_id(self) -> str:
        """sha256 of the manifest bytes: what the prompt and photo caches key on."""
        return self._artifact_id

    # ---- loading (once) ---------------------------------------------------------------------------

    def load(self, size: tuple[int, int]) -> None:
        """Load everything a render needs, planned for `size` (width, height): the DiT runtime, the
        decoder session and the audio encoder. Later renders reuse them (see `loads`)."""
        self._runtime_for(self._plan(size))
        self._decoder_session()
        self._audio_encoder()

    def _runtime_for(self, plan: Any) -> Any:
        """The DiT runtime laid out per `plan`: the loaded one when its weight layout matches (its KV
        caches re-placed if needed), else a new one (weights read again: counted in `loads`)."""
        from ..runtime.attention import use_attention
        from ..runtime.dit_runtime import DiTRuntime

        kernel = self.attention  # probed here, before the weights load (an unusable backend: one line)
        if self._runtime is not None and self._runtime.same_weight_layout(plan):
            self._runtime.place_kv(plan)
            return self._runtime
        if self._runtime is not None:
            log.info("re-placing the DiT weights for %dx%d (another size than the loaded plan)", *plan.size)
            self._runtime = None
            self._free()
        with phase("loading the DiT", self.options.progress):
            self._runtime = DiTRuntime.from_artifact(self.directory, plan, device=self.device,
                                                     timing=self.device.type == "cuda",
                                                     compile_units=self.options.compile_units)
            use_attention(self._runtime.dit, kernel)
        self.loads["dit"] += 1
        return self._runtime

    def _decoder_session(self) -> Any:
        """The ONNX decoder, sized by the plan: its arena cap (weights + one call's working set +
        workspace, from the graph's shapes) and the latents per call that working set was counted for.
        Reopened only when a plan for another size needs another cap."""
        from ..decode.vae_onnx import OnnxVAEDecoder

        plan = self.plan
        cap = plan.decoder_arena_bytes if self.device.type == "cuda" and plan is not None else None
        if self._decoder is not None and cap != self._decoder_cap:
            self._decoder = None
            self._free()
        if self._decoder is None:
            with phase("opening the ONNX decoder", self.options.progress):
                self._decoder = OnnxVAEDecoder(self.directory / self.manifest.paths["vae_onnx"], gpu_mem_limit=cap)
            self._decoder_cap = cap
            self.loads["decoder"] += 1
        self._decoder.latents_per_call = (plan.decode_latents_per_call or None) if plan is not None else None
        return self._decoder

    def _audio_encoder(self) -> Any:
        """wav2vec2, kept in host memory between renders (moved to the GPU only while it runs)."""
        from ..conditioning.audio_features import load_wav2vec

        if self._wav2vec is None:
            with phase("loading wav2vec2", self.options.progress):
                self._wav2vec = load_wav2vec(self.directory / self.manifest.paths["audio_dir"], device="cpu")
            self.loads["audio_encoder"] += 1
        return self._wav2vec

    def _vae_encoder(self) -> Any:
        """The torch VAE (encoder side used), loaded on the first photo-cache miss and kept on the host."""
        import torch

        from ..model.vae import WanVAE

        if self._vae is None:
            with torch.device("meta"):
                vae = WanVAE(self.preset.vae)
            with phase("loading the VAE encoder", self.options.progress):
                self._vae = self._load_module(vae, "vae", device=torch.device("cpu"))
            self.loads["vae_encoder"] += 1
        return self._vae

    def build(self, inputs: RenderInputs) -> ArtifactRenderer:
        """Conditioning (prompt, audio, ref/motion latents), then the DiT runtime and the decoder.

        renderer = backend.build(inputs); renderer.block_frames(0, 0)  # uint8 [12, H, W, 3]
        """
        plan = self._plan((inputs.width, inputs.height))  # first: a budget that cannot fit fails in a second
        _ = self.attention  # then the attention probe (one line if it cannot run), before any model loads
        text, audio, ref_latents, motion_latents = self.conditioning(inputs)
        return self._renderer(inputs, plan, text, audio, ref_latents, motion_latents)

    def build_session(self, inputs: RenderInputs) -> ArtifactRenderer:
        """A renderer for a talk session (pipeline/session.py): as `build`, but its clips never run
        out and each `block_frames(clip, block, audio=features)` brings its block's wav2vec2 features
        (the speech arrives while the video renders); `inputs.wave` is not used. The DiT of a block
        never runs ahead of its decode here (the next block's speech may not have arrived yet).

        renderer = backend.build_session(inputs); renderer.block_frames(0, 0, audio=feats)
        """
        from ..errors import UserError

        if type(self).build is not ArtifactBackend.build:
            raise UserError("talk sessions run in one process; this Pipeline renders as a pipeline of ranks "
                            "(--ranks): load one without it")
        req = inputs.request
        plan = self._plan((inputs.width, inputs.height))
        _ = self.attention
        text = self._prompt_states(req.prompt)
        ref_latents, motion_latents = self._photo_latents(inputs.reference, req.sample.motion_frames)
        placeholder = self.silence_features(req.sample.infer_frames)  # one clip's shape; blocks bring their own
        return self._renderer(inputs, plan, text, placeholder, ref_latents.to(self.dtype),
                              motion_latents.to(self.dtype), unbounded=True)

    def silence_features(self, frames: int) -> Any:
        """Silent features [audio_layers, audio_dim, frames] in the dtype renders use: what a render
        feeds past the end of its speech, and what a session's idle blocks get."""
        import torch

        dit = self.manifest.dit
        return torch.zeros(dit.audio_layers, dit.audio_dim, frames, dtype=self.dtype)

    def _renderer(self, inputs: RenderInputs, plan: Any, text: Any, audio: Any, ref_latents: Any,
                  motion_latents: Any, unbounded: bool = False) -> ArtifactRenderer:
        """The DiT runtime, the generator over the conditioning, the decoder reset and warmed up."""
        from .generator import CausalGenerator, GenerationInputs

        req = inputs.request
        runtime = self._runtime_for(plan)
        gen_inputs = GenerationInputs(text=text.to(self.device), audio=audio,
                                      ref_latents=ref_latents, motion_latents=motion_latents)
        generator = CausalGenerator(_OnDevice(runtime.dit, self.device), gen_inputs, seed=req.seed,
                                    sample=req.sample, num_clips=inputs.num_clips, runner=_RuntimeRunner(runtime),
                                    unbounded=unbounded)
        decoder = self._decoder_session()
        decoder.reset()  # a new video: zero caches, first-frame rule
        # As upstream's streaming decoder (TPP rank 4): warm the causal state up on the first 7
        # motion latents and discard those frames, so block 0 continues a "video" of the photo.
        with phase("warming the decoder up", self.options.progress):
            decoder.decode(motion_latents[:, :7].float().cpu().numpy())
        return ArtifactRenderer(generator, decoder, runtime, req.sample.blocks_per_clip, plan=plan,
                                overlap_decode=self.options.overlap_decode and not unbounded)

    def session_audio_encoder(self) -> Any:
        """wav2vec2 on the compute device for a talk session's life (each block runs it; moving it per
        block would cost more than running it). `release_session_audio_encoder()` puts it back."""
        encoder = self._audio_encoder()
        encoder.model.to(self.device)
        return encoder

    def release_session_audio_encoder(self) -> None:
        """wav2vec2 back to host memory after a session (as between renders)."""
        if self._wav2vec is not None:
            self._wav2vec.model.to("cpu")
            self._free()

    @property
    def feature_dtype(self) -> Any:
        """The dtype audio features are kept in (what `extract_audio_features` is given for renders)."""
        return self.dtype

    # ---- conditioning ---------------------------------------------------------------------------

    def conditioning(self, inputs: RenderInputs) -> tuple[Any, Any, Any, Any]:
        """(umT5 states [L, text_dim], wav2vec2 features [25, audio_dim, frames], ref latents
        [16, 1, h, w], motion latents [16, 92, h, w]) of a render; the prompt and the photo go
        through their on-disk caches. Also what a pipeline of ranks broadcasts (multirank)."""
        req = inputs.request
        text = self._prompt_states(req.prompt)
        audio = self._audio_features(inputs.wave, inputs.num_clips)
        ref_latents, motion_latents = self._photo_latents(inputs.reference, req.sample.motion_frames)
        return text, audio, ref_latents.to(self.dtype), motion_latents.to(self.dtype)

    def precompute(self, reference: np.ndarray | None = None, prompt: str | None = None,
                   motion_frames: int | None = None) -> None:
        """Encode a framed photo (float32 [3, H, W], as `load_reference` gives it) and/or a prompt into
        their on-disk caches now, as `build` would on a miss: a later render of them loads neither
        the VAE encoder nor umT5 (a kiosk pre-warms its faces before the doors open).

        backend.precompute(load_reference(Path("me.jpg"), "704*384"), "a person talking")
        """
        from ..config import SampleConfig

        if reference is not None:
            self._photo_latents(reference, motion_frames or SampleConfig().motion_frames)
        if prompt is not None:
            self._prompt_states(prompt)

    def _cache_root(self) -> Path:
        from ..conditioning.caches import default_cache_dir

        return self.options.cache_dir or default_cache_dir()

    def _prompt_states(self, prompt: str) -> Any:
        """umT5 states of `prompt` through the prompt cache (umT5 loads only on a miss)."""
        from ..conditioning.caches import PromptCache

        text, _ = PromptCache(self._cache_root()).get_or_compute(prompt, self.artifact_id,
                                                                 lambda: self._encode_prompt(prompt))
        return text

    def _photo_latents(self, reference: np.ndarray, motion_frames: int) -> tuple[Any, Any]:
        """(ref_latents, motion_latents) of the framed photo through the photo cache (VAE on a miss)."""
        from ..conditioning.caches import PhotoCache

        latents, _ = PhotoCache(self._cache_root()).get_or_compute(
            reference, self.artifact_id, motion_frames, lambda: self._encode_reference(reference, motion_frames))
        return latents

    def _load_module(self, module: Any, unit_name: str, device: Any = None) -> Any:
        """Fill a meta-built module from one artifact unit (quantized Linears stay quantized)."""
        import torch

        from ..artifact.format import read_unit
        from ..errors import ArtifactError
        from ..runtime.qlinear import QuantLinear, part_attr, swap_linears

        device = self.device if device is None else device
        buf, views = read_unit(self.directory, unit_name, manifest=self.manifest, verify=True)
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
                    setattr(owner, part_attr(role), t.to(device, copy=True))  # own memory: buf is freed
            else:
                t = view.dequantize(buf, self.dtype).to(device, copy=True)
                if attr in owner._parameters:
                    setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
                else:
                    setattr(owner, attr, t)
        leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if leftover:
            raise ArtifactError(f"{self.directory}: unit {unit_name} lacks {leftover[0]}")
        return module.eval()

    def _encode_prompt(self, prompt: str) -> Any:
        """umT5 states [L, text_dim] for the prompt (runs only on a prompt-cache miss; umT5 is not kept)."""
        import torch

        from ..conditioning.text_tokenizer import load_tokenizer, tokenize
        from ..model.t5 import UMT5Encoder, encode_prompt

        with phase("encoding the prompt with umT5 (cached for next time)", self.options.progress):
            tokenizer = load_tokenizer(self.directory / self.manifest.paths["tokenizer_dir"])
            with torch.device("meta"):
                encoder = UMT5Encoder(self.preset.t5)
            encoder = self._load_module(encoder, "t5")
            self.loads["t5"] += 1
            ids, mask = tokenize(tokenizer, prompt, self.preset.t5.text_len)
            with torch.no_grad():
                states = encode_prompt(encoder, ids.to(self.device), mask.to(self.device))[0]
            del encoder
            self._free()
        return states.float().cpu()

    def _audio_features(self, wave: np.ndarray, num_clips: int) -> Any:
        """Per-video-frame wav2vec2 features [25, audio_dim, num_clips*48], kept in host memory.

        Only the clips rendered are computed (20 min of speech with --num-clip 1: one window).

        They stay on the CPU (51 KB per video frame at width 1024 in bf16): each block moves only
        its own 12 frames to the device. The encoder visits the GPU only while it runs.
        """
        from ..conditioning.audio_features import extract_audio_features

        encoder = self._audio_encoder()
        encoder.model.to(self.device)
        try:
            with phase("computing audio features", self.options.progress):
                return extract_audio_features(encoder, wave, out_dtype=self.dtype, num_clips=num_clips)
        finally:
            encoder.model.to("cpu")
            self._free()

    def _encode_reference(self, reference: np.ndarray, motion_frames: int) -> tuple[Any, Any]:
        """(ref_latents [16, 1, h, w], motion_latents [16, 92, h, w]) as upstream encodes the photo.

        Upstream encodes the photo repeated 5 frames (keeping latent 1) and the photo repeated
        5 * 73 = 365 frames (92 latents). Both are prefixes of one constant video through a causal
        encoder, so one pass gives both: ref_latents = motion_latents[:, 1:2]. Runs only on a
        photo-cache miss.
        """
        import torch

        from ..conditioning.photo import encode_constant_video

        vae = self._vae_encoder().to(self.device)
        try:
            frame = torch.from_numpy(reference).to(self.device, self.dtype)[None, :, None]  # [1, 3, 1, H, W]
            with phase("encoding the photo (cached for next time)", self.options.progress), torch.no_grad():
                motion_latents = encode_constant_video(vae, frame, 5 * motion_frames)[0]  # [16, 92, h, w]
        finally:
            vae.to("cpu")
            self._free()
        motion_latents = motion_latents.cpu()
        return motion_latents[:, 1:2].clone(), motion_latents

    def _plan(self, size: tuple[int, int]) -> Any:
        """The memory plan for this budget and size (width, height); BudgetError if nothing fits."""
        import torch

        from .memory import RenderBudget, plan_compile_mode, plan_render

        opts = self.options
        # the loaded runtime's own memory is part of the budget when the budget is the GPU's free memory
        loaded = float(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" and self._runtime else 0.0
        planned = plan_render(self.directory, self.manifest, size,
                              RenderBudget(opts.vram_gb, opts.ram_gb, self.kv_dtype, opts.device_profile,
                                           compile=plan_compile_mode(opts.compile_units, self.device.type),
                                           attention=opts.attention, overlap_decode=opts.overlap_decode),
                              self.device.type, profile=self._profile, loaded_device_bytes=loaded,
                              quiet=self.plan is not None and self.plan.size == size)
        self._profile = planned.profile  # resolved (or probed) once per backend, not per render
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


class _AheadJob:
    """The DiT of the next block on a worker thread, while the caller's thread decodes this block
    (ONNX Runtime and torch's kernels release the GIL). Built unstarted, so that its owner starts it
    inside the `try:` that joins it; joined by the next `block_frames`, on every error path of the
    call that started it, and by `ArtifactRenderer.close()`: no thread outlives the renderer's use."""

    def __init__(self, generator: Any) -> None:
        import threading

        self.out: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None  # perf_counter when the DiT finished
        self._thread = threading.Thread(target=self._run, args=(generator,), name="dit-ahead", daemon=True)

    def start(self) -> None:
        import torch

        # per-thread state the DiT must see as on the caller's thread: the current CUDA device (a
        # rank of a pipeline set its own); grad mode is off in the worker (inference only)
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self._thread.start()

    def _run(self, generator: Any) -> None:
        import time

        import torch

        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            with torch.no_grad():
                self.out = generator.next_block()
        except BaseException as e:  # handed to the caller's thread by result()
            self.error = e
        self.ended_at = time.perf_counter()

    def join(self) -> None:
        """Wait for the DiT to end (bounded: one block). A Ctrl-C meanwhile is held until then, so the
        DiT is never left running on its own; it is raised after."""
        if not self._thread.is_alive() and self._thread.ident is None:
            return  # never started
        interrupted = False
        while True:
            try:
                self._thread.join()
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.out


class ArtifactRenderer:
    """ClipRenderer: CausalGenerator blocks -> ONNX streaming decode -> uint8 frames.

    frames = renderer.block_frames(clip, block)  # in order: clip 0 blocks 0..3, clip 1 block 0, ...

    With `overlap_decode`, the DiT of block b+1 starts on a worker thread before block b decodes on
    the caller's thread, and block b's frames are returned as soon as they are decoded (the DiT of
    b+1 may still run then); `block_frames(b+1)` joins it. The frames are the same bytes as serial
    (the decoder sees the same latents in the same order, the DiT the same inputs). The last block
    of a clip starts nothing ahead, so the renderer's state at a clip's end (what a checkpoint
    saves) is the serial one. A caller that stops before a clip's end calls `close()` (joins the
    DiT running ahead). `counters()` reports the decoder's time and the part of it not hidden
    behind the DiT (exposed).
    """

    def __init__(self, generator: Any, decoder: Any, runtime: Any, blocks_per_clip: int, plan: Any = None,
                 overlap_decode: bool = True) -> None:
        self.generator, self.decoder, self.runtime = generator, decoder, runtime
        self.blocks_per_clip, self.plan = blocks_per_clip, plan
        self.overlap_decode = overlap_decode
        self._ahead: _AheadJob | None = None  # the next block's DiT, running while this block decoded
        self._decode_span: tuple[float, float] = (0.0, 0.0)  # (start, seconds) of the decode it overlapped
        self.decode_seconds = 0.0  # the decoder's own time, all blocks
        self.decode_exposed_seconds = 0.0  # of it, the time not hidden behind the DiT

    def block_frames(self, clip: int, block: int, audio: Any = None) -> np.ndarray:
        """The next block's 12 frames, uint8 [12, H, W, 3]; (clip, block) must be the next in order.
        `audio`: the block's features [layers, audio_dim, 12] (a session's renderer needs them)."""
        return self.block_output(clip, block, audio)[1]

    def block_output(self, clip: int, block: int, audio: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(latents float32 [16, 3, h, w], frames uint8 [12, H, W, 3]) of the next block; (clip, block)
        must be the next in order. What `block_frames` returns the frames of (eval keeps both)."""
        import time

        if audio is not None and self._ahead is not None:
            raise RuntimeError("a block's audio cannot be given while the next block is computed ahead")
        if self._ahead is not None:
            out = self._join_ahead()
        else:  # (a render's generator slices its own audio; a session's gets each block's)
            out = self.generator.next_block() if audio is None else self.generator.next_block(audio=audio)
        if (out.clip, out.block) != (clip, block):
            raise RuntimeError(f"generator produced clip {out.clip} block {out.block}, expected {clip}/{block}")
        # sync point: the block's latents on the host (waits for this block's DiT work)
        latents = out.latents.float().cpu().numpy()
        ahead = None
        if self.overlap_decode and block < self.blocks_per_clip - 1:
            ahead = _AheadJob(self.generator)  # not started: a Ctrl-C before the try leaves no thread
        try:
            if ahead is not None:
                self._ahead = ahead
                ahead.start()  # the DiT of the next block runs on the worker ...
            t0 = time.perf_counter()
            frames = self.decoder.decode(latents)  # ... while this block decodes here; [12, H, W, 3] uint8
            spent = time.perf_counter() - t0
        except BaseException:
            self.close()  # sync point: the worker's DiT has finished before the error leaves
            raise
        self.decode_seconds += spent
        if ahead is None:
            self.decode_exposed_seconds += spent  # alone: all of it exposed
        else:
            self._decode_span = (t0, spent)  # how much the DiT hid is known once it ends
        return latents, frames

    def _join_ahead(self) -> Any:
        """The block the worker computed (its error raised here), after the thread ended."""
        job, self._ahead = self._ahead, None
        assert job is not None
        job.join()  # sync point: the next block's DiT has finished on the worker
        if job.ended_at is not None:  # the decode ran from t0 for `spent`; the DiT hid up to its end
            t0, spent = self._decode_span
            hidden = min(spent, max(0.0, job.ended_at - t0))
            self.decode_exposed_seconds += spent - hidden
        return job.result()

    def close(self) -> None:
        """Join the DiT running ahead, if any (a caller that stops mid-clip: cancel, error). Idempotent."""
        job, self._ahead = self._ahead, None
        if job is not None:
            job.join()

    def state(self) -> dict[str, Any]:
        """Everything the next block depends on, as tensors (torch.save-able). At a clip's end only
        (no block computed ahead then)."""
        import torch

        if self._ahead is not None:
            raise RuntimeError("renderer state is taken at a clip's end, not while a block is computed ahead")

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
        from ..runtime.attention import attention_record
        from ..runtime.qlinear import linear_kernels

        dit = self.runtime.dit  # which attention and linear kernels run (runtime/attention.py, qlinear.py)
        return {**self.runtime.layout(), "decode_latents_per_call": self.plan.decode_latents_per_call,
                **attention_record(dit), "linear_kernels": linear_kernels(dit, self.runtime.device)}

    def counters(self) -> dict[str, float]:
        """Running copy-wait (weights, KV), H2D byte and decoder-time totals (ledger.clip_mark):
        decode_s = the decoder's time, decode_exposed_s = what the loop waited for, decode_hidden_s
        = the rest (ran behind the DiT)."""
        return {**self.runtime.copy_counters(), "decode_s": self.decode_seconds,
                "decode_exposed_s": self.decode_exposed_seconds,
                "decode_hidden_s": self.decode_seconds - self.decode_exposed_seconds}

    def ledger(self, seconds: float | None, clip: dict[str, float]) -> dict[str, Any]:
        """The plan's figures next to the measured ones, for the clip just rendered."""
        from .ledger import memory_ledger

        return memory_ledger(self.plan, self.runtime, self.decoder, seconds, clip)
