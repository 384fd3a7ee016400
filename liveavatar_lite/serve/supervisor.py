"""The local executor: one worker process holding the warm Pipeline, supervised.

The supervisor starts the worker (worker.py) with a socket pair, reads its events on a thread, and
on every `events()` call does its housekeeping:

- a worker that died (crash, OOM kill, SIGKILL) is started again; a task it held comes back as
  `Lost`, and the dispatcher requeues it (resumable) or, the second time, fails it with the reason;
- a worker whose RSS passes the memory ceiling is killed and restarted (its task is `Lost` too);
- after `recycle_after_jobs` tasks an idle worker is stopped and started fresh;
- a worker that dies before it is ready (bad artifact, budget) is restarted with a growing delay
  (1, 2, 4 ... 60 s), and /readyz shows why;
- the stall watchdog: a task that makes no progress (no rendered block, no clip) for its deadline
  (`stall_timeout_s`, or `stall_blocks` of the plan's predicted block times if longer; until its
  first block, which also encodes inputs and restores a checkpoint, 3 times that) has its worker
  killed (SIGKILL works on a stopped or wedged process too) and restarted; the task comes back as
  `Lost` ("stalled"), resumable, and counts toward the job's death limit;
- worker.log is kept under the policy's `log_max_bytes` (--worker-log-mb; copied to worker.log.1, then truncated: the worker
  writes with O_APPEND, so it carries on at the new end).

Linux's PR_SET_PDEATHSIG is per *thread*: the worker gets SIGKILL when the thread that started it
ends. So `start()` and `events()` must be called from one thread that lives as long as the server
(the dispatcher's), never from a short-lived one.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .config import ServeConfig
from .tasks import (
    BlockDone,
    Cancel,
    Cancelled,
    Event,
    Failed,
    Finished,
    FirstFrame,
    ClipDone,
    Lost,
    Memory,
    NoSpace,
    Restarted,
    Resumed,
    Started,
    Stop,
    Task,
    WorkerFailed,
    WorkerReady,
    from_wire,
    to_wire,
)

log = logging.getLogger(__name__)

_EXITED = object()  # the reader's end-of-file marker
MAX_BACKOFF_S = 60.0
LOG_CHECK_S = 5.0
FIRST_PROGRESS_FACTOR = 3  # a task's first block also encodes its inputs and loads its checkpoint: 3 deadlines
_PROGRESS = (Started, Resumed, Restarted, BlockDone, FirstFrame, ClipDone)


def rotate_log(path: Path, max_bytes: int) -> bool:
    """Copy `path` to `path`.1 and truncate it once it passes `max_bytes` (copytruncate); True if it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        with open(path, "r+b") as f:
            f.truncate(0)
    except OSError as e:  # a full disk included: the log is not worth failing for
        log.warning("could not rotate %s: %s", path, e)
        return False
    return True


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process `pid` (Linux /proc; None elsewhere or when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class LocalWorkerExecutor:
    """The `Executor` (executor.py) of one supervised local worker process: one slot."""

    def __init__(self, config: ServeConfig, log_path: Path, worker_command: list[str] | None = None) -> None:
        """`worker_command`: the worker program (default: this package's worker.py; tests pass a fake)."""
        self.worker_command = worker_command or [sys.executable, "-m", "liveavatar_lite.serve.worker"]
        opts = config.pipeline
        w, h = (int(x) for x in config.size.lower().replace("x", "*").split("*"))
        self._options_json = json.dumps({
            "artifact": str(Path(opts.artifact).resolve()), "vram_gb": opts.vram_gb, "ram_gb": opts.ram_gb,
            "kv_dtype": opts.kv_dtype, "cache_dir": str(Path(opts.cache_dir).resolve()) if opts.cache_dir else None,
            "size": [w, h]})
        self.policy = config.worker
        self.log_path = log_path
        self._events: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._generation = 0
        self._ready = False
        self._task: Task | None = None
        self._tasks_since_start = 0
        self._kill_reason: tuple[str, str] | None = None  # why we stopped the worker ourselves
        self._failed_starts = 0
        self._next_start = 0.0
        self._stopping = False
        self.restarts: Counter[str] = Counter()
        self.last_error: str | None = None
        self.rss: int | None = None
        self.device_bytes: int | None = None
        self.pid: int | None = None
        self._progress_at = 0.0  # monotonic time of the current task's latest progress
        self._task_progressed = False  # the current task has rendered a block (else: a longer first deadline)
        self._block_s: float | None = None  # the plan's predicted seconds per block
        self.stall: dict[str, float] | None = None  # the latest stall, until a fresh worker is ready
        self._log_checked = 0.0
        self.seconds_per_clip: float | None = None  # the plan's prediction, from the ready worker

    # ---- Executor ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()

    def free_slots(self) -> int:
        alive = self._proc is not None and self._kill_reason is None
        return 1 if alive and self._ready and self._task is None else 0

    def submit(self, task: Task) -> None:
        if self.free_slots() < 1:
            raise RuntimeError("the worker is not free")
        self._task = task
        self._progress_at, self._task_progressed = time.monotonic(), False
        self._send(task)

    def cancel(self, task_id: str) -> None:
        if self._task is not None and self._task.id == task_id:
            self._send(Cancel(task_id))

    def events(self, timeout: float) -> list[Event]:
        out: list[Event] = []
        try:
            items = [self._events.get(timeout=timeout)]
        except queue.Empty:
            items = []
        while True:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                break
        for generation, message in items:
            if generation != self._generation:
                continue  # from a worker already handled as dead
            if message is _EXITED:
                out.extend(self._on_exit())
            else:
                out.extend(self._on_message(message))
        self._housekeeping(out)
        return out

    def status(self) -> dict[str, Any]:
        busy = self._task is not None
        return {"ready": self._ready and self._kill_reason is None, "pid": self.pid, "rss_bytes": self.rss,
                "device_bytes": self.device_bytes, "restarts": dict(self.restarts), "last_error": self.last_error,
                "busy": busy, "stall": self.stall, "seconds_per_clip": self.seconds_per_clip,
                "stall_deadline_s": round(self.stall_deadline(), 1),
                "seconds_since_progress": round(time.monotonic() - self._progress_at, 1) if busy else None}

    def stall_deadline(self) -> float:
        """Seconds a task may go without progress: the floor, or that many predicted blocks if longer."""
        predicted = self.policy.stall_blocks * self._block_s if self._block_s else 0.0
        return max(self.policy.stall_timeout_s, predicted)

    def stop(self) -> None:
        """Stop the worker: at once if it renders (the job resumes from its checkpoint next start)."""
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        if self._task is None:
            self._send(Stop())
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        else:
            proc.kill()
        proc.wait()
        if self._sock is not None:
            self._sock.close()

    # ---- the process ------------------------------------------------------------------------------

    def _spawn(self) -> None:
        parent, child = socket.socketpair()
        self._generation += 1
        generation = self._generation
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [*self.worker_command, "--fd", str(child.fileno()), "--parent-pid", str(os.getpid()),
                 "--options", self._options_json],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        child.close()
        self._sock, self._ready, self._kill_reason, self._tasks_since_start = parent, False, None, 0
        self.pid = self._proc.pid
        log.info("worker started (pid %d)", self._proc.pid)

        def read() -> None:
            try:
                for line in parent.makefile("rb"):
                    try:
                        self._events.put((generation, from_wire(line)))
                    except ValueError:
                        log.warning("worker said something unexpected: %r", line[:200])
            except OSError:
                pass
            self._events.put((generation, _EXITED))

        threading.Thread(target=read, name=f"worker-events-{generation}", daemon=True).start()

    def _send(self, message: object) -> None:
        try:
            if self._sock is not None:
                self._sock.sendall(to_wire(message))
        except OSError as e:  # the worker is dying: its end-of-file follows and is handled there
            log.warning("could not reach the worker: %s", e)

    def _on_message(self, message: Event) -> list[Event]:
        if isinstance(message, WorkerReady):
            self._ready, self._failed_starts, self.last_error, self.stall = True, 0, None, None
            self.seconds_per_clip = message.seconds_per_clip
            log.info("worker ready (pid %d), loads %s", message.pid, message.loads)
        elif isinstance(message, WorkerFailed):
            self.last_error = message.message
            log.error("the worker cannot load: %s", message.message)
        elif isinstance(message, Memory):
            self.rss = message.rss_bytes if message.rss_bytes is not None else self.rss
            self.device_bytes = message.device_bytes
        elif isinstance(message, _PROGRESS) and self._task is not None and self._task.id == message.task_id:
            self._progress_at = time.monotonic()
            if isinstance(message, BlockDone):
                self._task_progressed = True
                if message.predicted_block_s:
                    self._block_s = message.predicted_block_s
        elif (isinstance(message, Finished | Failed | Cancelled | NoSpace) and self._task is not None
              and self._task.id == message.task_id):
            self._task = None
            self._tasks_since_start += 1
        return [message]

    def _on_exit(self) -> list[Event]:
        proc, task, reason = self._proc, self._task, self._kill_reason
        assert proc is not None
        code = proc.wait()
        if self._sock is not None:
            self._sock.close()
        was_ready = self._ready
        self._proc, self._sock, self._task, self._ready, self._kill_reason = None, None, None, False, None
        if reason is None:
            kind = "worker_died"
            text = (f"the worker was killed by signal {signal.Signals(-code).name}" if code < 0
                    else f"the worker exited with code {code}")
            if self.last_error and not was_ready:
                text += f": {self.last_error}"
            reason = (kind, text)
        self.restarts[reason[0]] += 1
        if self._stopping:
            return []
        log.warning("%s; starting a new one", reason[1])
        if was_ready or reason[0] in ("recycle", "memory_ceiling"):
            self._next_start = time.monotonic()
        else:  # it never loaded: retry slower and slower
            self._failed_starts += 1
            self._next_start = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (self._failed_starts - 1))
        return [Lost(task.id, reason[0], reason[1])] if task is not None else []

    def _housekeeping(self, out: list[Event]) -> None:
        if self._stopping:
            return
        if self._proc is None:
            if time.monotonic() >= self._next_start:
                self._spawn()
            return
        if self._kill_reason is not None:
            return  # already on its way out
        now = time.monotonic()
        if now - self._log_checked > LOG_CHECK_S:
            self._log_checked = now
            rotate_log(self.log_path, self.policy.log_max_bytes)
        deadline = self.stall_deadline() * (1 if self._task_progressed else FIRST_PROGRESS_FACTOR)
        if self._task is not None and now - self._progress_at > deadline:
            age = now - self._progress_at
            self.stall = {"seconds_since_progress": round(age, 1), "deadline_s": round(deadline, 1)}
            self._kill_reason = ("stalled", f"the worker made no progress for {age:.0f} s (its deadline is "
                                            f"{deadline:.0f} s); it was killed")
            log.error("%s; restarting it", self._kill_reason[1])
            self._proc.kill()
            return
        self.rss = rss_bytes(self._proc.pid) or self.rss
        ceiling = self.policy.memory_ceiling_bytes
        if ceiling and self.rss and self.rss > ceiling:
            self._kill_reason = ("memory_ceiling", (f"the worker's RSS {self.rss / 1e9:.2f} GB passed the ceiling "
                                                    f"{ceiling / 1e9:.2f} GB"))
            log.warning("%s; restarting it", self._kill_reason[1])
            self._proc.kill()
        elif (self.policy.recycle_after_jobs and self._task is None and self._ready
              and self._tasks_since_start >= self.policy.recycle_after_jobs):
            self._kill_reason = ("recycle", f"recycling the worker after {self._tasks_since_start} tasks")
            log.info(self._kill_reason[1])
            self._send(Stop())
