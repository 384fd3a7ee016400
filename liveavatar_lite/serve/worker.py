"""The worker process: one warm Pipeline, tasks in and events out as JSON lines over a socket.

Started by the supervisor (supervisor.py) as `python -m liveavatar_lite.serve.worker --fd N ...`.
It never outlives the server: on Linux the kernel sends it SIGKILL when the server dies
(prctl PR_SET_PDEATHSIG), and everywhere the socket's end-of-file makes it exit at once. A reader
thread takes control messages (Cancel, Stop) while the main thread renders, so a cancel lands
between two blocks of the running render.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
from pathlib import Path

from ..errors import UserError
from ..pipeline.request import PipelineOptions
from .malloc_policy import steady_malloc
from .runner import TaskRunner, memory_now
from .tasks import Cancel, Memory, Stop, WorkerFailed, WorkerReady, from_wire, to_wire

log = logging.getLogger("liveavatar_lite.serve.worker")

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class _Channel:
    """The socket to the supervisor: one JSON line per message; writes from any thread."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            self.sock.sendall(to_wire(message))

    def lines(self):
        return self.sock.makefile("rb")


class CancelBook:
    """Which task's cancel flag a Cancel sets: the running task's, or one received and not started.

    A Cancel for a task that has already ended (it crossed the task's Finished on the socket) is
    dropped, so a worker that runs for weeks keeps nothing per finished task."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, threading.Event] = {}  # received and not ended: its cancel flag

    def received(self, task_id: str) -> None:
        with self._lock:
            self._flags[task_id] = threading.Event()

    def start(self, task_id: str) -> threading.Event:
        """The flag the task runs with (set already if its Cancel came first)."""
        with self._lock:
            return self._flags.setdefault(task_id, threading.Event())

    def cancel(self, task_id: str) -> None:
        with self._lock:
            flag = self._flags.get(task_id)
        if flag is not None:
            flag.set()

    def ended(self, task_id: str) -> None:
        with self._lock:
            self._flags.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._flags)


def serve_tasks(channel: _Channel, runner: TaskRunner, book: CancelBook | None = None) -> None:
    """Run tasks in arrival order until Stop; a reader thread applies Cancel as it arrives."""
    tasks: queue.Queue = queue.Queue()
    book = book if book is not None else CancelBook()

    def read() -> None:
        for line in channel.lines():
            message = from_wire(line)
            if isinstance(message, Cancel):
                book.cancel(message.task_id)
            elif isinstance(message, Stop):
                tasks.put(None)
            else:
                book.received(message.id)
                tasks.put(message)
        os._exit(0)  # end of file: the server is gone, and so is the reason to live

    threading.Thread(target=read, name="worker-reader", daemon=True).start()
    while (task := tasks.get()) is not None:
        runner.run(task, book.start(task.id), channel.send)
        book.ended(task.id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="liveavatar_lite.serve.worker", description="the serve worker (internal)")
    ap.add_argument("--fd", type=int, required=True, help="the socket to the supervisor")
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--options", required=True, help="PipelineOptions and the planning size as JSON")
    args = ap.parse_args(argv)
    die_with_parent(args.parent_pid)
    steady_malloc()  # before the Pipeline allocates: no RSS step some jobs into a long run
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us in order
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a drain is the server's; `systemctl kill` sends it to us too
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    logging.getLogger("liveavatar_lite").setLevel(logging.INFO)
    channel = _Channel(args.fd)
    doc = json.loads(args.options)
    options = PipelineOptions(artifact=Path(doc["artifact"]), vram_gb=doc["vram_gb"], ram_gb=doc["ram_gb"],
                              kv_dtype=doc["kv_dtype"], cache_dir=Path(doc["cache_dir"]), progress=False)
    try:
        runner = TaskRunner.load(options, tuple(doc["size"]))
    except UserError as e:
        channel.send(WorkerFailed(str(e)))
        return 3
    plan = getattr(runner.backend.inner, "plan", None)
    channel.send(WorkerReady(os.getpid(), runner.loads, plan.predicted_seconds_per_clip if plan is not None else None))
    channel.send(Memory(*memory_now()))
    serve_tasks(channel, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
