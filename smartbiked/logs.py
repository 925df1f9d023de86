"""Logging: to the journal with structured fields under systemd, to stderr otherwise.

Records may carry upper-case extra fields (``TOPIC``, ``DRIVER``); every record gets
``BIKE_ID``. journald keeps them as searchable fields::

    journalctl -u smartbiked TOPIC=fan
"""

from __future__ import annotations

import logging
import os
import sys
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

    return JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, sender_function=sender or send)


def setup(bike_id: str = "", level: int = logging.INFO, use_journal: bool | None = None,
          journal_sender: Callable[..., Any] | None = None) -> logging.Handler:
    """Route smartbiked's logs; returns the handler installed on the root logger.

    ``use_journal`` None decides by :func:`stderr_is_journal`; ``journal_sender``
    replaces journal.send (tests).
    """
    if use_journal is None:
        use_journal = stderr_is_journal()
    handler: logging.Handler | None = None
    if use_journal:
        try:
            handler = journal_handler(journal_sender)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; a terminal wants them.
        handler.setFormatter(_StderrFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_BikeField(bike_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paho logs through its own logger only when asked; keep third-party chatter down.
    logging.getLogger("gpiozero").setLevel(logging.WARNING)
    return handler


def set_bike_id(handler: logging.Handler, bike_id: str) -> None:
    """Change the BIKE_ID stamped on records (after a reload)."""
    for f in handler.filters:
        if isinstance(f, _BikeField):
            f.bike_id = bike_id
