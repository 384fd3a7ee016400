"""The service's parts without a model: config rules, the SQLite queue, blobs, the wire format, the
observed renderer's cancel/progress hooks, and the supervisor against a fake worker process."""
from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_helpers import pump, render_task

from liveavatar_lite.errors import UserError
from liveavatar_lite.pipeline.request import PipelineOptions
from liveavatar_lite.serve.blobs import BlobStore
from liveavatar_lite.serve.config import (
    ServeConfig,
    WorkerPolicy,
    is_loopback,
    read_token,
)
from liveavatar_lite.serve.runner import TaskCancelled, _Hooks, _ObservedRenderer
from liveavatar_lite.serve.store import (
    CANCELLED,
    QUEUED,
    RUNNING,
    JobRow,
    JobStore,
    QueueFull,
)
from liveavatar_lite.serve.supervisor import LocalWorkerExecutor, rss_bytes
from liveavatar_lite.serve.tasks import (
    BlockDone,
    ClipDone,
    Finished,
    FirstFrame,
    Lost,
    RenderTask,
    Resumed,
    WorkerReady,
    from_wire,
    to_wire,
)

OPTIONS = PipelineOptions(Path("unused-artifact"))


def _job(i: int, **kw) -> JobRow:
    return JobRow(id=f"{i:032x}", state=QUEUED, created=float(i), image="a" * 64, audio="b" * 64, prompt="p",
                  size="64*64", seed=i, clips_total=3, **kw)


def test_non_loopback_needs_a_token(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("kiosk.local")
    with pytest.raises(UserError, match="--token-file"):
        ServeConfig(pipeline=OPTIONS, state_dir=tmp_path, host="0.0.0.0")
    ServeConfig(pipeline=OPTIONS, state_dir=tmp_path, host="0.0.0.0", token="x" * 32)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UserError, match="at least 16"):
        read_token(tmp_path / "short")
    with pytest.raises(UserError, match="cannot read"):
        read_token(tmp_path / "missing")
    (tmp_path / "ok").write_text("  " + "k" * 20 + "  \nignored\n")
    assert read_token(tmp_path / "ok") == "k" * 20


def test_queue_order_limits_cancel_and_recovery(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "q.sqlite3")
    for i in range(3):
        store.add(_job(i), max_queued=3)
    with pytest.raises(QueueFull):
        store.add(_job(9), max_queued=3)
    first = store.claim_next()
    assert first is not None and first.id == _job(0).id and first.state == RUNNING
    # a server killed now: the running job goes back to the head of the queue, resumable
    reopened = JobStore(tmp_path / "q.sqlite3")
    assert reopened.recover() == [first.id]
    again = reopened.claim_next()
    assert again is not None and again.id == first.id and again.resume
    # concurrent cancels of one queued job: exactly one wins
    outcomes: list[str] = []

    def cancel() -> None:
        try:
            outcomes.append(JobStore(tmp_path / "q.sqlite3").request_cancel(_job(1).id).state)
        except ValueError:
            outcomes.append("refused")

    threads = [threading.Thread(target=cancel) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [CANCELLED] + ["refused"] * 5
    # a running job is only flagged; the dispatcher stops it
    assert reopened.request_cancel(first.id).cancel_requested and reopened.get(first.id).state == RUNNING
    with pytest.raises(ValueError, match="already being cancelled"):
        reopened.request_cancel(first.id)
    with pytest.raises(LookupError):
        reopened.request_cancel("f" * 32)
    reopened.finish(first.id, CANCELLED)
    with pytest.raises(ValueError, match="already cancelled"):
        reopened.request_cancel(first.id)
    assert [j.id for j in reopened.queued_before(_job(2).id)] == []
    assert reopened.prune(keep=1) == [_job(0).id]  # the earlier submitted of the two finished jobs


def test_blobs_are_content_addressed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"same bytes")
    d1, d2 = blobs.put(tmp_path / "a"), blobs.put(tmp_path / "b")
    assert d1 == d2 and blobs.digests() == {d1} and not (tmp_path / "b").exists()
    for bad in ("../../etc/passwd", "A" * 64, d1[:-1]):
        with pytest.raises(ValueError):
            blobs.path(bad)
    assert blobs.remove_except(set()) == 1 and not list((tmp_path / "blobs").iterdir())


