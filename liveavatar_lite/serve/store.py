"""The durable job queue: one SQLite database in WAL mode, every change one transaction.

A job is `queued` -> `running` -> `done` | `failed` | `cancelled` (a queued job may be cancelled
directly). A server killed at any point finds on restart exactly the committed states: `running`
jobs are put back at the head of the queue with `resume` set (the worker continues them from their
render checkpoint), `queued` ones stay queued, finished ones keep their results. Avatars (photos
pre-encoded before they are used) are `pending` -> `ready` | `failed`.

    store = JobStore(Path("state/queue.sqlite3"))
    store.add(JobRow(...), max_queued=32)      # QueueFull past the limit
    job = store.claim_next()                   # the next queued job, now running
"""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import UserError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
WAITING_FOR_DISK = "waiting_for_disk"  # the disk filled while it ran: its work is kept, it resumes with space
STATES = (QUEUED, RUNNING, WAITING_FOR_DISK, DONE, FAILED, CANCELLED)
TERMINAL = (DONE, FAILED, CANCELLED)
PENDING, READY = "pending", "ready"  # avatar states (plus FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    image TEXT NOT NULL,                     -- blob digest
    audio TEXT NOT NULL,                     -- blob digest
    avatar TEXT,                             -- the avatar id the photo came from, if any
    prompt TEXT NOT NULL,
    size TEXT NOT NULL,
    seed INTEGER NOT NULL,
    num_clip INTEGER,
    clips_total INTEGER NOT NULL,
    clips_done INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,       -- it was running when the server or worker stopped
    worker_deaths INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    first_frame_s REAL,
    render_s REAL,
    error TEXT,
    error_kind TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, resume, seq);
