"""`serve` left alone for weeks: stalls, full disks, growing state, drains, upgrades (issue 24).

Against a real server process (serve_helpers.ServeProcess), tiny model, 64*64:
- a SIGSTOPped worker is caught by the stall watchdog, /readyz says so (503, the age of the last
  progress), the worker is restarted and the job finishes with the frames of an uninterrupted run;
  systemd's notify socket got READY=1 and WATCHDOG=1; progress came per block and never went back;
- a disk that fills (a real ENOSPC from the kernel: the job's next live segment file is a symlink
  to /dev/full; the server's free-space probe reads a test hook file instead of statvfs): the job
  waits as `waiting_for_disk` with its work, the queued ones do not start, uploads get 507, /readyz
  says why; once space returns every job finishes with identical frames; with --max-state-gb the
  live segments of finished jobs and the caches are pruned;
- a drain (POST /v1/admin/drain, then SIGUSR1) finishes the running job and exits 0, the queued job
  kept for the next start;
- a checkpoint from another artifact identity (here: another --kv) restarts the job from scratch, logged;
- every job state change is one log line.
Plus unit tests of pruning (only what the database vouches for), log rotation and the notify protocol.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("av")

from media_fixtures import decoded_frames
from render_helpers import SIZE
from serve_helpers import ServeProcess, job_data, job_files, process_alive, pump, render_task, submit, until, wait_gone

from liveavatar_lite.serve.disk import FREE_BYTES_HOOK, prune_to, tree_bytes
from liveavatar_lite.serve.layout import StateDir
from liveavatar_lite.serve.notify import SystemdNotifier
from liveavatar_lite.serve.store import DONE, QUEUED, JobRow, JobStore
from liveavatar_lite.pipeline.request import PipelineOptions
from liveavatar_lite.serve.config import ServeConfig, WorkerPolicy
from liveavatar_lite.serve.supervisor import LocalWorkerExecutor, rotate_log
from liveavatar_lite.serve.tasks import BlockDone, Finished, Lost, NoSpace, WorkerReady

CLIP0 = 45  # frames of clip 0 at 64*64 (the 3-clip reference's first clip)
CLIP01 = 93  # frames of clips 0 and 1
READY_S = 900  # the worker's start: torch's import and the model load (minutes on a loaded 2-core VM)


@contextmanager
def _serving(server: ServeProcess) -> Iterator[ServeProcess]:
    server.start(READY_S)
    try:
        yield server
    finally:
        server.stop()


def _one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and body["error"], body
    return body["error"]


def _video(server: ServeProcess, job_id: str) -> np.ndarray:
    return decoded_frames(server.state_dir / "jobs" / job_id / "video.mp4")


def _frames_report(video: np.ndarray, clean: np.ndarray, job: dict, server: ServeProcess) -> str:
    """What a failed frame comparison needs for its diagnosis (it failed once in a loaded CI run,
    2026-12-07, and passed in every rerun): which frames differ, the job, the worker's log."""
    if video.shape != clean.shape:
        return f"shape {video.shape} != {clean.shape}; job {job}"
    differ = [i for i in range(len(clean)) if not np.array_equal(video[i], clean[i])]
    worst = max(int(np.abs(video[i].astype(int) - clean[i]).max()) for i in differ) if differ else 0
    worker_log = (server.state_dir / "worker.log").read_text(errors="replace")[-4000:]
    return (f"{len(differ)} of {len(clean)} frames differ (first {differ[:1]}, last {differ[-1:]}, max |diff| "
            f"{worst}); job {job}; server log tail:\n{server.log.read_text()[-3000:]}\nworker log tail:\n{worker_log}")


def _states_logged(server: ServeProcess, job_id: str) -> list[str]:
    """The states of `job_id`'s log lines, in order (joblog.py: `job ID STATE seconds=... reason=...`)."""
    return re.findall(rf"job {job_id} (\w+)", server.log.read_text())


def _watch(server: ServeProcess, job_id: str, done, seen: list[dict], timeout: float = 600) -> dict:
    """Poll the job until `done(job)`, keeping every view seen."""
    def look():
        job = server.job(job_id)
        seen.append(job)
        return job if done(job) else None
    return until(look, timeout, f"job {job_id} to progress")


