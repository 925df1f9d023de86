"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING and STOPPING messages.

Without ``NOTIFY_SOCKET`` (run by hand) every call is a quiet no-op. systemd-python
(apt's python3-systemd on a Pi) sends them when it is there; without it (a laptop
that installed the project without the ``systemd`` extra) the same datagram is sent
over the socket directly, so a unit with ``Type=notify`` still sees READY=1.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from typing import Any

_daemon: Any
try:
    _daemon = importlib.import_module("systemd.daemon")
except ImportError:  # not on Linux, or systemd-python missing: the socket directly
    _daemon = None

log = logging.getLogger("smartbiked.notify")


def _send(message: str, address: str) -> bool:
    """sd_notify by hand: one datagram to the AF_UNIX socket (``@``: abstract namespace)."""
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        return False  # Windows: there is no systemd to tell
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(target)
        sock.sendall(message.encode("utf-8"))
    return True


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False when there is nobody to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    try:
        if _daemon is None:
            return _send("\n".join(lines), address)
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