CREATE TABLE IF NOT EXISTS avatars (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    image TEXT NOT NULL,
    size TEXT NOT NULL,
    prompt TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS known_blobs (   -- every blob this database put in blobs/: the only ones it may delete
    digest TEXT PRIMARY KEY
);
"""


# The schema's version, kept in SQLite's user_version: a database written by a newer version (a
# larger number) is refused at start rather than half-understood (its rows could mean other things).
SCHEMA_VERSION = 1


class QueueFull(Exception):
    """More queued jobs than the limit allows."""


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    id: str
    state: str
    created: float
    image: str
    audio: str
    prompt: str
    size: str
    seed: int
    clips_total: int
    num_clip: int | None = None
    avatar: str | None = None
    started: float | None = None
    finished: float | None = None
    clips_done: int = 0
    resume: bool = False
    worker_deaths: int = 0
    cancel_requested: bool = False
    first_frame_s: float | None = None
    render_s: float | None = None
    error: str | None = None
    error_kind: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class AvatarRow:
    id: str
    state: str
    created: float
    image: str
    size: str
    prompt: str | None = None
    error: str | None = None


_JOB_COLUMNS = tuple(f.name for f in fields(JobRow))
_AVATAR_COLUMNS = tuple(f.name for f in fields(AvatarRow))


def _job(row: sqlite3.Row) -> JobRow:
    values = {k: row[k] for k in _JOB_COLUMNS}
    values["resume"], values["cancel_requested"] = bool(values["resume"]), bool(values["cancel_requested"])
    return JobRow(**values)


class JobStore:
    """Jobs and avatars in SQLite (WAL, synchronous=FULL: a committed change survives kill -9 and power loss).

    One connection for the whole server, used under a lock, so it is safe to call from any thread
    and its memory does not grow with the number of threads that ever called it (a connection per
    thread of the API's pool would keep up to 40 page caches). Writes that read-then-change run
    under BEGIN IMMEDIATE inside that lock, so two concurrent cancels cannot both win.
    """

    CACHE_KIB = 2048  # SQLite's page cache for the one connection (its default size, stated)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise UserError(f"the queue database {path} is not a regular file; move it away and restart")
        with self._lock:
            try:
                db = self._connect()
                had_known = self._check_schema(db)
                db.executescript(_SCHEMA)  # (executescript commits by itself)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                if not had_known:  # a database from before the table: the blobs its rows name are its own
                    with self._tx() as tx:
                        tx.execute("INSERT OR IGNORE INTO known_blobs SELECT image FROM jobs UNION "
                                   "SELECT audio FROM jobs UNION SELECT image FROM avatars")
            except sqlite3.DatabaseError as e:
                self.close()
                raise UserError(f"the queue database {path} is unreadable ({e}); move it (with its -wal and -shm "
                                "files) away to start with an empty queue (finished job folders are kept), "
                                "or restore it from a backup") from None

    @staticmethod
    def _check_schema(db: sqlite3.Connection) -> bool:
        """DatabaseError unless every table of ours that exists has the columns we read; whether
        the known_blobs table exists."""
        # a damaged page anywhere (a file cut mid-page, garbage written over one) is found now, not
        # as a 500 on the query that first reads it (a queue database is small: this takes milliseconds)
        problems = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"damaged: {' '.join(' '.join(problems).split())[:160]}")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"written by a newer liveavatar-lite (schema {version}, this one "
                                        f"reads {SCHEMA_VERSION}); upgrade, or use another --state-dir")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, columns in (("jobs", _JOB_COLUMNS), ("avatars", _AVATAR_COLUMNS)):
            if table not in tables:
                continue
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in columns if c not in have]
            if missing:
                raise sqlite3.DatabaseError(f"its {table} table lacks {', '.join(missing[:3])}: another schema")
            # a column we never write that must be set (NOT NULL, no default) makes every insert fail later
            unknown = [r[1] for r in db.execute(f"PRAGMA table_info({table})")
                       if r[1] not in columns and r[3] and r[4] is None and not r[5]]
            if unknown:
                raise sqlite3.DatabaseError(f"its {table} table requires {', '.join(unknown[:3])}, which this "
                                            "version does not write: another schema")
        return "known_blobs" in tables

    def _connect(self) -> sqlite3.Connection:
        """The connection (opened on first use); callers hold `self._lock`."""
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back to 4 MB after a checkpoint
            db.execute("PRAGMA busy_timeout=30000")
            db.execute(f"PRAGMA cache_size=-{self.CACHE_KIB}")
            self._db = db
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connect().execute(sql, args).fetchall()

    # ---- jobs -------------------------------------------------------------------------------------

    def add(self, job: JobRow, max_queued: int) -> None:
        """Insert a queued job; QueueFull when `max_queued` jobs are already waiting."""
        with self._tx() as db:
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()
            if waiting >= max_queued:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting)")
            cols = [c for c in _JOB_COLUMNS]
            db.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                       tuple(getattr(job, c) for c in cols))
            db.executemany("INSERT OR IGNORE INTO known_blobs VALUES (?)", [(job.image,), (job.audio,)])

    def get(self, job_id: str) -> JobRow | None:
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, state: str | None = None, limit: int = 100) -> list[JobRow]:
        """Newest first."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                          (*args, limit))
        return [_job(r) for r in rows]

    def count(self, state: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,))[0][0])

    def queued_before(self, job_id: str) -> list[JobRow]:
        """The queued jobs that run before `job_id` (claim order: interrupted first, then oldest)."""
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE state = ? ORDER BY resume DESC, seq",
                          (QUEUED,))
        order = [_job(r) for r in rows]
        ids = [j.id for j in order]
        return order[: ids.index(job_id)] if job_id in ids else order

    def next_queued(self) -> JobRow | None:
        """The job claim_next would take, left queued (None if none)."""
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE state = ? ORDER BY resume DESC, seq "
                          "LIMIT 1", (QUEUED,))
        return _job(rows[0]) if rows else None

    def claim_next(self) -> JobRow | None:
        """The next queued job (interrupted ones first, then oldest), marked running; None if none."""
        with self._tx() as db:
            row = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE state = ? "
                             "ORDER BY resume DESC, seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            now = time.time()
            db.execute("UPDATE jobs SET state = ?, started = COALESCE(started, ?) WHERE id = ?",
                       (RUNNING, now, job.id))
        return replace(job, state=RUNNING, started=job.started or now)

    def progress(self, job_id: str, clips_done: int | None = None, first_frame_s: float | None = None) -> None:
        with self._tx() as db:
            if clips_done is not None:
                db.execute("UPDATE jobs SET clips_done = ? WHERE id = ? AND state = ?", (clips_done, job_id, RUNNING))
            if first_frame_s is not None:
                db.execute("UPDATE jobs SET first_frame_s = COALESCE(first_frame_s, ?) WHERE id = ?",
                           (first_frame_s, job_id))

    def finish(self, job_id: str, state: str, *, render_s: float | None = None, error: str | None = None,
               error_kind: str | None = None, clips_done: int | None = None) -> None:
        """Move a job to a terminal state (a no-op if it already is in one)."""
        assert state in TERMINAL
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, render_s = COALESCE(?, render_s), error = ?, "
                       "error_kind = ?, clips_done = COALESCE(?, clips_done) "
                       "WHERE id = ? AND state NOT IN (?, ?, ?)",
                       (state, time.time(), render_s, error, error_kind, clips_done, job_id, *TERMINAL))

    def requeue_after_death(self, job_id: str) -> int:
        """A running job whose worker died: back to the head of the queue, resumable; returns its deaths."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, resume = 1, worker_deaths = worker_deaths + 1 "
                       "WHERE id = ? AND state = ?", (QUEUED, job_id, RUNNING))
            row = db.execute("SELECT worker_deaths FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return int(row[0]) if row else 0

    def wait_for_disk(self, job_id: str, reason: str) -> None:
        """A running job that hit a full disk: waiting (not claimed), resumable, its reason kept in `error`."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, resume = 1, error = ? WHERE id = ? AND state = ?",
                       (WAITING_FOR_DISK, reason, job_id, RUNNING))

    def release_waiting(self) -> list[str]:
        """The jobs waiting for disk go back to the head of the queue (resumable); returns their ids."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY seq",
                                            (WAITING_FOR_DISK,)).fetchall()]
            db.execute("UPDATE jobs SET state = ?, error = NULL WHERE state = ?", (QUEUED, WAITING_FOR_DISK))
        return ids

    def request_cancel(self, job_id: str) -> JobRow:
        """Cancel: a queued job at once, a running one by flagging it (the dispatcher stops it).

        Returns the job after the change; raises LookupError (unknown) or ValueError (nothing to
        cancel: finished, or a cancel already requested) with a one-line reason.
        """
        with self._tx() as db:
            row = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise LookupError(f"no job {job_id}")
            job = _job(row)
            if job.terminal:
                raise ValueError(f"job {job_id} is already {job.state}; there is nothing to cancel")
            if job.cancel_requested:
                raise ValueError(f"job {job_id} is already being cancelled")
            if job.state in (QUEUED, WAITING_FOR_DISK):
                db.execute("UPDATE jobs SET state = ?, finished = ?, cancel_requested = 1 WHERE id = ?",
                           (CANCELLED, time.time(), job_id))
                return replace(job, state=CANCELLED, cancel_requested=True)
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return replace(job, cancel_requested=True)

    def recover(self) -> list[str]:
        """At server start: running (and waiting-for-disk) jobs go back to the queue head (resume), or to
        cancelled if a cancel was asked; pending avatars stay pending. Returns the ids requeued."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ? AND cancel_requested = 0",
                                            (RUNNING,)).fetchall()]
            db.execute("UPDATE jobs SET state = ?, resume = 1 WHERE state = ? AND cancel_requested = 0",
                       (QUEUED, RUNNING))
            db.execute("UPDATE jobs SET state = ?, finished = ? WHERE state = ? AND cancel_requested = 1",
                       (CANCELLED, time.time(), RUNNING))
            # jobs that waited for disk: queued again (the start check holds them while space is short)
            ids += [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ?", (WAITING_FOR_DISK,)).fetchall()]
            db.execute("UPDATE jobs SET state = ?, resume = 1, error = NULL WHERE state = ?",
                       (QUEUED, WAITING_FOR_DISK))
        return ids

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest finished jobs beyond the newest `keep`; returns their ids."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq DESC LIMIT -1 OFFSET ?",
                (*TERMINAL, keep)).fetchall()]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        return ids

    def mean_clip_seconds(self, recent: int = 20) -> float | None:
        """Mean render seconds per clip over the latest finished jobs (None before the first)."""
        rows = self._read("SELECT render_s, clips_total FROM jobs WHERE state = ? AND render_s IS NOT NULL "
                          "ORDER BY seq DESC LIMIT ?", (DONE, recent))
        clips = sum(r[1] for r in rows)
        return sum(r[0] for r in rows) / clips if clips else None

    def know_blob(self, digest: str) -> None:
        """Record that the service put blob `digest` (before it is renamed into place)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO known_blobs VALUES (?)", (digest,))

    def known_blobs(self) -> set[str]:
        """The blobs this database put: the only ones clean-up may delete (an older or emptied
        database never makes the service delete blobs it does not know)."""
        return {r[0] for r in self._read("SELECT digest FROM known_blobs")}

    def forget_blobs(self, digests: set[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM known_blobs WHERE digest = ?", [(d,) for d in digests])

    def jobs_in(self, *states: str) -> set[str]:
        """The ids of every job in one of `states`."""
        marks = ", ".join("?" * len(states))
        return {r[0] for r in self._read(f"SELECT id FROM jobs WHERE state IN ({marks})", states)}

    def blob_refs(self) -> set[str]:
        rows = self._read("SELECT image, audio FROM jobs")
        refs = {d for r in rows for d in r}
        refs |= {r[0] for r in self._read("SELECT image FROM avatars")}
        return refs

    # ---- avatars ----------------------------------------------------------------------------------

    def add_avatar(self, avatar: AvatarRow) -> AvatarRow:
        """Insert (or return the existing avatar with the same id: the same photo, size and prompt)."""
        with self._tx() as db:
            row = db.execute(f"SELECT {', '.join(_AVATAR_COLUMNS)} FROM avatars WHERE id = ?", (avatar.id,)).fetchone()
            if row is not None:
                existing = AvatarRow(**{k: row[k] for k in _AVATAR_COLUMNS})
                if existing.state != FAILED:
                    return existing
                db.execute("DELETE FROM avatars WHERE id = ?", (avatar.id,))  # a failed one is tried again
            db.execute("INSERT OR IGNORE INTO known_blobs VALUES (?)", (avatar.image,))
            db.execute(f"INSERT INTO avatars ({', '.join(_AVATAR_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_AVATAR_COLUMNS))})", tuple(getattr(avatar, c) for c in _AVATAR_COLUMNS))
        return avatar

    def get_avatar(self, avatar_id: str) -> AvatarRow | None:
        rows = self._read(f"SELECT {', '.join(_AVATAR_COLUMNS)} FROM avatars WHERE id = ?", (avatar_id,))
        return AvatarRow(**{k: rows[0][k] for k in _AVATAR_COLUMNS}) if rows else None

    def next_pending_avatar(self) -> AvatarRow | None:
        rows = self._read(f"SELECT {', '.join(_AVATAR_COLUMNS)} FROM avatars WHERE state = ? ORDER BY created LIMIT 1",
                          (PENDING,))
        return AvatarRow(**{k: rows[0][k] for k in _AVATAR_COLUMNS}) if rows else None

    def finish_avatar(self, avatar_id: str, state: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE avatars SET state = ?, error = ? WHERE id = ?", (state, error, avatar_id))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
