"""What the dispatcher hands an executor (tasks) and what comes back (events), as plain frozen data.

The same messages travel over the local worker's pipe as JSON lines (`to_wire` / `from_wire`) and,
later, to Ray actors; nothing here knows which executor carries them.

    task = RenderTask(id=..., image="blobs/..", audio="blobs/..", prompt="...", size="704*384", seed=42,
                      num_clip=None, out="jobs/<id>/video.mp4", live="jobs/<id>/live", ...)
    line = to_wire(ClipDone(task_id=task.id, clip=0, clips_done=1, seconds=12.5))
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RenderTask:
    """Render one job to `out` (resuming its work dir if one exists), with live HLS in `live`."""

    id: str
    image: str
    audio: str
    prompt: str
    size: str
    seed: int
    num_clip: int | None
    out: str
    live: str | None  # None: no live HLS output
    telemetry: str | None  # None: no telemetry file
    checkpoint_interval_s: float
    resume: bool = True


@dataclass(frozen=True)
class AvatarTask:
    """Encode a photo framed at `size` (and, if given, a prompt) into the caches now."""

    id: str
    image: str
    size: str
    prompt: str | None = None


@dataclass(frozen=True)
class SessionTask:
    """Hold a talk session (serve/session_worker.py): listen on `socket` for the HTTP side, then render
    the speech it streams in until it closes. `keep`: a directory that receives the session's frames,
    speech and block boundaries (`serve --keep-sessions`, for tests and debugging), or None."""

    id: str
    image: str
    prompt: str
    size: str
    seed: int
    idle: str  # listen | pause
    socket: str
    keep: str | None = None
    max_backlog_s: float = 60.0


@dataclass(frozen=True)
class Cancel:
    """Stop task `task_id` at the next block boundary (a control message, not a task)."""

    task_id: str


@dataclass(frozen=True)
class Stop:
    """Finish nothing more and exit (a control message)."""


# ---- events (executor -> dispatcher) ------------------------------------------------------------

@dataclass(frozen=True)
class WorkerReady:
    """The worker has loaded its Pipeline and takes tasks."""

    pid: int
    loads: dict[str, int]
    seconds_per_clip: float | None = None  # the plan's prediction at the planning size (None: unknown)


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not load its Pipeline (bad artifact, budget); it exits after this."""

    message: str


@dataclass(frozen=True)
class Started:
    task_id: str
    resumed_clips: int = 0


@dataclass(frozen=True)
class Resumed:
    """The render continues from a checkpoint that covers `clips_done` clips."""

    task_id: str
    clips_done: int


@dataclass(frozen=True)
class BlockDone:
    """One block of clip `clip` is rendered: the unit of progress the stall watchdog counts."""

    task_id: str
    clip: int
    block: int
    blocks_per_clip: int
    predicted_block_s: float | None = None  # the plan's seconds per block (None: no plan)


@dataclass(frozen=True)
class NoSpace:
    """The disk filled during the task (ENOSPC); its work is kept and it waits for space."""

    task_id: str
    message: str


@dataclass(frozen=True)
class Restarted:
    """The task's checkpoint could not be resumed (e.g. another artifact); it renders from scratch."""

    task_id: str
    reason: str


@dataclass(frozen=True)
class SessionOpened:
    """The worker listens on the session's socket: the HTTP side may connect."""

    task_id: str


@dataclass(frozen=True)
class FirstFrame:
    task_id: str
    seconds: float  # from the task's start to its first decoded frame


@dataclass(frozen=True)
class ClipDone:
    """A clip is finished: its segment is durable and in the live playlist."""

    task_id: str
    clip: int
    clips_done: int
    seconds: float


@dataclass(frozen=True)
class Finished:
    task_id: str
    seconds: float
    frames: int = 0
    clips: int = 0
    resumed_clips: int = 0
    first_frame_s: float | None = None


@dataclass(frozen=True)
class Failed:
    """The task failed for a reason that retrying will not fix (bad input, out of memory, a bug)."""

    task_id: str
    kind: str  # bad_input | out_of_memory | internal
    message: str


@dataclass(frozen=True)
class Cancelled:
    task_id: str


@dataclass(frozen=True)
class Lost:
    """The worker died (or was stopped) with the task in flight; the task may be retried."""

    task_id: str
    kind: str  # worker_died | memory_ceiling | stalled
    reason: str


@dataclass(frozen=True)
class Memory:
    """The worker's memory after a task: host RSS and the accelerator's allocated bytes (None on CPU)."""

    rss_bytes: int | None
    device_bytes: int | None


Task = RenderTask | AvatarTask | SessionTask
Event = (WorkerReady | WorkerFailed | Started | Resumed | BlockDone | NoSpace | Restarted | FirstFrame | ClipDone
         | Finished | Failed | Cancelled | Lost | Memory | SessionOpened)

_TYPES: dict[str, type] = {t.__name__: t for t in (
    RenderTask, AvatarTask, SessionTask, Cancel, Stop, SessionOpened,
    WorkerReady, WorkerFailed, Started, Resumed, BlockDone, NoSpace, Restarted, FirstFrame, ClipDone, Finished, Failed,
    Cancelled, Lost, Memory)}


def to_wire(message: Any) -> bytes:
    """One JSON line: {"type": "ClipDone", ...fields}."""
    return (json.dumps({"type": type(message).__name__, **asdict(message)}) + "\n").encode()


def from_wire(line: bytes | str) -> Any:
    """The message of one JSON line (ValueError for anything else: the pipe carries only our own types)."""
    doc = json.loads(line)
    cls = _TYPES.get(doc.pop("type", None)) if isinstance(doc, dict) else None
    if cls is None:
        raise ValueError(f"not a serve message: {str(line)[:80]}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in doc.items() if k in names})
