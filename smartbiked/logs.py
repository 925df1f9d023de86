"""Logging: to the journal with structured fields under systemd, to stderr otherwise.

Records may carry upper-case extra fields (``TOPIC``, ``DRIVER``); every record gets
``BIKE_ID``. journald keeps them as searchable fields::

    journalctl -u smartbiked TOPIC=fan
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

IDENTIFIER = "smartbiked"


class _BikeField(logging.Filter):
    """Adds BIKE_ID to every record, so each journal entry says which bike wrote it."""

    def __init__(self, bike_id: str) -> None:
        super().__init__()
        self.bike_id = bike_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.BIKE_ID = self.bike_id
        return True


class FloodGuard(logging.Filter):
    """Lets at most ``burst`` records of one kind through per ``window`` seconds.

    A kind is the logger, level and message template: 100,000 refusals are one kind, so
    they cannot bury a real problem or make journald suppress everything. What was held
    back is counted and said later, in the next record of that kind or by :meth:`flush`.
    """

    def __init__(self, burst: int = 5, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> [window start, records let through, records held back]
        self._kinds: dict[tuple[str, int, str], list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "flood_summary", False):
            return True  # flush()'s own summaries: at most one per kind per window
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is None or now - entry[0] >= self.window:
                held = entry[2] if entry else 0
                self._kinds[kind] = [now, 1, 0]
                if held:
                    record.msg = (f"{record.getMessage()} ({held} similar message(s) "
                                  f"suppressed before this one)")
                    record.args = None
                return True
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            return False

    def flush(self, final: bool = False) -> None:
        """Say how many records each kind held back in a window that has ended (all
        windows when ``final``: at exit, so a count is never lost)."""
        now = self.clock()
        summaries = []
        with self._lock:
            for kind, entry in list(self._kinds.items()):
                if final or now - entry[0] >= self.window:
                    del self._kinds[kind]
                    if entry[2]:
                        summaries.append((kind, entry[2]))
        for (name, level, template), held in summaries:
            logging.getLogger(name).log(
                level, "%d more message(s) like %.80r suppressed in %.0f s", held, template,
                self.window, extra={"flood_summary": True})


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        topic = getattr(record, "TOPIC", None)
        return f"{text} [{topic}]" if topic and f"{topic}:" not in text else text


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM to match)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_handler(sender: Callable[..., Any] | None = None) -> logging.Handler:
    """A JournalHandler tagged ``smartbiked``; ``sender`` replaces journal.send in tests."""
    from systemd.journal import JournalHandler, send

    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER,
                                              sender_function=sender or send)
    return handler


def setup(bike_id: str = "", level: int = logging.INFO, use_journal: bool | None = None,
          journal_sender: Callable[..., Any] | None = None) -> logging.Handler:
    """Route smartbiked's logs; returns the handler installed on the root logger.

    ``use_journal`` None decides by :func:`stderr_is_journal`; ``journal_sender``
    replaces journal.send (tests).
    """
    if use_journal is None:
        use_journal = stderr_is_journal()
    handler: logging.Handler | None = None
    missing_journal = False
    if use_journal:
        try:
            handler = journal_handler(journal_sender)
        except ImportError:
            # systemd-python is an extra: stderr still reaches the journal, as plain lines.
            missing_journal = True
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; a terminal wants them.
        handler.setFormatter(_StderrFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_BikeField(bike_id))
    handler.addFilter(FloodGuard())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paho logs through its own logger only when asked; keep third-party chatter down.
    logging.getLogger("gpiozero").setLevel(logging.WARNING)
    if missing_journal:
        logging.getLogger("smartbiked.logs").warning(
            "stderr is the journal, but the Python module systemd is missing: logging plain "
            "lines without journal fields (install python3-systemd, or smartbiked[systemd])")
    return handler


def flood_guard(handler: logging.Handler) -> FloodGuard | None:
    """The handler's flood guard, to flush its summaries periodically."""
    return next((f for f in handler.filters if isinstance(f, FloodGuard)), None)


def set_bike_id(handler: logging.Handler, bike_id: str) -> None:
    """Change the BIKE_ID stamped on records (after a reload)."""
    for f in handler.filters:
        if isinstance(f, _BikeField):
            f.bike_id = bike_id
