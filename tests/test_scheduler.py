"""The scheduler keeps cadence on a monotonic clock: no drift, no bursts, no contagion."""

from __future__ import annotations

import pytest

from smartbiked.scheduler import Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_runs_on_a_fixed_grid_even_when_each_run_is_late():
    clock = Clock()
    sched = Scheduler(clock)
    times = []
    sched.every(0.5, lambda: times.append(clock.now), "tick")
    for _ in range(10):
        clock.now += 0.5 + 0.013  # always woken a little late
        sched.run_due()
        clock.now -= 0.013
    # Due times stay on start + k*0.5: lateness does not accumulate.
    assert sched.jobs[0].due == pytest.approx(1000.0 + 11 * 0.5)
    assert len(times) == 10


def test_a_long_stall_skips_missed_slots_instead_of_bursting():
    clock = Clock()
    sched = Scheduler(clock)
    runs = []
    job = sched.every(1.0, lambda: runs.append(clock.now), "tick")
    clock.now += 10.2
    sched.run_due()
    sched.run_due()
    assert len(runs) == 1 and job.skipped == 9
    assert job.due == pytest.approx(1011.0)


def test_returns_the_wait_until_the_next_job():
    clock = Clock()
    sched = Scheduler(clock)
    assert sched.run_due() == float("inf")
    sched.every(2.0, lambda: None, "slow")
    sched.every(0.3, lambda: None, "fast")
    assert sched.run_due() == pytest.approx(0.3)
    clock.now += 0.3
    assert sched.run_due() == pytest.approx(0.3)


def test_a_failing_job_never_stops_the_others(caplog):
    clock = Clock()
    sched = Scheduler(clock)
    ran = []

    def broken() -> None:
        raise OSError("sensor unplugged")

    sched.every(1.0, broken, "broken")
    sched.every(1.0, lambda: ran.append(1), "fine")
    for _ in range(3):
        clock.now += 1.0
        sched.run_due()
    assert ran == [1, 1, 1]
    assert "job broken failed" in caplog.text


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        Scheduler(Clock()).every(0, lambda: None, "x")


def test_a_timer_runs_once_when_due_and_can_be_cancelled():
    clock = Clock()
    sched = Scheduler(clock)
    ran = []
    sched.at(1002.0, lambda: ran.append("a"), "a")
    b = sched.at(1001.0, lambda: ran.append("b"), "b")
    assert sched.run_due() == pytest.approx(1.0)
    sched.cancel(b)
    sched.cancel(b)  # twice is fine
    clock.now = 1005.0
    sched.run_due()
    sched.run_due()
    assert ran == ["a"] and sched.jobs == []
    assert sched.run_due() == float("inf")  # an idle loop sleeps until something comes


def test_jobs_may_add_and_cancel_jobs_while_running():
    clock = Clock()
    sched = Scheduler(clock)
    ran = []
    tick = sched.every(1.0, lambda: ran.append("tick"), "tick")

    def rearm() -> None:
        ran.append("timer")
        sched.cancel(tick)
        sched.at(clock.now + 5, lambda: ran.append("later"), "later")

    sched.at(1001.0, rearm, "timer")
    clock.now = 1001.0
    sched.run_due()
    assert sorted(ran) == ["tick", "timer"]
    clock.now = 1010.0
    sched.run_due()
    assert sorted(ran) == ["later", "tick", "timer"]  # the cancelled tick never ran again
