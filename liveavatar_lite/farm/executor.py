"""`RayExecutor`: serve's `Executor` (serve/executor.py) over Ray actors, one slot per actor.

Both `serve --backend ray` (whose dispatcher feeds it from the durable queue) and `farm run`
(batch.py) drive it the same way: `submit` while `free_slots()`, then `events()`.

Each actor (actor.py) holds a warm Pipeline. Ray restarts an actor that dies (`max_restarts=-1`:
on another node if its node is gone); the task it held comes back as `Lost`, and the caller
requeues it: the next free actor resumes it from its newest render checkpoint on shared storage,
with identical frames. A restarted actor takes tasks again once it has loaded.

    executor = RayExecutor(ActorSpec(options, (704, 384)), ClusterConfig(address="head:6379"))
    executor.start(); ...; executor.stop()
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import first_line
from ..serve.tasks import (
    AvatarTask,
    Cancelled,
    Event,
    Failed,
    Finished,
    Lost,
    Memory,
    NoSpace,
    RenderTask,
    Task,
    WorkerFailed,
    WorkerReady,
)
from .actor import ActorSpec, actor_class
from .cluster import Cluster, ClusterConfig, import_ray

log = logging.getLogger(__name__)

SLOW_START_S = 120.0  # an actor still not loaded after this: say why it may be waiting
PROGRESS_WAIT_S = 5.0  # the longest wait for the running actors' progress answers
MAX_BACKOFF_S = 60.0  # the longest wait before an actor that failed to load tries again


@dataclass
class _Slot:
    """One actor and what it is doing."""

    name: str
    actor: Any
    loading: Any = None  # the ObjectRef of actor.load() while it loads (or restarts)
    loading_since: float = field(default_factory=time.monotonic)
    warned_slow: bool = False
    ready: bool = False
    task: Task | None = None
    running: Any = None  # the ObjectRef of actor.run(task)
    seen: int = 0  # the running task's events already passed on
    pid: int | None = None
    node: str | None = None
    deaths: int = 0
    failed_loads: int = 0
    retry_at: float | None = None  # after a failed load: when to try again


class RayExecutor:
    """Tasks onto Ray actors holding warm Pipelines; an actor's death is a `Lost` task, never a lost job."""

    def __init__(self, spec: ActorSpec, cluster: ClusterConfig) -> None:
        self.spec, self.cluster_config = spec, cluster
        self.cluster: Cluster | None = None
        self.slots: list[_Slot] = []
        self.last_error: str | None = None
        self.rss: int | None = None
        self.device_bytes: int | None = None
        self.placements: dict[str, list[str]] = {}  # task id -> the actors ("name pid@node") that ran it
        self._stopping = False
        self._first_submit: float | None = None  # busy_span(): first submit -> last task end
        self._last_end: float | None = None

    # ---- Executor ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.cluster = Cluster.connect(self.cluster_config)
        cls = actor_class().options(
            num_cpus=self.cluster.cpus_per_worker, num_gpus=self.cluster.gpus_per_worker,
            max_restarts=-1, max_task_retries=0,  # Ray restarts a dead actor; we retry the task (resuming it)
            max_concurrency=4)  # run on one thread; drain and cancel answered beside it
        for i in range(self.cluster.workers):
            slot = _Slot(f"actor-{i}", cls.remote(self.spec))
            self._load(slot)
            self.slots.append(slot)

    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s.ready and s.task is None)

    def submit(self, task: Task) -> None:
        slot = next((s for s in self.slots if s.ready and s.task is None), None)
        if slot is None:
            raise RuntimeError("no free actor")
        task = _absolute(task)  # actors' working directories are not ours
        self._first_submit = self._first_submit or time.monotonic()
        slot.task, slot.running, slot.seen = task, slot.actor.run.remote(task), 0
        self.placements.setdefault(task.id, []).append(self._where(slot))

    def cancel(self, task_id: str) -> None:
        for slot in self.slots:
            if slot.task is not None and slot.task.id == task_id:
                slot.actor.cancel.remote(task_id)

    def events(self, timeout: float) -> list[Event]:
        out = self._collect(0.0)  # runs and loads that ended
        out += self._progress()  # what the runs still going have emitted since the last look
        if not out:
            out = self._collect(timeout)  # nothing yet: wait for a run or a load to end
        self._housekeeping()
        return out

    def status(self) -> dict[str, Any]:
        workers = [{"name": s.name, "pid": s.pid, "node": s.node, "ready": s.ready, "deaths": s.deaths,
                    "task": s.task.id if s.task is not None else None} for s in self.slots]
        restarts = sum(s.deaths for s in self.slots)
        return {"backend": "ray", "ready": any(s.ready for s in self.slots), "workers": workers,
                "pid": next((s.pid for s in self.slots if s.ready), None), "rss_bytes": self.rss,
                "device_bytes": self.device_bytes, "restarts": {"worker_died": restarts} if restarts else {},
                "last_error": self.last_error, "busy": any(s.task is not None for s in self.slots)}

    def busy_span(self) -> float:
        """Seconds from the first task's submit to the last task's end (the benchmark's steady clock)."""
        if self._first_submit is None or self._last_end is None:
            return 0.0
        return self._last_end - self._first_submit

    def stop(self) -> None:
        """Kill the actors (a task in flight stays resumable from its checkpoint) and leave the cluster."""
        self._stopping = True
        if self.cluster is None:
            return
        ray = import_ray()
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self.slots = []
        self.cluster.close()

    # ---- actors -----------------------------------------------------------------------------------

    def _collect(self, timeout: float) -> list[Event]:
        """The events of runs and loads that have ended, waiting up to `timeout` for the first."""
        ray = import_ray()
        waiting = {s.running: s for s in self.slots if s.running is not None}
        waiting |= {s.loading: s for s in self.slots if s.loading is not None}
        if not waiting:
            time.sleep(timeout)
            return []
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        if done:
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        out: list[Event] = []
        for ref in done:
            slot = waiting[ref]
            out.extend(self._loaded(slot, ref) if ref is slot.loading else self._ran(slot, ref))
        return out

    def _progress(self) -> list[Event]:
        """New events of the running tasks (a slow or dead actor is skipped: its run() reports it)."""
        ray = import_ray()
        asked = {s.actor.drain.remote(s.seen): s for s in self.slots if s.running is not None}
        if not asked:
            return []
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=PROGRESS_WAIT_S)
        out: list[Event] = []
        for ref in ready:
            slot = asked[ref]
            try:
                events = ray.get(ref)
            except Exception:  # noqa: BLE001, S112 - a dead actor: its run() reports the death
                continue
            if slot.task is None or any(getattr(e, "task_id", slot.task.id) != slot.task.id for e in events):
                continue  # an answer about an earlier task (the slot moved on meanwhile)
            slot.seen += len(events)
            out.extend(events)
        return out

    def _load(self, slot: _Slot) -> None:
        slot.ready, slot.loading, slot.loading_since, slot.warned_slow = False, slot.actor.load.remote(), \
            time.monotonic(), False

    def _loaded(self, slot: _Slot, ref: Any) -> list[Event]:
        ray = import_ray()
        slot.loading = None
        try:
            where = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # died while loading: Ray restarts it; ask again
            slot.deaths += 1
            log.warning("%s died while loading (%s); waiting for Ray to restart it", slot.name, _reason(e))
            self._load(slot)
            return []
        except Exception as e:  # noqa: BLE001 - the artifact or budget failed in the actor: say why
            self.last_error = _reason(e)
            slot.failed_loads += 1
            slot.retry_at = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (slot.failed_loads - 1))
            log.error("%s cannot load: %s", slot.name, self.last_error)
            return [WorkerFailed(self.last_error)]
        slot.ready, slot.pid, slot.node, slot.failed_loads = True, where["pid"], where["node"], 0
        log.info("%s ready (pid %d on %s)", slot.name, slot.pid, slot.node)
        return [WorkerReady(slot.pid, where["loads"])]

    def _ran(self, slot: _Slot, ref: Any) -> list[Event]:
        ray = import_ray()
        task, slot.task, slot.running = slot.task, None, None
        self._last_end = time.monotonic()
        assert task is not None
        try:
            events = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            slot.deaths += 1
            reason = f"the Ray actor {self._where(slot)} died: {_reason(e)}"
            log.warning("%s; Ray restarts it", reason)
            self._load(slot)  # answers once Ray has restarted it and it has loaded again
            return [] if self._stopping else [Lost(task.id, "worker_died", reason)]
        except Exception as e:  # noqa: BLE001 - run() never raises for a task's own failure: a bug
            return [Failed(task.id, "internal", _reason(e))]
        ended = any(isinstance(e, Finished | Failed | Cancelled | NoSpace) and e.task_id == task.id for e in events)
        events = events[slot.seen:]  # run() returns them all; the first `seen` came through _progress
        for event in events:
            if isinstance(event, Memory):
                self.rss = event.rss_bytes if event.rss_bytes is not None else self.rss
                self.device_bytes = event.device_bytes
        if not ended:
            events.append(Failed(task.id, "internal", "the actor returned without a result"))
        return events

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.retry_at is not None and now >= slot.retry_at:  # a failed load: 1, 2, 4 ... 60 s later
                slot.retry_at = None
                self._load(slot)
            if slot.loading is not None and not slot.warned_slow and now - slot.loading_since > SLOW_START_S:
                slot.warned_slow = True
                log.warning("%s has not loaded after %.0f s: the cluster may lack a free %s", slot.name,
                            now - slot.loading_since, "GPU" if self.cluster and self.cluster.gpus_per_worker else "CPU")

    def _where(self, slot: _Slot) -> str:
        return f"{slot.name} (pid {slot.pid} on {slot.node})"


def _absolute(task: Task) -> Task:
    paths = ("image", "audio", "out", "live", "telemetry") if isinstance(task, RenderTask) else ("image",)
    assert isinstance(task, RenderTask | AvatarTask)
    return replace(task, **{k: str(Path(v).resolve()) for k in paths if (v := getattr(task, k))})


def _reason(e: BaseException) -> str:
    """One line for a Ray error: the original exception's message where Ray wraps one."""
    cause = getattr(e, "cause", None)
    return first_line(cause if isinstance(cause, BaseException) else e)
