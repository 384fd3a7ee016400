"""The interface between the durable queue and whatever renders: an `Executor`.

The dispatcher (dispatcher.py) claims jobs from the store and calls `submit` while `free_slots()`
says there is room; it collects `events()` (tasks.py: Started, FirstFrame, ClipDone, Finished,
Failed, Cancelled, Lost, Memory, WorkerReady) and writes them to the store. The local executor
(supervisor.py) is one supervised worker process, one slot. Issue 16's Ray executor implements the
same five methods over actors that hold warm Pipelines, with one slot per actor.

    executor.start()
    if executor.free_slots(): executor.submit(task)
    for event in executor.events(timeout=0.5): ...
    executor.cancel(task.id); executor.stop()
"""
from __future__ import annotations

from typing import Protocol

from .tasks import Event, Task


class Executor(Protocol):
    """Runs tasks somewhere and reports what happens to them."""

    def start(self) -> None:
        """Begin loading (returns at once; readiness comes as a WorkerReady event)."""

    def free_slots(self) -> int:
        """How many more tasks `submit` accepts now (0 while loading, restarting or busy)."""

    def submit(self, task: Task) -> None:
        """Start `task`; its events follow from `events()`."""

    def cancel(self, task_id: str) -> None:
        """Ask the task to stop at its next block boundary (a Cancelled event follows, or its end)."""

    def events(self, timeout: float) -> list[Event]:
        """Events since the last call, waiting up to `timeout` seconds for the first; also where the
        executor does its housekeeping (restarting dead workers, memory ceilings)."""

    def status(self) -> dict:
        """What /readyz and /metrics show: ready, pids, RSS, restarts, the last load error."""

    def stop(self) -> None:
        """Stop every worker (a task in flight stays resumable from its checkpoint)."""
