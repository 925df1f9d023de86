"""A fake serial board on a pseudo-terminal, for tests and the simulator.

:class:`FakeBoard` plays the microcontroller end of a USB serial cable. The daemon
opens :attr:`FakeBoard.path` exactly as it would open ``/dev/serial/by-id/...``;
the fake prints readings with :meth:`FakeBoard.send_line`, records every command
line the daemon writes, and can answer commands through a ``responder``::

    with FakeBoard(tmp_path, responder=lambda cmd: "ok") as board:
        # config: [serial.bike] url = str(board.path)
        board.send_line("hr=72,power=180")
        assert board.next_line(timeout=2) == "resistance=40"

:meth:`FakeBoard.unplug` and :meth:`FakeBoard.replug` imitate pulling the cable and
plugging it back: the same symlink then points at a fresh pseudo-terminal, as udev
re-points ``/dev/serial/by-id`` links.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger("smartbiked.fakeboard")


class FakeBoard:
    """The board side of a pty pair, reachable through a stable symlink.

    ``directory``: where the symlink ``name`` is made (a test's tmp_path, or a
    run-time directory for the simulator).
    ``responder``: called on the reader thread with each command line received
    (without its line end); a returned string is sent back as one or more lines
    (``"ok 40"``, or ``"ok 40\\nok 40"`` for two), None sends nothing. It may be
    replaced at any time.

    Commands are recorded in :attr:`received`; :meth:`next_line` waits for them in
    order, with a deadline, on a condition variable (never by sleeping and hoping).
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "usb-Fake_Board-if00",
                 responder: Callable[[str], str | None] | None = None) -> None:
        self.path = Path(directory) / name
        self.responder = responder
        self._cond = threading.Condition()
        self._received: list[str] = []
        self._taken = 0
        self._write_lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop_w: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.replug()

    # -- cable

    @property
    def plugged(self) -> bool:
        """True between :meth:`replug` and :meth:`unplug`."""
        return self._master is not None

    def replug(self) -> None:
        """Plug in (again): a new pty, the symlink re-pointed at its slave end."""
        if self._closed:
            raise RuntimeError(f"fake board {self.path.name} is closed")
        if self.plugged:
            return
        master, slave = os.openpty()
        # Raw: no echo of commands back to the daemon, no \n -> \r\n translation,
        # no line buffering of what the fake prints before the daemon opens the port.
        tty.setraw(slave)
        # The fake keeps the slave open too: with no slave open at all, reading the
        # master fails with EIO and the reader thread could not tell that from unplug.
        self._master, self._slave = master, slave
        link = self.path.with_name(self.path.name + ".new")
        link.unlink(missing_ok=True)
        os.symlink(os.ttyname(slave), link)
        os.replace(link, self.path)  # atomic: the daemon never sees a missing link
        stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._read_loop, args=(master, stop_r),
                                        name=f"fakeboard-{self.path.name}", daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        """Pull the cable: the daemon's reads and writes fail, the symlink disappears."""
        if not self.plugged:
            return
        self.path.unlink(missing_ok=True)
        assert self._stop_w is not None and self._thread is not None
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_w)
        with self._write_lock:
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = self._stop_w = None
        self._thread = None

    def close(self) -> None:
        """Unplug for good; safe to call twice."""
        self.unplug()
        self._closed = True

    def __enter__(self) -> FakeBoard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what the board prints

    def send(self, data: bytes) -> None:
        """Print raw bytes (half a line, garbage, a binary burst)."""
        with self._write_lock:
            if self._master is None:
                raise RuntimeError(f"fake board {self.path.name} is unplugged")
            view = memoryview(data)
            while view:
                written = os.write(self._master, view)
                view = view[written:]

    def send_line(self, text: str, end: str = "\n") -> None:
        """Print ``text`` and a line end (Arduino's ``println`` would use ``"\\r\\n"``)."""
        self.send((text + end).encode("utf-8"))

    # -- what the board receives

    @property
    def received(self) -> list[str]:
        """A copy of every command line received so far, oldest first."""
        with self._cond:
            return list(self._received)

    def next_line(self, timeout: float = 2.0) -> str:
        """The next command line not yet returned; TimeoutError if none comes in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) > self._taken, timeout):
                raise TimeoutError(f"fake board {self.path.name}: no command within {timeout} s"
                                   f" (received so far: {self._received!r})")
            line = self._received[self._taken]
            self._taken += 1
            return line

    def wait_received(self, count: int, timeout: float = 2.0) -> list[str]:
        """Wait until ``count`` command lines have arrived in all; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= count, timeout):
                raise TimeoutError(f"fake board {self.path.name}: {len(self._received)} of "
                                   f"{count} commands within {timeout} s")
            return list(self._received)

    def _read_loop(self, master: int, stop_r: int) -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([master, stop_r], [], [])
                if stop_r in ready:
                    return
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return  # the pty is gone
                if not data:
                    return
                pending += data
                *lines, pending = pending.replace(b"\r\n", b"\n").split(b"\n")
                for raw in lines:
                    self._got(raw.rstrip(b"\r").decode("utf-8", "replace"))
        finally:
            os.close(stop_r)

    def _got(self, line: str) -> None:
        with self._cond:
            self._received.append(line)
            self._cond.notify_all()
        responder = self.responder
        if responder is None:
            return
        try:
            answer = responder(line)
            if answer is not None:
                self.send_line(answer)
        except Exception:
            # A broken responder must not kill the reader: the test then sees no answer.
            log.exception("fake board %s: responder failed on %r", self.path.name, line)

    def __repr__(self) -> str:
        return f"<FakeBoard {self.path} {'plugged' if self.plugged else 'unplugged'}>"


def wait_until(predicate: Callable[[], bool], step: Callable[[float], object],
               timeout: float = 2.0) -> None:
    """Call ``step(time_left)`` until ``predicate()`` holds; AssertionError after ``timeout``.

    ``step`` must block on an event (e.g. ``SerialBoard.wait_readable`` after a poll),
    so this never sleeps blindly.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"condition not met within {timeout} s")
        step(left)
