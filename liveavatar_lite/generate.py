"""`generate`: photo + speech + prompt -> mp4, streamed clip by clip, resumable after a crash.

Per clip, per block: the DiT denoises 3 latent frames (via the runtime), the ONNX decoder turns
them into 12 frames at once, and the frames go straight into the clip's h264 segment (video.py).
After each clip its segment is made durable; every `checkpoint_interval_s` (0: every clip) so is
the full generation state (KV caches, decoder cache, RNG, counters). `--resume` continues from
the newest checkpoint and produces the same frames as an uninterrupted run. The final mp4 (with
the speech as aac) is muxed to `OUT.tmp` and renamed only when complete.

Sections: input validation (size, photo, clip count), the clip loop (`generate`), and the
artifact backend that builds the real renderer (prompt cache + umT5, wav2vec2, VAE encode of the
photo, the planned DiT runtime driving `reference.CausalGenerator`, the ONNX streaming decoder).

    result = generate(GenerateRequest(artifact=Path("art"), image=Path("me.jpg"), audio=Path("hi.wav"),
                                      prompt="a person talking", out=Path("out.mp4")))
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import SampleConfig
from .errors import BudgetError, UserError

log = logging.getLogger(__name__)

MIN_AREA = 64 * 64  # both sides are snapped to multiples of 64
MAX_AREA = 1280 * 720  # the largest size upstream offers
SNAP = 64


@dataclass(frozen=True)
class GenerateRequest:
    """Everything one render needs, built once from the CLI flags."""

    artifact: Path
    image: Path
    audio: Path
    prompt: str
    out: Path
    size: str = "704*384"
    num_clip: int | None = None  # None: until the audio ends
    seed: int = 42
    vram_gb: float | None = None  # None: the GPU's free memory
    ram_gb: float | None = None  # None: this machine's physical RAM
    kv_dtype: str = "bf16"  # KV cache storage: bf16 | fp8 | int8 (8-bit halves the biggest memory user)
    resume: bool = False
    telemetry: Path | None = None
    cache_dir: Path | None = None  # prompt-embedding cache; None: prompt_cache.default_cache_dir()
    # Seconds between resume checkpoints (0: after every clip). A checkpoint holds every KV cache
    # (about 40 GB at 14B and 704*384), so writing one per clip would dominate the render time.
    checkpoint_interval_s: float = 600.0
    progress: bool = True
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class GenerateResult:
    out: Path
    clips: int
    frames: int
    height: int
    width: int
    resumed_clips: int
    seconds: float


class ClipRenderer(Protocol):
    """The model side of a render: yields decoded frames block by block and can save/restore itself.

    `block_frames(clip, block)` returns uint8 [12, H, W, 3] (RGB) for every block; the caller drops
    the first clip's first `first_clip_drop` frames. `state()` must capture everything the next
    block depends on (KV caches, decoder cache, RNG), so that `load_state(state())` on a freshly
    built renderer continues bit-identically.
    """

    blocks_per_clip: int

    def block_frames(self, clip: int, block: int) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def copy_wait_seconds(self) -> float: ...


@dataclass(frozen=True)
class RenderInputs:
    """The validated inputs a renderer is built from."""

    request: GenerateRequest
    reference: np.ndarray  # float32 [3, H, W] in [-1, 1]: the photo, resized and cropped
    height: int
    width: int
    num_clips: int
    wave: np.ndarray  # float32 [n] at 16 kHz mono: the speech the audio features are computed from


# ------------------------------------------------------------------------------------------ inputs

def parse_size(text: str) -> int:
    """The maximum pixel area a --size string allows: one of upstream's keys or a custom "A*B".

    Custom sizes (e.g. "128*128" for the tiny test model) follow the same rule as upstream's keys.
    parse_size("704*384")  # 270336
    """
    from . import media_io

    parts = text.lower().replace("x", "*").split("*")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--size {text!r} is not of the form WIDTH*HEIGHT, e.g. 704*384 "
                        f"(upstream sizes: {', '.join(media_io.SIZE_KEYS)})") from None
    area = a * b
    if a <= 0 or b <= 0 or area < MIN_AREA:
        raise UserError(f"--size {text!r} is too small: the area must be at least {SNAP}*{SNAP}")
    if area > MAX_AREA:
        raise UserError(f"--size {text!r} is larger than the largest supported size 1280*720")
    return area


def num_clips_for(num_samples: int, num_clip: int | None) -> int:
    """Upstream's clip count for 16 kHz speech (int(30-fps frames / 57.6) + 1), capped by --num-clip.

    num_clips_for(3 * 16000, None)  # 2
    """
    from .audio_features import num_clips_for_audio

    available = num_clips_for_audio(num_samples)
    return available if num_clip is None else min(num_clip, available)


def job_key(request: GenerateRequest, artifact_id: str) -> str:
    """What makes two renders produce the same frames: inputs' bytes, prompt, size, seed, artifact."""
    h = hashlib.sha256()
    for part in (artifact_id, request.prompt, request.size, str(request.seed), request.kv_dtype):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    for path in (request.image, request.audio):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_reference(path: Path, size: str) -> np.ndarray:
    """The photo framed as upstream does for --size: float32 [3, H, W] in [-1, 1].

    The aspect ratio is kept with both sides multiples of 64 and H*W <= the size's area; the short
    side is resized to min(H, W) and the rest center-cropped (black-padded where too narrow).
    load_reference(Path("face.jpg"), "704*384").shape  # (3, 384, 704) for a 16:9 photo
    """
    from PIL import Image, UnidentifiedImageError

    from .media_io import generation_size, resize_and_crop

    area = parse_size(size)
    if not path.is_file():
        raise UserError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")  # decodes fully here, so a truncated file fails inside the try
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read image {path}: {msg}") from None
    height, width = generation_size(img.size[1], img.size[0], area)
    if height < SNAP or width < SNAP:
        raise UserError(f"--size {size}: the photo's aspect ratio ({img.size[0]}x{img.size[1]}) leaves no "
                        f"side of at least {SNAP} pixels; crop the photo or pick a larger size")
    rgb = np.asarray(resize_and_crop(img, height, width), dtype=np.float32)  # [H, W, 3] in 0..255
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)) / 255.0 * 2.0 - 1.0  # [3, H, W] in [-1, 1]


