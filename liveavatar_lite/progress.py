"""Progress for the phases of a run that take seconds: one line when a phase starts, one when it ends.

Long phases without a natural count (loading the DiT, encoding a photo, warming the decoder up)
get a start line and a "done in N s" line on our logger, so a user watching a terminal or a log
file sees what the silence is; countable work (clips, blocks, units) uses tqdm bars instead.

    with phase("loading the DiT", enabled=options.progress):
        runtime = DiTRuntime.from_artifact(...)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("liveavatar_lite.progress")


@contextmanager
def phase(what: str, enabled: bool = True) -> Iterator[None]:
    """Log `what...` now and `what: done in N s` when the block ends (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - t0)
