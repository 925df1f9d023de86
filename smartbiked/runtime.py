"""What the daemon keeps in its runtime directory: a lock per bike, and reload outcomes.

The directory is systemd's ``$RUNTIME_DIRECTORY`` (``RuntimeDirectory=smartbiked``),
else ``$XDG_RUNTIME_DIR/smartbiked``, else the temporary directory: the daemon and
``smartbiked --reload`` (systemd's ExecReload) find the same one.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

try:
    import fcntl

    _HAVE_FLOCK = True
except ImportError:  # Windows: no flock(); the lock is not taken there (virtual bikes only)
    _HAVE_FLOCK = False

#: How long ``--reload`` waits for the daemon to confirm, seconds.
RELOAD_TIMEOUT = 60.0


def directory() -> Path:
    """The runtime directory, created if it does not exist yet."""
    configured = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "smartbiked"
    else:
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        path = Path(tempfile.gettempdir()) / f"smartbiked-{user}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class AlreadyRunning(Exception):
    """Another daemon holds this bike's lock."""


class BikeLock:
    """One daemon per bike id on a machine: an flock() on ``<dir>/bike-<id>.lock``.

    Two daemons with one bike id take the broker session from each other forever; the
    second one refuses to start instead. The kernel drops the lock when the holder
    dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, bike_id: str) -> None:
        self.path = directory() / f"bike-{bike_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AlreadyRunning` naming the holder."""
        if not _HAVE_FLOCK:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another smartbiked (pid {holder}) already runs this bike "
                                 f"(lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (also done by the kernel at exit)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReloadState:
    """The daemon's side: each finished reload is written as ``<count> ok|refused <why>``."""

    def __init__(self, pid: int | None = None) -> None:
        self.path = state_path(os.getpid() if pid is None else pid)
        self.count = 0
        self.path.unlink(missing_ok=True)

    def done(self, ok: bool, why: str) -> None:
        """Record one reload's outcome (atomically: a reader never sees half a line)."""
        self.count += 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.count} {'ok' if ok else 'refused'} {why}\n")
        tmp.replace(self.path)

    def remove(self) -> None:
        """Forget the file (at exit)."""
        self.path.unlink(missing_ok=True)


def state_path(pid: int) -> Path:
    """Where the daemon with ``pid`` writes its reload outcomes."""
    return directory() / f"reload-{pid}"


def _read(path: Path) -> tuple[int, bool, str]:
    try:
        count, verdict, why = path.read_text().rstrip("\n").split(" ", 2)
        return int(count), verdict == "ok", why
    except (OSError, ValueError):
        return 0, False, ""


def request_reload(pid: int, timeout: float = RELOAD_TIMEOUT) -> tuple[bool, str]:
    """Send SIGHUP to the daemon ``pid`` and wait for its verdict: (applied, why)."""
    path = state_path(pid)
    before, _, _ = _read(path)
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None:
        return False, "reloading needs SIGHUP, which this system does not have"
    try:
        os.kill(pid, hangup)
    except ProcessLookupError:
        return False, f"no process {pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count, ok, why = _read(path)
        if count > before:
            return ok, why
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, f"the daemon (pid {pid}) exited during the reload"
        time.sleep(0.05)  # polls a file: no inotify in the standard library
    return False, f"no answer from the daemon (pid {pid}) within {timeout:g} s"
