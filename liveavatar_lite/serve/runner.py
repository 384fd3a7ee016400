"""The worker side of the service: a warm Pipeline that runs one task at a time and reports as it goes.

`TaskRunner` is what a worker process (worker.py) or, later, a Ray actor holds. It wraps the
Pipeline's backend in `_ObservedBackend`, whose renderers check the cancel flag before every block
(a cancel stops the render between blocks) and report the first frame and each finished clip. No
change to the Pipeline is needed for that: the backend is the Pipeline's own extension point.

    runner = TaskRunner.load(options, size=(704, 384))
    runner.run(task, cancel=threading.Event(), emit=print)   # emits Started, FirstFrame, ClipDone..., Finished
"""
from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BudgetError, UserError, first_line
from ..pipeline.pipeline import Pipeline
from ..pipeline.request import PipelineOptions, RenderInputs, RenderRequest
from .malloc_policy import release_free_memory
from .tasks import (
    AvatarTask,
    BlockDone,
    Cancelled,
    ClipDone,
    Event,
    Failed,
    Finished,
    FirstFrame,
    Memory,
    NoSpace,
    RenderTask,
    Restarted,
    Resumed,
    SessionTask,
    Started,
)

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


class TaskCancelled(Exception):
    """Raised between blocks when the task's cancel flag is set."""


class _Hooks:
    """Per-task state the observed renderer reports through."""

    def __init__(self, task_id: str, cancel: threading.Event, emit: Emit) -> None:
        self.task_id, self.cancel, self.emit = task_id, cancel, emit
        self.started = time.perf_counter()
        self.first_frame_s: float | None = None
        self.clip: int | None = None  # the clip being rendered
        self.block = 0
        self.clip_started = self.started
        self.blocks_per_clip = 1
        self.predicted_block_s: float | None = None

    def before_block(self, clip: int, block: int) -> None:
        if self.cancel.is_set():
            raise TaskCancelled()
        if self.clip is None and clip > 0:
            self.emit(Resumed(self.task_id, clip))  # a resumed render starts after its checkpoint
        if block == 0 and self.clip is not None and clip == self.clip + 1:
            # block 0 of clip c+1 starts only after clip c's segment and live entry were committed
            self.clip_done(self.clip)
        if block == 0 or self.clip is None:
            self.clip, self.clip_started = clip, time.perf_counter()
        self.block = block

    def after_block(self) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - self.started
            self.emit(FirstFrame(self.task_id, round(self.first_frame_s, 4)))
        assert self.clip is not None
        self.emit(BlockDone(self.task_id, self.clip, self.block, self.blocks_per_clip, self.predicted_block_s))

    def clip_done(self, clip: int) -> None:
        self.emit(ClipDone(self.task_id, clip, clip + 1, round(time.perf_counter() - self.clip_started, 4)))


class _ObservedRenderer:
    """A ClipRenderer that checks for a cancel before each block and reports progress after it."""

    def __init__(self, inner: Any, hooks: _Hooks) -> None:
        self.inner, self.hooks = inner, hooks
        self.blocks_per_clip = inner.blocks_per_clip
        hooks.blocks_per_clip = max(1, int(inner.blocks_per_clip))
        plan = getattr(inner, "plan", None)
        if plan is not None:  # the plan's seconds per clip, spread over its blocks
            hooks.predicted_block_s = round(plan.predicted_seconds_per_clip / hooks.blocks_per_clip, 4)

    def block_frames(self, clip: int, block: int, **kwargs: Any) -> Any:
        """(`kwargs`: a talk session's renderer takes each block's `audio` features here)"""
        self.hooks.before_block(clip, block)
        frames = self.inner.block_frames(clip, block, **kwargs)
        self.hooks.after_block()
        return frames

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def close(self) -> None:  # a cancel between blocks: the inner renderer joins what it ran ahead
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def load_state(self, state: dict[str, Any]) -> None:
        self.inner.load_state(state)

    def copy_wait_seconds(self) -> float:
        return self.inner.copy_wait_seconds()


