"""On-disk caches of conditioning that costs a model load: umT5 prompt states and photo latents.

Encoding a prompt loads umT5-XXL (about 11 GB in bf16); encoding a photo runs the VAE encoder over
upstream's 365-frame constant video. A kiosk that always shows the same face and prompt pays both
once. Every key hashes its exact input and the artifact's identity (its manifest bytes), so a
different model or a re-quantized artifact never reuses a stale entry. Entries are safetensors
files (data, never code), written temp + rename; a damaged entry is recomputed.

    prompts = PromptCache(default_cache_dir())
    emb, hit = prompts.get_or_compute(prompt, artifact_id, lambda: encode(prompt))  # [L, text_dim]
    photos = PhotoCache(default_cache_dir())
    (ref, motion), hit = photos.get_or_compute(reference, artifact_id, motion_frames, encode)
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_KEY_VERSION = "1"  # bump when a stored layout or an encoder's preprocessing changes


def default_cache_dir() -> Path:
    """$LIVEAVATAR_LITE_CACHE, else $XDG_CACHE_HOME/liveavatar-lite, else ~/.cache/liveavatar-lite.

    PromptCache(default_cache_dir())
    """
    env = os.environ.get("LIVEAVATAR_LITE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "liveavatar-lite"


def cache_key(*parts: str | bytes) -> str:
    """sha256 hex of the length-prefixed parts (so no two part lists collide), versioned.

    cache_key("a man talking", "ab12...")  # '3f0c...'
    """
    h = hashlib.sha256()
    for part in (_KEY_VERSION, *parts):
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def prompt_key(prompt: str, artifact_id: str) -> str:
    """The cache key of a prompt's umT5 states for one artifact.

    prompt_key("a man talking", "ab12...")  # '3f0c...'
    """
    return cache_key(artifact_id, prompt)


def _mark_used(path: Path) -> None:
    """Set the entry's times to now: a pruner keeps the most recently used entries (serve's
    --max-state-gb), and a read alone does not say so on a relatime or noatime mount (Linux's
    default updates atime at most once a day), so a prompt every job uses would look the oldest."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: it is not pruned either
        pass


class TensorCache:
    """Named tensors stored as one safetensors file per key under `root/kind/`."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = Path(root) / kind

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None if absent or unreadable (a damaged entry is recomputed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            log.warning("ignoring damaged cache entry %s (%s)", path, e)
            return None
        _mark_used(path)
        return tensors

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store `tensors` atomically; an unwritable cache only logs a warning."""
        from safetensors.torch import save_file

        path = self.path_for(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache must not fail the render
            tmp.unlink(missing_ok=True)
            log.warning("could not write the cache at %s (%s)", path, e)

    def get_or_compute(self, key: str, names: tuple[str, ...],
                       compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[tuple[torch.Tensor, ...], bool]:
        """((tensors in `names` order), was_cached): read them, or run `compute` once and store the result."""
        stored = self.load(key)
        if stored is not None and all(n in stored for n in names):
            log.info("%s from cache %s", self.root.name, key[:12])
            return tuple(stored[n] for n in names), True
        values = compute()
        self.store(key, dict(zip(names, values, strict=True)))
        return values, False


class PromptCache(TensorCache):
    """umT5 states of prompts, keyed by (prompt text, artifact).

    emb, hit = PromptCache(Path("~/.cache/liveavatar-lite")).get_or_compute(prompt, artifact_id, encode)
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root, "prompts")

    def path(self, prompt: str, artifact_id: str) -> Path:
        """Where the entry for (prompt, artifact) lives, whether or not it exists yet."""
        return self.path_for(prompt_key(prompt, artifact_id))

    def get(self, prompt: str, artifact_id: str) -> torch.Tensor | None:
        stored = self.load(prompt_key(prompt, artifact_id))
        return None if stored is None else stored.get("context")

    def put(self, prompt: str, artifact_id: str, embedding: torch.Tensor) -> None:
        self.store(prompt_key(prompt, artifact_id), {"context": embedding})

    def get_or_compute(self, prompt: str, artifact_id: str,  # type: ignore[override]
                       encode: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(embedding [L, text_dim], was_cached): read it, or run `encode` once and store the result."""
        (value,), hit = super().get_or_compute(prompt_key(prompt, artifact_id), ("context",), lambda: (encode(),))
        return value, hit


class PhotoCache(TensorCache):
    """The photo's latents (ref [16, 1, h, w], motion [16, T, h, w]), keyed by the framed pixels.

    The key is the photo AFTER framing for the render's size (float32 [3, H, W]), so the same face
    at the same size hits whatever file it came from, and another size or crop is its own entry.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root, "photos")

    def get_or_compute(self, reference: np.ndarray, artifact_id: str, motion_frames: int,  # type: ignore[override]
                       encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
        ref = np.ascontiguousarray(reference, dtype=np.float32)
        key = cache_key(artifact_id, str(motion_frames), str(ref.shape), ref.tobytes())
        (ref_latents, motion_latents), hit = super().get_or_compute(key, ("ref", "motion"), encode)
        return (ref_latents, motion_latents), hit
