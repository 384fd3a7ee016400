"""Disk space of the state dir: how much is free, how much the service's files take, and pruning.

    free_bytes(Path("state"))           # statvfs, or the test hook below
    state_bytes(Path("state"))          # everything under the state dir
    prune_to(layout, store, cache_dir, limit_bytes)   # LRU: finished jobs' live segments, then caches
    job_bytes(dit, (704, 384), clips=16)                 # what a job will write: its room before it starts

Pruning deletes only what the database vouches for: the `live/` directory of a job the store says
is `done` (its mp4 holds the same frames), and photo or prompt cache entries (named
`<hex>.safetensors` under the cache's `photos/` or `prompts/`), which a render recomputes on a miss.
Nothing else is ever removed here: not unknown files, not the jobs of other states.

Test hook: if the environment names a file in LIVEAVATAR_SERVE_FREE_BYTES_FILE and that file
exists, its integer content is the free space reported (how the tests fill a disk without root;
they replace it atomically).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..config import DiTConfig, SampleConfig
from ..runtime.plan_inputs import KV_DTYPES, kv_specs
from .layout import StateDir
from .store import DONE, JobStore

log = logging.getLogger(__name__)

FREE_BYTES_HOOK = "LIVEAVATAR_SERVE_FREE_BYTES_FILE"
CACHE_ENTRY = re.compile(r"^[0-9a-f]{16,128}\.safetensors$")
CACHE_KINDS = ("photos", "prompts")
# An encoded copy of a clip (x264 at crf 18, or its MPEG-TS live segment) as a fraction of the clip's raw
# RGB bytes: 0.19 (mp4) and 0.21 (.ts) measured on the tiny model's noise-like frames at 64*64, the
# worst case for the encoder; real faces compress several times better, so this bounds from above.
ENCODED_FRACTION = 0.25
# A photo-cache entry per output pixel: 92 B measured (376 KB at 64*64, about 25 MB at 704*384).
PHOTO_ENTRY_BYTES_PER_PIXEL = 100
LATENT_CHANNELS = 16


def job_bytes(dit: DiTConfig | None, size: tuple[int, int], clips: int, kv_dtype: str = "bf16",
              sample: SampleConfig = SampleConfig()) -> int:
    """An upper estimate of the bytes one job writes under the state dir, from its plan: three encoded
    copies of each clip (the work dir's segment, the live segment, the mp4), the photo-cache entry of
    its face, and (more than one clip) two resume checkpoints at once (the newest is written before
    the previous one is deleted), each the K/V rings and sink of the plan (`kv_specs` in `kv_dtype`;
    about 40 GB at 14B, 704*384 in bf16) plus the latents kept beside them. `dit` None (no manifest):
    no checkpoints counted."""
    w, h = size
    raw_clip = w * h * 3 * sample.infer_frames
    video = int(3 * clips * raw_clip * ENCODED_FRACTION)
    photo = PHOTO_ENTRY_BYTES_PER_PIXEL * w * h
    state = 0
    if clips > 1 and dit is not None:
        kv = sum(k.nbytes(kv_dtype if kv_dtype in KV_DTYPES else "bf16") for k in kv_specs(dit, size, sample))
        latent_frames = 1 + sample.motion_latent_frames + sample.latent_frames_per_clip  # ref, motion, the clip
        latents = LATENT_CHANNELS * latent_frames * (h // 8) * (w // 8) * 4
        state = 2 * (kv + latents)
    return video + photo + state


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the filesystem of `path`."""
    hook = os.environ.get(FREE_BYTES_HOOK)
    if hook:
        try:
            return int(Path(hook).read_text().strip())
        except (OSError, ValueError):
            pass  # no hook file: the real figure
    return shutil.disk_usage(path).free


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 if it is gone); files vanishing meanwhile are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def cache_entries(cache_dir: Path) -> list[Path]:
    """The photo and prompt cache entries under `cache_dir`, least recently used first."""
    entries = []
    for kind in CACHE_KINDS:
        d = cache_dir / kind
        if d.is_dir():
            entries += [p for p in d.iterdir() if CACHE_ENTRY.match(p.name) and p.is_file()]

    def last_use(p: Path) -> float:
        try:
            st = p.stat()
        except OSError:
            return 0.0
        return max(st.st_atime, st.st_mtime)

    return sorted(entries, key=last_use)


def prune_to(layout: StateDir, store: JobStore, cache_dir: Path | None, limit_bytes: int,
             finishing: str | None = None, reserve: int = 0) -> int:
    """Bring the state dir under `limit_bytes` less `reserve` (room kept for running jobs): live
    segments of done jobs (oldest finished first; then those of `finishing`, a job whose mp4 is
    complete and which is about to be marked done), then cache entries (least recently used first).
    Returns the bytes it removed."""
    used = tree_bytes(layout.root)
    if cache_dir is not None and not _inside(cache_dir, layout.root):
        used += tree_bytes(cache_dir)
    target = limit_bytes - reserve
    if used <= target:
        return 0
    removed = 0
    done = [j.id for j in sorted(store.list(DONE, limit=10**9), key=lambda j: j.finished or 0.0)]
    for job_id in done + ([finishing] if finishing else []):
        if used - removed <= target:
            break
        live = layout.live(job_id)
        if live.is_dir():
            size = tree_bytes(live)
            shutil.rmtree(live, ignore_errors=True)
            removed += size
    if cache_dir is not None:
        for entry in cache_entries(cache_dir):
            if used - removed <= target:
                break
            try:
                size = entry.stat().st_size
                entry.unlink()
            except OSError:
                continue
            removed += size
    if used - removed > target:
        log.warning("pruned %.1f MB; the state dir still holds %.1f MB, over --max-state-gb %g less %.1f MB kept "
                    "for the next job: what is left are results, queued inputs and the queue (--keep-jobs bounds "
                    "the results)", removed / 1e6, (used - removed) / 1e6, limit_bytes / 1e9, reserve / 1e6)
    elif removed:
        log.info("pruned %.1f MB (live segments of finished jobs, least recently used caches) to stay under "
                 "--max-state-gb %g", removed / 1e6, limit_bytes / 1e9)
    return removed


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True