class _ObservedBackend:
    """The loaded ArtifactBackend, whose renderers report to the current task's hooks."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hooks: _Hooks | None = None

    @property
    def loads(self) -> dict[str, int]:
        return dict(self.inner.loads)

    def identity(self) -> str:
        return self.inner.identity()

    def oom_advice(self) -> str:
        return self.inner.oom_advice()

    def build(self, inputs: RenderInputs) -> _ObservedRenderer:
        renderer = self.inner.build(inputs)
        assert self.hooks is not None, "build outside a task"
        return _ObservedRenderer(renderer, self.hooks)

    # ---- talk sessions (pipeline/session.py): the same renderer observed, the rest as the inner backend

    def build_session(self, inputs: RenderInputs) -> _ObservedRenderer:
        renderer = self.inner.build_session(inputs)
        assert self.hooks is not None, "build outside a task"
        return _ObservedRenderer(renderer, self.hooks)

    def session_audio_encoder(self) -> Any:
        return self.inner.session_audio_encoder()

    def release_session_audio_encoder(self) -> None:
        self.inner.release_session_audio_encoder()

    def silence_features(self, frames: int) -> Any:
        return self.inner.silence_features(frames)

    @property
    def feature_dtype(self) -> Any:
        return self.inner.feature_dtype


class TaskRunner:
    """A warm Pipeline (models loaded once) that renders tasks and pre-encodes avatars."""

    def __init__(self, backend: Any, remove_outputs: Callable[[RenderTask | AvatarTask], None] | None = None) -> None:
        """`remove_outputs`: what a failed or cancelled task leaves is removed by it (default: the task's
        job directory, serve's layout; the farm removes only the render's work files)."""
        self.backend = _ObservedBackend(backend)
        self.remove_outputs = remove_outputs or _remove_outputs
        self.pipeline = Pipeline(self.backend, progress=False)
        self.tasks_run = 0

    @classmethod
    def load(cls, options: PipelineOptions, size: tuple[int, int],
             remove_outputs: Callable[[RenderTask | AvatarTask], None] | None = None) -> TaskRunner:
        """Open the artifact and load its models planned for `size` (width, height)."""
        from ..pipeline.render import ArtifactBackend

        backend = ArtifactBackend.open(options)
        backend.load(size)
        return cls(backend, remove_outputs)

    @property
    def loads(self) -> dict[str, int]:
        return self.pipeline.loads

    def run(self, task: RenderTask | AvatarTask | SessionTask, cancel: threading.Event, emit: Emit) -> None:
        """Run one task to its end, emitting its events; never raises for a task's own failure."""
        self.tasks_run += 1
        try:
            if isinstance(task, AvatarTask):
                self._avatar(task)
                emit(Finished(task.id, 0.0))
            elif isinstance(task, SessionTask):
                self._session(task, cancel, emit)
            else:
                self._render(task, cancel, emit)
        except TaskCancelled:
            self.remove_outputs(task)
            emit(Cancelled(task.id))
        except Exception as e:  # noqa: BLE001 - sorted below: a full disk keeps the work, the rest fails
            if no_space(e):
                log.warning("task %s: the disk is full (%s); its work is kept", task.id, first_line(e))
                emit(NoSpace(task.id, f"the disk is full: {first_line(e)}"))
            else:
                self._failed(task, e, emit)
        finally:
            self.backend.hooks = None
            release_free_memory()  # the heap's free pages back to the OS: RSS between tasks is what is held
            emit(Memory(*memory_now()))

    def _failed(self, task: RenderTask | AvatarTask, e: Exception, emit: Emit) -> None:
        """A task's own failure: its outputs removed, the reason emitted."""
        self.remove_outputs(task)
        if isinstance(e, BudgetError):
            emit(Failed(task.id, "out_of_memory", str(e)))
        elif isinstance(e, UserError):
            emit(Failed(task.id, "bad_input", str(e)))
        else:  # a bug or a library failure: reported, and the worker keeps serving
            log.error("task %s failed", task.id, exc_info=e)
            emit(Failed(task.id, "internal", f"{type(e).__name__}: {first_line(e)}"))

    def _render(self, task: RenderTask, cancel: threading.Event, emit: Emit) -> None:
        hooks = _Hooks(task.id, cancel, emit)
        if cancel.is_set():
            raise TaskCancelled()
        self.backend.hooks = hooks
        request = RenderRequest(
            image=Path(task.image), audio=Path(task.audio), prompt=task.prompt, out=Path(task.out), size=task.size,
            num_clip=task.num_clip, seed=task.seed, resume=task.resume,
            telemetry=Path(task.telemetry) if task.telemetry else None, live=Path(task.live) if task.live else None,
            checkpoint_interval_s=task.checkpoint_interval_s, progress=False)
        emit(Started(task.id))
        try:
            result = self.pipeline.run(request)
        except UserError as e:
            if not (task.resume and str(e).startswith("cannot resume")) or no_space(e):
                raise
            # the checkpoint is unusable (another artifact or version, damaged): start over, said so
            log.warning("task %s: %s; rendering it from scratch", task.id, first_line(e))
            self.remove_outputs(task)
            emit(Restarted(task.id, first_line(e)))
            hooks.clip = None
            result = self.pipeline.run(request)
        if hooks.clip is not None:
            hooks.clip_done(hooks.clip)  # the last clip (its segment is in the mp4 now)
        emit(Finished(task.id, round(result.seconds, 4), result.frames, result.clips, result.resumed_clips,
                      None if result.first_frame_seconds is None else round(result.first_frame_seconds, 4)))

    def _session(self, task: SessionTask, cancel: threading.Event, emit: Emit) -> None:
        """A talk session (session_worker.py); its blocks count as progress for the stall watchdog."""
        from .session_worker import run_session

        started = time.perf_counter()
        # the session's own loop stops it on `cancel`; the hooks only report blocks (their flag stays clear)
        self.backend.hooks = _Hooks(task.id, threading.Event(), emit)
        emit(Started(task.id))
        frames = run_session(self.pipeline, task, cancel, emit)
        emit(Finished(task.id, round(time.perf_counter() - started, 4), frames))

    def _avatar(self, task: AvatarTask) -> None:
        from ..conditioning.photo import load_reference

        reference = load_reference(Path(task.image), task.size)  # float32 [3, H, W]
        self.backend.inner.precompute(reference, task.prompt)


def _remove_outputs(task: RenderTask | AvatarTask) -> None:
    """A failed or cancelled render leaves nothing: its job directory (mp4, work dir, live) goes."""
    if isinstance(task, RenderTask):
        shutil.rmtree(Path(task.out).parent, ignore_errors=True)


def no_space(e: BaseException) -> bool:
    """True when `e` (or what caused it) is the disk being full (ENOSPC, or a quota: EDQUOT)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def memory_now() -> tuple[int | None, int | None]:
    """(host RSS of this process, accelerator bytes allocated by torch or None)."""
    import sys

    from ..pipeline.telemetry import host_rss_bytes

    torch = sys.modules.get("torch")
    device = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = int(torch.cuda.memory_allocated())
    return host_rss_bytes()[0], device
