"""The service's typed configuration, built once at the edge (the `serve` command's flags).

    config = ServeConfig(pipeline=PipelineOptions(Path("art")), state_dir=Path("state"))
    config.limits.max_queue  # 32
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..pipeline.request import PipelineOptions

MAX_TOKEN_CHARS = 1024  # a header line a client can send whole (h11 takes up to 16 KB of headers)
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the service; past these a request gets a 4xx, never a crash."""

    max_queue: int = 32  # queued jobs (not counting the running one); more -> 429 + Retry-After
    max_upload_bytes: int = 50 * 1024 * 1024  # the whole multipart body of one request
    max_audio_seconds: float = 600.0  # speech longer than this -> 413
    max_prompt_chars: int = 2000
    request_timeout_s: float = 60.0  # receiving + validating one upload; slower -> 408
    max_jobs_listed: int = 500  # GET /v1/jobs?limit=


@dataclass(frozen=True)
class WorkerPolicy:
    """How the supervisor keeps the warm worker healthy."""

    memory_ceiling_bytes: int | None = None  # worker RSS above this -> restarted (a job in flight is lost once)
    recycle_after_jobs: int = 0  # restart the worker (between jobs) after this many tasks; 0: never
    max_deaths_per_job: int = 2  # a job whose worker died this many times is failed, not retried again
    checkpoint_interval_s: float = 600.0  # resume checkpoints of service jobs (0: after every clip)
    stall_timeout_s: float = 600.0  # the least time a task may go without progress before its worker is killed
    stall_blocks: float = 10.0  # ... or this many of the plan's predicted block times, if that is longer
    log_max_bytes: int = 20_000_000  # worker.log beyond this is moved to worker.log.1 (one old copy kept)


@dataclass(frozen=True)
class SessionPolicy:
    """Talk sessions (POST /v1/sessions + the WebSocket; docs/serve.md, "Talk mode")."""

    idle_s: float = 120.0  # no message from the client (or no client yet) for this long -> the session ends
    max_message_bytes: int = 256 * 1024  # one PCM message (4 s of float32 at 16 kHz); more -> error, close 1009
    max_backlog_s: float = 60.0  # speech received but not yet rendered; more -> error, close 1008
    send_timeout_s: float = 30.0  # a client that does not take a fragment for this long is dropped
    keep: bool = False  # keep each session's frames, speech and sent bytes under state/sessions/ (debug, tests)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `liveavatar-lite serve` runs with."""

    pipeline: PipelineOptions  # the artifact and memory budget the worker loads once
    state_dir: Path  # queue database, inputs, results, logs: everything the service writes
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token; required for a non-loopback host
    size: str = "704*384"  # the size the worker is planned for, and a job's default
    limits: Limits = field(default_factory=Limits)
    worker: WorkerPolicy = field(default_factory=WorkerPolicy)
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    keep_jobs: int = 1000  # finished jobs (and their videos) kept; older ones are deleted
    max_state_bytes: int | None = None  # prune live segments of done jobs and caches (LRU) to stay under this
    min_free_bytes: int = 1_000_000_000  # free disk below this (plus a job's own need) -> jobs wait, uploads 507

    def __post_init__(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise UserError(f"--host {self.host} is reachable from other machines: pass --token-file FILE "
                            "(clients then send `Authorization: Bearer TOKEN`), or bind to 127.0.0.1")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> str:
    """The bearer token in `path` (its first line, stripped); UserError if missing, empty, short, not
    printable ASCII (an HTTP header carries bytes a client could never match), or not a regular file
    (a FIFO would block the start)."""
    from ..fileio import require_file

    require_file(path, "--token-file", missing=f"cannot read --token-file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TOKEN_CHARS * 4 + 64)  # what a token line can be: never a whole large file
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --token-file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) > MAX_TOKEN_CHARS:  # no client could send it (an HTTP header line is limited)
        raise UserError(f"--token-file {path}: the token's first line is longer than {MAX_TOKEN_CHARS} characters "
                        "(is it the right file?); e.g. `openssl rand -hex 32 > FILE`")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"--token-file {path}: the token must be at least {MIN_TOKEN_CHARS} characters "
                        "(e.g. `openssl rand -hex 32 > FILE`)")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise UserError(f"--token-file {path}: the token must be printable ASCII without spaces (clients send it "
                        "in an HTTP header); e.g. `openssl rand -hex 32 > FILE`")
    return token


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/liveavatar-lite/serve, else ~/.local/state/liveavatar-lite/serve."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "liveavatar-lite" / "serve"