def test_wire_format_round_trips() -> None:
    task = RenderTask(id="1" * 32, image="i", audio="a", prompt="p\nq", size="64*64", seed=7, num_clip=None,
                      out="o.mp4", live="l", telemetry="t", checkpoint_interval_s=0.0)
    for message in (task, ClipDone("x", 0, 1, 1.5), Lost("x", "worker_died", "gone"), WorkerReady(5, {"dit": 1})):
        line = to_wire(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1 and from_wire(line) == message
    with pytest.raises(ValueError):
        from_wire(b'{"type": "os.system", "command": "rm -rf /"}')


class _FakeRenderer:
    blocks_per_clip = 2

    def block_frames(self, clip: int, block: int) -> np.ndarray:
        return np.zeros((12, 8, 8, 3), np.uint8)


def test_observed_renderer_reports_and_cancels_between_blocks() -> None:
    events: list = []
    cancel = threading.Event()
    renderer = _ObservedRenderer(_FakeRenderer(), _Hooks("t", cancel, events.append))
    renderer.block_frames(1, 0)  # a resumed render starts at clip 1
    renderer.block_frames(1, 1)
    renderer.block_frames(2, 0)
    blocks = [(e.clip, e.block) for e in events if isinstance(e, BlockDone)]  # per-block progress
    events = [e for e in events if not isinstance(e, BlockDone)]
    assert blocks == [(1, 0), (1, 1), (2, 0)]
    assert [type(e) for e in events] == [Resumed, FirstFrame, ClipDone]
    assert events[0].clips_done == 1 and events[2].clip == 1 and events[2].clips_done == 2
    cancel.set()
    with pytest.raises(TaskCancelled):
        renderer.block_frames(2, 1)



def test_worker_applies_cancels_and_keeps_nothing_per_finished_task() -> None:
    """serve_tasks: a Cancel before its task starts cancels it; one for the running task sets its flag;
    one that crosses a task's end (or names an unknown task) is dropped, so nothing piles up over weeks."""
    from liveavatar_lite.serve.tasks import Cancel, Stop
    from liveavatar_lite.serve.worker import CancelBook, serve_tasks

    inbox: queue.Queue = queue.Queue()
    ran: list[tuple[str, bool]] = []
    a_runs, a_may_end = threading.Event(), threading.Event()

    class Channel:
        def send(self, message: object) -> None:
            pass

        def lines(self):  # never reaches end of file (that would _exit the process)
            while True:
                yield to_wire(inbox.get())

    class Runner:
        def run(self, task, cancel, emit) -> None:
            if task.id == "a":
                a_runs.set()
                assert a_may_end.wait(10)
            ran.append((task.id, cancel.is_set()))

    def task(task_id: str) -> RenderTask:
        return RenderTask(id=task_id, image="i", audio="a", prompt="p", size="64*64", seed=0, num_clip=None,
                          out="o.mp4", live=None, telemetry=None, checkpoint_interval_s=0.0)

    book = CancelBook()
    inbox.put(task("a"))
    inbox.put(task("b"))
    worker = threading.Thread(target=serve_tasks, args=(Channel(), Runner(), book), daemon=True)
    worker.start()
    assert a_runs.wait(10)
    for message in (Cancel("b"), Cancel("a"), Cancel("unknown")):  # b waits behind a, a runs
        inbox.put(message)
    deadline = time.monotonic() + 10
    while inbox.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the reader applies the last one
    a_may_end.set()
    for _ in range(100):  # cancels crossing a finished task, as when a job ends as the user cancels it
        inbox.put(Cancel("a"))
    inbox.put(task("c"))
    inbox.put(Stop())
    worker.join(10)
    assert not worker.is_alive()
    assert ran == [("a", True), ("b", True), ("c", False)]
    assert len(book) == 0


_FAKE_WORKER = r'''
import argparse, json, os, socket, sys
ap = argparse.ArgumentParser()
ap.add_argument("--fd", type=int); ap.add_argument("--parent-pid", type=int); ap.add_argument("--options")
ap.add_argument("--on-task", default="finish")
a = ap.parse_args()
s = socket.socket(fileno=a.fd)
send = lambda **m: s.sendall((json.dumps(m) + "\n").encode())
send(type="WorkerReady", pid=os.getpid(), loads={})
for line in s.makefile("rb"):
    m = json.loads(line)
    if m["type"] == "Stop":
        break
    if m["type"] == "RenderTask":
        if a.on_task == "die":
            os._exit(7)
        send(type="Finished", task_id=m["id"], seconds=0.1)
'''


def _executor(tmp_path: Path, policy: WorkerPolicy, on_task: str = "finish") -> LocalWorkerExecutor:
    script = tmp_path / "fake_worker.py"
    script.write_text(_FAKE_WORKER)
    config = ServeConfig(pipeline=OPTIONS, state_dir=tmp_path, size="64*64", worker=policy)
    return LocalWorkerExecutor(config, tmp_path / "worker.log", [sys.executable, str(script), "--on-task", on_task])


def test_supervisor_restarts_dead_worker_and_reports_the_lostrender_task(tmp_path: Path) -> None:
    executor = _executor(tmp_path, WorkerPolicy(), on_task="die")
    executor.start()
    try:
        pump(executor, lambda seen: any(isinstance(e, WorkerReady) for e in seen))
        first = executor.pid
        executor.submit(render_task(1))
        seen = pump(executor, lambda seen: any(isinstance(e, Lost) for e in seen))
        lost = next(e for e in seen if isinstance(e, Lost))
        assert lost.task_id == render_task(1).id and lost.kind == "worker_died" and "code 7" in lost.reason
        pump(executor, lambda seen: executor.free_slots() == 1)
        assert executor.pid != first and executor.restarts["worker_died"] == 1
    finally:
        executor.stop()


def test_supervisor_memory_ceiling_and_recycling(tmp_path: Path) -> None:
    # any RSS is over 1 byte: the worker is restarted as soon as it runs
    executor = _executor(tmp_path, WorkerPolicy(memory_ceiling_bytes=1))
    executor.start()
    try:
        pump(executor, lambda seen: executor.restarts["memory_ceiling"] >= 1)
    finally:
        executor.stop()
    recycled = _executor(tmp_path, WorkerPolicy(recycle_after_jobs=1))
    recycled.start()
    try:
        pump(recycled, lambda seen: recycled.free_slots() == 1)
        first = recycled.pid
        recycled.submit(render_task(2))
        pump(recycled, lambda seen: any(isinstance(e, Finished) for e in seen))
        pump(recycled, lambda seen: recycled.restarts["recycle"] == 1 and recycled.free_slots() == 1)
        assert recycled.pid != first
    finally:
        recycled.stop()
    assert rss_bytes(10**9) is None


def test_metrics_show_every_label_at_zero_before_any_event() -> None:
    """A scrape of a fresh service has every state, failure kind and restart reason at 0 (a dashboard
    or a test reading `worker_died` finds it before the first death)."""
    from liveavatar_lite.serve.metrics import FAILURE_KINDS, RESTART_REASONS, ServeMetrics
    from liveavatar_lite.serve.store import TERMINAL

    text = ServeMetrics(lambda: 0, lambda: {"ready": True, "restarts": {}}).render().decode()
    want = [f'liveavatar_jobs_total{{state="{s}"}} 0.0' for s in TERMINAL]
    want += [f'liveavatar_failures_total{{kind="{k}"}} 0.0' for k in FAILURE_KINDS]
    want += [f'liveavatar_worker_restarts{{reason="{r}"}} 0.0' for r in RESTART_REASONS]
    want += ["liveavatar_queue_depth 0.0", "liveavatar_worker_ready 1.0", "liveavatar_job_seconds_count 0.0"]
    assert [w for w in want if w not in text.splitlines()] == []
    metrics = ServeMetrics(lambda: 0, lambda: {"restarts": {"worker_died": 2}})
    metrics.failure("worker_died")
    lines = metrics.render().decode().splitlines()
    assert 'liveavatar_failures_total{kind="worker_died"} 1.0' in lines
    assert 'liveavatar_worker_restarts{reason="worker_died"} 2.0' in lines
