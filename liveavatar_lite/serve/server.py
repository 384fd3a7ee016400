"""`serve()`: lock the state dir, recover the queue, start the dispatcher + worker, run uvicorn.

    serve(ServeConfig(pipeline=PipelineOptions(Path("art")), state_dir=Path("state")))  # until SIGTERM / Ctrl-C

SIGUSR1 (or POST /v1/admin/drain) drains: the running job finishes, nothing new is accepted, then
the server exits 0. Under systemd it speaks the notify protocol (notify.py): READY=1 once
listening, WATCHDOG=1 from the dispatcher's loop, STOPPING=1.

Start-up after any stop (clean or kill -9): temp uploads are deleted; jobs that were running go
back to the head of the queue and resume from their checkpoints; directories of jobs the database
lists as failed or cancelled are removed, as are blobs it put that no job or avatar refers to.
Nothing the database does not list is ever deleted: a queue.sqlite3 that is missing, empty, or
restored without its WAL starts with the jobs it holds and leaves the other job folders and blobs
alone (one warning line names them); one that is unreadable or of another schema stops the start
with one line naming the file.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import IO

from ..errors import UserError
from .api import BodyLimit, create_app
from .blobs import BlobStore
from .config import ServeConfig
from .dispatcher import Dispatcher
from .executor import Executor
from .joblog import job_state
from .layout import StateDir, is_job_id
from .malloc_policy import steady_malloc
from .metrics import ServeMetrics
from .notify import SystemdNotifier
from .service import JobService
from .sessions import SessionBroker
from .store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, WAITING_FOR_DISK, JobStore
from .supervisor import LocalWorkerExecutor
from .uploads import ApiError

log = logging.getLogger(__name__)


def lock_state_dir(layout: StateDir) -> IO[str]:
    """Hold an exclusive lock on the state dir for the server's life (the kernel drops it on kill -9)."""
    handle = open(layout.lock, "a+")  # noqa: SIM115 - held open (locked) for the server's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another `liveavatar-lite serve` uses --state-dir {layout.root}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def recover(layout: StateDir, store: JobStore, blobs: BlobStore) -> None:
    """Bring the state dir back to what the database says (see the module docstring)."""
    shutil.rmtree(layout.tmp, ignore_errors=True)
    layout.tmp.mkdir(parents=True, exist_ok=True)
    requeued = store.recover()
    if requeued:
        log.info("resuming %d interrupted job(s): %s", len(requeued), ", ".join(requeued))
    for job_id in requeued:
        job = store.get(job_id)
        job_state(job_id, QUEUED, job.created if job else None, "interrupted by a server stop; it resumes")
    ended = store.jobs_in(FAILED, CANCELLED)  # their folders are the database's to delete
    listed = ended | store.jobs_in(DONE, QUEUED, RUNNING, WAITING_FOR_DISK)
    unlisted = 0
    for d in layout.jobs.iterdir():
        if d.name in ended and is_job_id(d.name):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink(missing_ok=True)
        elif d.name not in listed:
            unlisted += 1  # not ours to delete: a database restored from an older copy does not list it
    if unlisted:
        log.warning("%s lists no job for %d folder(s) in %s; they are kept (move them away if unwanted)",
                    layout.database, unlisted, layout.jobs)
    blobs.remove_except(store.blob_refs())  # only blobs the database put (BlobStore.known)


