"""The dispatcher thread: claims queued jobs for the executor and writes what happens back to the store.

One loop, every 0.2 s or sooner when an event arrives:
  1. apply the executor's events (progress, results, failures, lost workers) to the store and metrics;
  2. pass cancel requests of running jobs to the executor;
  3. while the executor has a free slot: pending avatars first, then the next queued job.

A job whose worker died (or stalled: supervisor.py) is requeued at the head (resumable from its
checkpoint); the `max_deaths_per_job`-th time it is failed with the reason instead of being retried forever.

Disk: no job starts while the state dir's filesystem has less than `min_free_bytes` plus the job's
own bytes free (disk.job_bytes: its video, live segments, photo-cache entry and checkpoints, from
its clip count, size and the artifact's plan); a job that hits a full disk (ENOSPC) waits as
`waiting_for_disk` with its work kept, and goes back to the head of the queue once space returns
(checked every second; nothing starts until DISK_RETRY_S after the latest full disk, doubling
while the disk keeps filling, so the waiting jobs go first). With `max_state_bytes`, finished jobs'
live segments and least recently used caches are pruned (disk.py) so that the state dir stays
under it: before a job starts, down to the limit less the running jobs' own bytes; when a job
finishes, before it is marked done (its own live segments may go too: its mp4 holds the frames);
and after any upload, within one step of this loop.

Drain (`drain()`: SIGUSR1 or POST /v1/admin/drain): nothing new starts; once the running task is
done, `on_drained` is called (the server then exits 0). Queued jobs stay queued for the next start.

Every job state change is one log line (joblog.py). Progress is per block and never goes back.

    dispatcher = Dispatcher(store, executor, layout, config, metrics); dispatcher.start(); ...; dispatcher.stop()
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..artifact.format import read_manifest
from ..runtime.plan_inputs import parse_size
from . import disk
from .blobs import BlobStore
from .config import ServeConfig
from .executor import Executor
from .layout import StateDir
from .joblog import job_state
from .metrics import ServeMetrics
from .store import CANCELLED, DONE, FAILED, QUEUED, READY, RUNNING, WAITING_FOR_DISK, JobRow, JobStore
from .tasks import (
    AvatarTask,
    BlockDone,
    Cancelled,
    ClipDone,
    Event,
    Failed,
    Finished,
    FirstFrame,
    Lost,
    Memory,
    NoSpace,
    RenderTask,
    Restarted,
    Resumed,
    SessionOpened,
    SessionTask,
    Task,
    WorkerFailed,
    WorkerReady,
)

log = logging.getLogger(__name__)

DISK_CHECK_S = 1.0  # how often free space is measured
DISK_RETRY_S = 5.0  # after a full disk, jobs wait at least this long (doubling up to DISK_RETRY_MAX_S)
DISK_RETRY_MAX_S = 300.0


class Dispatcher:
    """Joins the durable queue and an executor; runs on its own long-lived thread."""

    def __init__(self, store: JobStore, executor: Executor, layout: StateDir, blobs: BlobStore, config: ServeConfig,
                 metrics: ServeMetrics, blob_lock: threading.Lock) -> None:
        self.store, self.executor, self.layout, self.blobs = store, executor, layout, blobs
        self.config, self.metrics, self.blob_lock = config, metrics, blob_lock
        self._running: dict[str, Task] = {}  # task id -> task, as submitted
        self._cancel_sent: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self.wake = threading.Event()  # set by the API after a submit or cancel: act now
        self.draining = threading.Event()
        self.on_drained: Callable[[], None] | None = None  # called once, from this thread
        self._drained = False
        self.on_step: Callable[[], None] | None = None  # called every loop (the systemd watchdog ping)
        self.progress: dict[str, float] = {}  # running job id -> fraction of its blocks done (never decreasing)
        self._clips_total: dict[str, int] = {}
        self.free_bytes: int | None = None
        self._disk_checked = 0.0
        self._disk_retry_s = DISK_RETRY_S
        self._disk_retry_at = 0.0
        self.sessions = None  # a SessionBroker (sessions.py) when the executor runs talk sessions
        self._room_logged: str | None = None  # the job last logged as waiting for room (logged once)
        self._reserved: dict[str, int] = {}  # running job id -> its bytes, kept free under max_state_bytes
        try:  # the plan's model (checkpoint sizes); a test's fake artifact has none: no checkpoints counted
            self._dit = read_manifest(config.pipeline.artifact).dit
        except Exception:  # noqa: BLE001 - the worker reports a bad artifact in its own words
            self._dit = None

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Start nothing new; once the running task ends, call `on_drained` (safe from a signal handler)."""
        if not self.draining.is_set():
            log.info("draining: the running job finishes, nothing new starts; then the server exits")
        self.draining.set()
        self.wake.set()

    def disk_status(self) -> dict:
        """For /readyz: free bytes under the state dir and whether jobs wait for space."""
        return {"free_bytes": self.free_bytes, "min_free_bytes": self.config.min_free_bytes,
                "short": self.disk_short()}

    def disk_short(self) -> bool:
        return self.free_bytes is not None and self.free_bytes < self.config.min_free_bytes

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=30)

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        self.executor.start()  # here: the worker must be started by this long-lived thread (PDEATHSIG)
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # the loop must survive anything one job does
                    log.exception("dispatcher step failed")
                    time.sleep(1.0)
        finally:
            self.executor.stop()

    def job_bytes(self, job: JobRow) -> int:
        """What `job` will write under the state dir (an upper estimate: disk.job_bytes)."""
        return disk.job_bytes(self._dit, parse_size(job.size), job.clips_total, self.config.pipeline.kv_dtype)

    def _room_for_next(self) -> bool:
        """Whether the next queued job fits: free space >= --min-free-mb plus its own bytes."""
        job = self.store.next_queued()
        if job is None or self.free_bytes is None:
            return True
        need = self.job_bytes(job)
        if self.free_bytes >= self.config.min_free_bytes + need:
            return True
        if self._room_logged != job.id:
            self._room_logged = job.id
            log.warning("job %s waits for disk space: it needs about %.0f MB (its video, live segments, photo cache "
                        "and checkpoints) above --min-free-mb %.0f MB; %.0f MB free", job.id, need / 1e6,
                        self.config.min_free_bytes / 1e6, self.free_bytes / 1e6)
        return False

    def _step(self) -> None:
        woken = self.wake.is_set()
        timeout = 0.05 if woken else 0.2
        self.wake.clear()
        if woken:
            self._prune_state()  # an upload may have added bytes: back under the limit at once
        if self.on_step is not None:
            self.on_step()
        for event in self.executor.events(timeout=timeout):
            self._apply(event)
        self._send_cancels()
        self._check_disk()
        while (self.executor.free_slots() > 0 and not self._stop.is_set() and not self.draining.is_set()
               and not self.disk_short() and time.monotonic() >= self._disk_retry_at  # (waiting jobs first)
               and (self._session_holds_worker()  # a session writes no job bytes
                    or self.store.next_pending_avatar() is not None or self._room_for_next())):
            task = self._next_task()
            if task is None:
                break
            self._running[task.id] = task
            self.executor.submit(task)
        if self.draining.is_set() and not self._running and not self._drained:
            self._drained = True
            log.info("drained: no job is running")
            if self.on_drained is not None:
                self.on_drained()

    def _check_disk(self) -> None:
        """Measure free space (each DISK_CHECK_S); release jobs waiting for disk once there is enough."""
        now = time.monotonic()
        if now - self._disk_checked < DISK_CHECK_S:
            return
        self._disk_checked = now
        try:
            self.free_bytes = disk.free_bytes(self.layout.root)
        except OSError as e:
            log.warning("cannot measure the free space under %s: %s", self.layout.root, e)
            return
        self.metrics.free_bytes.set(self.free_bytes)
        if not self.disk_short() and now >= self._disk_retry_at and self.store.count(WAITING_FOR_DISK):
            for job_id in self.store.release_waiting():
                job = self.store.get(job_id)
                job_state(job_id, QUEUED, job.created if job else None,
                          f"{self.free_bytes / 1e6:.0f} MB free again; it resumes from its checkpoint")
            self.wake.set()

    def _session_holds_worker(self) -> bool:
        """Whether a talk session waits for (or holds) the worker: it goes before queued work."""
        return self.sessions is not None and self.sessions.holds_worker()

    def _next_task(self) -> Task | None:
        if self._session_holds_worker():
            return self.sessions.take()  # a talk session goes before queued work, and holds the worker
        avatar = self.store.next_pending_avatar()
        if avatar is not None and avatar.id not in self._running:
            return AvatarTask(avatar.id, str(self.blobs.path(avatar.image)), avatar.size, avatar.prompt)
        job = self.store.claim_next()
        if job is None:
            return None
        self._reserved[job.id], self._room_logged = self.job_bytes(job), None
        self._prune_state()  # room for this job's own bytes under --max-state-gb before it writes any
        self.layout.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        self._clips_total[job.id] = job.clips_total
        self.progress[job.id] = max(self.progress.get(job.id, 0.0), job.clips_done / max(1, job.clips_total))
        job_state(job.id, RUNNING, job.created, "resumed from its checkpoint" if job.resume else None)
        return self._render_task(job)

    def _render_task(self, job: JobRow) -> RenderTask:
        return RenderTask(
            id=job.id, image=str(self.blobs.path(job.image)), audio=str(self.blobs.path(job.audio)),
            prompt=job.prompt, size=job.size, seed=job.seed, num_clip=job.num_clip,
            out=str(self.layout.video(job.id)), live=str(self.layout.live(job.id)),
            telemetry=str(self.layout.telemetry(job.id)),
            checkpoint_interval_s=self.config.worker.checkpoint_interval_s, resume=True)

    def _send_cancels(self) -> None:
        if self.sessions is not None:
            self.sessions.expire()
            session_id = self.sessions.to_cancel()
            if session_id is not None and session_id in self._running and session_id not in self._cancel_sent:
                self._cancel_sent.add(session_id)
                self.executor.cancel(session_id)
        for task_id in list(self._running):
            if task_id in self._cancel_sent or isinstance(self._running[task_id], AvatarTask | SessionTask):
                continue
            job = self.store.get(task_id)
            if job is not None and job.cancel_requested:
                self._cancel_sent.add(task_id)
                self.executor.cancel(task_id)

    # ---- events -----------------------------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        if isinstance(event, WorkerReady | WorkerFailed | Memory):
            self.metrics.worker_event(event)
            return
        task = self._running.get(event.task_id)
        if task is None:
            return  # a task already handled (e.g. a result after its full disk): the store keeps its state
        if isinstance(task, AvatarTask):
            self._apply_avatar(task, event)
            return
        if isinstance(task, SessionTask):
            self._apply_session(task, event)
            return
        if isinstance(event, FirstFrame):
            self.store.progress(event.task_id, first_frame_s=event.seconds)
            self.metrics.first_frame(event.seconds)
        elif isinstance(event, BlockDone):
            total = self._clips_total.get(event.task_id, 1) * event.blocks_per_clip
            done = event.clip * event.blocks_per_clip + event.block + 1
            self.progress[event.task_id] = max(self.progress.get(event.task_id, 0.0), min(1.0, done / total))
        elif isinstance(event, Resumed | ClipDone):
            job = self.store.get(event.task_id)  # a resumed render re-renders the clips after its checkpoint:
            if job is not None and event.clips_done > job.clips_done:  # clips_done never goes back
                self.store.progress(event.task_id, clips_done=event.clips_done)
            if isinstance(event, ClipDone):
                self.metrics.clip_done(event.seconds)
        elif isinstance(event, Restarted):
            job = self.store.get(event.task_id)
            self.store.progress(event.task_id, clips_done=0)
            self.progress[event.task_id] = 0.0
            job_state(event.task_id, RUNNING, job.created if job else None,
                      f"restarted from scratch: {event.reason}")
        elif isinstance(event, NoSpace):
            self._no_space(event)
        elif isinstance(event, Finished):
            self._reserved.pop(event.task_id, None)
            self._prune_state(finishing=event.task_id)  # before `done` is visible: a client never sees it over
            self.store.finish(event.task_id, DONE, render_s=event.seconds, clips_done=event.clips)
            self._ended(event.task_id, DONE)
        elif isinstance(event, Failed):
            self.store.finish(event.task_id, FAILED, error=event.message, error_kind=event.kind)
            self._ended(event.task_id, FAILED, event.kind, event.message)
        elif isinstance(event, Cancelled):
            self.store.finish(event.task_id, CANCELLED)
            self._ended(event.task_id, CANCELLED)
        elif isinstance(event, Lost):
            self._lost(event)

    def _apply_avatar(self, task: AvatarTask, event: Event) -> None:
        if isinstance(event, Finished):
            self.store.finish_avatar(task.id, READY)
        elif isinstance(event, Failed | NoSpace):
            message = event.message
            self.store.finish_avatar(task.id, FAILED, message)
            self.metrics.failure(event.kind if isinstance(event, Failed) else "no_space")
            log.warning("avatar %s failed: %s", task.id, message)
        elif isinstance(event, Lost):
            self.store.finish_avatar(task.id, FAILED, event.reason)
            self.metrics.failure(event.kind)
            log.warning("avatar %s failed: %s", task.id, event.reason)
        else:
            return
        self._running.pop(task.id, None)

    def _apply_session(self, task: SessionTask, event: Event) -> None:
        """A talk session's task: opened, then over however it ends (the broker logs the one line)."""
        assert self.sessions is not None
        if isinstance(event, SessionOpened):
            self.sessions.opened(task.id)
            return
        if isinstance(event, Finished | Cancelled):
            reason = None
        elif isinstance(event, Failed | NoSpace):
            reason = f"error: {event.message}"
        elif isinstance(event, Lost):
            reason = f"worker_died: {event.reason}"
            self.metrics.failure(event.kind)
        else:
            return
        self._running.pop(task.id, None)
        self._cancel_sent.discard(task.id)
        self.sessions.ended(task.id, reason)

    def _no_space(self, event: NoSpace) -> None:
        """The disk filled under a running job: it waits, its work kept, and nothing starts for a while."""
        self._forget(event.task_id, ended=False)
        self.store.wait_for_disk(event.task_id, event.message)
        job = self.store.get(event.task_id)
        job_state(event.task_id, WAITING_FOR_DISK, job.created if job else None, event.message)
        self.metrics.failure("no_space")
        now = time.monotonic()
        self._disk_retry_at = now + self._disk_retry_s
        self._disk_retry_s = min(DISK_RETRY_MAX_S, self._disk_retry_s * 2)

    def _forget(self, job_id: str, ended: bool = True) -> None:
        """Drop what the loop holds for a task; a job that will resume keeps its progress (never going back)."""
        self._running.pop(job_id, None)
        self._cancel_sent.discard(job_id)
        self._reserved.pop(job_id, None)
        if ended:
            self.progress.pop(job_id, None)
            self._clips_total.pop(job_id, None)

    def _lost(self, event: Lost) -> None:
        job = self.store.get(event.task_id)
        self._running.pop(event.task_id, None)
        if job is None or job.state != RUNNING:
            return
        if job.cancel_requested:
            self.store.finish(job.id, CANCELLED)
            self._ended(job.id, CANCELLED)
            return
        deaths = self.store.requeue_after_death(job.id)
        if deaths >= self.config.worker.max_deaths_per_job:
            error = f"{event.reason} (the worker died {deaths} times on this job; not retried again)"
            self.store.finish(job.id, FAILED, error=error, error_kind=event.kind)
            self._ended(job.id, FAILED, event.kind, error)
        else:
            self._forget(job.id, ended=False)
            job_state(job.id, QUEUED, job.created, f"{event.reason}; it resumes from its checkpoint")
            self.metrics.failure(event.kind)  # counted, though it is retried

    def _ended(self, job_id: str, state: str, kind: str | None = None, reason: str | None = None) -> None:
        """Book-keeping once a job is terminal: the log line, metrics, outputs of unsuccessful jobs, retention."""
        self._forget(job_id)
        job = self.store.get(job_id)
        if job is None:
            return
        job_state(job_id, state, job.created, f"{kind}: {reason}" if kind else reason)
        self.metrics.job_ended(job, kind)
        if state != DONE:
            shutil.rmtree(self.layout.job_dir(job_id), ignore_errors=True)
        else:
            self._disk_retry_s = DISK_RETRY_S  # a job got through: the next full disk starts the backoff over
        self._prune()

    def _prune(self) -> None:
        removed = self.store.prune(self.config.keep_jobs)
        for job_id in removed:
            shutil.rmtree(self.layout.job_dir(job_id), ignore_errors=True)
        if removed:
            with self.blob_lock:
                self.blobs.remove_except(self.store.blob_refs())
        self._prune_state()

    def _prune_state(self, finishing: str | None = None) -> None:
        """Under --max-state-gb, less the bytes kept for the running job (disk.prune_to)."""
        if self.config.max_state_bytes is not None:
            cache = self.config.pipeline.cache_dir
            disk.prune_to(self.layout, self.store, Path(cache) if cache else None, self.config.max_state_bytes,
                          finishing=finishing, reserve=sum(self._reserved.values()))