# ---- the stall watchdog ---------------------------------------------------------------------------

@pytest.mark.slow
def test_stopped_worker_is_caught_restarted_and_the_job_finishes_identically(
        tiny_artifact: Path, media: Path, clean_render: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # ping every 0.5 s
    stall_s = 20  # (its first block gets 3 times that: encoding, checkpoint restore)
    with _serving(ServeProcess(tiny_artifact, tmp_path / "state", "--stall-timeout", str(stall_s),
                               cache_dir=media / "cache")) as server:
        messages = {notify.recv(256).decode() for _ in range(3)}
        assert "READY=1" in messages and "WATCHDOG=1" in messages, messages
        job_id = submit(server, media, seed=7, num_clip=2)
        seen: list[dict] = []
        _watch(server, job_id, lambda j: j["state"] == "running" and j["progress"] > 0, seen, 300)  # a block
        assert seen[-1]["eta_s"] is not None  # from the plan's seconds per clip: no job has finished yet
        worker = server.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        try:
            ready = until(lambda: (r := server.client.get("/readyz")).status_code == 503 and r.json(), 120,
                           "/readyz to report the stall")
        finally:
            if process_alive(worker):
                os.kill(worker, signal.SIGCONT)
        stall = ready["worker"]["stall"]
        assert stall["deadline_s"] == stall_s and stall_s <= stall["seconds_since_progress"], ready
        assert "no progress" in ready["reason"]
        assert wait_gone(worker, 30)  # killed by the supervisor, not by us
        job = _watch(server, job_id, lambda j: j["state"] == "done", seen)
        assert job["worker_deaths"] == 1 and job["resumed"], job
        assert np.array_equal(_video(server, job_id), decoded_frames(clean_render["out"])[:CLIP01])
        assert server.wait_ready()["worker"]["restarts"] == {"stalled": 1}
        assert server.worker_pid() != worker
        running = [j for j in seen if j["state"] == "running"]
        progress = [j["progress"] for j in running]
        assert progress == sorted(progress), progress  # per block, never backwards (not even after the resume)
        clips = [j["clips_done"] for j in seen]
        assert clips == sorted(clips), clips
        assert len({p for p in progress if 0 < p < 1}) >= 2  # more than one step per clip: blocks, not clips
        assert _states_logged(server, job_id) == ["queued", "running", "queued", "running", "done"]
        assert "no progress for" in server.log.read_text()
        notify.settimeout(5)
        assert notify.recv(256) == b"WATCHDOG=1"  # still pinging
    notify.close()


_HANGING_WORKER = r'''
import argparse, json, os, socket, time
ap = argparse.ArgumentParser()
ap.add_argument("--fd", type=int); ap.add_argument("--parent-pid", type=int); ap.add_argument("--options")
a = ap.parse_args()
s = socket.socket(fileno=a.fd)
send = lambda **m: s.sendall((json.dumps(m) + "\n").encode())
send(type="WorkerReady", pid=os.getpid(), loads={}, seconds_per_clip=0.01)
for line in s.makefile("rb"):
    m = json.loads(line)
    if m["type"] == "RenderTask":
        send(type="BlockDone", task_id=m["id"], clip=0, block=0, blocks_per_clip=2, predicted_block_s=0.005)
        if m["seed"] == 1:
            time.sleep(3600)  # wedged after its first block
        if m["seed"] == 3:
            send(type="NoSpace", task_id=m["id"], message="the disk is full")
            continue
        send(type="Finished", task_id=m["id"], seconds=0.1)
'''


def test_watchdog_kills_a_wedged_worker_and_reports_the_task_lost(tmp_path: Path) -> None:
    """The supervisor alone, with a fake worker that stops reporting after one block: `Lost`
    ("stalled") after the deadline, a fresh worker, which then serves; a task that reports is untouched."""
    script = tmp_path / "hanging_worker.py"
    script.write_text(_HANGING_WORKER)
    config = ServeConfig(pipeline=PipelineOptions(artifact=tmp_path), state_dir=tmp_path, size="64*64",
                         worker=WorkerPolicy(stall_timeout_s=1.0))
    executor = LocalWorkerExecutor(config, tmp_path / "worker.log", [sys.executable, str(script)])

    def events(done) -> list:  # the supervisor's events until `done(events)`
        return pump(executor, done, timeout=60)

    executor.start()
    try:
        events(lambda seen: executor.free_slots() == 1)
        executor.submit(render_task(0))
        seen = events(lambda seen: any(isinstance(e, Finished) for e in seen))
        assert not any(isinstance(e, Lost) for e in seen) and executor.restarts == {}
        first = executor.pid
        executor.submit(render_task(1))
        seen = events(lambda seen: any(isinstance(e, Lost) for e in seen))
        lost = next(e for e in seen if isinstance(e, Lost))
        assert any(isinstance(e, BlockDone) for e in seen)
        assert lost.kind == "stalled" and "no progress" in lost.reason, lost
        status = executor.status()
        # the plan's 0.005 s blocks * 10 are under the floor: the floor (1 s) is the deadline
        assert status["stall"]["deadline_s"] == 1.0 and status["stall"]["seconds_since_progress"] >= 1.0
        assert not status["ready"] and executor.restarts == {"stalled": 1}
        events(lambda seen: any(isinstance(e, WorkerReady) for e in seen))
        assert executor.pid != first and executor.status()["stall"] is None
        executor.submit(render_task(2))
        events(lambda seen: any(isinstance(e, Finished) for e in seen))
        executor.submit(render_task(3))  # a full disk ends the task on the worker: the slot is free again
        events(lambda seen: any(isinstance(e, NoSpace) for e in seen))
        assert executor.free_slots() == 1
    finally:
        executor.stop()


# ---- a disk that fills ----------------------------------------------------------------------------

@pytest.mark.slow
def test_full_disk_keeps_every_job_and_resumes_them_all(
        tiny_artifact: Path, media: Path, clean_render: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free_file = tmp_path / "free_bytes"  # while it exists, the server believes this many bytes are free
    monkeypatch.setenv(FREE_BYTES_HOOK, str(free_file))
    state = tmp_path / "state"
    with _serving(ServeProcess(tiny_artifact, state, "--min-free-mb", "100", "--max-state-gb", "0.000001")) as server:
        c = server.client
        first = submit(server, media, seed=7)  # 3 clips
        waiting = [submit(server, media, seed=7, num_clip=1) for _ in range(2)]
        server.wait_for(first, "running")
        worker = server.worker_pid()
        os.kill(worker, signal.SIGSTOP)  # hold the render still while the disk "fills"
        try:
            live = state / "jobs" / first / "live"
            live.mkdir(parents=True, exist_ok=True)
            planted = [live / f".seg_{i:05d}.ts.tmp" for i in range(3) if not (live / f"seg_{i:05d}.ts").exists()]
            assert len(planted) >= 2, "the job finished two clips before it could be stopped"
            for p in planted:
                p.symlink_to("/dev/full")  # its next live segment is written to /dev/full: ENOSPC from the kernel
            (tmp_path / "free_bytes.tmp").write_text("0")
            os.replace(tmp_path / "free_bytes.tmp", free_file)  # atomic: the server never reads it half-written
            ready = until(lambda: (r := c.get("/readyz")).status_code == 503 and r.json(), 60, "the disk check")
            assert "disk" in ready["reason"] and "--min-free-mb" in ready["reason"], ready
        finally:
            os.kill(worker, signal.SIGCONT)
        job = server.wait_for(first, "waiting_for_disk", timeout=300)
        assert "No space left on device" in job["error"], job
        assert (state / "jobs" / first).is_dir()  # its work is kept
        assert [server.job(w)["state"] for w in waiting] == ["queued", "queued"]  # nothing starts on a full disk
        for path in ("/v1/jobs", "/v1/avatars"):
            error = _one_line_error(c.post(path, files=job_files(media), data=job_data()), 507)
            assert "free" in error
        assert "liveavatar_state_free_bytes 0.0" in c.get("/metrics").text
        assert server.worker_pid() == worker  # a full disk is not the worker's fault

        for p in planted:
            p.unlink(missing_ok=True)
        free_file.unlink()  # space returns: every job resumes by itself
        for job_id in (first, *waiting):
            server.wait_for(job_id, "done", timeout=600)
        job = server.job(first)
        assert job["resumed"] and job["worker_deaths"] == 0 and job["error"] is None
        clean = decoded_frames(clean_render["out"])
        video = _video(server, first)
        assert np.array_equal(video, clean), _frames_report(video, clean, job, server)
        for job_id in waiting:
            assert np.array_equal(_video(server, job_id), clean[:CLIP0])
        assert _states_logged(server, first) == ["queued", "running", "waiting_for_disk", "queued", "running", "done"]
        for job_id in waiting:
            assert _states_logged(server, job_id) == ["queued", "running", "done"]
        # --max-state-gb (1 kB here): every finished job's live segments and every cache entry pruned,
        # the results and the queue kept
        assert not list((state / "jobs").glob("*/live")) and (state / "jobs" / first / "video.mp4").is_file()
        assert not list((state / "cache").rglob("*.safetensors"))
        assert "pruned" in server.log.read_text()
        assert c.post("/v1/jobs", files=job_files(media), data=job_data(num_clip=1)).status_code == 201


def _store_with(root: Path) -> tuple[StateDir, JobStore]:
    layout = StateDir(root)
    layout.create()
    return layout, JobStore(layout.database)


def _row(job_id: str, state: str, finished: float | None = None) -> JobRow:
    return JobRow(id=job_id, state=state, created=1.0, image="a" * 64, audio="b" * 64, prompt="p", size=SIZE,
                  seed=1, clips_total=1, finished=finished)


def test_pruning_removes_least_recently_used_and_only_what_the_database_vouches_for(tmp_path: Path) -> None:
    layout, store = _store_with(tmp_path / "state")
    old, new, queued = "1" * 32, "2" * 32, "3" * 32
    for job_id, state, finished in ((old, DONE, 10.0), (new, DONE, 20.0), (queued, QUEUED, None)):
        store.add(_row(job_id, state, finished), max_queued=10)
        (layout.live(job_id)).mkdir(parents=True)
        (layout.live(job_id) / "seg_00000.ts").write_bytes(bytes(1000))
        (layout.video(job_id)).write_bytes(bytes(100))
    stranger = layout.jobs / ("4" * 32) / "live"  # a job the database does not know
    stranger.mkdir(parents=True)
    (stranger / "seg_00000.ts").write_bytes(bytes(1000))
    cache = layout.cache
    entries = []
    for i, kind in enumerate(("photos", "prompts", "photos")):
        (cache / kind).mkdir(parents=True, exist_ok=True)
        entry = cache / kind / f"{i:064x}.safetensors"
        entry.write_bytes(bytes(2000))
        os.utime(entry, (100.0 + i, 100.0 + i))  # entry 0 is the least recently used
        entries.append(entry)
    (cache / "photos" / "notes.txt").write_bytes(bytes(2000))  # not a cache entry: never touched
    base = tree_bytes(layout.root)

    # live segments of finished jobs go first (they duplicate the mp4), oldest finished first
    assert prune_to(layout, store, cache, base - 500) == 1000
    assert not layout.live(old).exists() and layout.live(new).is_dir() and layout.video(old).is_file()
    # then the least recently used cache entries
    assert prune_to(layout, store, cache, base - 2500) == 3000
    assert not layout.live(new).exists()
    assert not entries[0].exists() and entries[1].exists() and entries[2].exists()
    assert prune_to(layout, store, cache, base) == 0  # under the limit: nothing

    prune_to(layout, store, cache, 0)  # as far as it goes
    assert not any(e.exists() for e in entries)
    assert layout.live(queued).is_dir() and stranger.is_dir() and (cache / "photos" / "notes.txt").exists()
    assert all(layout.video(j).is_file() for j in (old, new, queued))
    store.close()


def test_a_cache_hit_makes_its_entry_the_most_recently_used(tmp_path: Path) -> None:
    """A prompt every job reads must not be the first pruned: on a relatime mount a read alone does
    not update atime more than once a day, so the cache marks a hit itself."""
    import torch

    from liveavatar_lite.conditioning.caches import PromptCache
    from liveavatar_lite.serve.disk import cache_entries

    cache = PromptCache(tmp_path)
    for i, prompt in enumerate(("hot", "cold")):
        cache.put(prompt, "art", torch.zeros(2, 4))
        os.utime(cache.path(prompt, "art"), (100.0 + i, 100.0 + i))  # "hot" was stored first
    assert cache_entries(tmp_path)[0] == cache.path("hot", "art")
    assert cache.get("hot", "art") is not None  # every job reads it
    assert cache_entries(tmp_path) == [cache.path("cold", "art"), cache.path("hot", "art")]
    # marked through its mtime, which no mount option skips (atime may or may not have moved here)
    assert cache.path("hot", "art").stat().st_mtime > 1e9 and cache.path("cold", "art").stat().st_mtime == 101.0


def test_worker_log_is_rotated(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_bytes(b"x" * 100)
    assert not rotate_log(log, 100)
    with open(log, "ab", buffering=0) as f:  # the worker's O_APPEND descriptor carries on after the truncation
        f.write(b"y")
        assert rotate_log(log, 100)
        f.write(b"z")
    assert (tmp_path / "worker.log.1").read_bytes() == b"x" * 100 + b"y" and log.read_bytes() == b"z"


def test_notify_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier.from_env()
    notifier.send("READY=1")
    notifier.ping()
    notifier.ping()  # within half the period: not sent again
    notifier.send("STOPPING=1")
    assert [sock.recv(64) for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    SystemdNotifier.from_env().send("READY=1")  # outside systemd: nothing, no error
    sock.close()


# ---- drain ----------------------------------------------------------------------------------------

def _db_state(state: Path, job_id: str) -> str:
    with sqlite3.connect(state / "queue.sqlite3") as db:
        return db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


@pytest.mark.slow
def test_drain_finishes_the_running_job_and_exits_0(tiny_artifact: Path, media: Path, clean_render: dict,
                                                     tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = ServeProcess(tiny_artifact, state, cache_dir=media / "cache").start(READY_S)
    try:
        running = submit(server, media, seed=7, num_clip=2)
        later = submit(server, media, seed=7, num_clip=1)
        server.wait_for(running, "running")
        worker = server.worker_pid()
        os.kill(worker, signal.SIGUSR1)  # `systemctl kill -s USR1` reaches the whole control group: ignored
        r = server.client.post("/v1/admin/drain")
        assert r.status_code == 202 and r.json() == {"draining": True}
        _one_line_error(server.client.post("/v1/jobs", files=job_files(media), data=job_data()), 503)
        ready = server.client.get("/readyz")
        assert ready.status_code == 503 and "draining" in ready.json()["reason"]
        assert server.proc is not None and server.proc.wait(timeout=600) == 0
        assert wait_gone(worker, 30)
    finally:
        server.stop()
    assert _db_state(state, running) == "done" and _db_state(state, later) == "queued"
    assert np.array_equal(decoded_frames(state / "jobs" / running / "video.mp4"),
                          decoded_frames(clean_render["out"])[:CLIP01])
    assert "drained" in server.log.read_text() and server.log.read_text().count("worker started") == 1

    # the next start runs the queued job; SIGUSR1 drains too
    server.start(READY_S)
    try:
        server.wait_for(later, "running", "done")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGUSR1)
        assert server.proc.wait(timeout=600) == 0
    finally:
        server.stop()
    assert _db_state(state, later) == "done"
    assert np.array_equal(decoded_frames(state / "jobs" / later / "video.mp4"),
                          decoded_frames(clean_render["out"])[:CLIP0])
    assert _states_logged(server, later) == ["queued", "running", "done"]


# ---- an upgrade: the artifact identity changes under an interrupted job ---------------------------

@pytest.mark.slow
def test_checkpoint_of_another_artifact_restarts_the_job_from_scratch(tiny_artifact: Path, media: Path,
                                                                      tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = ServeProcess(tiny_artifact, state, cache_dir=media / "cache").start(READY_S)
    try:
        job_id = submit(server, media, seed=7, num_clip=2)
        server.wait_for(job_id, "running", clips_done=1)
        worker = server.worker_pid()
        server.kill()
        wait_gone(worker, 10)
    finally:
        server.stop()
    # the same artifact with another KV storage: a different identity, so the checkpoint cannot be used
    upgraded = ServeProcess(tiny_artifact, state, "--kv", "int8", cache_dir=media / "cache")
    with _serving(upgraded):
        job = upgraded.wait_for(job_id, "done", timeout=600)
        assert job["error"] is None and job["clips_done"] == 2
    text = server.log.read_text()
    assert "restarted from scratch: cannot resume" in text
    assert _states_logged(server, job_id) == ["queued", "running", "queued", "running", "running", "done"]
    telemetry = (state / "jobs" / job_id / "telemetry.jsonl").read_text()
    assert '"event": "resume"' not in telemetry


# ---- a job's own bytes before it starts -----------------------------------------------------------

def test_job_bytes_is_the_plans_video_and_checkpoints(clean_render: dict) -> None:
    from liveavatar_lite.config import PRESETS, SampleConfig
    from liveavatar_lite.runtime.plan_inputs import kv_specs
    from liveavatar_lite.serve.disk import ENCODED_FRACTION, job_bytes

    tiny, big = PRESETS["tiny"].dit, PRESETS["14b"].dit
    raw_clip = 64 * 64 * 3 * SampleConfig().infer_frames
    # the measured mp4 of the 3-clip reference render fits the bound on one encoded copy
    assert clean_render["out"].stat().st_size <= 3 * raw_clip * ENCODED_FRACTION
    one = job_bytes(tiny, (64, 64), 1)
    assert one == job_bytes(None, (64, 64), 1)  # one clip: no checkpoint is ever written
    assert job_bytes(tiny, (64, 64), 2) - one > 2 * sum(k.nbytes("bf16") for k in kv_specs(tiny, (64, 64)))
    # docs/generate.md: a 14B checkpoint holds about 40 GB of K/V at 704*384 (bf16), about half with 8-bit K/V;
    # two exist at once
    bf16, fp8 = job_bytes(big, (704, 384), 16), job_bytes(big, (704, 384), 16, "fp8")
    assert 80e9 < bf16 < 100e9 and 40e9 < fp8 < 0.6 * bf16


class _RecordingExecutor:
    """An executor whose one slot finishes each task at the next events() call; records the state
    dir's size at each submit (what the job would find)."""

    def __init__(self, root: Path) -> None:
        self.root, self.submitted, self.sizes, self._pending = root, [], [], []

    def start(self) -> None:
        self._pending.append(WorkerReady(os.getpid(), {}, None))

    def free_slots(self) -> int:
        return 0 if any(isinstance(e, Finished) for e in self._pending) else 1

    def submit(self, task) -> None:
        self.submitted.append(task.id)
        self.sizes.append(tree_bytes(self.root))
        self._pending.append(Finished(task.id, 0.1, CLIP0, 1, 0, None))

    def cancel(self, task_id: str) -> None:
        pass

    def events(self, timeout: float) -> list:
        out, self._pending = self._pending, []
        return out

    def status(self) -> dict:
        return {"ready": True}

    def stop(self) -> None:
        pass


def test_a_job_starts_only_with_room_for_its_own_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from liveavatar_lite.serve.blobs import BlobStore
    from liveavatar_lite.serve.dispatcher import Dispatcher
    from liveavatar_lite.serve.disk import job_bytes
    from liveavatar_lite.serve.metrics import ServeMetrics

    free_file = tmp_path / "free_bytes"
    monkeypatch.setenv(FREE_BYTES_HOOK, str(free_file))
    layout, store = _store_with(tmp_path / "state")
    need, floor = job_bytes(None, (64, 64), 1), 1000  # (no manifest here: a one-clip job has no checkpoint anyway)
    for i in range(4):  # photo-cache entries, a quarter of the job's bytes each, the least recently used first
        entry = layout.cache / "photos" / f"{i:064x}.safetensors"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(bytes(need // 4))
        os.utime(entry, (100.0 + i, 100.0 + i))
    # the job's bytes fit only once two entries are pruned (need // 8: room for the queue database's growth)
    limit = tree_bytes(layout.root) + need // 2 + need // 8
    config = ServeConfig(pipeline=PipelineOptions(tmp_path / "no-artifact", cache_dir=layout.cache),
                         state_dir=layout.root, size=SIZE, min_free_bytes=floor, max_state_bytes=limit)
    executor = _RecordingExecutor(layout.root)
    dispatcher = Dispatcher(store, executor, layout, BlobStore(layout.blobs), config,
                            ServeMetrics(lambda: 0, executor.status), threading.Lock())
    free_file.write_text(str(floor + need - 1))  # room for the floor, not for the job
    store.add(_row("5" * 32, QUEUED), max_queued=10)
    with caplog.at_level("WARNING", logger="liveavatar_lite.serve.dispatcher"):
        dispatcher.start()
        try:
            until(lambda: "waits for disk space" in caplog.text, 30, "the log line")
            assert executor.submitted == [] and store.get("5" * 32).state == QUEUED
            assert not dispatcher.disk_short()  # above the floor: uploads are still taken
            (tmp_path / "free.tmp").write_text(str(floor + need))
            os.replace(tmp_path / "free.tmp", free_file)
            until(lambda: store.get("5" * 32).state == DONE, 30, "the job")
        finally:
            dispatcher.stop()
    assert caplog.text.count("waits for disk space") == 1  # once per job, not every loop
    assert executor.sizes[0] <= limit - need  # pruned to leave the job its bytes before it started
    left = sorted(p.name for p in (layout.cache / "photos").iterdir())
    assert left == [f"{i:064x}.safetensors" for i in (2, 3)]  # the least recently used went
    store.close()


# ---- the page says why --------------------------------------------------------------------------

@pytest.mark.slow
def test_page_shows_why_not_ready_and_why_a_job_failed(tiny_artifact: Path, tmp_path: Path) -> None:
    from test_serve import _chromium

    from liveavatar_lite.serve.store import FAILED

    layout, store = _store_with(tmp_path / "state")  # a job that failed before this start, with its reason
    store.add(replace(_row("6" * 32, FAILED, 5.0), error="the worker died 2 times on this job; not retried again",
                      error_kind="worker_died"), max_queued=10)
    store.close()
    server = ServeProcess(tiny_artifact, layout.root, "--ram", "0.001")  # a budget the model cannot load in
    server.start(READY_S, wait=False)
    driver = _chromium(tmp_path)
    try:
        def load_error() -> str | None:
            reason = server.client.get("/readyz").json()["reason"] or ""
            return reason if "cannot load" in reason else None

        reason = until(load_error, READY_S, "the load error")
        assert "--ram" in reason
        driver.get(server.url + "/")
        badge = until(lambda: (t := driver.find_element("id", "ready").text) not in ("loading the model…", "checking…")
                      and t, 60,  # (the page says "checking…" until its first /readyz answer)
                      "the badge")
        assert badge == reason  # /readyz's reason, word for word
        row = until(lambda: driver.find_element("id", "queue").text, 60, "the queue table")
        assert "failed: the worker died 2 times on this job" in row
    finally:
        driver.quit()
        server.stop()


@pytest.mark.slow
def test_worker_log_is_capped_by_a_running_server(tiny_artifact: Path, media: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _serving(ServeProcess(tiny_artifact, state, "--worker-log-mb", "0.0002")) as server:  # 200 bytes
        log, old = state / "worker.log", state / "worker.log.1"
        until(old.is_file, 60, "the first rotation")  # the worker's start alone writes more than 200 bytes
        job = submit(server, media, num_clip=1)
        server.wait_for(job, "done")
        # the job's lines (over 200 bytes) passed the cap again: moved to worker.log.1 by the next check
        until(lambda: job.encode() in old.read_bytes(), 60, "a rotation after the job")
        assert log.stat().st_size <= old.stat().st_size  # emptied, then only what came since
        assert not log.read_bytes().startswith(b"\0")  # the worker appends at the new end: no hole of zeros
