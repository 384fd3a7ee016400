"""One log line per job state change, to the server's stderr (the journal under systemd).

    job 8b83211e... running seconds=0.4
    job 8b83211e... waiting_for_disk seconds=12.9 reason="the disk is full: [Errno 28] No space left on device"

`seconds` counts from the job's submission. Grep a job's id to read its whole life.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("liveavatar_lite.serve.jobs")


def job_state(job_id: str, state: str, created: float | None = None, reason: str | None = None) -> None:
    """Log that job `job_id` is now in `state` (`created`: its submission time, for `seconds`)."""
    seconds = f" seconds={time.time() - created:.1f}" if created is not None else ""
    why = f' reason="{" ".join(str(reason).split())[:300]}"' if reason else ""
    log.info("job %s %s%s%s", job_id, state, seconds, why)
