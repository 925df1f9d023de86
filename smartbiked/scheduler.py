"""Heartbeats and timeouts on ``time.monotonic()``: periodic jobs that never drift, and timers.

The bike uses it only for what is about time (a sensor's heartbeat report, a reading
going stale, a command held back by ``min_interval``), never to poll a port: readings
and commands arrive as events.

A job due every 0.5 s started at t runs at t+0.5, t+1.0, ... however long each
run takes; a run that falls more than a whole period behind skips the missed
slots instead of bursting to catch up. A timer (:meth:`Scheduler.at`) runs once;
moving its ``due`` reschedules it. The caller's loop sleeps on its own inbox for
:meth:`Scheduler.run_due`'s answer, so a command or event wakes it early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("smartbiked.scheduler")


@dataclass(eq=False)
class Job:
    """One scheduled call; ``due`` is the monotonic time of its next run.

    ``interval`` is None for a timer that runs once.
    """

    name: str
    interval: float | None
    action: Callable[[], None]
    due: float
    runs: int = 0
    skipped: int = 0
    cancelled: bool = False


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

    def at(self, due: float, action: Callable[[], None], name: str) -> Job:
        """Call ``action`` once, at monotonic time ``due`` (at once if that has passed)."""
        job = Job(name, None, action, due)
        self.jobs.append(job)
        return job

    def cancel(self, job: Job | None) -> None:
        """Forget ``job`` (None, or one already run or cancelled, is fine)."""
        if job is not None and not job.cancelled:
            job.cancelled = True
            self.jobs.remove(job)

    def clear(self) -> None:
        """Forget every job."""
        for job in self.jobs:
            job.cancelled = True
        self.jobs.clear()

    def run_due(self) -> float:
        """Run every job that is due; return the seconds until the next one (inf if none).

        An exception from one job is logged and never stops the others. A job may add
        or cancel jobs while it runs.
        """
        now = self.clock()
        for job in list(self.jobs):
            if job.cancelled or job.due > now:
                continue
            if job.interval is None:
                self.cancel(job)  # a timer: done once it runs, even if it fails
            try:
                job.action()
            except Exception:
                log.exception("job %s failed", job.name, extra={"JOB": job.name})
            job.runs += 1
            if job.interval is not None and not job.cancelled:
                # Advance on the grid, not from now: that keeps the cadence drift-free.
                behind = int((now - job.due) // job.interval)
                job.skipped += behind
                job.due += (behind + 1) * job.interval
        if not self.jobs:
            return float("inf")
        return max(0.0, min(job.due for job in self.jobs) - self.clock())