# ------------------------------------------------------------------------------------------ rendering

class Backend(Protocol):
    """Where renderers come from: the artifact (default) or a test fake."""

    def identity(self) -> str: ...

    def build(self, inputs: RenderInputs) -> ClipRenderer: ...


def generate(request: GenerateRequest, backend: Backend | None = None) -> GenerateResult:
    """Render `request` to its mp4 (resuming if asked); returns what was written.

    Bad input raises UserError before any heavy work; a crash leaves only the work dir, which
    `resume=True` continues from.
    """
    from . import media_io
    from .telemetry import Telemetry
    from .video import RenderWorkDir

    started = time.perf_counter()
    out = request.out
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {out} must end in .mp4")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    if backend is None:
        backend = ArtifactBackend.open(request.artifact, vram_gb=request.vram_gb, ram_gb=request.ram_gb,
                                       kv_dtype=request.kv_dtype)
    reference = load_reference(request.image, request.size)
    height, width = reference.shape[1:]
    wave = media_io.load_audio(request.audio)  # float32 [n] at 16 kHz; UserError if unusable
    seconds = len(wave) / request.sample.audio_rate
    num_clips = num_clips_for(len(wave), request.num_clip)
    log.info("%dx%d, %.2f s of speech -> %d clips", width, height, seconds, num_clips)

    work = RenderWorkDir.open(out, job_key(request, backend.identity()), request.resume)
    if work.clips_done < num_clips:
        work.rewind_to_state()  # segments after the newest checkpoint are rendered again
    resumed = work.clips_done
    telemetry = Telemetry.open(request.telemetry, append=resumed > 0)
    try:
        frames = _render(request, backend, work, _inputs_for(request, reference, num_clips, wave), telemetry)
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        advice = backend.oom_advice() if hasattr(backend, "oom_advice") else "pass a smaller --vram or --size"
        raise BudgetError(f"out of memory after {work.clips_done} finished clips; {advice}") from None
    finally:
        telemetry.close()
    work.remove()
    return GenerateResult(out, num_clips, frames, height, width, resumed, time.perf_counter() - started)


