"""Prometheus metrics of the service (prometheus_client), on a registry of its own.

    liveavatar_queue_depth                         jobs waiting (gauge, read from the store on scrape)
    liveavatar_jobs_total{state}                   finished jobs by final state
    liveavatar_failures_total{kind}                failures by kind: bad_input, out_of_memory, internal,
                                                   worker_died, memory_ceiling (retried ones included)
    liveavatar_job_seconds                         render time of done jobs (histogram)
    liveavatar_job_latency_seconds                 submit -> done (histogram)
    liveavatar_clip_seconds                        per clip (histogram)
    liveavatar_time_to_first_frame_seconds         task start -> first decoded frame (histogram)
    liveavatar_worker_ready                        1 when the Pipeline is loaded
    liveavatar_worker_restarts_total{reason}       by reason (gauge mirrored from the supervisor)
    liveavatar_host_memory_bytes{process}          RSS of the server and the worker
    liveavatar_device_memory_bytes                 accelerator memory the worker's torch holds
    liveavatar_state_free_bytes                    free disk under the state dir (measured each second)
    liveavatar_session_block_latency_seconds       talk sessions: a block's last speech sample in -> its
                                                   fragment sent to the client (histogram)
    liveavatar_sessions_total{outcome}             ended talk sessions by outcome (sessions.OUTCOMES)
    liveavatar_sessions_active                     talk sessions waiting for the worker or open (0 or 1)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .store import TERMINAL, JobRow
from .supervisor import rss_bytes
from .tasks import Memory, WorkerFailed, WorkerReady

_BLOCK_SECONDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)  # real time: a block is 0.48 s
_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
# The labels every scrape shows from the start (at 0), so a dashboard or a rate() sees a series
# before its first event: failure kinds (tasks.Failed, tasks.Lost) and worker restart reasons.
FAILURE_KINDS = ("bad_input", "out_of_memory", "internal", "worker_died", "memory_ceiling", "stalled")
RESTART_REASONS = ("worker_died", "memory_ceiling", "recycle", "stalled")


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], executor_status: Callable[[], dict[str, Any]]) -> None:
        r = self.registry = CollectorRegistry()
        self._status = executor_status
        Gauge("liveavatar_queue_depth", "jobs waiting in the queue", registry=r).set_function(queue_depth)
        self.jobs = Counter("liveavatar_jobs", "finished jobs by final state", ["state"], registry=r)
        self.failures = Counter("liveavatar_failures", "failures by kind", ["kind"], registry=r)
        self.job_seconds = Histogram("liveavatar_job_seconds", "render seconds of a done job", buckets=_SECONDS,
                                     registry=r)
        self.latency = Histogram("liveavatar_job_latency_seconds", "submit to done", buckets=_SECONDS, registry=r)
        self.clip_seconds = Histogram("liveavatar_clip_seconds", "seconds per clip", buckets=_SECONDS, registry=r)
        self.ttff = Histogram("liveavatar_time_to_first_frame_seconds", "task start to first decoded frame",
                              buckets=_SECONDS, registry=r)
        ready = Gauge("liveavatar_worker_ready", "1 when the worker's Pipeline is loaded", registry=r)
        ready.set_function(lambda: 1.0 if self._status().get("ready") else 0.0)
        self.restarts = Gauge("liveavatar_worker_restarts", "worker restarts by reason", ["reason"], registry=r)
        self.host_memory = Gauge("liveavatar_host_memory_bytes", "resident memory", ["process"], registry=r)
        self.device_memory = Gauge("liveavatar_device_memory_bytes", "accelerator memory held by the worker",
                                   registry=r)
        self.free_bytes = Gauge("liveavatar_state_free_bytes", "free disk under the state dir", registry=r)
        self.block_latency = Histogram("liveavatar_session_block_latency_seconds",
                                       "talk session: last speech sample of a block in -> its fragment out",
                                       buckets=_BLOCK_SECONDS, registry=r)
        self.sessions = Counter("liveavatar_sessions", "ended talk sessions by outcome", ["outcome"], registry=r)
        self.sessions_active = Gauge("liveavatar_sessions_active", "talk sessions waiting or open", registry=r)
        from .sessions import OUTCOMES

        for outcome in OUTCOMES:
            self.sessions.labels(outcome=outcome)
        for state in TERMINAL:
            self.jobs.labels(state=state)
        for kind in FAILURE_KINDS:
            self.failures.labels(kind=kind)
        for reason in RESTART_REASONS:
            self.restarts.labels(reason=reason).set(0)

    # ---- updates from the dispatcher --------------------------------------------------------------

    def first_frame(self, seconds: float) -> None:
        self.ttff.observe(seconds)

    def clip_done(self, seconds: float) -> None:
        if seconds > 0:
            self.clip_seconds.observe(seconds)

    def failure(self, kind: str) -> None:
        self.failures.labels(kind=kind).inc()

    def job_ended(self, job: JobRow, kind: str | None) -> None:
        self.jobs.labels(state=job.state).inc()
        if kind is not None:
            self.failure(kind)
        if job.state == "done":
            if job.render_s is not None:
                self.job_seconds.observe(job.render_s)
            if job.finished is not None:
                self.latency.observe(job.finished - job.created)

    def session_block(self, latency_s: float) -> None:
        self.block_latency.observe(latency_s)

    def session_ended(self, reason: str | None) -> None:
        from .sessions import OUTCOMES

        outcome = (reason or "closed").split(":")[0]
        self.sessions.labels(outcome=outcome if outcome in OUTCOMES else "error").inc()

    def worker_event(self, event: WorkerReady | WorkerFailed | Memory) -> None:
        if isinstance(event, Memory) and event.device_bytes is not None:
            self.device_memory.set(event.device_bytes)

    # ---- a scrape ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        status = self._status()
        for reason, n in status.get("restarts", {}).items():
            self.restarts.labels(reason=reason).set(n)
        server = rss_bytes(os.getpid())
        if server is not None:
            self.host_memory.labels(process="server").set(server)
        if status.get("rss_bytes") is not None:
            self.host_memory.labels(process="worker").set(status["rss_bytes"])
        return generate_latest(self.registry)

