"""Typed, frozen model configuration: the DiT, the VAE, umT5 and wav2vec2.

Built once at the edge (CLI, checkpoint reader, artifact manifest) and passed down; nothing below
reads dicts. `PRESETS["14b"]` is the real Wan2.2-S2V-14B; `PRESETS["tiny"]` keeps the module
structure, key names and every structural constant (RoPE split, 25 wav2vec layers, VAE strides)
but with small widths, so tests run in seconds.

    cfg = PRESETS["tiny"].dit; cfg.head_dim  # 128
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import CheckpointError

# The upstream S2V config.json fields we understand. Anything else that changes the architecture
# (motioner, tsm, trainable token positions) is refused rather than guessed.
_S2V_FIXED_FLAGS = {
    "model_type": "s2v",
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "zero_timestep": True,
    "enable_motioner": False,
    "add_last_motion": True,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "enable_framepack": True,
    "framepack_drop_mode": "padd",
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
}


# Plausible bounds for every integer field of a DiT config (the 14B model is far inside them):
# a config.json or manifest outside them is refused in one line instead of hanging in model building.
_DIT_INT_RANGES = {
    "dim": (2, 65536), "ffn_dim": (1, 262144), "num_heads": (1, 1024), "num_layers": (1, 1024),
    "freq_dim": (2, 65536), "text_dim": (1, 65536), "text_len": (1, 65536), "in_dim": (1, 4096),
    "out_dim": (1, 4096), "cond_dim": (1, 4096), "audio_dim": (1, 65536), "audio_layers": (1, 1024),
    "num_audio_token": (1, 1024), "motion_token_num": (1, 1 << 20),
}
_MAX_DIT_PARAMS = 2e11


@dataclass(frozen=True)
class DiTConfig:
    """WanModel_S2V hyper-parameters (upstream config.json of Wan2.2-S2V-14B)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024  # wav2vec2 hidden width
    audio_layers: int = 25  # wav2vec2 hidden states used (embeddings + 24 layers)
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    zero_init: bool = True
    motion_token_num: int = 1024

    def inject_slot(self, i: int) -> int | None:
        """Injector index j run after block i, or None when block i has no audio injection."""
        return self.audio_inject_layers.index(i) if i in self.audio_inject_layers else None

    def __post_init__(self) -> None:
        for name, (lo, hi) in _DIT_INT_RANGES.items():  # absurd sizes would build for minutes, then fail
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} {v} is outside {lo}..{hi}")
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and 1 <= p <= 16 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 integers in 1..16, got {self.patch_size!r}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers must be integers, got {self.audio_inject_layers!r}")
        params = self.num_layers * (4 * self.dim * self.dim + 2 * self.dim * self.ffn_dim)
        if params > _MAX_DIT_PARAMS:
            raise ValueError(f"{self.num_layers} layers of dim {self.dim} would be {params / 1e9:.0f} B parameters "
                             f"(this runtime takes at most {_MAX_DIT_PARAMS / 1e9:.0f} B)")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"audio_inject_layers {bad} outside 0..{self.num_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head dims given to (time, height, width) RoPE: 44/42/42 for head_dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def to_upstream_json(self) -> dict[str, Any]:
        """The config.json dict upstream's `WanModel_S2V.from_pretrained` reads."""
        out: dict[str, Any] = {"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0"}
        out.update(
            cond_dim=self.cond_dim,
            audio_dim=self.audio_dim,
            num_audio_token=self.num_audio_token,
            audio_inject_layers=list(self.audio_inject_layers),
            zero_init=self.zero_init,
            motion_token_num=self.motion_token_num,
            patch_size=list(self.patch_size),
            text_len=self.text_len,
            in_dim=self.in_dim,
            dim=self.dim,
            ffn_dim=self.ffn_dim,
            freq_dim=self.freq_dim,
            text_dim=self.text_dim,
            out_dim=self.out_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            eps=self.eps,
        )
        out.update(_S2V_FIXED_FLAGS)
        if self.audio_layers != 25:
            out["audio_layers"] = self.audio_layers  # our extension; upstream hard-codes 25
        return out

    @classmethod
    def from_upstream_json(cls, d: dict[str, Any], source: str = "config.json") -> DiTConfig:
        """Parse upstream's config.json; refuse architectures this runtime does not implement."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: not a JSON object")
        if d.get("_class_name") not in (None, "WanModel_S2V", "CausalWanModel_S2V"):
            raise CheckpointError(f"{source}: _class_name {d.get('_class_name')!r} is not WanModel_S2V")
        for key, want in _S2V_FIXED_FLAGS.items():
            if key in d and _norm(d[key]) != _norm(want):
                raise CheckpointError(f"{source}: {key}={d[key]!r} is not supported (expected {want!r})")
        try:
            def seq(key: str, default: Any = None) -> tuple:
                v = d[key] if default is None else d.get(key, default)
                if not isinstance(v, (list, tuple)):
                    raise TypeError(f"{key} must be a list, got {v!r}")
                return tuple(v)

            eps = d.get("eps", 1e-6)
            if not isinstance(eps, (int, float)) or isinstance(eps, bool):
                raise TypeError(f"eps must be a number, got {eps!r}")
            return cls(
                dim=d["dim"],
                ffn_dim=d["ffn_dim"],
                num_heads=d["num_heads"],
                num_layers=d["num_layers"],
                freq_dim=d.get("freq_dim", 256),
                text_dim=d.get("text_dim", 4096),
                text_len=d.get("text_len", 512),
                in_dim=d.get("in_dim", 16),
                out_dim=d.get("out_dim", 16),
                patch_size=seq("patch_size", (1, 2, 2)),  # type: ignore[arg-type]
                eps=float(eps),
                cond_dim=d.get("cond_dim", 16),
                audio_dim=d.get("audio_dim", 1024),
                audio_layers=d.get("audio_layers", 25),
                num_audio_token=d.get("num_audio_token", 4),
                audio_inject_layers=seq("audio_inject_layers"),
                zero_init=bool(d.get("zero_init", True)),
                motion_token_num=d.get("motion_token_num", 1024),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from None


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE (WanVAE_): causal 3D conv autoencoder, stride (4, 8, 8), 16 latent channels."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    # Per-channel latent statistics: z_normalized = (mu - mean) / std. Constants of the released model.
    latent_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )
    latent_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True)
class T5Config:
    """umT5-XXL encoder as stored in models_t5_umt5-xxl-enc-bf16.pth."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512
    eps: float = 1e-6


