"""Where the service keeps things under --state-dir, and the only names it accepts from clients.

    state/
      queue.sqlite3 (+ -wal, -shm)   the durable job queue (store.py)
      server.lock                    held by the running server (a second one on the same dir is refused)
      blobs/ab/abcd...               uploaded photos and speech, named by sha256 (blobs.py)
      jobs/<id>/video.mp4            a job's result; live/ its HLS while rendering; telemetry.jsonl
      tmp/                           uploads being received and validated (emptied at start)
      cache/                         prompt and photo latent caches (unless --cache-dir)
      worker.log                     the worker process's stderr

    layout = StateDir(Path("state")); layout.job_dir(job_id)
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

JOB_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
AVATAR_ID = re.compile(r"^av_[0-9a-f]{32}$")
LIVE_FILE = re.compile(r"^(index\.m3u8|seg_[0-9]{5}\.ts)$")  # what decode/hls.py writes, nothing else


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return bool(JOB_ID.match(text))


def is_avatar_id(text: str) -> bool:
    return bool(AVATAR_ID.match(text))


@dataclass(frozen=True)
class StateDir:
    """Paths under the state directory; job paths only for ids that passed `is_job_id`."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "queue.sqlite3"

    @property
    def lock(self) -> Path:
        return self.root / "server.lock"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs / job_id

    def video(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "video.mp4"

    def live(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "live"

    def telemetry(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "telemetry.jsonl"

    def create(self) -> None:
        for d in (self.root, self.blobs, self.tmp, self.jobs):
            d.mkdir(parents=True, exist_ok=True)
