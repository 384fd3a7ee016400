"""The Ray actor: a warm Pipeline (serve's `TaskRunner`) in a Ray worker process, one per GPU.

The actor is threaded (`max_concurrency`): `run` renders one task on one thread while `drain`
(the events emitted so far) and `cancel` are answered on others, so the driver sees progress
(first frame, each clip) while a render runs and a cancel lands between two blocks.

    actor = actor_class().options(num_gpus=1, max_restarts=-1).remote(ActorSpec(options, (704, 384)))
    ray.get(actor.load.remote())            # {"pid": ..., "node": ..., "loads": {...}}; raises if it cannot load
    ref = actor.run.remote(task)            # -> all the task's events, ending with Finished/Failed/Cancelled
    ray.get(actor.drain.remote(3))          # while it runs: its events from the 4th on

Everything a task reads and writes is a path on shared storage: the inputs, the mp4, its work dir
with the render checkpoint. So when an actor dies, another one (on any node) resumes the task from
its newest checkpoint and produces identical frames.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline.request import PipelineOptions
from ..pipeline.workdir import RenderWorkDir
from ..serve.runner import TaskRunner
from ..serve.tasks import AvatarTask, Event, RenderTask

log = logging.getLogger(__name__)

# What a failed or cancelled task leaves behind is removed by its owner's rule:
#   "job_dir":  serve's jobs/<id>/ (the whole directory is the job's);
#   "work_dir": a farm job's `.OUT.work` and `OUT.tmp` only (OUT's directory is the user's).
CLEANUPS = ("job_dir", "work_dir")


@dataclass(frozen=True)
class ActorSpec:
    """What every actor loads: the artifact and budget, the planning size, the cleanup rule, CPU threads."""

    options: PipelineOptions
    size: tuple[int, int]  # (width, height) the DiT is planned for
    cleanup: str = "work_dir"
    threads: int | None = None  # torch CPU threads (None: what Ray set, OMP_NUM_THREADS = the actor's CPUs)


def remove_work(task: RenderTask | AvatarTask) -> None:
    """A failed farm job leaves nothing half-written: its work dir and temp mp4 go, the user's directory
    stays. A work dir another render holds (its flock: a second driver, an actor not yet known dead) is
    left alone: that render's failure to lock it is what failed this task."""
    if not isinstance(task, RenderTask):
        return
    out = Path(task.out)
    work = RenderWorkDir.path_for(out)
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone already, or not a directory we made: nothing of ours to remove
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(work, ignore_errors=True)  # removed while we hold its lock
        out.with_name(out.name + ".tmp").unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # releases the lock


class RenderActor:
    """Lives in a Ray worker process; `actor_class()` makes it a Ray actor."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self._runner: TaskRunner | None = None
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._cancel: dict[str, threading.Event] = {}
        self._cancelled: set[str] = set()  # cancels that came before their task

    def load(self) -> dict[str, Any]:
        """Load the Pipeline (once); where this actor runs. Raises UserError if the artifact or budget fails."""
        if self._runner is None:
            logging.getLogger("liveavatar_lite").setLevel(logging.INFO)
            if self.spec.threads:
                import torch

                torch.set_num_threads(self.spec.threads)
            cleanup = None if self.spec.cleanup == "job_dir" else remove_work  # None: serve's rule
            self._runner = TaskRunner.load(self.spec.options, self.spec.size, remove_outputs=cleanup)
        return {"pid": os.getpid(), "node": socket.gethostname(), "loads": self._runner.loads}

    def run(self, task: RenderTask | AvatarTask) -> list[Event]:
        """Run `task` to its end; every event it emitted (the last is Finished, Failed or Cancelled)."""
        self.load()
        assert self._runner is not None
        cancel = threading.Event()
        with self._lock:
            self._events = []
            self._cancel[task.id] = cancel
            if task.id in self._cancelled:
                self._cancelled.discard(task.id)
                cancel.set()
        try:
            self._runner.run(task, cancel, self._emit)
        finally:
            with self._lock:
                self._cancel.pop(task.id, None)
        with self._lock:
            return list(self._events)

    def drain(self, since: int) -> list[Event]:
        """The running task's events from index `since` on (nothing is removed: a late or lost answer
        costs no event, and `run` returns them all)."""
        with self._lock:
            return self._events[since:]

    def cancel(self, task_id: str) -> None:
        with self._lock:
            if task_id in self._cancel:
                self._cancel[task_id].set()
            else:
                self._cancelled.add(task_id)

    def _emit(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)


def actor_class() -> Any:
    """`RenderActor` as a Ray actor class (Ray is imported here, so the farm's other modules load without it)."""
    from .cluster import import_ray

    ray = import_ray()
    return ray.remote(RenderActor)