def build(config: ServeConfig, executor: Executor | None = None) -> tuple[object, Dispatcher, IO[str]]:
    """The ASGI app and the (not yet started) dispatcher over `config.state_dir`, rendering on
    `executor` (default: the local supervised worker; `serve --backend ray` passes the farm's)."""
    layout = StateDir(config.state_dir)
    layout.create()
    lock = lock_state_dir(layout)
    store = JobStore(layout.database)
    blobs = BlobStore(layout.blobs, known=store.known_blobs, on_put=store.know_blob, forget=store.forget_blobs)
    recover(layout, store, blobs)
    executor = executor or LocalWorkerExecutor(config, layout.worker_log)
    metrics = ServeMetrics(lambda: store.count(QUEUED), executor.status)
    blob_lock = threading.Lock()
    dispatcher = Dispatcher(store, executor, layout, blobs, config, metrics, blob_lock)
    sessions = None
    if isinstance(executor, LocalWorkerExecutor):  # talk sessions need the worker's live socket (sessions.py)
        sessions = SessionBroker(config, layout, dispatcher.wake, on_end=lambda slot: metrics.session_ended(slot.reason))
        sessions.start()
        dispatcher.sessions = sessions
        metrics.sessions_active.set_function(lambda: 1.0 if sessions.current and sessions.current.state != "ended"
                                             else 0.0)

    def refusal() -> ApiError | None:
        if dispatcher.draining.is_set():
            return ApiError(503, "the server is draining (finishing its running job before it stops); "
                                 "try again after its restart", {"Retry-After": "60"})
        if dispatcher.disk_short():
            return ApiError(507, _disk_reason(dispatcher))
        return None

    def status() -> dict:
        """The executor's status, plus what else makes the service not ready, and why (for the page)."""
        out = {**executor.status(), "draining": dispatcher.draining.is_set(), "disk": dispatcher.disk_status()}
        reason = None
        if out["draining"]:
            reason = "draining: the running job finishes, then the server stops"
        elif out.get("stall") and not out.get("ready"):
            reason = (f"the worker made no progress for {out['stall']['seconds_since_progress']:.0f} s "
                      f"(deadline {out['stall']['deadline_s']:.0f} s); it is being restarted")
        elif dispatcher.disk_short():
            reason = _disk_reason(dispatcher)
        elif not out.get("ready"):
            reason = (f"the worker cannot load: {out['last_error']}" if out.get("last_error")
                      else "loading the model")
        out["reason"] = reason
        out["ready"] = bool(out.get("ready")) and reason is None
        return out

    service = JobService(config, layout, store, blobs, blob_lock, dispatcher.wake, refusal=refusal,
                         progress=dispatcher.progress,
                         predicted_clip_s=lambda: executor.status().get("seconds_per_clip"))
    app = create_app(service, layout, metrics, status, config.token, drain=dispatcher.drain, sessions=sessions)
    return BodyLimit(app, config.limits.max_upload_bytes), dispatcher, lock


def _disk_reason(dispatcher: Dispatcher) -> str:
    free = dispatcher.free_bytes or 0
    return (f"the disk is nearly full: {free / 1e6:.0f} MB free under the state dir, the server keeps "
            f"{dispatcher.config.min_free_bytes / 1e6:.0f} MB (--min-free-mb); jobs wait until space is freed")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts (UserError: one line, no worker left behind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(256)
    return sock


HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this (http_guard.py)
BODY_SLACK_S = 15.0  # a body may take the upload timeout (--request-timeout) plus this; then the connection closes
PENDING_PER_CLIENT = 16  # connections one address may hold while they wait for their headers
MAX_CONNECTIONS = 256  # open connections in all; past this a request gets 503
MAX_WAITING = 192  # of them, still waiting for their headers (all addresses): a quarter stays for real requests


def serve(config: ServeConfig, executor: Executor | None = None) -> None:
    """Run the service until SIGTERM or Ctrl-C; the worker (or `executor`'s workers) stopped with it."""
    import uvicorn

    from .http_guard import guarded_protocol

    steady_malloc()  # a server that runs for days: no RSS step some jobs into the run
    sock = listen(config.host, config.port)
    app, dispatcher, lock = build(config, executor)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=5,
        limit_concurrency=MAX_CONNECTIONS, ws="websockets",
        # a talk session's PCM message over its limit gets a one-line error from sessions.py; one far over it
        # (more than this) is refused by uvicorn itself (close 1009)
        ws_max_size=4 * config.sessions.max_message_bytes,
        http=guarded_protocol(HEADER_TIMEOUT_S, config.limits.request_timeout_s + BODY_SLACK_S, PENDING_PER_CLIENT,
                              MAX_WAITING)))
    notifier = SystemdNotifier.from_env()
    dispatcher.on_step = notifier.ping  # the watchdog ping comes from the loop that does the work

    def drained() -> None:
        log.info("drained: stopping the server")
        server.should_exit = True  # uvicorn's loop polls it; serve() then returns and the command exits 0

    dispatcher.on_drained = drained
    signal.signal(signal.SIGUSR1, lambda *_: dispatcher.drain())
    dispatcher.start()
    host, port = sock.getsockname()[:2]
    log.info("serving on http://%s:%d (state: %s%s)", f"[{host}]" if ":" in host else host, port,
             Path(config.state_dir).resolve(), ", bearer token required" if config.token else "")
    notifier.send("READY=1")
    try:
        server.run(sockets=[sock])
    finally:
        notifier.send("STOPPING=1")
        dispatcher.stop()
        if dispatcher.sessions is not None:
            dispatcher.sessions.stop()
        lock.close()
        sock.close()