@dataclass(frozen=True)
class Wav2VecConfig:
    """The parts of wav2vec2-large-xlsr-53-english's HF config our fixtures must reproduce."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    vocab_size: int = 33
    sample_rate: int = 16000


@dataclass(frozen=True)
class ModelPreset:
    """Every component's config for one model size."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    wav2vec: Wav2VecConfig
    lora_rank: int = 128
    lora_alpha: float = 64.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SampleConfig:
    """Live Avatar's fixed streaming schedule (LIVEAVATAR.md §1.2-1.4)."""

    num_steps: int = 4
    shift: float = 3.0
    num_train_timesteps: int = 1000
    frames_per_block: int = 3  # latent frames denoised together
    infer_frames: int = 48  # pixel frames per clip
    motion_frames: int = 73  # pixel frames of FramePack history -> 19 latent frames
    first_clip_drop: int = 3  # the first clip drops its first 3 frames (45 frames out)
    fps: int = 25
    audio_rate: int = 16000
    sink_offset_range: tuple[int, int] = (4, 30)  # RoPE offset of the ref (sink) frame, drawn per call

    @property
    def latent_frames_per_clip(self) -> int:
        return (self.infer_frames + 3 + self.motion_frames) // 4 - self.motion_latent_frames

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames_per_clip // self.frames_per_block

    @property
    def video_frames_per_block(self) -> int:
        """Pixel frames one block decodes to (the VAE's 4x temporal stride): 12."""
        return self.frames_per_block * 4

    @property
    def block_seconds(self) -> float:
        """Seconds of video (and of speech) one block covers: 0.48."""
        return self.video_frames_per_block / self.fps


PRESETS: dict[str, ModelPreset] = {
    "14b": ModelPreset(name="14b", dit=DiTConfig(), vae=VAEConfig(), t5=T5Config(), wav2vec=Wav2VecConfig()),
    # Small widths, same structure: head_dim stays 128 (RoPE 44/42/42), 25 wav2vec hidden states,
    # VAE strides and cache layout unchanged, LoRA rank/alpha as upstream (scale 0.5).
    "tiny": ModelPreset(
        name="tiny",
        dit=DiTConfig(
            dim=256,
            ffn_dim=512,
            num_heads=2,
            num_layers=4,
            text_dim=64,
            audio_dim=32,
            audio_inject_layers=(0, 2, 3),
        ),
        vae=VAEConfig(dim=8),
        t5=T5Config(vocab=384, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
        wav2vec=Wav2VecConfig(
            hidden_size=32,
            num_hidden_layers=24,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        ),
        lora_rank=128,
        lora_alpha=64.0,
    ),
}



def preset_for_dit(dit: DiTConfig, default: ModelPreset | None = None) -> ModelPreset:
    """The preset whose DiT this is (its umT5, VAE and wav2vec2 configs come with it).

    An unknown DiT gives `default` when one is passed, else CheckpointError.
    """
    for preset in PRESETS.values():
        if preset.dit == dit:
            return preset
    if default is not None:
        return default
    raise CheckpointError(
        f"a DiT with dim {dit.dim} and {dit.num_layers} layers is not Wan2.2-S2V-14B (nor the tiny test model)"
    )
