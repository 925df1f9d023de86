"""The log flood guard: a burst becomes a few lines and a count, and no count is lost."""

from __future__ import annotations

import logging

import pytest

from smartbiked.logs import FloodGuard


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def guarded():
    clock = Clock()
    guard = FloodGuard(burst=5, window=10.0, clock=clock)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(guard)
    logger = logging.getLogger("smartbiked.test-flood")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, guard, clock, records
    logger.removeHandler(handler)
    logger.propagate = True


def test_a_burst_is_cut_to_the_allowance_and_counted_in_the_next_window(guarded):
    logger, guard, clock, records = guarded
    for i in range(100):
        logger.warning("fan: command refused: %s", i)
    logger.warning("something else entirely")  # another kind is not held back
    assert len(records) == 6
    clock.now += 10
    logger.warning("fan: command refused: %s", "late")
    assert records[-1].getMessage() == ("fan: command refused: late "
                                        "(95 similar message(s) suppressed before this one)")


def test_flush_says_what_was_held_back_once_the_window_ends(guarded):
    logger, guard, clock, records = guarded
    for i in range(12):
        logger.warning("bad line %s", i)
    guard.flush()
    assert len(records) == 5  # the window is still open: nothing to say yet
    clock.now += 10
    guard.flush()
    assert "7 more message(s) like 'bad line %s'" in records[-1].getMessage()


def test_a_final_flush_loses_no_count(guarded):
    logger, guard, clock, records = guarded
    for i in range(8):
        logger.warning("bad line %s", i)
    guard.flush(final=True)
    assert "3 more message(s)" in records[-1].getMessage()