def _inputs_for(request: GenerateRequest, reference: np.ndarray, num_clips: int, wave: np.ndarray) -> RenderInputs:
    return RenderInputs(request, reference, int(reference.shape[1]), int(reference.shape[2]), num_clips, wave)


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, or ONNX Runtime's allocation failure (a plain RuntimeException there)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return "out of memory" in text.lower() or "Failed to allocate memory" in text


def _render(request: GenerateRequest, backend: Backend, work: Any, inputs: RenderInputs, telemetry: Any) -> int:
    """Build the renderer (resuming its state), render the missing clips, mux; returns the frame count."""
    from .video import VideoSpec, mux_segments

    resumed = work.clips_done
    spec = VideoSpec(height=inputs.height, width=inputs.width, fps=request.sample.fps)
    if resumed < inputs.num_clips:  # (a render killed while muxing has every clip already)
        renderer = backend.build(inputs)
        if work.state_path is not None:
            import torch

            # mmap: the tens of GB of KV state are paged in while copied into the caches, never held twice
            renderer.load_state(torch.load(work.state_path, map_location="cpu", weights_only=True, mmap=True))
            telemetry.event("resume", clips_done=resumed, frames_done=work.frames_done)
        _render_clips(renderer, work, spec, inputs, telemetry)
    frames = mux_segments(work.segment_paths()[: inputs.num_clips], request.audio, request.out, spec)
    telemetry.summary(out=str(request.out), resumed_clips=resumed, height=inputs.height, width=inputs.width)
    return frames


def _render_clips(renderer: ClipRenderer, work: Any, spec: Any, inputs: RenderInputs, telemetry: Any) -> None:
    """Clips work.clips_done .. num_clips-1: blocks -> segment, then commit segment + state."""
    import torch
    from tqdm import tqdm

    sample, show = inputs.request.sample, inputs.request.progress
    interval = inputs.request.checkpoint_interval_s
    last_checkpoint = time.monotonic()
    clips = tqdm(total=inputs.num_clips, initial=work.clips_done, unit="clip", desc="clips", disable=not show)
    for clip in range(work.clips_done, inputs.num_clips):
        t0, wait0 = time.perf_counter(), renderer.copy_wait_seconds()
        segment = work.begin_clip(clip, spec)
        try:
            blocks = tqdm(range(renderer.blocks_per_clip), unit="block", desc=f"clip {clip}", leave=False,
                          disable=not show)
            for block in blocks:
                frames = renderer.block_frames(clip, block)  # uint8 [12, H, W, 3]
                if clip == 0 and block == 0:
                    frames = frames[sample.first_clip_drop:]  # upstream drops the very first 3 frames
                segment.append(frames)
            # Checkpoint when due, never after the last clip (nothing follows it).
            due = clip < inputs.num_clips - 1 and (interval <= 0 or time.monotonic() - last_checkpoint >= interval)
            t_ckpt = time.perf_counter()
            work.commit_clip(segment, (lambda path: torch.save(renderer.state(), path)) if due else None)
            if due:
                last_checkpoint = time.monotonic()
        except BaseException:
            segment.abort()
            raise
        telemetry.clip_done(clip, segment.frames, time.perf_counter() - t0,
                            renderer.copy_wait_seconds() - wait0,
                            checkpoint_seconds=round(time.perf_counter() - t_ckpt, 4) if due else None)
        clips.update(1)
    clips.close()


# ------------------------------------------------------------------------------------------ artifact backend

REQUIRED_COMPONENTS = ("dit", "t5", "vae", "audio", "tokenizer")


def _preset_for(dit_cfg: Any) -> Any:
    """The ModelPreset whose DiT is this artifact's (its T5, VAE and wav2vec configs come with it)."""
    from .config import PRESETS
    from .errors import ArtifactError

    for preset in PRESETS.values():
        if preset.dit == dit_cfg:
            return preset
    raise ArtifactError(f"the artifact's DiT (dim {dit_cfg.dim}, {dit_cfg.num_layers} layers) is not a model this "
                        "runtime knows (Wan2.2-S2V-14B + Live Avatar)")


