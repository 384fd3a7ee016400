"""The dispatcher thread: claims queued jobs for the executor and writes what happens back to the store.

One loop, every 0.2 s or sooner when an event arrives:
  1. apply the executor's events (progress, results, failures, lost workers) to the store and metrics;
  2. pass cancel requests of running jobs to the executor;
  3. while the executor has a free slot: pending avatars first, then the next queued job.

A job whose worker died is requeued at the head (resumable from its checkpoint); the
`max_deaths_per_job`-th time it is failed with the reason instead of being retried forever.

    dispatcher = Dispatcher(store, executor, layout, config, metrics); dispatcher.start(); ...; dispatcher.stop()
"""
from __future__ import annotations

import logging
import shutil
import threading
import time

from .blobs import BlobStore
from .config import ServeConfig
from .executor import Executor
from .layout import StateDir
from .metrics import ServeMetrics
from .store import CANCELLED, DONE, FAILED, READY, RUNNING, JobRow, JobStore
from .tasks import (
    AvatarTask,
    Cancelled,
    ClipDone,
    Event,
    Failed,
    Finished,
    FirstFrame,
    Lost,
    Memory,
    RenderTask,
    Resumed,
    Task,
    WorkerFailed,
    WorkerReady,
)

log = logging.getLogger(__name__)


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

    def start(self) -> None:
        self._thread.start()

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

    def _step(self) -> None:
        timeout = 0.05 if self.wake.is_set() else 0.2
        self.wake.clear()
        for event in self.executor.events(timeout=timeout):
            self._apply(event)
        self._send_cancels()
        while self.executor.free_slots() > 0 and not self._stop.is_set():
            task = self._next_task()
            if task is None:
                break
            self._running[task.id] = task
            self.executor.submit(task)

    def _next_task(self) -> Task | None:
        avatar = self.store.next_pending_avatar()
        if avatar is not None and avatar.id not in self._running:
            return AvatarTask(avatar.id, str(self.blobs.path(avatar.image)), avatar.size, avatar.prompt)
        job = self.store.claim_next()
        if job is None:
            return None
        self.layout.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        return self._render_task(job)

    def _render_task(self, job: JobRow) -> RenderTask:
        return RenderTask(
            id=job.id, image=str(self.blobs.path(job.image)), audio=str(self.blobs.path(job.audio)),
            prompt=job.prompt, size=job.size, seed=job.seed, num_clip=job.num_clip,
            out=str(self.layout.video(job.id)), live=str(self.layout.live(job.id)),
            telemetry=str(self.layout.telemetry(job.id)),
            checkpoint_interval_s=self.config.worker.checkpoint_interval_s, resume=True)

    def _send_cancels(self) -> None:
        for task_id in list(self._running):
            if task_id in self._cancel_sent or isinstance(self._running[task_id], AvatarTask):
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
        if isinstance(task, AvatarTask):
            self._apply_avatar(task, event)
            return
        if isinstance(event, FirstFrame):
            self.store.progress(event.task_id, first_frame_s=event.seconds)
            self.metrics.first_frame(event.seconds)
        elif isinstance(event, Resumed):
            self.store.progress(event.task_id, clips_done=event.clips_done)
        elif isinstance(event, ClipDone):
            self.store.progress(event.task_id, clips_done=event.clips_done)
            self.metrics.clip_done(event.seconds)
        elif isinstance(event, Finished):
            self.store.finish(event.task_id, DONE, render_s=event.seconds, clips_done=event.clips)
            self._ended(event.task_id, DONE)
        elif isinstance(event, Failed):
            self.store.finish(event.task_id, FAILED, error=event.message, error_kind=event.kind)
            self._ended(event.task_id, FAILED, event.kind)
        elif isinstance(event, Cancelled):
            self.store.finish(event.task_id, CANCELLED)
            self._ended(event.task_id, CANCELLED)
        elif isinstance(event, Lost):
            self._lost(event)

    def _apply_avatar(self, task: AvatarTask, event: Event) -> None:
        if isinstance(event, Finished):
            self.store.finish_avatar(task.id, READY)
        elif isinstance(event, Failed):
            self.store.finish_avatar(task.id, FAILED, event.message)
            self.metrics.failure(event.kind)
        elif isinstance(event, Lost):
            self.store.finish_avatar(task.id, FAILED, event.reason)
            self.metrics.failure(event.kind)
        else:
            return
        self._running.pop(task.id, None)

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
            self.store.finish(job.id, FAILED, error=f"{event.reason} (the worker died {deaths} times on this job; "
                                                    "not retried again)", error_kind=event.kind)
            self._ended(job.id, FAILED, event.kind)
        else:
            log.warning("job %s: %s; it resumes from its checkpoint", job.id, event.reason)
            self.metrics.failure(event.kind)  # counted, though it is retried

    def _ended(self, job_id: str, state: str, kind: str | None = None) -> None:
        """Book-keeping once a job is terminal: metrics, outputs of unsuccessful jobs, retention."""
        self._running.pop(job_id, None)
        self._cancel_sent.discard(job_id)
        job = self.store.get(job_id)
        if job is None:
            return
        self.metrics.job_ended(job, kind)
        if state != DONE:
            shutil.rmtree(self.layout.job_dir(job_id), ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        removed = self.store.prune(self.config.keep_jobs)
        for job_id in removed:
            shutil.rmtree(self.layout.job_dir(job_id), ignore_errors=True)
        if removed:
            with self.blob_lock:
                self.blobs.remove_except(self.store.blob_refs())
