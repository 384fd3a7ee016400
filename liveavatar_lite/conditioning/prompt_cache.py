"""On-disk cache of umT5 prompt embeddings, keyed by the prompt text and the artifact.

Encoding a prompt loads umT5-XXL (about 11 GB in bf16); a kiosk that always uses the same prompt
pays that once. The key hashes the exact prompt and the artifact's identity (its manifest bytes),
so a different model or re-quantized artifact never reuses a stale embedding.

    cache = PromptCache(default_cache_dir())
    emb = cache.get_or_compute(prompt, artifact_id, lambda: encode(prompt))  # [L, text_dim]
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_KEY_VERSION = "1"  # bump when the stored layout or the encoder's preprocessing changes


def default_cache_dir() -> Path:
    """$LIVEAVATAR_LITE_CACHE, else $XDG_CACHE_HOME/liveavatar-lite, else ~/.cache/liveavatar-lite.

    PromptCache(default_cache_dir())
    """
    env = os.environ.get("LIVEAVATAR_LITE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "liveavatar-lite"


def prompt_key(prompt: str, artifact_id: str) -> str:
    """sha256 hex of (version, artifact identity, prompt).

    prompt_key("a man talking", "ab12...")  # '3f0c...'
    """
    h = hashlib.sha256()
    for part in (_KEY_VERSION, artifact_id, prompt):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two (id, prompt) pairs collide
        h.update(data)
    return h.hexdigest()


class PromptCache:
    """Prompt embeddings stored as safetensors files, one per key, written temp + rename.

    emb, hit = PromptCache(Path("~/.cache/liveavatar-lite")).get_or_compute(prompt, artifact_id, encode)
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "prompts"

    def path(self, prompt: str, artifact_id: str) -> Path:
        """Where the entry for (prompt, artifact) lives, whether or not it exists yet."""
        return self.root / f"{prompt_key(prompt, artifact_id)}.safetensors"

    def get(self, prompt: str, artifact_id: str) -> torch.Tensor | None:
        """The cached embedding, or None if absent or unreadable (a damaged entry is recomputed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(prompt, artifact_id)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            return tensors["context"]
        except (OSError, KeyError, SafetensorError) as e:
            log.warning("ignoring damaged prompt cache entry %s (%s)", path, e)
            return None

    def put(self, prompt: str, artifact_id: str, embedding: torch.Tensor) -> None:
        """Store `embedding` atomically; an unwritable cache only logs a warning."""
        from safetensors.torch import save_file

        path = self.path(prompt, artifact_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"context": embedding.detach().cpu().contiguous()}, str(tmp))
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache must not fail the render
            log.warning("could not write the prompt cache at %s (%s)", path, e)

    def get_or_compute(self, prompt: str, artifact_id: str,
                       encode: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(embedding, was_cached): read it, or run `encode` once and store the result."""
        cached = self.get(prompt, artifact_id)
        if cached is not None:
            log.info("prompt embedding from cache %s", self.path(prompt, artifact_id).name[:12])
            return cached, True
        embedding = encode()
        self.put(prompt, artifact_id, embedding)
        return embedding, False
