"""Running `liveavatar-lite serve` the way a kiosk does: a real server process on a free port, over HTTP.

    with ServeProcess(art, state_dir, "--size", SIZE) as server:
        job = server.client.post("/v1/jobs", files=job_files(media), data={"prompt": PROMPT}).json()
        server.wait_for(job["id"], "done")

The server (and so its worker) runs with OMP_NUM_THREADS=1, like the CLI renders it is compared to.
Stopping it (SIGTERM, then SIGKILL) also makes sure its worker is gone: no test leaves a process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from render_helpers import PROMPT, SIZE, cli_command, render_env

from liveavatar_lite.serve.tasks import RenderTask

if TYPE_CHECKING:
    from liveavatar_lite.serve.supervisor import LocalWorkerExecutor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_files(media: Path, image: str = "photo.png", audio: str = "speech.wav") -> dict[str, Any]:
    return {"image": (image, (media / image).read_bytes(), "image/png"),
            "audio": (audio, (media / audio).read_bytes(), "audio/wav")}


def job_data(**extra: Any) -> dict[str, str]:
    return {"prompt": PROMPT, "size": SIZE, **{k: str(v) for k, v in extra.items()}}


def submit(server: ServeProcess, media: Path, **extra: Any) -> str:
    """POST one job (the photo and speech in `media`, `job_data(**extra)`); its id (201 expected)."""
    r = server.client.post("/v1/jobs", files=job_files(media), data=job_data(**extra))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition()` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def pump(executor: LocalWorkerExecutor, done: Callable[[list], bool], timeout: float = 30) -> list:
    """Collect the supervisor's events until `done(events so far)`; AssertionError (with them) after `timeout` s."""
    seen: list = []
    deadline = time.monotonic() + timeout
    while not done(seen):
        assert time.monotonic() < deadline, seen
        seen += executor.events(timeout=0.1)
    return seen


def render_task(i: int) -> RenderTask:
    """A task for a fake worker: id and seed `i`, one clip, placeholder paths."""
    return RenderTask(id=f"{i:032x}", image="i", audio="a", prompt="p", size="64*64", seed=i, num_clip=1,
                      out="o.mp4", live="l", telemetry="t", checkpoint_interval_s=0.0)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in text


class ServeProcess:
    """`liveavatar-lite serve ART --state-dir DIR --port P ...` in a subprocess, with an httpx client."""

    def __init__(self, artifact: Path, state_dir: Path, *args: str, token: str | None = None,
                 cache_dir: Path | None = None) -> None:
        self.artifact, self.state_dir, self.args, self.token = artifact, state_dir, args, token
        self.cache_dir = cache_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = state_dir.parent / f"{state_dir.name}.server.log"
        self.client = httpx.Client(timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 300, wait: bool = True) -> ServeProcess:
        """Start the server; with `wait`, until /readyz says ready (without: until it answers at all)."""
        self.port = free_port()
        args = ["serve", str(self.artifact), "--state-dir", str(self.state_dir), "--port", str(self.port),
                "--size", SIZE, "--checkpoint-interval", "0", *self.args]
        if "--min-free-mb" not in self.args:  # the machine's free disk must not decide a test (tests of it set it)
            args += ["--min-free-mb", "0"]
        if self.cache_dir is not None:
            args += ["--cache-dir", str(self.cache_dir)]
        if self.token is not None:
            token_file = self.state_dir.parent / f"{self.state_dir.name}.token"
            token_file.write_text(self.token + "\n")
            args += ["--token-file", str(token_file)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cli_command(*args), env=render_env(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client.close()
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self.wait_ready(ready_timeout, any_answer=not wait)
        return self

    def wait_ready(self, timeout: float = 300, any_answer: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                r = self.client.get("/readyz")
                if r.status_code == 200 or any_answer:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server was not ready within {timeout} s: {self.log.read_text()[-3000:]}")

    def worker_pid(self) -> int:
        return int(self.client.get("/readyz").json()["worker"]["pid"])

    def job(self, job_id: str) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(self, job_id: str, *states: str, clips_done: int = 0, timeout: float = 600) -> dict:
        """Poll until the job is in one of `states` with at least `clips_done` clips finished."""
        deadline = time.monotonic() + timeout
        job: dict = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in states and job["clips_done"] >= clips_done:
                return job
            if job["state"] in ("done", "failed", "cancelled") and job["state"] not in states:
                raise AssertionError(f"job {job_id} ended {job['state']}: {job['error']}")
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not {states} within {timeout} s: {job}")

    def drain(self, timeout: float = 600) -> dict:
        """A queue the next test knows: cancel what is queued or running (left by a failed test; a
        passing test waits for its own jobs), wait until each has ended and the worker is free."""
        for state in ("queued", "running"):
            for job in self.client.get("/v1/jobs", params={"state": state, "limit": 500}).json()["jobs"]:
                self.client.delete(f"/v1/jobs/{job['id']}")
                self.wait_for(job["id"], "done", "failed", "cancelled", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            worker = self.wait_ready(max(1.0, deadline - time.monotonic()))["worker"]
            if not worker.get("busy"):  # an avatar task may still hold it
                return worker
            assert time.monotonic() < deadline, f"the worker stayed busy for {timeout} s: {worker}"
            time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 the server (its worker dies with it: PR_SET_PDEATHSIG / the socket's end)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        pid = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                pid = self.worker_pid()
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pid = None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        if pid is not None:
            wait_gone(pid, timeout=10)

    def __enter__(self) -> ServeProcess:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for `pid` to end; if it has not after `timeout`, SIGKILL it (it is our worker) and say so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return False


@contextmanager
def paused(pid: int) -> Iterator[int]:
    """SIGSTOP `pid` (a worker) for the block, SIGCONT after it even if it fails: a worker that holds
    its task without finishing it, so a test fills the queue behind it deterministically."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while "\nState:\tT" not in Path(f"/proc/{pid}/status").read_text():  # T: stopped
            assert time.monotonic() < deadline, f"process {pid} did not stop on SIGSTOP"
            time.sleep(0.01)
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
