"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING and STOPPING messages.

Without ``NOTIFY_SOCKET`` (run by hand) every call is a quiet no-op.
"""

from __future__ import annotations

import logging
import os

try:
    from systemd import daemon as _daemon
except ImportError:  # not on Linux, or systemd-python missing: no notifications
    _daemon = None

log = logging.getLogger("smartbiked.notify")


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False when there is nobody to tell."""
    if _daemon is None or not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        return bool(_daemon.notify("\n".join(lines)))
    except OSError as exc:  # NOTIFY_SOCKET set but pointing nowhere
        log.debug("sd_notify failed: %s", exc)
        return False


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's WatchdogSec), or None if unset."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