def encode_constant_video(vae: Any, frame: Any, num_frames: int) -> Any:
    """`vae.encode` of `frame` [1, 3, 1, H, W] repeated `num_frames` times, computed exactly but cheaply.

    The encoder steps over chunks of 1, 4, 4, ... frames with causal caches. With a constant input,
    once a chunk leaves the caches bit-identical to the previous chunk's, every later chunk repeats
    the same output (same input, same state): the rest are copies, not approximations.
    encode_constant_video(vae, photo, 365).shape  # [1, 16, 92, H/8, W/8]
    """
    import torch

    n_chunks = 1 + (num_frames - 1) // 4  # chunks of 1, then 4 (a partial tail is ignored, as upstream)
    outs, caches = [], None
    for i in range(n_chunks):
        chunk = frame if i == 0 else frame.expand(-1, -1, 4, -1, -1)  # [1, 3, 1 or 4, H, W], a view
        y, new_caches = vae.encoder.step(chunk, i == 0, caches)
        outs.append(y)
        if i >= 2 and all(torch.equal(a, b) for a, b in zip(caches, new_caches)):
            outs.extend([y] * (n_chunks - 1 - i))  # fixed point reached: the remaining outputs repeat
            break
        caches = new_caches
    mu = vae.conv1(torch.cat(outs, dim=2))[:, : vae.cfg.z_dim]  # [1, z, n_chunks, h, w]
    return vae.normalize_latents(mu)


