"""Periodic work on ``time.monotonic()``: jobs keep their cadence and never drift.

A job due every 0.5 s started at t runs at t+0.5, t+1.0, ... however long each
run takes; a run that falls more than a whole period behind skips the missed
slots instead of bursting to catch up. The caller's loop sleeps on its own inbox
for :meth:`Scheduler.run_due`'s answer, so a command or event wakes it early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("smartbiked.scheduler")


@dataclass
class Job:
    """One periodic call; ``due`` is the monotonic time of its next run."""

    name: str
    interval: float
    action: Callable[[], None]
    due: float
    runs: int = 0
    skipped: int = 0


class Scheduler:
    """Runs jobs when they fall due; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.jobs: list[Job] = []

    def every(self, interval: float, action: Callable[[], None], name: str) -> Job:
        """Call ``action`` every ``interval`` seconds, first one interval from now."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        job = Job(name, interval, action, self.clock() + interval)
        self.jobs.append(job)
        return job

    def clear(self) -> None:
        """Forget every job."""
        self.jobs.clear()

    def run_due(self) -> float:
        """Run every job that is due; return the seconds until the next one (inf if none).

        An exception from one job is logged and never stops the others.
        """
        now = self.clock()
        for job in self.jobs:
            if job.due > now:
                continue
            try:
                job.action()
            except Exception:
                log.exception("job %s failed", job.name, extra={"JOB": job.name})
            job.runs += 1
            # Advance on the grid, not from now: that is what keeps the cadence drift-free.
            behind = int((now - job.due) // job.interval)
            job.skipped += behind
            job.due += (behind + 1) * job.interval
        if not self.jobs:
            return float("inf")
        return max(0.0, min(job.due for job in self.jobs) - self.clock())
