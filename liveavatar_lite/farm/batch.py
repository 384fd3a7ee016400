"""`farm run`: a batch of jobs over the Ray actors, safe to run again.

The loop is serve's dispatcher in miniature, with a list instead of the durable queue (the files on
shared storage are the durable state): submit while an actor is free; on `Finished` write the
job's marker (claimed at submit); on `Lost` (its actor died) put the job back at the head, so the next free actor
resumes it from its checkpoint; a job whose actor died `max_deaths` times is failed, not retried
forever. Interrupted (Ctrl-C, the driver killed), a batch continues where it stopped when run
again: finished jobs are skipped (their markers), unfinished ones resume from their checkpoints.

    summary = run_batch(plan, executor, checkpoint_interval_s=600)
    print(summary.line())   # "6 jobs: 6 rendered (1 resumed), 0 skipped, 0 failed in 93.1 s; 3.87 jobs/min"
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..serve.tasks import (
    Cancelled,
    ClipDone,
    Failed,
    Finished,
    Lost,
    NoSpace,
    RenderTask,
    WorkerFailed,
)
from .jobs import BatchPlan, FarmJob, drop_claim, write_marker

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What happened to one job in this run."""

    job: FarmJob
    state: str = "queued"  # queued | running | done | failed | skipped
    error: str | None = None
    resumed_clips: int = 0
    deaths: int = 0
    seconds: float = 0.0
    actors: list[str] = field(default_factory=list)  # where it ran, in order


@dataclass
class BatchSummary:
    outcomes: list[JobOutcome]
    seconds: float

    def count(self, state: str) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    @property
    def jobs_per_minute(self) -> float:
        rendered = self.count("done")
        return rendered / self.seconds * 60 if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = sum(1 for o in self.outcomes if o.state == "done" and o.resumed_clips)
        return (f"{len(self.outcomes)} jobs: {self.count('done')} rendered ({resumed} resumed), "
                f"{self.count('skipped')} skipped, {self.count('failed')} failed in {self.seconds:.1f} s; "
                f"{self.jobs_per_minute:.2f} jobs/min")


def task_for(job: FarmJob, checkpoint_interval_s: float) -> RenderTask:
    """The render task of a job: its id is its line number (unique in the file), resumable."""
    return RenderTask(id=f"line-{job.line}", image=str(job.image), audio=str(job.audio), prompt=job.prompt,
                      size=job.size, seed=job.seed, num_clip=job.num_clip, out=str(job.out), live=None,
                      telemetry=None, checkpoint_interval_s=checkpoint_interval_s, resume=True)


def run_batch(plan: BatchPlan, executor: Any, checkpoint_interval_s: float = 600.0, max_deaths: int = 2,
              report: TextIO | None = None) -> BatchSummary:
    """Render `plan.todo` on `executor` (started and stopped here); one line per finished job on `report`
    (default: the stderr of the moment of the call, not of the import)."""
    report = sys.stderr if report is None else report
    t0 = time.perf_counter()
    outcomes = {f"line-{j.line}": JobOutcome(j) for j in plan.todo}
    skipped = [JobOutcome(j, "skipped") for j in plan.done]
    pending = deque(task_for(j, checkpoint_interval_s) for j in plan.todo)
    tasks = {t.id: t for t in pending}
    running: set[str] = set()
    total = len(plan.todo)
    if not pending:
        return BatchSummary(skipped, time.perf_counter() - t0)
    executor.start()
    try:
        while pending or running:
            for event in executor.events(timeout=0.5):
                if isinstance(event, WorkerFailed) and not any(w["ready"] for w in executor.status()["workers"]):
                    from ..errors import UserError

                    raise UserError(f"the actors cannot load the pipeline: {event.message}")
                outcome = outcomes.get(getattr(event, "task_id", ""))
                if outcome is None:
                    continue
                if isinstance(event, ClipDone):
                    log.info("line %d: clip %d/%d done", outcome.job.line, event.clips_done, outcome.job.clips)
                elif isinstance(event, Finished):
                    running.discard(event.task_id)
                    write_marker(outcome.job, plan.keys[outcome.job.line], event.frames)
                    outcome.state, outcome.seconds = "done", event.seconds
                    outcome.resumed_clips = max(outcome.resumed_clips, event.resumed_clips)
                    _report(report, outcomes, total, outcome, f"done in {event.seconds:.1f} s" + (
                        f", resumed after {outcome.resumed_clips} clip(s)" if outcome.resumed_clips else ""))
                elif isinstance(event, Failed | Cancelled | NoSpace):  # a full disk: its checkpoint stays
                    running.discard(event.task_id)
                    outcome.state = "failed"
                    outcome.error = event.message if isinstance(event, Failed | NoSpace) else "cancelled"
                    drop_claim(outcome.job)
                    _report(report, outcomes, total, outcome, f"FAILED: {outcome.error}")
                elif isinstance(event, Lost):
                    running.discard(event.task_id)
                    outcome.deaths += 1
                    if outcome.deaths >= max_deaths:
                        outcome.state = "failed"
                        outcome.error = f"{event.reason} (its actor died {outcome.deaths} times; not retried again)"
                        drop_claim(outcome.job)  # its checkpoint stays: a later run resumes it
                        _report(report, outcomes, total, outcome, f"FAILED: {outcome.error}")
                    else:
                        log.warning("line %d: %s; it resumes on the next free actor", outcome.job.line, event.reason)
                        pending.appendleft(tasks[event.task_id])
            while pending and executor.free_slots() > 0:
                task = pending.popleft()
                job = outcomes[task.id].job
                write_marker(job, plan.keys[job.line])  # the claim: this out is ours from now on
                executor.submit(task)
                running.add(task.id)
                outcomes[task.id].state = "running"
                outcomes[task.id].actors = list(executor.placements.get(task.id, []))
    finally:
        executor.stop()
    return BatchSummary(skipped + list(outcomes.values()), time.perf_counter() - t0)


def _report(stream: TextIO, outcomes: dict[str, JobOutcome], total: int, outcome: JobOutcome, text: str) -> None:
    ended = sum(1 for o in outcomes.values() if o.state in ("done", "failed"))
    print(f"[{ended}/{total}] line {outcome.job.line} {outcome.job.out}: {text}", file=stream, flush=True)