class ArtifactBackend:
    """Builds renderers from a quantized artifact: conditioning, the streamed DiT, the ONNX decoder.

    backend = ArtifactBackend.open(Path("artifact"), vram_gb=24); renderer = backend.build(inputs)
    """

    def __init__(self, directory: Path, manifest: Any, preset: Any, vram_gb: float | None, ram_gb: float | None,
                 kv_dtype: str = "bf16") -> None:
        import torch

        self.directory, self.manifest, self.preset = directory, manifest, preset
        self.vram_gb, self.ram_gb, self.kv_dtype = vram_gb, ram_gb, kv_dtype
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @classmethod
    def open(cls, directory: Path, vram_gb: float | None = None, ram_gb: float | None = None,
             kv_dtype: str = "bf16") -> ArtifactBackend:
        """Validate the artifact (format version, model, components) before any heavy work."""
        from .errors import ArtifactError
        from .format import read_manifest

        manifest = read_manifest(directory)
        missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.components]
        if missing:
            raise ArtifactError(f"{directory}: the artifact lacks {', '.join(missing)}; generate needs all of "
                                f"{', '.join(REQUIRED_COMPONENTS)} (re-run quantize without --components)")
        for key in ("audio_dir", "tokenizer_dir", "vae_onnx"):
            if key not in manifest.paths or not (directory / manifest.paths[key]).exists():
                raise ArtifactError(f"{directory}: the artifact has no {key.replace('_', ' ')} (incomplete conversion)")
        return cls(directory, manifest, _preset_for(manifest.dit), vram_gb, ram_gb, kv_dtype)

    def identity(self) -> str:
        from .format import MANIFEST_FILE

        return hashlib.sha256((self.directory / MANIFEST_FILE).read_bytes()).hexdigest()

    def build(self, inputs: RenderInputs) -> ArtifactRenderer:
        """Conditioning (prompt, audio, ref/motion latents), then the DiT runtime and the decoder."""
        from .plan import vae_arena_estimate
        from .prompt_cache import PromptCache, default_cache_dir
        from .reference import CausalGenerator, GenerationInputs
        from .runtime import DiTRuntime
        from .vae_onnx import OnnxVAEDecoder

        req = inputs.request
        plan = self._plan((inputs.width, inputs.height))  # first: a budget that cannot fit fails in a second
        cache = PromptCache(req.cache_dir or default_cache_dir())
        text, _ = cache.get_or_compute(req.prompt, self.identity(), lambda: self._encode_prompt(req.prompt))
        audio = self._audio_features(inputs.wave)
        ref_latents, motion_latents = self._encode_reference(inputs.reference, req.sample.motion_frames)
        runtime = DiTRuntime.from_artifact(self.directory, plan, device=self.device,
                                           timing=self.device.type == "cuda")
        gen_inputs = GenerationInputs(text=text.to(self.device), audio=audio,
                                      ref_latents=ref_latents, motion_latents=motion_latents)
        generator = CausalGenerator(_OnDevice(runtime.dit, self.device), gen_inputs, seed=req.seed,
                                    sample=req.sample, num_clips=inputs.num_clips, runner=_RuntimeRunner(runtime))
        decoder = OnnxVAEDecoder(self.directory / self.manifest.paths["vae_onnx"],
                                 gpu_mem_limit=vae_arena_estimate((inputs.width, inputs.height))
                                 if self.device.type == "cuda" else None)
        # As upstream's streaming decoder (TPP rank 4): warm the causal state up on the first 7
        # motion latents and discard those frames, so block 0 continues a "video" of the photo.
        decoder.decode(motion_latents[:, :7].float().cpu().numpy())
        return ArtifactRenderer(generator, decoder, runtime, req.sample.blocks_per_clip)

    # ---- conditioning ---------------------------------------------------------------------------

    def _load_module(self, module: Any, unit_name: str) -> Any:
        """Fill a meta-built module from one artifact unit (quantized Linears stay quantized)."""
        import torch

        from .errors import ArtifactError
        from .format import read_unit
        from .qlinear import QuantLinear, part_attr, swap_linears

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

        from .model.t5 import UMT5Encoder, encode_prompt
        from .text_tokenizer import load_tokenizer, tokenize

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
        from .audio_features import extract_audio_features, load_wav2vec

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

        from .model.vae import WanVAE

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
        import torch

        from .device_profiles import probe_profile
        from .plan import Budget, make_plan
        from .plan_inputs import manifest_unit_sizes, plan_input

        m = self.manifest
        inp = plan_input(m.dit, size, m.quant.format, unit_sizes=manifest_unit_sizes(m))
        if self.vram_gb is not None:
            vram = self.vram_gb * 1e9
        elif self.device.type == "cuda":
            vram = float(torch.cuda.mem_get_info(self.device)[0])
        else:
            vram = 1e15  # CPU: "device" memory is host memory; no separate budget
        ram = self.ram_gb * 1e9 if self.ram_gb else _physical_ram_bytes()
        budget = Budget(vram_bytes=vram, ram_bytes=ram, kv_dtype=self.kv_dtype)
        profile = probe_profile(str(self.device), seconds=0.3 if self.device.type == "cpu" else 2.0)
        plan = make_plan(inp, budget, profile)
        self._plan_args = (inp, budget, profile)
        log.info("plan: peak VRAM %.2f GB, %d streamed units, predicted %.1f s per clip",
                 plan.peak_vram_bytes / 1e9, len(plan.streamed_units), plan.predicted_seconds_per_clip)
        self.plan = plan
        return plan

    def oom_advice(self) -> str:
        """What to change after running out of memory: the plan for a 15 % smaller VRAM budget."""
        from dataclasses import replace

        from .errors import BudgetError
        from .plan import make_plan

        if getattr(self, "_plan_args", None) is None:
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
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _physical_ram_bytes() -> float | None:
    """Total physical memory (POSIX), the default host budget; None where the OS does not say."""
    import os

    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


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
    """ClipRenderer: CausalGenerator blocks -> ONNX streaming decode -> uint8 frames."""

    def __init__(self, generator: Any, decoder: Any, runtime: Any, blocks_per_clip: int) -> None:
        self.generator, self.decoder, self.runtime = generator, decoder, runtime
        self.blocks_per_clip = blocks_per_clip

    def block_frames(self, clip: int, block: int) -> np.ndarray:
        out = self.generator.next_block()
        if (out.clip, out.block) != (clip, block):
            raise RuntimeError(f"generator produced clip {out.clip} block {out.block}, expected {clip}/{block}")
        return self.decoder.decode(out.latents.float().cpu().numpy())  # [12, H, W, 3] uint8

    def state(self) -> dict[str, Any]:
        import torch

        # np.array (not ascontiguousarray, which turns 0-d arrays into 1-d) keeps every shape
        decoder = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.decoder.state().items()}
        return {"generator": self.generator.state_dict(), "decoder": decoder}

    def load_state(self, state: dict[str, Any]) -> None:
        import torch

        # The state may be memory-mapped from the checkpoint file: the generator keeps its small
        # tensors (latents, RNG) by reference, so give it copies; the caches are copied into place.
        gen = {k: v.clone() if isinstance(v, torch.Tensor) and k != "caches" else v
               for k, v in state["generator"].items()}
        self.generator.load_state_dict(gen)
        self.decoder.load_state({k: v.numpy() for k, v in state["decoder"].items()})

    def copy_wait_seconds(self) -> float:
        return self.runtime.copy_wait_seconds()
